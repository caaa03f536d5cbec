"""Neutral form <-> live models: ``danet_torch`` modules and ``danet_keras`` layers.

Both frameworks are imported lazily, inside the functions. Models are built
from the record alone (:data:`weights_convert.arch.KINDS` names the class;
the record's fields that the constructor takes are passed to it), so no
kind is special-cased here.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict

import numpy as np

from .arch import KINDS, ArchSpec, expected_shapes
from .errors import ConvertError, check_strict
from .infer import infer_arch
from .mapping import RULES, from_keras_layout, keras_table, resolve_keras, to_keras_layout
from .neutral import numpy_dtype, numpy_to_tensor, tensor_to_numpy

__all__ = ["build_torch", "build_keras", "to_torch", "from_torch", "spec_from_torch", "to_keras", "from_keras",
           "spec_from_keras", "keras_precision", "danet_layer_of"]

def _constructor_kwargs(cls, spec: ArchSpec, exclude=()) -> dict:
    """The record's fields that ``cls.__init__`` takes by name."""
    params = inspect.signature(cls.__init__).parameters
    fields = spec.info.fields + ("data_format",)
    return {f: getattr(spec, f) for f in fields if f in params and f not in exclude}


def build_torch(spec: ArchSpec, initialize: bool = True):
    """The ``danet_torch`` module of ``spec``, in eval mode and ``spec.dtype``.

    ``initialize=False`` is for a caller that assigns every parameter and
    buffer next (a strict ``load_state_dict``): the module is built on the
    meta device, as ``torch.nn.utils.skip_init`` does, and its tensors are
    zeros instead of random draws.
    """
    import torch

    import danet_torch

    cls = getattr(danet_torch, spec.info.class_name)
    kwargs = _constructor_kwargs(cls, spec, exclude=("data_format",))
    if initialize:
        model = cls(**kwargs)
    else:
        with torch.device("meta"):
            model = cls(**kwargs)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for t in (*model.parameters(), *model.buffers()):
                t.zero_()
    model.eval()
    if spec.dtype != "float32":
        model.to(getattr(torch, spec.dtype))
    return model


def from_torch(module) -> "OrderedDict[str, np.ndarray]":
    """A torch module's state_dict as the neutral form (copies, dtypes kept)."""
    return OrderedDict((k, tensor_to_numpy(v)) for k, v in module.state_dict().items())


def spec_from_torch(module) -> ArchSpec:
    """The :class:`ArchSpec` of a ``danet_torch`` module: its class, and the constructor arguments it keeps as
    attributes of the same names (every danet_torch model does)."""
    import torch

    kind = next((k for k in KINDS.values() if k.class_name == type(module).__name__), None)
    if kind is None:
        raise ConvertError(f"Not a danet_torch model: {type(module).__name__}; accepted: "
                           f"{sorted(k.class_name for k in KINDS.values())}.")
    record = {f: getattr(module, f) for f in kind.fields}
    floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
    record["dtype"] = str(floats[0] if floats else torch.float32).replace("torch.", "")
    return ArchSpec(kind.name, **record)


def to_torch(weights, arch: ArchSpec | None = None, allow_partial: bool = False):
    """The ``danet_torch`` module of ``arch`` (inferred if ``None``) holding ``weights``; strict by default."""
    spec = arch if arch is not None else infer_arch(weights)
    model = build_torch(spec, initialize=allow_partial)  # strict: every tensor is assigned below
    expected = OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())
    check_strict(expected, weights, context=spec.describe(), allow_partial=allow_partial)
    state = {k: numpy_to_tensor(v) for k, v in weights.items()
             if k in expected and tuple(np.shape(v)) == expected[k]}
    model.load_state_dict(state, strict=not allow_partial)
    return model


# -- Keras ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def keras_precision(dtype: str):
    """Let the Keras backend hold ``dtype``: JAX keeps float64 only with x64 enabled (scoped here)."""
    import keras

    if dtype == "float64" and keras.backend.backend() == "jax":
        import jax

        with jax.enable_x64(True):
            yield
    else:
        yield


