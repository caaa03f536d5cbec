"""``ArchSpec``: which model a set of weights belongs to, and its state_dict names and shapes.

The names and shapes are computed here without importing any framework, in
exactly the order of ``danet_torch``'s ``state_dict()`` (a test checks it), so
strict checks, ``.weights.h5`` inference and the weight map need neither torch
nor Keras.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Tuple

__all__ = ["ArchSpec", "ARCHS", "BACKBONE_DEPTHS", "expected_shapes"]

ARCHS = ("pam", "cam", "dual_attention", "head", "danet")
BACKBONE_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
INT_KEYS_SUFFIX = "num_batches_tracked"


@dataclass
class ArchSpec:
    """An architecture that both frameworks can build.

    Args:
        arch: ``"pam"``, ``"cam"``, ``"dual_attention"``, ``"head"`` or ``"danet"``.
        channels: Input channels (PAM, CAM, DualAttention, DANetHead; 2048 inside DANet).
            ``None`` for a CAM built without a channel check.
        num_classes: Classes of DANetHead / DANet.
        backbone: ``"resnet50"`` or ``"resnet101"`` (DANet).
        deep_stem: Three 3x3 stem convs instead of the 7x7 conv (DANet).
        output_stride: 8, 16 or 32 (DANet; not stored in the weights).
        multi_grid: layer4 dilations or ``None`` (DANet; not stored in the weights).
        inter_channels, out_channels: DualAttention's (default ``channels // 4`` and ``channels``).
        reduction: PAM's query/key reduction (8).
        dtype: Floating dtype of the weights (models are built in it).
    """

    arch: str
    channels: Optional[int] = None
    num_classes: Optional[int] = None
    backbone: str = "resnet101"
    deep_stem: bool = False
    output_stride: int = 8
    multi_grid: Optional[Tuple[int, ...]] = (4, 8, 16)
    inter_channels: Optional[int] = None
    out_channels: Optional[int] = None
    reduction: int = 8
    dtype: str = "float32"
    notes: list = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"`arch` must be one of {list(ARCHS)}, got {self.arch!r}.")
        if self.backbone not in BACKBONE_DEPTHS:
            raise ValueError(f"`backbone` must be one of {sorted(BACKBONE_DEPTHS)}, got {self.backbone!r}.")
        if self.multi_grid is not None:
            self.multi_grid = tuple(int(d) for d in self.multi_grid)
        if self.arch == "danet":
            self.channels = 2048
        if self.arch in ("head", "danet") and self.num_classes is None:
            raise ValueError(f"`num_classes` is required for arch={self.arch!r}.")
        if self.arch in ("pam", "dual_attention", "head") and self.channels is None:
            raise ValueError(f"`channels` is required for arch={self.arch!r}.")
        if self.arch == "dual_attention":
            self.inter_channels = self.inter_channels or self.channels // 4
            self.out_channels = self.out_channels or self.channels

    # -- serialisation (stored in .safetensors / .npz metadata) -------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("notes")
        d["multi_grid"] = None if self.multi_grid is None else list(self.multi_grid)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ArchSpec":
        known = {f.name for f in dataclasses.fields(cls)} - {"notes"}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **overrides) -> "ArchSpec":
        """A copy with ``overrides`` applied (``None`` values are ignored, except ``multi_grid``)."""
        d = self.to_dict()
        for k, v in overrides.items():
            if v is not None or k == "multi_grid":
                d[k] = v
        out = ArchSpec.from_dict(d)
        out.notes = list(self.notes)
        return out

    @property
    def input_channels(self):
        """Channels of the model's input: 3 (RGB) for DANet, else ``channels`` (``None`` for an unchecked CAM)."""
        return 3 if self.arch == "danet" else self.channels

    def describe(self) -> str:
        if self.arch == "danet":
            stem = "deep stem" if self.deep_stem else "7x7 stem"
            return (f"DANet({self.backbone}, {self.num_classes} classes, {stem}, output stride "
                    f"{self.output_stride}, multi-grid {self.multi_grid})")
        if self.arch == "head":
            return f"DANetHead(in_channels={self.channels}, num_classes={self.num_classes})"
        if self.arch == "dual_attention":
            return (f"DualAttention(in_channels={self.channels}, out_channels={self.out_channels}, "
                    f"inter_channels={self.inter_channels})")
        return f"{'PositionAttention' if self.arch == 'pam' else 'ChannelAttention'}(in_channels={self.channels})"

    # -- builders ----------------------------------------------------------------------------
    def build_torch(self):
        """The ``danet_torch`` module (eval mode, in ``dtype``)."""
        from .frameworks import build_torch

        return build_torch(self)

    def build_keras(self):
        """The ``danet_keras`` layer/model, built (its variables exist), in ``dtype``."""
        from .frameworks import build_keras

        return build_keras(self)

    def expected_shapes(self) -> "OrderedDict[str, tuple]":
        return expected_shapes(self)


