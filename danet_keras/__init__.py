"""DANet dual attention (Fu et al., CVPR 2019) as Keras 3 layers (NHWC by default, every backend)."""

from .attention import CAM_Module, ChannelAttention, PAM_Module, PositionAttention
from .backbone import Bottleneck, DilatedResNet, resnet50, resnet101
from .head import DANetHead, DualAttention
from .layers import BatchNorm, Conv2d, MaxPool2d, resize_bilinear_align_corners
from .model import DANet
from . import distribution, losses, metrics, pam  # registers the loss and the metric for .keras reloads

__all__ = [
    "PositionAttention",
    "ChannelAttention",
    "PAM_Module",
    "CAM_Module",
    "DualAttention",
    "DANetHead",
    "Bottleneck",
    "DilatedResNet",
    "resnet50",
    "resnet101",
    "DANet",
    "Conv2d",
    "BatchNorm",
    "MaxPool2d",
    "resize_bilinear_align_corners",
    "distribution",
    "losses",
    "metrics",
    "pam",
]
