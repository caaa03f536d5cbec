"""Where the two frameworks part: the first module whose output differs while its input agrees.

The Keras model mirrors the torch module tree (docs/ARCHITECTURE.md, the
mirror rule), so every torch module name resolves to a Keras sublayer: a name
is ``getattr``, a number is ``.layers[i]`` of a ``keras.Sequential``
(:func:`keras_path_of`). The trace

1. runs the torch model once with forward hooks on every named module, which
   records each call's input and output in execution order (a module's call
   completes after its children's);
2. runs the Keras model once with every mirrored sublayer's ``call`` wrapped
   (restored afterwards; eager, any backend), which gives each module's input
   and output as the whole Keras model computes them ("end to end");
3. runs mirrored Keras sublayers again on the *torch* module's input, in
   Keras layout, and compares their outputs with torch's ("local"): first the
   whole model, then, inside a module that differs, its sub-modules in
   order. Both sides start from the same numbers, so a module whose local
   output differs while every module inside it agrees is where the port
   differs: a weight mapped wrongly, another epsilon, a missing ReLU, other
   math. Where all agree, this costs one more forward.

:func:`training_divergences` does the same for BatchNorm in training mode:
each Keras BatchNorm, from the same state, normalises the torch BatchNorm's
input with batch statistics and updates its moving statistics; the first
whose updated statistics (or output) differ is reported (momentum, the
unbiased running-variance update, ``num_batches_tracked``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import keras
import numpy as np
import torch

from parity_tests.harness import exact_numerics
from weights_convert.mapping import resolve_keras
from weights_convert.tolerances import compare, tolerance

__all__ = ["Call", "keras_path_of", "torch_calls", "capture_keras", "forward_divergences", "training_divergences"]

STATS = (("running_mean", "moving_mean"), ("running_var", "moving_variance"),
         ("num_batches_tracked", "num_batches_tracked"))


@dataclass(eq=False)
class Call:
    """One call of a torch module: its name, which call of it this is, its input and outputs (NCHW NumPy arrays:
    float64 stays float64, other floats are held as float32)."""

    name: str
    index: int
    cls: str
    inputs: np.ndarray
    parent: Optional["Call"] = None
    outputs: tuple = ()


def keras_path_of(name: str) -> str:
    """The Keras sublayer path of a torch module name: ``"head.conv5a.0"`` -> ``"head.conv5a.layers[0]"``."""
    return "".join(f".layers[{p}]" if p.isdigit() else f".{p}" for p in name.split(".")).lstrip(".") if name else ""


def _np(t) -> np.ndarray:
    t = t.detach().to("cpu")
    return t.numpy() if t.dtype == torch.float64 else t.to(torch.float32).numpy()


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def torch_calls(model, x: np.ndarray, dtype: str = "float32", device: str = "cpu", only=None) -> list:
    """Every module call of ``model(x)`` in completion order (a child before its parent), as :class:`Call`.

    ``only`` (a module class) restricts the hooks to modules of that class.
    The model runs in whatever mode it is in; half dtypes under autocast.
    """
    calls, stack, counts, handles = [], [], {}, []

    def pre(name):
        def hook(module, args):
            call = Call(name, counts.get(name, 0), type(module).__name__, _np(args[0]),
                        parent=stack[-1] if stack else None)
            counts[name] = call.index + 1
            stack.append(call)
        return hook

    def post(module, args, out):
        call = stack.pop()
        call.outputs = tuple(_np(o) for o in _as_tuple(out))
        calls.append(call)

    for name, module in model.named_modules():
        if only is None or isinstance(module, only):
            handles += [module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post)]
    half = dtype in ("float16", "bfloat16")
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    try:
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype), enabled=half):
            model(torch.from_numpy(x).to(device, tdtype))
    finally:
        for h in handles:
            h.remove()
    return calls


def _to_keras(a: np.ndarray, channels_last: bool) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if channels_last and a.ndim == 4 else a


def _from_keras(t, channels_last: bool) -> np.ndarray:
    a = np.asarray(keras.ops.convert_to_numpy(t))
    a = a if a.dtype == np.float64 else a.astype(np.float32)
    return np.moveaxis(a, -1, 1) if channels_last and a.ndim == 4 else a


def _layers(keras_model, names) -> dict:
    """``{torch name: Keras sublayer}`` for the names that resolve (the mirror rule)."""
    out = {}
    for name in names:
        try:
            out[name] = keras_model if not name else resolve_keras(keras_model, keras_path_of(name))
        except AttributeError:
            continue
    return out


@contextlib.contextmanager
def capture_keras(layers: dict, channels_last: bool = True):
    """Wrap each layer's ``call`` (``{name: layer}``); yields ``{(name, call index): (input, outputs)}``.

    The wrappers are instance attributes, removed (or the previous instance
    attribute restored) on exit, so the model is left as it was.
    """
    seen, counts, saved = {}, {}, []

    def wrap(name, original):
        def call(*args, **kwargs):
            out = original(*args, **kwargs)
            i = counts.get(name, 0)
            counts[name] = i + 1
            seen[(name, i)] = (_from_keras(args[0], channels_last),
                               tuple(_from_keras(o, channels_last) for o in _as_tuple(out)))
            return out
        return call

    try:
        for name, layer in layers.items():
            saved.append((layer, layer.__dict__.get("call")))
            object.__setattr__(layer, "call", wrap(name, layer.call))
        yield seen
    finally:
        for layer, previous in reversed(saved):
            if previous is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", previous)


def _compare_all(name, actual, expected, tol):
    """The worst of the per-output comparisons (by headroom), or ``None`` if the shapes or counts differ."""
    if len(actual) != len(expected) or any(a.shape != e.shape for a, e in zip(actual, expected)):
        return None
    results = [compare(name, a, e, tol) for a, e in zip(actual, expected)]
    return max(results, key=lambda c: c.headroom)


def _numbers(c) -> dict:
    return {"max_abs": c.max_abs, "error": c.normwise, "headroom": c.headroom}


def _entry(call, mode, dtype, tol, local, end_to_end_input=None, what="output"):
    entry = {"module": call.name, "class": call.cls, "keras_path": keras_path_of(call.name), "call": call.index,
             "mode": mode, "dtype": dtype, "what": what, **_numbers(local),
             "tolerance": {"atol": tol.atol, "rtol": tol.rtol, "relative_to": tol.relative_to},
             "input_error": None, "input_headroom": None}
    if end_to_end_input is not None:
        entry["input_error"], entry["input_headroom"] = end_to_end_input.normwise, end_to_end_input.headroom
    return entry


def _children(calls) -> dict:
    """``{id(call): [its direct child calls, in order]}``, and the root calls under ``None``."""
    kids = {None: []}
    for call in calls:  # completion order; siblings complete in the order they ran
        kids.setdefault(id(call.parent) if call.parent is not None else None, []).append(call)
    return kids


def forward_divergences(torch_model, keras_model, x: np.ndarray, dtype: str, scope: str, device: str = "cpu",
                        channels_last: bool = True, limit: int = 5) -> tuple:
    """``(divergences, note)``: modules whose local output differs while every module inside them agrees.

    Both models in eval mode on the NCHW input ``x``. The search goes down
    from the model: a module that differs on torch's input is opened, and
    its sub-modules run, in order, on their own torch inputs; the deepest
    modules that differ while all of theirs agree are reported, in
    execution order (the first is the first divergence), at most ``limit``.
    Each entry: ``module`` (torch name, ``""`` for the model itself),
    ``class``, ``keras_path``, ``call`` (which call of a module used more
    than once), ``error`` (normwise relative, local), ``headroom``,
    ``max_abs``, ``input_error``/``input_headroom`` (its input in the whole
    Keras run against torch's), ``tolerance``, ``what``. ``note`` names
    torch modules without a Keras mirror. Runs under
    :func:`parity_tests.harness.exact_numerics` (no TF32; float64 on JAX).
    """
    with exact_numerics():
        return _forward_divergences(torch_model, keras_model, x, dtype, scope, device, channels_last, limit)


def _forward_divergences(torch_model, keras_model, x, dtype, scope, device, channels_last, limit):
    tol = tolerance(dtype, scope)
    torch_model.eval()
    calls = torch_calls(torch_model, x, dtype, device)
    layers = _layers(keras_model, {c.name for c in calls})
    kids = _children(calls)
    keras_dtype = "float64" if dtype == "float64" else "float32"
    with capture_keras(layers, channels_last) as seen:
        keras_model(_to_keras(x, channels_last).astype(keras_dtype), training=False)
    found = []

    def local(call):
        out = layers[call.name](_to_keras(call.inputs, channels_last).astype(keras_dtype), training=False)
        result = _compare_all(call.name, [_from_keras(o, channels_last) for o in _as_tuple(out)], call.outputs, tol)
        return result if result is not None else compare(f"{call.name} (output shapes or count differ)", [np.inf],
                                                         [0.0], tol)

    def mirrored(children):  # a module without a Keras mirror is looked through, to its own children
        for child in children:
            if child.name in layers:
                yield child
            else:
                yield from mirrored(kids.get(id(child), []))

    def search(call, result) -> None:
        """``call`` differs: find, in order, which of its sub-modules differ; it is reported if none does."""
        inner = False
        for child in mirrored(kids.get(id(call), [])):
            if len(found) >= limit:
                return
            child_result = local(child)
            if not child_result.passed:
                inner = True
                search(child, child_result)
        if not inner and len(found) < limit:
            e2e = seen.get((call.name, call.index))
            e2e_input = compare(call.name, e2e[0], call.inputs, tol) if e2e and e2e[0].shape == call.inputs.shape \
                else None
            what = "output shape or count" if result.name.endswith("(output shapes or count differ)") else "output"
            found.append(_entry(call, "forward", dtype, tol, result, e2e_input, what))

    for root in mirrored(kids[None]):
        result = local(root)
        if not result.passed:
            search(root, result)
    unresolved = sorted({c.name for c in calls} - set(layers))
    return found, (f"no Keras mirror for {unresolved}" if unresolved else "")


def training_divergences(torch_model, keras_model, x: np.ndarray, dtype: str, scope: str, device: str = "cpu",
                         channels_last: bool = True, limit: int = 5) -> tuple:
    """``(divergences, note)`` for one training step: BatchNorm by BatchNorm, from the same state and input.

    Both models must be fresh (their statistics not yet updated). Each torch
    BatchNorm's input, in Keras layout, goes through the mirrored Keras
    BatchNorm with ``training=True``; its output and its updated
    ``moving_mean``, ``moving_variance`` and ``num_batches_tracked`` are
    compared with torch's. Entries as :func:`forward_divergences`, with
    ``what`` naming the statistics that differ.
    """
    with exact_numerics():
        return _training_divergences(torch_model, keras_model, x, dtype, scope, device, channels_last, limit)


def _training_divergences(torch_model, keras_model, x, dtype, scope, device, channels_last, limit):
    tol, stat_tol = tolerance(dtype, scope), tolerance(dtype, "layer")
    torch_model.train()
    try:
        calls = torch_calls(torch_model, x, dtype, device, only=torch.nn.BatchNorm2d)
    finally:
        torch_model.eval()
    modules = dict(torch_model.named_modules())
    layers = _layers(keras_model, {c.name for c in calls})
    found = []
    for call in calls:
        if call.name not in layers or call.index > 0:
            continue
        layer = layers[call.name]
        local = layer(_to_keras(call.inputs, channels_last).astype("float64" if dtype == "float64" else "float32"),
                      training=True)
        differ, worst = [], compare(call.name, _from_keras(local, channels_last), call.outputs[0], tol)
        if not worst.passed:
            differ.append("output")
        for t_name, k_name in STATS:
            k_var = getattr(layer, k_name, None)
            if k_var is None:
                continue
            c = compare(f"{call.name}.{t_name}", keras.ops.convert_to_numpy(k_var), _np(getattr(modules[call.name],
                        t_name)), stat_tol)
            if not c.passed:
                differ.append(t_name)
                worst = c if c.headroom > worst.headroom or worst.passed else worst
        if differ:
            found.append(_entry(call, "training", dtype, stat_tol if worst.tol is stat_tol else tol, worst,
                                what=", ".join(differ)))
            if len(found) >= limit:
                break
    return found, ""
