"""The architecture record: which model a set of weights belongs to, as one frozen, serialisable value.

:class:`ArchSpec` describes a model completely (kind, channels, classes,
backbone, stem, output stride, multi-grid, reduction, dropout, dtype, data
format); :data:`KINDS` holds, once per kind, the facts every part of the
project reads: the class built in each framework, the record fields that
apply, the output names, the tolerance scope and an example input. The
record travels with the weights in every format this package writes
(``ArchSpec.to_dict``); :func:`apply_overrides` is the one rule by which
options change a stored or inferred record.

Importing this module imports no framework.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Tuple

from . import layout

__all__ = ["ArchSpec", "Kind", "KINDS", "ARCHS", "BACKBONE_DEPTHS", "RECORD_VERSION", "expected_shapes",
           "apply_overrides", "layer_dilations", "check_multi_grid", "check_flag"]

BACKBONE_DEPTHS = layout.BACKBONE_DEPTHS
RECORD_VERSION = 1
DTYPES = ("float32", "float64", "float16", "bfloat16")
DATA_FORMATS = ("channels_last", "channels_first")
OUTPUT_STRIDES = (8, 16, 32)
COMMON_FIELDS = ("dtype", "data_format")


@dataclass(frozen=True)
class Kind:
    """What the project knows about one kind of model.

    Attributes:
        name: The record's ``kind``.
        class_name: The class in ``danet_torch`` and in ``danet_keras`` (same name in both).
        fields: Record fields that apply to this kind (besides ``dtype`` and ``data_format``).
        outputs: Output names, in order (ONNX outputs, parity rows).
        scope: Tolerance scope (``weights_convert.tolerances``).
        example_size: ``(H, W)`` of the input ``--verify`` and other checks use.
        export_size: Square size exporters trace at (any size runs afterwards).
        rows: ``spec -> [(state_dict name, shape)]`` in ``state_dict()`` order.
    """

    name: str
    class_name: str
    fields: Tuple[str, ...]
    outputs: Tuple[str, ...]
    scope: str
    example_size: Tuple[int, int]
    export_size: int
    rows: Callable

    @property
    def required(self) -> Tuple[str, ...]:
        return tuple(f for f in ("in_channels", "num_classes") if f in self.fields and f not in OPTIONAL[self.name])


OPTIONAL = {"pam": (), "cam": ("in_channels",), "dual_attention": (), "head": (), "danet": ()}

KINDS = {k.name: k for k in (
    Kind("pam", "PositionAttention", ("in_channels", "reduction"), ("output",), "layer", (9, 11), 12,
         lambda s: layout.pam_rows(s.in_channels, s.reduction)),
    Kind("cam", "ChannelAttention", ("in_channels",), ("output",), "layer", (9, 11), 12,
         lambda s: layout.cam_rows()),
    Kind("dual_attention", "DualAttention", ("in_channels", "inter_channels", "out_channels", "reduction"),
         ("output",), "layer", (9, 11), 12,
         lambda s: layout.dual_attention_rows(s.in_channels, s.inter_channels, s.out_channels, s.reduction)),
    Kind("head", "DANetHead", ("in_channels", "num_classes", "reduction", "dropout"), ("fused", "pam", "cam"),
         "layer", (9, 11), 12, lambda s: layout.head_rows(s.in_channels, s.num_classes, s.reduction)),
    Kind("danet", "DANet", ("in_channels", "num_classes", "backbone", "deep_stem", "output_stride", "multi_grid",
                            "reduction", "dropout"), ("fused", "pam", "cam"), "model", (33, 33), 65,
         lambda s: layout.danet_rows(s.backbone, s.deep_stem, s.num_classes, s.reduction, s.in_channels)),
)}
ARCHS = tuple(KINDS)


def _int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def check_flag(name: str, value) -> bool:
    """``value`` as a bool (``True``/``False``, or an int 0/1); ``ValueError`` naming ``name`` otherwise (the
    string ``"no"`` is truthy)."""
    if isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def check_multi_grid(value, blocks: int | None = None) -> Optional[Tuple[int, ...]]:
    """``multi_grid`` as a tuple of ints >= 1 (``blocks`` of them where given), or ``None``.

    A string is refused (``"124"`` would be read as ``(1, 2, 4)``), and so is
    a dilation that is not an int (``8.5`` would be read as 8).
    """
    if value is None:
        return None
    ints = (isinstance(value, Iterable) and not isinstance(value, (str, bytes))
            and all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in value))
    if not ints:
        raise ValueError(f"`multi_grid` must be a sequence of ints >= 1 or None, got {value!r}.")
    grid = tuple(int(d) for d in value)
    if blocks is not None and len(grid) != blocks:
        raise ValueError(f"`multi_grid` must give one dilation >= 1 per layer4 block ({blocks}), got {grid!r}.")
    return grid


def layer_dilations(blocks: Sequence[int], output_stride: int, multi_grid: Sequence[int] | None):
    """Per-stage ``(stride, [dilation per block])`` of the official dilated ResNet, in both frameworks.

    Output stride 8: layer3 stride 1 (dilations 1, 2, 2, ...), layer4 stride 1
    (2, 4, 4, ... or ``multi_grid``). Output stride 16: layer3 stride 2,
    layer4 stride 1 (1, 2, 2, ... or ``multi_grid``). Output stride 32 is the
    plain ResNet.
    """
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"`output_stride` must be 8, 16 or 32, got {output_stride!r}.")
    n1, n2, n3, n4 = blocks

    def first_then(first, rest, n):
        return [first] + [rest] * (n - 1)

    if output_stride == 8:
        l3, l4 = (1, first_then(1, 2, n3)), (1, first_then(2, 4, n4))
    elif output_stride == 16:
        l3, l4 = (2, [1] * n3), (1, first_then(1, 2, n4))
    else:
        l3, l4 = (2, [1] * n3), (2, [1] * n4)
    if multi_grid is not None:
        l4 = (l4[0], list(check_multi_grid(multi_grid, n4)))
    return [(1, [1] * n1), (2, [1] * n2), l3, l4]


@dataclass(frozen=True, repr=False)
class ArchSpec:
    """An architecture both frameworks can build; frozen, compared by value, stored beside the weights.

    Args:
        kind: ``"pam"``, ``"cam"``, ``"dual_attention"``, ``"head"`` or ``"danet"``.
        in_channels: Channels of the model's input (3 for a DANet by default;
            ``None`` for a ChannelAttention built without a channel check).
        num_classes: Classes of DANetHead / DANet.
        backbone: ``"resnet50"`` or ``"resnet101"`` (DANet).
        deep_stem: Three 3x3 stem convs instead of the 7x7 conv (DANet).
        output_stride: 8, 16 or 32 (DANet; not visible in the weights).
        multi_grid: layer4 dilations, or ``None`` (DANet; not visible in the weights).
        inter_channels, out_channels: DualAttention's (default ``in_channels // 4`` and ``in_channels``).
        reduction: PAM's query/key reduction (8).
        dropout: Dropout rate before the classifiers (DANetHead, DANet).
        dtype: Floating dtype of the weights; models are built in it.
        data_format: Keras layout (``danet_torch`` is always NCHW).

    ``None`` for ``in_channels`` (DANet), ``inter_channels`` and
    ``out_channels`` means the kind's default and is resolved here. A field
    that does not apply to the kind must keep its default.

    Raises:
        ValueError: a field has a bad value, or does not apply to the kind.
    """

    kind: str
    in_channels: Optional[int] = None
    num_classes: Optional[int] = None
    backbone: str = "resnet101"
    deep_stem: bool = False
    output_stride: int = 8
    multi_grid: Optional[Tuple[int, ...]] = (4, 8, 16)
    inter_channels: Optional[int] = None
    out_channels: Optional[int] = None
    reduction: int = 8
    dropout: float = 0.1
    dtype: str = "float32"
    data_format: str = "channels_last"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {list(KINDS)}, got {self.kind!r}.")
        kind = KINDS[self.kind]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in defaults:
            if name not in kind.fields + COMMON_FIELDS + ("kind",) and getattr(self, name) != defaults[name]:
                raise ValueError(f"`{name}` does not apply to a {kind.class_name} record (got {getattr(self, name)!r}); "
                                 f"its fields are {list(kind.fields + COMMON_FIELDS)}.")
        resolved = {}
        if self.kind == "danet" and self.in_channels is None:
            resolved["in_channels"] = 3
        for name in kind.required:
            if getattr(self, name) is None and name not in resolved:
                raise ValueError(f"`{name}` is required for kind {self.kind!r}.")
        for name in ("in_channels", "num_classes", "inter_channels", "out_channels", "reduction"):
            value = resolved.get(name, getattr(self, name))
            if value is not None:
                resolved[name] = _int(name, value)
        if self.kind == "dual_attention":
            resolved.setdefault("inter_channels", resolved["in_channels"] // 4)
            resolved.setdefault("out_channels", resolved["in_channels"])
        if "reduction" in kind.fields:
            channels = {"pam": resolved.get("in_channels"), "dual_attention": resolved.get("inter_channels"),
                        "head": resolved.get("in_channels", 0) // 4, "danet": layout.HEAD_IN_CHANNELS // 4}[self.kind]
            if channels // resolved["reduction"] < 1:
                raise ValueError(f"`reduction`={resolved['reduction']} leaves PAM no query channels: its input "
                                 f"has {channels} channels; use reduction <= {max(channels, 1)}.")
        if self.backbone not in BACKBONE_DEPTHS:
            raise ValueError(f"`backbone` must be one of {sorted(BACKBONE_DEPTHS)}, got {self.backbone!r}.")
        if self.output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"`output_stride` must be one of {list(OUTPUT_STRIDES)}, got {self.output_stride!r}.")
        if self.multi_grid is not None:
            resolved["multi_grid"] = check_multi_grid(self.multi_grid, BACKBONE_DEPTHS[self.backbone][3])
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}.")
        resolved["dropout"] = float(self.dropout)
        resolved["deep_stem"] = check_flag("deep_stem", self.deep_stem)
        if str(self.dtype) not in DTYPES:
            raise ValueError(f"`dtype` must be one of {list(DTYPES)}, got {self.dtype!r}.")
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"`data_format` must be one of {list(DATA_FORMATS)}, got {self.data_format!r}.")
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    # -- the record -------------------------------------------------------------------------------
    @property
    def info(self) -> Kind:
        """This kind's entry in :data:`KINDS`."""
        return KINDS[self.kind]

    def to_dict(self) -> dict:
        """The record as plain JSON types: the fields that apply to the kind, and ``version``."""
        out = {"version": RECORD_VERSION, "kind": self.kind}
        for name in self.info.fields + COMMON_FIELDS:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, record: dict) -> "ArchSpec":
        """The spec of a stored record (also the earlier form, which said ``arch`` and ``channels``)."""
        record = dict(record)
        record.pop("version", None)
        if "arch" in record and "kind" not in record:  # earlier records
            record["kind"] = record.pop("arch")
            channels = record.pop("channels", None)
            if record["kind"] != "danet":
                record["in_channels"] = channels
            for name in set(record) - set(KINDS.get(record["kind"], KINDS["danet"]).fields) - set(COMMON_FIELDS):
                if name != "kind":
                    record.pop(name)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"unknown architecture record field(s) {unknown}; known: {sorted(known)}.")
        return cls(**record)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "version")
        return f"ArchSpec({fields})"

    def replace(self, **changes) -> "ArchSpec":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def outputs(self) -> Tuple[str, ...]:
        return self.info.outputs

    @property
    def example_channels(self) -> int:
        """Input channels of example inputs: ``in_channels`` (8 for a ChannelAttention without a channel check)."""
        return self.in_channels or 8

    def describe(self) -> str:
        """One line naming the model, for messages."""
        if self.kind == "danet":
            stem = "deep stem" if self.deep_stem else "7x7 stem"
            grid = "no multi-grid" if self.multi_grid is None else f"multi-grid {self.multi_grid}"
            channels = "" if self.in_channels == 3 else f", {self.in_channels} input channels"
            return (f"DANet({self.backbone}, {self.num_classes} classes, {stem}, output stride "
                    f"{self.output_stride}, {grid}{channels})")
        args = ", ".join(f"{f}={getattr(self, f)}" for f in self.info.fields
                         if f not in ("reduction", "dropout") or getattr(self, f) != {"reduction": 8, "dropout": 0.1}[f])
        return f"{self.info.class_name}({args})"

    def expected_shapes(self) -> dict:
        return expected_shapes(self)

    def build_torch(self, initialize: bool = True):
        """The ``danet_torch`` module (eval mode, in ``dtype``); zeros, not random, without ``initialize``."""
        from .frameworks import build_torch

        return build_torch(self, initialize)

    def build_keras(self, initialize: bool = True):
        """The ``danet_keras`` layer or model, built (its variables exist), in ``dtype``; zero convolutions, not
        random, without ``initialize``."""
        from .frameworks import build_keras

        return build_keras(self, initialize)


