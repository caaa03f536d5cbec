"""Input checks shared by the PyTorch modules: clear errors naming the argument."""

from __future__ import annotations

import numbers

import torch

__all__ = ["check_input", "check_positive_int"]


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as a Python int (NumPy integers accepted); ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def check_input(x, channels: int | None, layer: str) -> None:
    """Raise if ``x`` is not a 4-D floating tensor with ``channels`` channels (NCHW)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: `x` must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}.")
    if x.dim() != 4:
        raise ValueError(
            f"{layer}: `x` must be 4-D (B, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise TypeError(
            f"{layer}: `x` must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}.")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{layer}: `x` has {x.shape[1]} channels (shape {tuple(x.shape)}), but the layer was built "
            f"for in_channels={channels}.")
