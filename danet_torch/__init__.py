"""DANet dual attention in PyTorch (NCHW), faithful to the official code."""

from .attention import CAM_Module, ChannelAttention, PAM_Module, PositionAttention
from .backbone import Bottleneck, DilatedResNet, resnet50, resnet101
from .head import DANetHead, DualAttention
from .model import DANet, danet_loss
from . import pam

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
    "danet_loss",
    "pam",
]