def expected_shapes(spec: ArchSpec) -> dict:
    """``{torch state_dict name: shape}`` of ``spec``, in ``state_dict()`` order."""
    return dict(spec.info.rows(spec))


def apply_overrides(spec: ArchSpec, overrides: dict, source: str) -> tuple:
    """``(spec with overrides, notes)``: the one rule by which options change a record.

    Every key given in ``overrides`` replaces the field (``None`` is a value:
    ``multi_grid=None`` means no multi-grid); a note says so whenever the
    value differs from what ``source`` (for example "the stored record")
    said. Changing ``kind`` starts a new record of that kind from the fields
    that apply to it.

    Raises:
        ValueError: a field unknown, or not applicable, or a bad value.
    """
    notes = []
    if not overrides:
        return spec, notes
    known = {f.name for f in dataclasses.fields(ArchSpec)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown architecture option(s) {unknown}; known: {sorted(known)}.")
    current = spec.to_dict()
    current.pop("version")
    kind = overrides.get("kind", spec.kind)
    if kind != spec.kind:
        fields = KINDS[kind].fields + COMMON_FIELDS if kind in KINDS else ()
        current = {k: v for k, v in current.items() if k in fields}
        current["kind"] = kind
    for name, value in overrides.items():
        old = current.get(name, getattr(spec, name, None))
        old = tuple(old) if isinstance(old, list) else old
        new = tuple(value) if isinstance(value, list) else value
        if new != old:
            notes.append(f"option {name}={new!r} overrides {source}'s {old!r}")
        current[name] = value
    return ArchSpec(**current), notes
