"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel accuracy.

The confusion matrix counts pixels by (true class, predicted class), ignored
pixels left out; it adds up over batches and over processes (one
``all_reduce``), so the metrics of a distributed validation are exactly
those of one process. mIoU averages the IoU of the classes that occur
(in the labels or the predictions); a class absent from both has no IoU
(``nan``), as mmsegmentation and ``keras.metrics.MeanIoU`` do.
"""

from __future__ import annotations

import math

import torch

__all__ = ["confusion_matrix", "segmentation_metrics"]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows = true class, columns = predicted class.

    Args:
        pred: Predicted class ids, any shape.
        target: True class ids, the shape of ``pred``; ``ignore_index`` pixels are left out.
        num_classes: Classes.
        ignore_index: Label of ignored pixels.
    """
    if pred.shape != target.shape:
        raise ValueError(f"`pred` {tuple(pred.shape)} and `target` {tuple(target.shape)} must have one shape.")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"`target` holds class ids outside 0..{num_classes - 1} (and {ignore_index}, ignored): "
                         f"{sorted(set(t.unique().tolist()) - set(range(num_classes)))[:8]}.")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(cm: torch.Tensor) -> dict:
    """``{"miou", "pixel_acc", "iou": [per class, None if the class never occurs]}`` from a confusion matrix."""
    cm = cm.double()
    inter = torch.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    iou = [float(i / u) if u > 0 else None for i, u in zip(inter.tolist(), union.tolist())]
    present = [v for v in iou if v is not None]
    total = float(cm.sum())
    return {"miou": sum(present) / len(present) if present else math.nan,
            "pixel_acc": float(inter.sum()) / total if total else math.nan,
            "iou": iou}
