"""The DANet head: the dual-attention trunk and the three classifiers (NCHW)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ._checks import check_input, check_positive_int
from .attention import ChannelAttention, PositionAttention

__all__ = ["DualAttention", "DANetHead", "conv_bn_relu"]

NormLayer = Callable[[int], nn.Module]


def conv_bn_relu(in_channels: int, out_channels: int, norm_layer: NormLayer) -> nn.Sequential:
    """``Sequential(Conv2d 3x3 pad 1 no bias, norm, ReLU)``: keys ``.0.weight``, ``.1.*``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        norm_layer(out_channels),
        nn.ReLU(),
    )


def _check_reduction(inter_channels: int, reduction: int, given: str, fix: str) -> None:
    """Refuse ``inter_channels // reduction == 0`` (no query/key channels) in the words of the caller's
    arguments: ``given`` says where ``inter_channels`` came from, ``fix`` what to change. PAM's own check
    would name its ``in_channels``, a value the caller of DualAttention or DANetHead never passed."""
    check_positive_int("reduction", reduction)
    if inter_channels // reduction < 1:
        raise ValueError(f"{given} too few for `reduction`={reduction} (PAM's query/key channels are "
                         f"inter_channels // reduction): {fix} or `reduction` <= {inter_channels}.")


class DualAttention(nn.Module):
    """DANet's attention trunk, usable on its own (for example in a U-Net).

    ``conv5a -> PAM (sa) -> conv51`` and ``conv5c -> CAM (sc) -> conv52``,
    summed. With ``out_channels=in_channels`` (the default) it is a drop-in
    block that keeps the feature shape.

    Args:
        in_channels: Input channels.
        out_channels: Output channels (default: ``in_channels``).
        inter_channels: Channels inside the attention (default
            ``in_channels // 4``, as the official head).
        reduction: PAM's query/key reduction (8).
        norm_layer: Normalisation constructor (``nn.BatchNorm2d``).
        pam_path: PAM's path, ``"auto"``, ``"official"`` or ``"efficient"``
            (see :class:`PositionAttention`).

    Shape:
        ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, inter_channels: int | None = None,
                 reduction: int = 8, norm_layer: NormLayer = nn.BatchNorm2d, pam_path: str = "auto"):
        super().__init__()
        check_positive_int("in_channels", in_channels)
        out_channels = in_channels if out_channels is None else check_positive_int("out_channels", out_channels)
        if inter_channels is None:
            inter_channels = in_channels // 4
            if inter_channels < 1:
                raise ValueError(f"`in_channels` // 4 must be >= 1 (default inter_channels), got "
                                 f"in_channels={in_channels}; pass `inter_channels` explicitly.")
            _check_reduction(inter_channels, reduction,
                             f"`in_channels`={in_channels} gives the default `inter_channels` = in_channels // 4 = "
                             f"{inter_channels},", f"use `in_channels` >= {4 * reduction}, or pass "
                             f"`inter_channels` >= {reduction}")
        check_positive_int("inter_channels", inter_channels)
        _check_reduction(inter_channels, reduction, f"`inter_channels`={inter_channels} is",
                         f"pass `inter_channels` >= {reduction}")
        self.in_channels, self.out_channels, self.inter_channels = in_channels, out_channels, inter_channels
        self.reduction = reduction
        self.conv5a = conv_bn_relu(in_channels, inter_channels, norm_layer)
        self.conv5c = conv_bn_relu(in_channels, inter_channels, norm_layer)
        self.sa = PositionAttention(inter_channels, reduction=reduction, pam_path=pam_path)
        self.sc = ChannelAttention(inter_channels)
        self.conv51 = conv_bn_relu(inter_channels, out_channels, norm_layer)
        self.conv52 = conv_bn_relu(inter_channels, out_channels, norm_layer)

    def forward_branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sa_conv, sc_conv)``: the position and channel branches before the sum."""
        check_input(x, self.in_channels, type(self).__name__)
        sa_conv = self.conv51(self.sa(self.conv5a(x)))
        sc_conv = self.conv52(self.sc(self.conv5c(x)))
        return sa_conv, sc_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sa_conv, sc_conv = self.forward_branches(x)
        return sa_conv + sc_conv


class DANetHead(DualAttention):
    """The official ``DANetHead``: state_dict keys are exactly upstream's.

    Args:
        in_channels: Backbone channels (2048 for ResNet).
        num_classes: Classes of the three classifiers.
        norm_layer: Normalisation constructor (``nn.BatchNorm2d``).
        dropout: ``Dropout2d`` rate before each classifier (0.1).
        pam_path: PAM's path, ``"auto"``, ``"official"`` or ``"efficient"``
            (see :class:`PositionAttention`).

    Returns:
        ``(fused, pam, cam)`` logits, each ``(B, num_classes, H, W)``:
        ``conv8(sa_conv + sc_conv)``, ``conv6(sa_conv)``, ``conv7(sc_conv)``.
    """

    def __init__(self, in_channels: int, num_classes: int, norm_layer: NormLayer = nn.BatchNorm2d,
                 reduction: int = 8, dropout: float = 0.1, pam_path: str = "auto"):
        check_positive_int("in_channels", in_channels, minimum=4)
        check_positive_int("num_classes", num_classes)
        inter = in_channels // 4
        _check_reduction(inter, reduction, f"DANetHead: `in_channels`={in_channels} gives inter_channels = "
                         f"in_channels // 4 = {inter},", f"use `in_channels` >= {4 * reduction}")
        super().__init__(in_channels, out_channels=inter, inter_channels=inter, reduction=reduction,
                         norm_layer=norm_layer, pam_path=pam_path)
        self.num_classes, self.dropout = num_classes, float(dropout)
        self.conv6 = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(inter, num_classes, 1))
        self.conv7 = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(inter, num_classes, 1))
        self.conv8 = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(inter, num_classes, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sa_conv, sc_conv = self.forward_branches(x)
        return self.conv8(sa_conv + sc_conv), self.conv6(sa_conv), self.conv7(sc_conv)

    def attention_maps(self, features: torch.Tensor, points, size=None):
        """PAM rows of the query ``points``, CAM's matrix and the segmentation, in one pass.

        Args:
            features: ``(B, C, h, w)`` backbone features.
            points: ``(row, col)`` pixel pairs in the ``size`` frame.
            size: ``(H, W)`` of the image the features come from (default ``(h, w)``).

        Returns:
            :class:`~danet_torch.attention_maps.AttentionMaps`.
        """
        from .attention_maps import head_attention_maps

        return head_attention_maps(self, features, points, size=size)
