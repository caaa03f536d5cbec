"""Synchronized BatchNorm for CPU process groups (gloo), and the model conversion for any device.

``torch.nn.SyncBatchNorm`` computes the batch statistics over every process
of the group, but only for CUDA (and XPU/HPU) tensors: on CPU its kernels
are missing and ``DistributedDataParallel`` refuses it. On CUDA,
:func:`convert_sync_batchnorm` uses ``torch.nn.SyncBatchNorm`` itself; on
CPU it uses :class:`SyncBatchNorm` here, a ``BatchNorm2d`` that computes the
same global statistics with differentiable
``torch.distributed.nn.functional.all_reduce`` (the sums of ``x``, of
``(x - mean)^2`` and the pixel count over all processes), so training on CPU
processes equals one process on the concatenated batch, statistics and
gradients alike. Running statistics follow ``nn.BatchNorm2d``: momentum
update with the unbiased global variance, ``num_batches_tracked`` counted.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum over the group (the backward sums the gradients over the group too)."""
    import torch.distributed._functional_collectives as fc

    if hasattr(fc, "all_reduce_backward"):  # newer torch: autograd registered for the functional collective
        return fc.wait_tensor(fc.all_reduce(t, "sum", group))
    from torch.distributed.nn.functional import all_reduce  # older torch: the autograd.Function version

    return all_reduce(t, group=group)


class SyncBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics span every process of ``process_group`` (any device).

    Same arguments as ``nn.BatchNorm2d`` plus ``process_group`` (default: the
    whole world); same state_dict keys. Without an initialised process group
    of more than one process it is ``nn.BatchNorm2d``.

    Shape:
        ``(B, C, H, W)`` -> same.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)
        self.process_group = process_group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        sync = (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group or dist.group.WORLD) > 1)
        if not sync:
            return super().forward(input)
        self._check_input_dim(input)
        group = self.process_group or dist.group.WORLD
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() / input.shape[1]], dtype=input.dtype, device=input.device)
        total = _all_reduce(torch.cat([input.sum(dims), count]), group)
        n = total[-1]
        mean = total[:-1] / n
        centred = input - mean.reshape(shape)
        var = _all_reduce((centred * centred).sum(dims), group) / n  # biased: used to normalise
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        return out


def convert_sync_batchnorm(module: nn.Module, process_group=None, device=None) -> nn.Module:
    """Every ``nn.BatchNorm2d`` of ``module`` synchronized (parameters and buffers shared, keys unchanged).

    ``device`` of type CUDA (or XPU/HPU): ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``;
    otherwise (CPU, the default) :class:`SyncBatchNorm` of this module.
    """
    if device is not None and torch.device(device).type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group, device))
    del module
    return out
