"""Build a PyTorch/Keras pair, convert, run both on the same input, compare: rows of numbers.

The harness only *uses* the conversion path (``weights_convert``): it has no
name map of its own. Inputs are NCHW for torch and the same array transposed
to NHWC for Keras; Keras outputs are transposed back before comparing. All
tolerances come from :mod:`weights_convert.tolerances`.

This module imports Keras, so the backend is the one ``KERAS_BACKEND`` named
when the process started (the CLI and the suite start one process per backend).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import keras
import numpy as np
import torch

import weights_convert as wc
from parity_tests import reference as ref
from parity_tests.keras_grad import keras_loss_and_grads
from weights_convert.testing import random_torch_model
from weights_convert.tolerances import compare, tolerance

__all__ = ["Row", "COMPONENTS", "make_input", "make_pair", "keras_device", "forward_rows", "gradient_rows",
           "reference_outputs", "run_component", "exact_numerics", "component_spec", "nhwc", "nchw"]

# name -> (ArchSpec, default input size H, W)
COMPONENTS = {
    "pam": (wc.ArchSpec("pam", in_channels=16), (9, 11)),
    "cam": (wc.ArchSpec("cam", in_channels=16), (9, 11)),
    "dual_attention": (wc.ArchSpec("dual_attention", in_channels=32), (9, 11)),
    "head": (wc.ArchSpec("head", in_channels=64, num_classes=5), (9, 11)),
    "danet50": (wc.ArchSpec("danet", num_classes=5, backbone="resnet50"), (65, 65)),
    "danet101": (wc.ArchSpec("danet", num_classes=5, backbone="resnet101"), (97, 129)),
}


def component_spec(component: str, spec=None, size=None):
    """``(spec, size)``: a named component's defaults, each replaced by what is given."""
    if spec is None and component not in COMPONENTS:
        raise ValueError(f"`component` must be one of {list(COMPONENTS)} (or give `spec`), got {component!r}.")
    default_spec, default_size = COMPONENTS.get(component, (None, None))
    spec = spec or default_spec
    return spec, tuple(size or default_size or spec.info.example_size)


@dataclass
class Row:
    """One compared tensor: which, where, how far apart, under which tolerance.

    ``check`` is ``"outputs"``, ``"gradients"`` or ``"BatchNorm statistics"``;
    ``normwise`` is ``||actual - expected|| / ||expected||``; ``headroom`` is
    ``max(|actual - expected| / (atol + rtol * scale))``: PASS iff <= 1 (and
    the NaN masks agree).
    """

    component: str
    output: str
    backend: str
    device: str
    dtype: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool
    against: str = "torch"
    check: str = "outputs"
    normwise: float = 0.0
    headroom: float = 0.0
    relative_to: str = "element"
    norm: float = 0.0  # ||expected||, so groups of rows can give one normwise error
    nonfinite: int = 0  # NaN or inf elements of the expected tensor (equal NaN masks pass; the report warns)
    size: int = 0  # elements of the expected tensor

    def message(self) -> str:
        return (f"{self.component}/{self.output} [keras-{self.backend} vs {self.against}, {self.device}, "
                f"{self.dtype}]: normwise={self.normwise:.3e} headroom={self.headroom:.3g} "
                f"max|diff|={self.max_abs:.3e} (atol={self.atol:g}, rtol={self.rtol:g}) "
                f"{'PASS' if self.passed else 'FAIL'}")

    def as_dict(self) -> dict:
        return asdict(self)


def keras_device() -> str:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.devices()[0].platform
    if backend == "torch":
        return str(keras.ops.convert_to_tensor(0.0).device)  # where Keras puts new tensors
    return "cpu"


def make_input(spec, size, batch: int = 2, seed: int = 0) -> np.ndarray:
    """A seeded NCHW float64 input for ``spec``."""
    return np.random.default_rng(seed).standard_normal((batch, spec.example_channels, *size))


