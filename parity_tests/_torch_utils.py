"""Helpers for the PyTorch tests: random weights, state_dict <-> NumPy."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["randomize_", "state_numpy", "to_numpy"]


def randomize_(module: torch.nn.Module, seed: int = 0, gamma: float | None = None) -> torch.nn.Module:
    """Give every parameter and BatchNorm statistic non-default random values.

    Gammas get ``gamma`` if given, else random values in [0.5, 1.5).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma") and p.numel() == 1:
                p.fill_(gamma if gamma is not None else 0.5 + torch.rand(1, generator=g).item())
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                b.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
    return module


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64 if t.is_floating_point() else t.dtype).numpy()


def state_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: to_numpy(v) for k, v in module.state_dict().items()}
