"""The official DANet state_dict layout, written from REFERENCE.md (not from our modules).

Used by the tests to check that our modules' keys and shapes are upstream's.
"""

from __future__ import annotations

__all__ = ["head_keys", "backbone_keys", "danet_keys"]

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix, c):
    return [(f"{prefix}.{n}", () if n == "num_batches_tracked" else (c,)) for n in BN]


def head_keys(in_channels: int, num_classes: int, prefix: str = ""):
    """``[(key, shape)]`` of ``DANetHead(in_channels, num_classes)`` in upstream order."""
    inter = in_channels // 4
    keys = []
    keys += [(f"{prefix}conv5a.0.weight", (inter, in_channels, 3, 3))] + _bn(f"{prefix}conv5a.1", inter)
    keys += [(f"{prefix}conv5c.0.weight", (inter, in_channels, 3, 3))] + _bn(f"{prefix}conv5c.1", inter)
    keys += [(f"{prefix}sa.gamma", (1,)),
             (f"{prefix}sa.query_conv.weight", (inter // 8, inter, 1, 1)), (f"{prefix}sa.query_conv.bias", (inter // 8,)),
             (f"{prefix}sa.key_conv.weight", (inter // 8, inter, 1, 1)), (f"{prefix}sa.key_conv.bias", (inter // 8,)),
             (f"{prefix}sa.value_conv.weight", (inter, inter, 1, 1)), (f"{prefix}sa.value_conv.bias", (inter,))]
    keys += [(f"{prefix}sc.gamma", (1,))]
    keys += [(f"{prefix}conv51.0.weight", (inter, inter, 3, 3))] + _bn(f"{prefix}conv51.1", inter)
    keys += [(f"{prefix}conv52.0.weight", (inter, inter, 3, 3))] + _bn(f"{prefix}conv52.1", inter)
    for name in ("conv6", "conv7", "conv8"):
        keys += [(f"{prefix}{name}.1.weight", (num_classes, inter, 1, 1)), (f"{prefix}{name}.1.bias", (num_classes,))]
    return keys


def backbone_keys(depth: int, deep_stem: bool = False, prefix: str = "pretrained."):
    """``[(key, shape)]`` of the dilated ResNet, torchvision naming, no ``fc``."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    keys = []
    if deep_stem:
        keys += [(f"{prefix}conv1.0.weight", (64, 3, 3, 3))] + _bn(f"{prefix}conv1.1", 64)
        keys += [(f"{prefix}conv1.3.weight", (64, 64, 3, 3))] + _bn(f"{prefix}conv1.4", 64)
        keys += [(f"{prefix}conv1.6.weight", (128, 64, 3, 3))] + _bn(f"{prefix}bn1", 128)
        inplanes = 128
    else:
        keys += [(f"{prefix}conv1.weight", (64, 3, 7, 7))] + _bn(f"{prefix}bn1", 64)
        inplanes = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for i in range(n):
            p = f"{prefix}layer{stage}.{i}"
            keys += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1))] + _bn(f"{p}.bn1", planes)
            keys += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{p}.bn2", planes)
            keys += [(f"{p}.conv3.weight", (planes * 4, planes, 1, 1))] + _bn(f"{p}.bn3", planes * 4)
            if i == 0:
                keys += [(f"{p}.downsample.0.weight", (planes * 4, inplanes, 1, 1))] + _bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    return keys


def danet_keys(num_classes: int, depth: int = 101, deep_stem: bool = False):
    return backbone_keys(depth, deep_stem) + head_keys(2048, num_classes, prefix="head.")