def nhwc(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def nchw(a):
    return np.moveaxis(np.asarray(a), -1, 1)


def _disable_dropout(torch_model, keras_model):
    """Dropout's random masks cannot match across frameworks: turn it off in both."""
    for m in torch_model.modules():
        if isinstance(m, torch.nn.Dropout2d):
            m.p = 0.0
    for layer in keras_model._flatten_layers():
        if isinstance(layer, keras.layers.SpatialDropout2D):
            layer.rate = 0.0


@contextlib.contextmanager
def exact_numerics():
    """What the comparison assumes, restored afterwards: full float32 matmuls on GPUs (no TF32) in torch and
    JAX, and 64-bit JAX arrays (float64 parity)."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        if keras.backend.backend() == "jax":
            import jax

            with jax.enable_x64(True), jax.default_matmul_precision("highest"):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@contextlib.contextmanager
def keras_policy(dtype: str):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype if dtype in ("float32", "float64") else f"mixed_{dtype}")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def make_pair(spec, seed: int = 0, device: str = "cpu", dtype: str = "float32", neutral=None,
              keras_neutral=None):
    """``(torch_model, keras_model)`` holding the same weights.

    Without ``neutral`` the torch model gets random weights, non-zero gammas
    and non-default BatchNorm statistics; the Keras model gets them through
    ``weights_convert``. ``keras_neutral`` gives Keras its own weights (a
    user's Keras file), so a mismatch between two files shows.
    """
    if neutral is None:
        torch_model = random_torch_model(spec, seed=seed)
        neutral = wc.from_torch(torch_model)
    else:
        torch_model = wc.to_torch(neutral, spec)
    with keras_policy(dtype):
        keras_model = wc.to_keras(neutral if keras_neutral is None else keras_neutral, spec)
    torch_model.to(device, torch.float64 if dtype == "float64" else torch.float32)
    _disable_dropout(torch_model, keras_model)
    return torch_model, keras_model


def _torch_run(model, x: torch.Tensor, dtype: str):
    amp = dtype in ("float16", "bfloat16")
    with torch.autocast(x.device.type, dtype=getattr(torch, dtype), enabled=amp):
        out = model(x)
    return out if isinstance(out, (tuple, list)) else (out,)


def torch_outputs(model, x: np.ndarray, dtype: str = "float32", device: str = "cpu"):
    model.eval()
    with torch.no_grad():
        xt = torch.from_numpy(x).to(device, torch.float64 if dtype == "float64" else torch.float32)
        outs = _torch_run(model, xt, dtype)
    return [o.detach().double().cpu().numpy() for o in outs]


def keras_inference(model, x):
    """``model(x, training=False)``; on JAX compiled whole, as Keras' ``predict`` runs a model there.

    Eager JAX compiles every operation of a new shape on its own (XLA's CPU
    compiler takes tens of milliseconds each, hundreds of them for a DANet);
    one ``jax.jit`` of the whole call compiles once. The call inside is the
    same ``model(...)`` (its ``__call__``: input casting, autocast), with the
    variables passed in through a ``StatelessScope``.
    """
    if keras.backend.backend() != "jax" or not model.built:  # an unbuilt model creates its variables here
        return model(x, training=False)
    import jax

    variables = list(model.variables)

    def call(values, x):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return model(x, training=False)

    return jax.jit(call)([v.value for v in variables], x)


def keras_outputs(model, x: np.ndarray, dtype: str = "float32"):
    out = keras_inference(model, nhwc(x).astype("float64" if dtype == "float64" else "float32"))
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [nchw(keras.ops.convert_to_numpy(o)).astype(np.float64) for o in out]


def reference_outputs(spec, neutral, x: np.ndarray):
    """Float64 outputs: the NumPy reference for the attention parts, torch float64 for DANet."""
    sd = {k: np.asarray(v, dtype=np.float64) for k, v in neutral.items()}
    if spec.kind == "pam":
        return [ref.position_attention(x, sd["query_conv.weight"], sd["query_conv.bias"], sd["key_conv.weight"],
                                       sd["key_conv.bias"], sd["value_conv.weight"], sd["value_conv.bias"],
                                       sd["gamma"])]
    if spec.kind == "cam":
        return [ref.channel_attention(x, sd["gamma"])]
    if spec.kind == "dual_attention":
        return [ref.dual_attention(x, sd)]
    if spec.kind == "head":
        return list(ref.danet_head(x, sd))
    model64 = wc.to_torch(neutral, spec.replace(dtype="float64")).eval()  # a new model: the caller's is untouched
    with torch.no_grad():
        return [o.numpy() for o in model64(torch.from_numpy(x))]


def _rows(component, names, actual, expected, dtype, scope, against, device, check="outputs", scales=None):
    tol = tolerance(dtype, scope)
    rows = []
    for name, a, e, scale in zip(names, actual, expected, scales or [None] * len(names)):
        c = compare(name, a, e, tol, scale)
        e = np.asarray(e, np.float64)
        rows.append(Row(component, name, keras.backend.backend(), device, dtype, c.max_abs, c.max_rel,
                        tol.atol, tol.rtol, c.passed, against, check, c.normwise, c.headroom, tol.relative_to,
                        float(np.linalg.norm(np.nan_to_num(e, posinf=0.0, neginf=0.0))), c.nonfinite, c.size))
    return rows


def forward_rows(component, spec, torch_model, keras_model, x, dtype="float32", device="cpu", neutral=None):
    """Keras vs torch (float32), or both vs the float64 reference (half precision)."""
    names = spec.outputs
    scope = spec.info.scope
    where = f"torch:{device}/keras:{keras_device()}"
    t_out = torch_outputs(torch_model, x, dtype, device)
    k_out = keras_outputs(keras_model, x, dtype)
    if dtype in ("float32", "float64"):
        return _rows(component, names, k_out, t_out, dtype, scope, "torch", where)
    expected = reference_outputs(spec, neutral if neutral is not None else wc.from_torch(torch_model), x)
    return (_rows(component, [f"{n} (torch)" for n in names], t_out, expected, dtype, scope, "float64", where)
            + _rows(component, [f"{n} (keras)" for n in names], k_out, expected, dtype, scope, "float64", where))


def _layer_scales(labels, expected):
    """Per gradient, the largest ``|expected|`` among its layer's parameter gradients (``None`` for the input's).

    ``d/d sa.key_conv.bias`` is measured against ``sa.key_conv``'s kernel
    gradient too (:func:`weights_convert.tolerances.compare`'s ``scale``).
    """
    layer = [label.split()[1].rpartition(".")[0] if label != "d/d input" else None for label in labels]
    largest = {}
    for name, e in zip(layer, expected):
        if name is not None:
            finite = np.abs(np.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0))
            largest[name] = max(largest.get(name, 0.0), float(finite.max(initial=0.0)))
    return [None if name is None else largest[name] for name in layer]


def gradient_rows(component, spec, torch_model, keras_model, x, device="cpu", seed=1, dtype="float32"):
    """Training mode: d loss / d input and / d every parameter, then the updated BatchNorm statistics.

    ``loss = sum_i <output_i, w_i>`` with fixed random ``w_i``; both models
    must hold the same weights in ``dtype`` (float32 or float64).
    """
    rng = np.random.default_rng(seed)
    tdtype = getattr(torch, dtype)
    torch_model.train()
    xt = torch.from_numpy(x).to(device, tdtype).requires_grad_(True)
    torch_model.zero_grad()
    t_out = _torch_run(torch_model, xt, dtype)
    weights = [rng.standard_normal(tuple(o.shape)) for o in t_out]
    sum((o * torch.from_numpy(w).to(device, tdtype)).sum() for o, w in zip(t_out, weights)).backward()
    torch_model.eval()
    _, k_dx, k_grads = keras_loss_and_grads(keras_model, nhwc(x).astype(dtype),
                                            [nhwc(w) for w in weights], training=True)
    where = f"torch:{device}/keras:{keras_device()}"
    actual, expected, labels = [nchw(k_dx)], [xt.grad.double().cpu().numpy()], ["d/d input"]
    params = dict(torch_model.named_parameters())
    for row in wc.keras_table(spec):
        if row.torch_name not in params:
            continue
        var = wc.mapping.resolve_keras(keras_model, row.keras_path)
        grad = k_grads.get(id(var))
        expected.append(params[row.torch_name].grad.double().cpu().numpy())
        if grad is None:  # the variable does not take part in Keras' loss: a failing row, all NaN
            actual.append(np.full(expected[-1].shape, np.nan))
            labels.append(f"d/d {row.torch_name} (Keras has no gradient for {row.keras_path})")
            continue
        actual.append(wc.mapping.from_keras_layout(grad, row.rule))
        labels.append(f"d/d {row.torch_name}")
    rows = _rows(component, labels, actual, expected, dtype, "grad", "torch", where, "gradients",
                 _layer_scales(labels, expected))
    buffers = dict(torch_model.named_buffers())
    k_state = wc.from_keras(keras_model, spec)
    stats = [k for k in buffers if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    rows += _rows(component, [f"{k} after 1 step" for k in stats], [k_state[k] for k in stats],
                  [buffers[k].double().cpu().numpy() for k in stats], dtype, "layer", "torch", where,
                  "BatchNorm statistics")
    return rows


def run_component(component, spec=None, size=None, batch=2, seed=0, dtype="float32", device="cpu",
                  gradients=True, neutral=None, keras_neutral=None, float64=True):
    """All rows for one component (see :func:`parity_tests.session.check_component`, which also traces)."""
    from parity_tests.session import check_component

    result = check_component(component, spec=spec, size=size, batch=batch, seed=seed, dtype=dtype, device=device,
                             gradients=gradients, neutral=neutral, keras_neutral=keras_neutral, float64=float64,
                             trace=False, trace_on_failure=False, raise_errors=True)
    return result.rows
