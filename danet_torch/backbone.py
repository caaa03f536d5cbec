"""Dilated ResNet-50/101, the DANet backbone (keys as upstream and torchvision, no ``fc``)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from weights_convert.arch import check_flag, check_multi_grid, layer_dilations

from ._checks import check_input, check_positive_int

__all__ = ["Bottleneck", "DilatedResNet", "resnet50", "resnet101", "layer_dilations", "DEPTHS"]

NormLayer = Callable[[int], nn.Module]
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class Bottleneck(nn.Module):
    """ResNet bottleneck (expansion 4), stride and dilation on ``conv2`` (ResNet v1.5)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm_layer(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.stride, self.dilation = stride, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class DilatedResNet(nn.Module):
    """Dilated ResNet (Bottleneck), the official ``encoding`` backbone without ``fc``.

    Args:
        depth: 50 or 101.
        output_stride: 8 (DANet), 16 or 32.
        deep_stem: Three 3x3 convs (64, 64, 128) instead of one 7x7 conv.
        multi_grid: Dilations of the layer4 blocks, or ``None``.
        norm_layer: Normalisation constructor.
        in_channels: Input channels (3: RGB; 1 for MRI, 4 for RGB + another band, ...).

    Shape:
        ``(B, in_channels, H, W)`` -> ``(c1, c2, c3, c4)`` with 256, 512, 1024, 2048 channels.
    """

    def __init__(self, depth: int = 101, output_stride: int = 8, deep_stem: bool = False,
                 multi_grid: Sequence[int] | None = None, norm_layer: NormLayer = nn.BatchNorm2d,
                 in_channels: int = 3):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"`depth` must be one of {sorted(DEPTHS)}, got {depth!r}.")
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.depth, self.output_stride = depth, output_stride
        self.deep_stem, self.multi_grid = check_flag("deep_stem", deep_stem), check_multi_grid(multi_grid)
        if self.deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_channels, 64, 3, stride=2, padding=1, bias=False), norm_layer(64), nn.ReLU(),
                nn.Conv2d(64, 64, 3, padding=1, bias=False), norm_layer(64), nn.ReLU(),
                nn.Conv2d(64, 128, 3, padding=1, bias=False),
            )
            self.inplanes = 128
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.inplanes = 64
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = layer_dilations(DEPTHS[depth], output_stride, multi_grid)
        for i, (planes, (stride, dilations)) in enumerate(zip((64, 128, 256, 512), stages), start=1):
            setattr(self, f"layer{i}", self._make_layer(planes, stride, dilations, norm_layer))

    def _make_layer(self, planes, stride, dilations, norm_layer) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       norm_layer(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, dilations[0], downsample, norm_layer)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, 1, d, None, norm_layer) for d in dilations[1:]]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor):
        check_input(x, self.in_channels, type(self).__name__)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4


def resnet50(**kwargs) -> DilatedResNet:
    return DilatedResNet(depth=50, **kwargs)


def resnet101(**kwargs) -> DilatedResNet:
    return DilatedResNet(depth=101, **kwargs)