def build_keras(spec: ArchSpec, initialize: bool = True):
    """The ``danet_keras`` layer of ``spec``, built (its variables exist), in ``spec.dtype`` and ``spec.data_format``.

    ``initialize=False`` is for a caller that assigns every variable next: the
    convolutions are built with zeros instead of random draws
    (:func:`danet_keras.layers.no_init_weights`).
    """
    import danet_keras
    from danet_keras.layers import no_init_weights

    if spec.kind == "cam" and spec.in_channels is None:
        raise ConvertError("A Keras ChannelAttention is built for a channel count and its weights (`gamma`) do "
                           "not tell it: pass --in-channels.")
    cls = getattr(danet_keras, spec.info.class_name)
    kwargs = _constructor_kwargs(cls, spec)
    if spec.dtype != "float32":
        kwargs["dtype"] = spec.dtype
    with keras_precision(spec.dtype), (contextlib.nullcontext() if initialize else no_init_weights()):
        layer = cls(**kwargs)
        c = spec.in_channels
        layer.build((None, c, None, None) if spec.data_format == "channels_first" else (None, None, None, c))
    return layer


def _check_coverage(layer, assigned_ids, spec):
    left = [v.path for v in layer.weights if id(v) not in assigned_ids]
    if left:
        raise ConvertError(f"The Keras {type(layer).__name__} ({spec.describe()}) has {len(left)} weight(s) the "
                           f"name table does not cover: {left[:5]}; the mirror rule is broken.")


def to_keras(weights, arch: ArchSpec | None = None, allow_partial: bool = False, layer=None,
             allow_cast: bool = True, notes: list | None = None):
    """The ``danet_keras`` layer of ``arch`` holding ``weights`` (strict by default), via the name table.

    A Keras layer holds one floating dtype (``arch.dtype``) and int32 counters: a tensor that its variable
    would not give back as it is (another dtype, or another value: a fractional or too large counter) is
    cast, which is what running a model needs. ``allow_cast=False`` (a file being written) refuses it
    instead, naming each; the casts done are described in ``notes`` when it is a list.
    """
    spec = arch if arch is not None else infer_arch(weights)
    check_strict(expected_shapes(spec), weights, context=spec.describe(), allow_partial=allow_partial)
    layer = build_keras(spec, initialize=allow_partial) if layer is None else layer  # strict: all assigned below
    assigned, casts = set(), []
    with keras_precision(spec.dtype):
        for row in keras_table(spec):
            var = resolve_keras(layer, row.keras_path)
            assigned.add(id(var))
            if row.torch_name not in weights or tuple(np.shape(weights[row.torch_name])) != row.torch_shape:
                continue  # allow_partial: left at its initial value
            source = np.asarray(weights[row.torch_name])
            value = to_keras_layout(source, row.rule)
            if tuple(var.shape) != tuple(value.shape):
                raise ConvertError(f"`{row.keras_path}` has shape {tuple(var.shape)}, the table expects "
                                   f"{tuple(value.shape)} for `{row.torch_name}`.")
            value = np.asarray(value).astype(numpy_dtype(var.dtype), copy=False)
            if not _comes_back(source, value, row.rule):
                casts.append((row.torch_name, source, value, row.rule))
                if not allow_cast:
                    continue
            var.assign(value)
    _check_coverage(layer, assigned, spec)
    if casts and not allow_cast:
        raise ConvertError(f"{len(casts)} tensor(s) would not come back as they are from a Keras file of "
                           f"{spec.describe()}, which holds {spec.dtype} weights and int32 counters: "
                           f"{_describe_casts(casts)}{_census(weights)}. Refused; pass --allow-cast "
                           f"(allow_cast=True) to write them cast, or write .pth/.safetensors/.npz, which keep "
                           f"every dtype.")
    if casts and notes is not None:
        notes.append(f"cast {len(casts)} tensor(s) to fit the Keras {spec.dtype} weights and int32 counters: "
                     f"{_describe_casts(casts)}")
    return layer


def _comes_back(source: np.ndarray, value: np.ndarray, rule: str) -> bool:
    """Whether ``value`` (``source`` as the Keras variable holds it) reads back as ``source``: dtype and bits."""
    restored = RULES[rule][1]  # the dtype the rule gives back (int64 counters), else the variable's
    if np.dtype(restored or value.dtype) != source.dtype:
        return False
    return value.dtype == source.dtype or np.array_equal(from_keras_layout(value, rule), source)


