"""The state_dict names and shapes of every architecture, in ``danet_torch``'s order, without any framework.

Strict checks, ``.weights.h5`` reading and the weight map need the names and
shapes before any model exists; a test checks them against ``state_dict()``.
"""

from __future__ import annotations

__all__ = ["BACKBONE_DEPTHS", "pam_rows", "cam_rows", "dual_attention_rows", "head_rows", "resnet_rows",
           "danet_rows"]

BACKBONE_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
HEAD_IN_CHANNELS = 2048  # DANet's head reads ResNet's last stage


def _conv(prefix, o, i, k, bias):
    out = [(f"{prefix}weight", (o, i, k, k))]
    return out + [(f"{prefix}bias", (o,))] if bias else out


def _bn(prefix, c):
    return [(f"{prefix}{n}", (c,)) for n in ("weight", "bias", "running_mean", "running_var")] + \
        [(f"{prefix}num_batches_tracked", ())]


def _conv_bn(prefix, i, o):
    return _conv(f"{prefix}0.", o, i, 3, False) + _bn(f"{prefix}1.", o)


def pam_rows(c: int, reduction: int, prefix: str = "") -> list:
    k = c // reduction
    return ([(f"{prefix}gamma", (1,))] + _conv(f"{prefix}query_conv.", k, c, 1, True)
            + _conv(f"{prefix}key_conv.", k, c, 1, True) + _conv(f"{prefix}value_conv.", c, c, 1, True))


def cam_rows(prefix: str = "") -> list:
    return [(f"{prefix}gamma", (1,))]


def dual_attention_rows(c: int, inter: int, out: int, reduction: int, prefix: str = "") -> list:
    return (_conv_bn(f"{prefix}conv5a.", c, inter) + _conv_bn(f"{prefix}conv5c.", c, inter)
            + pam_rows(inter, reduction, f"{prefix}sa.") + cam_rows(f"{prefix}sc.")
            + _conv_bn(f"{prefix}conv51.", inter, out) + _conv_bn(f"{prefix}conv52.", inter, out))


def head_rows(c: int, num_classes: int, reduction: int, prefix: str = "") -> list:
    inter = c // 4
    rows = dual_attention_rows(c, inter, inter, reduction, prefix)
    for name in ("conv6", "conv7", "conv8"):
        rows += _conv(f"{prefix}{name}.1.", num_classes, inter, 1, True)
    return rows


def resnet_rows(backbone: str, deep_stem: bool, in_channels: int = 3, prefix: str = "pretrained.") -> list:
    if deep_stem:
        rows = (_conv(f"{prefix}conv1.0.", 64, in_channels, 3, False) + _bn(f"{prefix}conv1.1.", 64)
                + _conv(f"{prefix}conv1.3.", 64, 64, 3, False) + _bn(f"{prefix}conv1.4.", 64)
                + _conv(f"{prefix}conv1.6.", 128, 64, 3, False))
        inplanes = 128
    else:
        rows, inplanes = _conv(f"{prefix}conv1.", 64, in_channels, 7, False), 64
    rows += _bn(f"{prefix}bn1.", inplanes)
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), BACKBONE_DEPTHS[backbone]), start=1):
        for b in range(blocks):
            p = f"{prefix}layer{stage}.{b}."
            rows += (_conv(f"{p}conv1.", planes, inplanes, 1, False) + _bn(f"{p}bn1.", planes)
                     + _conv(f"{p}conv2.", planes, planes, 3, False) + _bn(f"{p}bn2.", planes)
                     + _conv(f"{p}conv3.", planes * 4, planes, 1, False) + _bn(f"{p}bn3.", planes * 4))
            if b == 0:  # every stage's first block changes channels (and/or stride)
                rows += _conv(f"{p}downsample.0.", planes * 4, inplanes, 1, False) + _bn(f"{p}downsample.1.", planes * 4)
            inplanes = planes * 4
    return rows


def danet_rows(backbone: str, deep_stem: bool, num_classes: int, reduction: int, in_channels: int = 3) -> list:
    return resnet_rows(backbone, deep_stem, in_channels) + head_rows(HEAD_IN_CHANNELS, num_classes, reduction, "head.")
