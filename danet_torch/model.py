"""DANet (Fu et al., CVPR 2019): dilated ResNet + ``DANetHead``, three outputs at input size."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_input, check_positive_int
from .backbone import DilatedResNet
from .head import DANetHead

__all__ = ["DANet", "danet_loss"]

BACKBONES = {"resnet50": 50, "resnet101": 101}


class DANet(nn.Module):
    """DANet with the official attribute names (``pretrained``, ``head``).

    The defaults reproduce the released Cityscapes checkpoint's architecture:
    ResNet-101, output stride 8, 7x7 stem, layer4 multi-grid dilations
    (4, 8, 16). Inputs are ImageNet-normalised RGB; normalisation happens
    outside the model, as upstream.

    Args:
        num_classes: Classes (19 for Cityscapes).
        backbone: ``"resnet50"`` or ``"resnet101"``.
        output_stride: 8 or 16 (32: plain ResNet).
        deep_stem: Three 3x3 stem convs (mmseg's ResNetV1c) instead of 7x7.
        multi_grid: layer4 dilations, or ``None`` for the plain dilated rule.
        norm_layer: Normalisation constructor.
        dropout: Dropout2d rate before each classifier.
        pam_path: PAM's path, ``"auto"``, ``"official"`` or ``"efficient"``
            (see :class:`~danet_torch.PositionAttention`).
        in_channels: Input channels (3: RGB; 1 for MRI, 4 for RGB + another band, ...).
        reduction: PAM's query/key reduction (8).
        pretrained_backbone: Path of ImageNet ResNet weights (torchvision/timm
            keys, ``.pth``/``.safetensors``/``.npz``) loaded into ``pretrained``
            by :meth:`load_pretrained_backbone`; ``None`` keeps the random init.

    Returns:
        ``(fused, pam, cam)`` logits, each ``(B, num_classes, H, W)`` at the
        input size, upsampled bilinearly with ``align_corners=True``.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet101", output_stride: int = 8,
                 deep_stem: bool = False, multi_grid: Sequence[int] | None = (4, 8, 16),
                 norm_layer=nn.BatchNorm2d, dropout: float = 0.1, pam_path: str = "auto",
                 in_channels: int = 3, pretrained_backbone=None, reduction: int = 8):
        super().__init__()
        num_classes = check_positive_int("num_classes", num_classes)
        if backbone not in BACKBONES:
            raise ValueError(f"`backbone` must be one of {sorted(BACKBONES)}, got {backbone!r}.")
        self.num_classes, self.backbone = num_classes, backbone
        self.pretrained = DilatedResNet(BACKBONES[backbone], output_stride=output_stride, deep_stem=deep_stem,
                                        multi_grid=multi_grid, norm_layer=norm_layer, in_channels=in_channels)
        self.head = DANetHead(2048, num_classes, norm_layer=norm_layer, dropout=dropout, pam_path=pam_path,
                              reduction=reduction)
        # Every constructor argument that shapes the model, under its own name (the architecture record reads them).
        self.in_channels, self.output_stride = self.pretrained.in_channels, self.pretrained.output_stride
        self.deep_stem, self.multi_grid = self.pretrained.deep_stem, self.pretrained.multi_grid
        self.reduction, self.dropout = self.head.reduction, self.head.dropout
        self.backbone_notes: list = []
        if pretrained_backbone is not None:
            self.backbone_notes = self.load_pretrained_backbone(pretrained_backbone)

    def load_pretrained_backbone(self, path) -> list:
        """Load ImageNet ResNet weights into ``pretrained``, strictly; returns the reader's notes.

        Reads ``path`` with :func:`weights_convert.backbone.read_imagenet_backbone`
        (``fc.*`` ignored, ``conv1`` adapted to ``in_channels`` by timm's rule)
        and copies every backbone tensor (cast to the model's dtype).
        """
        from weights_convert.backbone import read_imagenet_backbone
        from weights_convert.neutral import numpy_to_tensor

        neutral, notes = read_imagenet_backbone(path, depth=self.pretrained.depth, deep_stem=self.pretrained.deep_stem,
                                                in_channels=self.in_channels)
        state = {k[len("pretrained."):]: numpy_to_tensor(v) for k, v in neutral.items()}
        self.pretrained.load_state_dict(state, strict=True)
        return notes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_input(x, self.in_channels, type(self).__name__)
        size = x.shape[-2:]
        c4 = self.pretrained(x)[-1]
        return tuple(F.interpolate(y, size=size, mode="bilinear", align_corners=True) for y in self.head(c4))

    def attention_maps(self, images: torch.Tensor, points):
        """What the attention sees for query ``points`` in image pixels (the paper's Figure 4).

        Args:
            images: ``(B, 3, H, W)``, ImageNet-normalised RGB.
            points: ``(row, col)`` pixel pairs, mapped to the feature grid with the
                ``align_corners=True`` geometry and back.

        Returns:
            :class:`~danet_torch.attention_maps.AttentionMaps`: ``pam`` ``(B, P, H, W)``,
            ``cam`` ``(B, C, C)``, ``segmentation`` ``(B, H, W)``, the grid points used.
        """
        from .attention_maps import danet_attention_maps

        return danet_attention_maps(self, images, points)


def danet_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Upstream's training loss: the sum of three equally weighted cross-entropies."""
    return sum(F.cross_entropy(o, target, ignore_index=ignore_index) for o in outputs)