# -- state_dict names and shapes, in torch's order ---------------------------------------------
def _conv(prefix, o, i, k, bias):
    out = [(f"{prefix}weight", (o, i, k, k))]
    return out + [(f"{prefix}bias", (o,))] if bias else out


def _bn(prefix, c):
    return [(f"{prefix}{n}", (c,)) for n in ("weight", "bias", "running_mean", "running_var")] + \
        [(f"{prefix}num_batches_tracked", ())]


def _pam(prefix, c, reduction):
    k = c // reduction
    return ([(f"{prefix}gamma", (1,))] + _conv(f"{prefix}query_conv.", k, c, 1, True)
            + _conv(f"{prefix}key_conv.", k, c, 1, True) + _conv(f"{prefix}value_conv.", c, c, 1, True))


def _cbr(prefix, i, o):
    return _conv(f"{prefix}0.", o, i, 3, False) + _bn(f"{prefix}1.", o)


def _dual(prefix, c, inter, out, reduction):
    return (_cbr(f"{prefix}conv5a.", c, inter) + _cbr(f"{prefix}conv5c.", c, inter)
            + _pam(f"{prefix}sa.", inter, reduction) + [(f"{prefix}sc.gamma", (1,))]
            + _cbr(f"{prefix}conv51.", inter, out) + _cbr(f"{prefix}conv52.", inter, out))


def _head(prefix, c, n, reduction):
    inter = c // 4
    rows = _dual(prefix, c, inter, inter, reduction)
    for name in ("conv6", "conv7", "conv8"):
        rows += _conv(f"{prefix}{name}.1.", n, inter, 1, True)
    return rows


def _resnet(prefix, blocks, deep_stem):
    if deep_stem:
        rows = (_conv(f"{prefix}conv1.0.", 64, 3, 3, False) + _bn(f"{prefix}conv1.1.", 64)
                + _conv(f"{prefix}conv1.3.", 64, 64, 3, False) + _bn(f"{prefix}conv1.4.", 64)
                + _conv(f"{prefix}conv1.6.", 128, 64, 3, False))
        inplanes = 128
    else:
        rows, inplanes = _conv(f"{prefix}conv1.", 64, 3, 7, False), 64
    rows += _bn(f"{prefix}bn1.", inplanes)
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(n):
            p = f"{prefix}layer{li}.{b}."
            rows += (_conv(f"{p}conv1.", planes, inplanes, 1, False) + _bn(f"{p}bn1.", planes)
                     + _conv(f"{p}conv2.", planes, planes, 3, False) + _bn(f"{p}bn2.", planes)
                     + _conv(f"{p}conv3.", planes * 4, planes, 1, False) + _bn(f"{p}bn3.", planes * 4))
            if b == 0:  # every stage's first block changes channels (and/or stride)
                rows += _conv(f"{p}downsample.0.", planes * 4, inplanes, 1, False) + _bn(f"{p}downsample.1.", planes * 4)
            inplanes = planes * 4
    return rows


def expected_shapes(spec: ArchSpec) -> "OrderedDict[str, tuple]":
    """``{torch state_dict name: shape}`` of ``spec``, in ``state_dict()`` order."""
    if spec.arch == "pam":
        rows = _pam("", spec.channels, spec.reduction)
    elif spec.arch == "cam":
        rows = [("gamma", (1,))]
    elif spec.arch == "dual_attention":
        rows = _dual("", spec.channels, spec.inter_channels, spec.out_channels, spec.reduction)
    elif spec.arch == "head":
        rows = _head("", spec.channels, spec.num_classes, spec.reduction)
    else:
        rows = _resnet("pretrained.", BACKBONE_DEPTHS[spec.backbone], spec.deep_stem)
        rows += _head("head.", 2048, spec.num_classes, spec.reduction)
    return OrderedDict(rows)
