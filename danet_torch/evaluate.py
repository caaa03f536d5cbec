"""Validation of ``danet-train``: precise BatchNorm statistics, then per-class IoU over whole images.

:func:`precise_bn` is upstream's ``encoding/utils/precise_bn.py`` (from
fvcore): with the weights fixed, the BatchNorm running statistics are set to
the average of the batch statistics of ``batches`` training batches, so that
evaluation (which uses the running statistics) sees the current weights'
statistics, not a momentum average over weights that have since changed.
It matters for short runs; upstream's recipe does not call it (``--precise-bn 0``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .data import IGNORE_INDEX
from .distributed import all_reduce_sum
from .metrics import confusion_matrix, segmentation_metrics

__all__ = ["precise_bn", "evaluate"]


@torch.no_grad()
def precise_bn(model: nn.Module, loader, batches: int, device, dtype) -> int:
    """Recompute every BatchNorm's running mean/var as the average over ``batches`` batches of ``loader``.

    ``num_batches_tracked`` keeps its value. Returns the batches used. Under
    several processes every rank must call it with the same ``batches``
    (synchronized BatchNorm averages over all of them).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if batches <= 0 or not bns:
        return 0
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: running = mean of the batch statistics seen
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    used = 0
    for images, _ in loader:
        if used == batches:
            break
        model(images.to(device, dtype))
        used += 1
    for m, (momentum, count) in zip(bns, saved):
        m.momentum = momentum
        m.num_batches_tracked.copy_(count)
    return used


def evaluate(model: nn.Module, dataset, ctx, num_classes: int, amp_dtype=None, workers: int = 0) -> dict:
    """Per-class IoU, mIoU and pixel accuracy of ``model`` on ``dataset`` (whole images, split over ranks)."""
    from torch.utils.data import DataLoader, Subset

    model.eval()
    part = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=ctx.device)
    dtype = next(model.parameters()).dtype
    with torch.no_grad(), torch.autocast(ctx.device.type, dtype=amp_dtype or torch.float32,
                                         enabled=amp_dtype is not None):
        for x, y in DataLoader(part, batch_size=1, num_workers=workers):
            pred = model(x.to(ctx.device, dtype))[0].argmax(1)
            cm += confusion_matrix(pred, y.to(ctx.device), num_classes, IGNORE_INDEX)
    return segmentation_metrics(all_reduce_sum(cm, ctx).cpu())
