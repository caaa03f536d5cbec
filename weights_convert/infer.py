"""The architecture of a set of weights, from their torch names and shapes; what cannot be seen is assumed aloud.

One engine for every source: a state_dict's names, and a Keras
``.weights.h5`` whose dataset paths were first translated to torch names
(:func:`weights_convert.io_keras.torch_names_of_h5`). Classes come from the
classifier, depth from the number of layer3 blocks, the stem from ``conv1``,
channels from ``conv5a`` / ``query_conv``, the reduction from the query conv.
Output stride, multi-grid and dropout are not in the weights: the released
checkpoint's values are assumed, and each assumption is said in a note that
names the option that changes it.
"""

from __future__ import annotations

import re
from typing import Mapping

from .arch import BACKBONE_DEPTHS, KINDS, ArchSpec, apply_overrides
from .errors import ConvertError
from .neutral import float_dtype

__all__ = ["infer_arch", "infer_record", "detect_kind", "ASSUMPTIONS"]

# field -> (what is assumed, how to change it)
ASSUMPTIONS = {
    "output_stride": "output stride 8 assumed (the released checkpoint's); pass `--output-stride 16` for weights "
                     "trained at output stride 16",
    "multi_grid": "multi-grid (4, 8, 16) assumed, as in the released checkpoint; mmseg-trained weights need "
                  "`--multi-grid none`",
    "dropout": "dropout 0.1 before the classifiers assumed (training only; `--dropout` to change)",
}


def _shape(shapes, key):
    value = shapes[key]
    return tuple(getattr(value, "shape", value))


def detect_kind(names) -> str | None:
    """The kind whose characteristic keys ``names`` hold, or ``None``."""
    names = set(names)
    if any(k.startswith(("pretrained.", "head.")) for k in names):
        return "danet"
    if "conv6.1.weight" in names or "conv8.1.weight" in names:
        return "head"
    if "conv5a.0.weight" in names:
        return "dual_attention"
    if "query_conv.weight" in names:
        return "pam"
    if names == {"gamma"}:
        return "cam"
    return None


