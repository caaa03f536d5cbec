"""Infer the architecture from the weights; explicit options override.

Classes come from the classifier's shape, depth from the number of layer3
blocks, the stem from ``conv1``, channels from ``conv5a``. Output stride and
multi-grid are not in the weights: the released checkpoint's (8, (4, 8, 16))
are the defaults.
"""

from __future__ import annotations

import re
from typing import Mapping

from .arch import ArchSpec, BACKBONE_DEPTHS
from .errors import ConvertError
from .neutral import float_dtype

__all__ = ["infer_arch"]


def _shape(neutral, key):
    return tuple(neutral[key].shape)


def _reduction(channels: int, key_channels: int) -> int:
    return max(1, channels // max(1, key_channels))


def infer_arch(neutral: Mapping, **overrides) -> ArchSpec:
    """An :class:`ArchSpec` for ``neutral`` (``{torch name: array}``).

    Args:
        neutral: The weights.
        **overrides: ``ArchSpec`` fields that win over what is inferred
            (``arch``, ``num_classes``, ``backbone``, ``deep_stem``,
            ``output_stride``, ``multi_grid``, ``channels``, ...). ``None`` is ignored
            (except ``multi_grid=None``, which means no multi-grid).

    Raises:
        ConvertError: nothing recognisable in the weights and no ``arch`` given.
    """
    keys = list(neutral)
    inferred: dict = {"dtype": float_dtype(neutral)}
    arch = overrides.get("arch")
    if arch is None:
        if any(k.startswith("pretrained.") for k in keys) or any(k.startswith("head.") for k in keys):
            arch = "danet"
        elif "conv6.1.weight" in neutral or "conv8.1.weight" in neutral:
            arch = "head"
        elif "conv5a.0.weight" in neutral:
            arch = "dual_attention"
        elif "query_conv.weight" in neutral:
            arch = "pam"
        elif keys == ["gamma"]:
            arch = "cam"
        else:
            sample = ", ".join(keys[:5]) or "(no tensors)"
            raise ConvertError(
                f"Cannot infer the architecture from the weights (first keys: {sample}); expected the keys of "
                f"a DANet (`pretrained.*`, `head.*`), DANetHead (`conv5a.*`, `conv6.1.*`), DualAttention, "
                f"PositionAttention (`query_conv.*`) or ChannelAttention (`gamma`). Pass --arch.")
    inferred["arch"] = arch
    prefix = "head." if arch == "danet" else ""
    try:
        if arch in ("head", "danet") and f"{prefix}conv8.1.weight" in neutral:
            inferred["num_classes"] = _shape(neutral, f"{prefix}conv8.1.weight")[0]
        if arch in ("head", "dual_attention") and "conv5a.0.weight" in neutral:
            inferred["channels"] = _shape(neutral, "conv5a.0.weight")[1]
        if arch == "dual_attention":
            if "conv5a.0.weight" in neutral:
                inferred["inter_channels"] = _shape(neutral, "conv5a.0.weight")[0]
            if "conv51.0.weight" in neutral:
                inferred["out_channels"] = _shape(neutral, "conv51.0.weight")[0]
        if arch == "pam" and "query_conv.weight" in neutral:
            inferred["channels"] = _shape(neutral, "query_conv.weight")[1]
        q = f"{prefix}sa.query_conv.weight" if arch != "pam" else "query_conv.weight"
        if q in neutral:
            c, k = _shape(neutral, q)[1], _shape(neutral, q)[0]
            inferred["reduction"] = _reduction(c, k)
        if arch == "danet":
            blocks = {int(m.group(1)) for k in keys if (m := re.match(r"pretrained\.layer3\.(\d+)\.", k))}
            if blocks:
                n3 = max(blocks) + 1
                by_n3 = {d[2]: name for name, d in BACKBONE_DEPTHS.items()}
                if n3 in by_n3:
                    inferred["backbone"] = by_n3[n3]
            inferred["deep_stem"] = "pretrained.conv1.0.weight" in neutral
    except (IndexError, TypeError) as e:  # a tensor of the wrong rank
        raise ConvertError(f"Cannot infer the architecture: a tensor has an unexpected rank ({e}).") from e
    merged = dict(inferred)
    for k, v in overrides.items():
        if v is not None or k == "multi_grid":
            merged[k] = v
    try:
        return ArchSpec.from_dict(merged)
    except ValueError as e:
        raise ConvertError(f"{e} (inferred from the weights: {inferred}; pass it as an option).") from e
