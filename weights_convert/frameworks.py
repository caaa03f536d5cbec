"""Neutral form <-> live models: ``danet_torch`` modules and ``danet_keras`` layers.

Both frameworks are imported lazily, inside the functions.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .arch import ArchSpec, expected_shapes
from .errors import ConvertError, check_strict
from .infer import infer_arch
from .mapping import from_keras_layout, keras_table, resolve_keras, to_keras_layout
from .neutral import numpy_to_tensor, tensor_to_numpy

__all__ = ["build_torch", "build_keras", "to_torch", "from_torch", "to_keras", "from_keras", "spec_from_keras"]

KERAS_CLASSES = {"PositionAttention": "pam", "ChannelAttention": "cam", "DualAttention": "dual_attention",
                 "DANetHead": "head", "DANet": "danet"}


def build_torch(spec: ArchSpec):
    """The ``danet_torch`` module of ``spec``, in eval mode and ``spec.dtype``."""
    import torch

    import danet_torch as dt

    if spec.arch == "pam":
        m = dt.PositionAttention(spec.channels, reduction=spec.reduction)
    elif spec.arch == "cam":
        m = dt.ChannelAttention(spec.channels)
    elif spec.arch == "dual_attention":
        m = dt.DualAttention(spec.channels, out_channels=spec.out_channels, inter_channels=spec.inter_channels,
                             reduction=spec.reduction)
    elif spec.arch == "head":
        m = dt.DANetHead(spec.channels, spec.num_classes, reduction=spec.reduction)
    else:
        m = dt.DANet(spec.num_classes, backbone=spec.backbone, output_stride=spec.output_stride,
                     deep_stem=spec.deep_stem, multi_grid=spec.multi_grid)
    m.eval()
    if spec.dtype != "float32":
        m.to(getattr(torch, spec.dtype))
    return m


def from_torch(module) -> "OrderedDict[str, np.ndarray]":
    """A torch module's state_dict as the neutral form (copies, dtypes kept)."""
    return OrderedDict((k, tensor_to_numpy(v)) for k, v in module.state_dict().items())


def to_torch(neutral, arch: ArchSpec | None = None, allow_partial: bool = False):
    """The ``danet_torch`` module of ``arch`` (inferred if ``None``) holding ``neutral``; strict by default."""
    spec = arch if arch is not None else infer_arch(neutral)
    model = build_torch(spec)
    expected = OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())
    check_strict(expected, neutral, context=spec.describe(), allow_partial=allow_partial)
    state = {k: numpy_to_tensor(v) for k, v in neutral.items()
             if k in expected and tuple(np.shape(v)) == expected[k]}
    model.load_state_dict(state, strict=not allow_partial)
    return model


# -- Keras ---------------------------------------------------------------------------------------
def build_keras(spec: ArchSpec, data_format: str | None = None):
    """The ``danet_keras`` layer of ``spec``, built (its variables exist), in ``spec.dtype``.

    Keras layers take their input channels from ``build``: the layer is built
    for ``(None, None, None, channels)`` (``channels_last``).
    """
    import danet_keras as dk

    kw = {} if spec.dtype == "float32" else {"dtype": spec.dtype}
    if data_format is not None:
        kw["data_format"] = data_format
    if spec.arch == "pam":
        layer = dk.PositionAttention(reduction=spec.reduction, **kw)
    elif spec.arch == "cam":
        if spec.channels is None:
            raise ConvertError("A Keras ChannelAttention is built for a channel count and its weights (`gamma`) do "
                               "not tell it: pass --channels (channels=...).")
        layer = dk.ChannelAttention(**kw)
    elif spec.arch == "dual_attention":
        layer = dk.DualAttention(out_channels=spec.out_channels, inter_channels=spec.inter_channels,
                                 reduction=spec.reduction, **kw)
    elif spec.arch == "head":
        layer = dk.DANetHead(spec.num_classes, reduction=spec.reduction, **kw)
    else:
        layer = dk.DANet(spec.num_classes, backbone=spec.backbone, output_stride=spec.output_stride,
                         deep_stem=spec.deep_stem, multi_grid=spec.multi_grid, **kw)
    fmt = getattr(layer, "data_format", "channels_last")
    c = spec.input_channels
    layer.build((None, c, None, None) if fmt == "channels_first" else (None, None, None, c))
    return layer


def _check_coverage(layer, assigned_ids, spec):
    left = [v.path for v in layer.weights if id(v) not in assigned_ids]
    if left:
        raise ConvertError(f"The Keras {type(layer).__name__} ({spec.describe()}) has {len(left)} weight(s) the "
                           f"name table does not cover: {left[:5]}; the mirror rule is broken.")


def to_keras(neutral, arch: ArchSpec | None = None, allow_partial: bool = False, layer=None):
    """The ``danet_keras`` layer of ``arch`` holding ``neutral`` (strict by default), via the name table."""
    spec = arch if arch is not None else infer_arch(neutral)
    check_strict(expected_shapes(spec), neutral, context=spec.describe(), allow_partial=allow_partial)
    layer = build_keras(spec) if layer is None else layer
    assigned = set()
    for row in keras_table(spec):
        var = resolve_keras(layer, row.keras_path)
        assigned.add(id(var))
        if row.torch_name not in neutral or tuple(np.shape(neutral[row.torch_name])) != row.torch_shape:
            continue  # allow_partial: left at its initial value
        value = to_keras_layout(neutral[row.torch_name], row.rule)
        if tuple(var.shape) != tuple(value.shape):
            raise ConvertError(f"`{row.keras_path}` has shape {tuple(var.shape)}, the table expects "
                               f"{tuple(value.shape)} for `{row.torch_name}`.")
        var.assign(np.asarray(value).astype(_np_dtype(var.dtype), copy=False))
    _check_coverage(layer, assigned, spec)
    return layer


def _np_dtype(dtype):
    name = getattr(dtype, "name", str(dtype)).replace("torch.", "")
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


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


def spec_from_keras(layer) -> ArchSpec:
    """The :class:`ArchSpec` of a ``danet_keras`` layer (its class and config)."""
    name = type(layer).__name__
    if name not in KERAS_CLASSES:
        inner = [sub for sub in getattr(layer, "layers", []) if type(sub).__name__ in KERAS_CLASSES]
        if len(inner) == 1:
            return spec_from_keras(inner[0])
        raise ConvertError(f"Not a danet_keras layer: {name}; accepted: {sorted(KERAS_CLASSES)} (or a "
                           f"Functional model wrapping exactly one of them).")
    cfg = layer.get_config()
    arch = KERAS_CLASSES[name]
    policy = getattr(layer, "dtype_policy", None)
    d = {"arch": arch, "dtype": str(getattr(policy, "variable_dtype", None) or "float32")}
    for key in ("num_classes", "backbone", "deep_stem", "output_stride", "reduction", "inter_channels",
                "out_channels", "multi_grid"):
        if key in cfg:
            d[key] = cfg[key]
    if arch != "danet":
        d["channels"] = getattr(layer, "in_channels", None)
    if arch == "dual_attention" and d["channels"] is not None:
        d["inter_channels"] = d.get("inter_channels") or d["channels"] // 4
        d["out_channels"] = d.get("out_channels") or d["channels"]
    return ArchSpec.from_dict(d)