def _reductions(channels: int, key_channels: int) -> list:
    return [r for r in range(1, channels + 1) if channels // r == key_channels]


def infer_record(weights: Mapping, hints: Mapping | None = None, overrides: Mapping | None = None):
    """``(ArchSpec, notes)`` for ``weights`` (``{torch name: array or shape}``).

    Args:
        weights: The weights, or their shapes.
        hints: Fields known from the source without being visible in the
            weights (an importer's, for example mmseg's ``multi_grid=None``);
            they are not reported as assumptions.
        overrides: Fields given by the user; they win, with a note when
            they change what was inferred (:func:`apply_overrides`).

    Raises:
        ConvertError: nothing recognisable, or the inferred record is invalid.
    """
    hints, overrides = dict(hints or {}), dict(overrides or {})
    kind = overrides.get("kind") or hints.get("kind") or detect_kind(weights)
    if kind is None:
        sample = ", ".join(list(weights)[:5]) or "(no tensors)"
        raise ConvertError(
            f"Cannot infer the architecture from the weights (first keys: {sample}); expected the keys of a DANet "
            f"(`pretrained.*`, `head.*`), DANetHead (`conv5a.*`, `conv6.1.*`), DualAttention, PositionAttention "
            f"(`query_conv.*`) or ChannelAttention (`gamma`). Pass --arch.")
    fields, notes = {"kind": kind, "dtype": float_dtype(weights)}, []
    prefix = "head." if kind == "danet" else ""
    try:
        if kind in ("head", "danet") and f"{prefix}conv8.1.weight" in weights:
            fields["num_classes"] = _shape(weights, f"{prefix}conv8.1.weight")[0]
        if kind in ("head", "dual_attention") and "conv5a.0.weight" in weights:
            fields["in_channels"] = _shape(weights, "conv5a.0.weight")[1]
            other = _shape(weights, "conv5c.0.weight")[1] if "conv5c.0.weight" in weights else fields["in_channels"]
            if other != fields["in_channels"] and "in_channels" not in overrides:
                raise ConvertError(f"Cannot infer in_channels: the input convs disagree: conv5a.0.weight takes "
                                   f"{fields['in_channels']} input channels, conv5c.0.weight {other}; pass "
                                   f"--in-channels (the strict check then names the one that does not fit).")
        if kind == "dual_attention":
            if "conv5a.0.weight" in weights:
                fields["inter_channels"] = _shape(weights, "conv5a.0.weight")[0]
            if "conv51.0.weight" in weights:
                fields["out_channels"] = _shape(weights, "conv51.0.weight")[0]
        query = {"pam": "query_conv.weight", "danet": "head.sa.query_conv.weight"}.get(kind, "sa.query_conv.weight")
        if kind == "pam" and query in weights:
            fields["in_channels"] = _shape(weights, query)[1]
        if query in weights and "reduction" not in overrides:
            channels, key_channels = _shape(weights, query)[1], _shape(weights, query)[0]
            options = _reductions(channels, key_channels)
            fields["reduction"] = 8 if 8 in options else (options[0] if options else 8)
            if len(options) > 1 and 8 not in options:
                notes.append(f"reduction {fields['reduction']} assumed: any of {options[0]}..{options[-1]} gives "
                             f"{key_channels} query channels for {channels} channels (identical models; "
                             f"`--reduction` to record another)")
        if kind == "danet":
            blocks = {int(m.group(1)) for k in weights if (m := re.match(r"pretrained\.layer3\.(\d+)\.", k))}
            by_blocks = {depth[2]: name for name, depth in BACKBONE_DEPTHS.items()}
            if blocks and max(blocks) + 1 in by_blocks:
                fields["backbone"] = by_blocks[max(blocks) + 1]
            elif blocks and "backbone" not in overrides:  # a ResNet-152's 36: not a ResNet-101 with extra keys
                known = " or ".join(f"{d[2]} ({name})" for name, d in BACKBONE_DEPTHS.items())
                raise ConvertError(f"Cannot infer the backbone: layer3 has {max(blocks) + 1} blocks; DANet's "
                                   f"backbones have {known}. Pass --backbone (with --allow-partial, the blocks "
                                   f"that fit are loaded).")
            fields["deep_stem"] = "pretrained.conv1.0.weight" in weights
            stem = "pretrained.conv1.0.weight" if fields["deep_stem"] else "pretrained.conv1.weight"
            if stem in weights:
                fields["in_channels"] = _shape(weights, stem)[1]
    except (IndexError, TypeError) as e:  # a tensor of the wrong rank
        raise ConvertError(f"Cannot infer the architecture: a tensor has an unexpected rank ({e}).") from e
    fields.update(hints)
    # A required field the weights do not show (`num_classes` of weights without a classifier) is the option's
    # from the start: no record can be made without it, so it cannot wait to override one.
    if kind in KINDS:
        fields.update({k: overrides[k] for k in KINDS[kind].required if k not in fields and k in overrides})
        for name in ASSUMPTIONS:
            if name in KINDS[kind].fields and name not in hints and name not in overrides:
                notes.append(ASSUMPTIONS[name])
    try:
        spec, changed = apply_overrides(ArchSpec(**{k: v for k, v in fields.items() if k in _applicable(kind)}),
                                        overrides, "the weights")
    except ValueError as e:
        raise ConvertError(f"{e} (inferred from the weights: {fields}; pass it as an option).") from e
    return spec, notes + changed


def _applicable(kind):
    return ("kind", "dtype", "data_format") + (KINDS[kind].fields if kind in KINDS else ())


def infer_arch(weights: Mapping, **overrides) -> ArchSpec:
    """The :class:`ArchSpec` of ``weights``; ``overrides`` (record fields) win. See :func:`infer_record`."""
    return infer_record(weights, overrides=overrides)[0]