def _census(weights, limit: int = 5) -> str:
    """`` (the weights are float32 (33), float64 (1: a))``: the dtypes of a mixed set of floating tensors, the
    names of all but the commonest, which a cast list led by the many widened tensors would hide; ``""`` if one."""
    groups: dict = {}
    for name, value in weights.items():
        dtype = np.asarray(value).dtype.name
        if "float" in dtype:
            groups.setdefault(dtype, []).append(name)
    if len(groups) < 2:
        return ""
    ordered = sorted(groups.items(), key=lambda item: -len(item[1]))  # the commonest first, unnamed

    def named(names):
        return f"{len(names)}: {', '.join(names[:limit])}{', ...' if len(names) > limit else ''}"

    return " (the weights are " + ", ".join(f"{d} ({len(n) if i == 0 else named(n)})"
                                            for i, (d, n) in enumerate(ordered)) + ")"


def _describe_casts(casts, limit: int = 5) -> str:
    """``float32 -> float64 (values kept): 3 (a, b, c); ...``: the casts grouped by dtypes, first names."""
    groups: dict = {}
    for name, source, value, rule in casts:
        kept = np.array_equal(from_keras_layout(value, rule), source, equal_nan=True)
        groups.setdefault((source.dtype.name, value.dtype.name, kept), []).append(name)
    return "; ".join(f"{a} -> {b} ({'values kept' if kept else 'values change'}): {len(names)} "
                     f"({', '.join(names[:limit])}{', ...' if len(names) > limit else ''})"
                     for (a, b, kept), names in groups.items())


def from_keras(layer, arch: ArchSpec | None = None) -> "OrderedDict[str, np.ndarray]":
    """A ``danet_keras`` layer's weights as the neutral form (torch names and layout)."""
    import keras

    spec = arch if arch is not None else spec_from_keras(layer)
    out, assigned = OrderedDict(), set()
    for row in keras_table(spec):
        var = resolve_keras(layer, row.keras_path)
        assigned.add(id(var))
        out[row.torch_name] = from_keras_layout(np.array(keras.ops.convert_to_numpy(var.value)), row.rule)
    _check_coverage(layer, assigned, spec)
    return out


def danet_layer_of(model):
    """``(the danet_keras layer in model, [other layers holding weights])``.

    ``model`` is a ``danet_keras`` layer itself, or a Keras model that holds
    exactly one of them (a U-Net with ``DualAttention`` at its bottleneck).

    Raises:
        ConvertError: no danet_keras layer, or more than one.
    """
    classes = {kind.class_name for kind in KINDS.values()}
    if type(model).__name__ in classes:
        return model, []
    inner = [sub for sub in getattr(model, "layers", []) if type(sub).__name__ in classes]
    if len(inner) != 1:
        found = ", ".join(f"{type(s).__name__} {s.name!r}" for s in inner) or "none"
        raise ConvertError(f"Not a danet_keras model: {type(model).__name__} {getattr(model, 'name', '')!r}; "
                           f"accepted: {sorted(classes)}, or a Keras model holding exactly one of them "
                           f"(found: {found}).")
    others = [sub for sub in model.layers if sub is not inner[0] and sub.weights]
    return inner[0], others


def spec_from_keras(layer) -> ArchSpec:
    """The :class:`ArchSpec` of a ``danet_keras`` layer (its class, config and built input)."""
    layer, _ = danet_layer_of(layer)
    kind = next(k.name for k in KINDS.values() if k.class_name == type(layer).__name__)
    config = layer.get_config()
    policy = getattr(layer, "dtype_policy", None)
    record = {"kind": kind, "dtype": str(getattr(policy, "variable_dtype", None) or "float32")}
    for key in KINDS[kind].fields + ("data_format",):
        if key in config:
            record[key] = tuple(config[key]) if isinstance(config[key], list) else config[key]
    if kind != "danet" or getattr(layer, "in_channels", None) is not None:
        record["in_channels"] = getattr(layer, "in_channels", None) or record.get("in_channels")
    return ArchSpec(**record)
