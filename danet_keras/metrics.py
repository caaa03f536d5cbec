"""Mean IoU of segmentation logits as a Keras metric (a confusion matrix of pixel counts)."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

__all__ = ["MeanIoU"]


@keras.saving.register_keras_serializable(package="danet")
class MeanIoU(keras.metrics.Metric):
    """mIoU of logits: the argmax over the class axis against integer labels, ``ignore_index`` left out.

    Accumulates a ``(num_classes, num_classes)`` int32 confusion matrix (rows:
    true class, columns: predicted class). IoU per class is
    ``TP / (TP + FP + FN)``; the mean is over the classes that occur in the
    labels or the predictions (an absent class has no IoU), as
    ``danet_torch.metrics`` and mmsegmentation. Labels outside
    ``0 .. num_classes - 1`` (other than ``ignore_index``) are left out too.

    Args:
        num_classes: Classes.
        ignore_index: Label of pixels left out (``-1`` upstream; ``255`` in the folder format).
        axis: Class axis of the logits (``-1`` channels_last, ``1`` channels_first).

    Shape:
        ``y_true`` ``(B, H, W)`` (or ``(B, H, W, 1)``); ``y_pred`` ``(B, H, W, num_classes)``.
    """

    def __init__(self, num_classes: int, ignore_index: int = -1, axis: int = -1, name: str = "mean_iou",
                 dtype=None):
        super().__init__(name=name, dtype=dtype)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"`num_classes` must be an int >= 1, got {num_classes!r}.")
        if axis not in (-1, 1, 3):
            raise ValueError(f"`axis` must be -1 (or 3, channels_last) or 1 (channels_first), got {axis!r}.")
        self.num_classes, self.ignore_index, self.axis = num_classes, int(ignore_index), axis
        self.confusion = self.add_variable(shape=(num_classes, num_classes), initializer="zeros", dtype="int32",
                                           name="confusion", aggregation="sum")

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError("MeanIoU does not take `sample_weight`; mark pixels to leave out with `ignore_index`.")
        pred = ops.reshape(ops.cast(ops.argmax(y_pred, axis=self.axis), "int32"), (-1,))
        labels = ops.cast(y_true, "int32")
        if len(labels.shape) == len(y_pred.shape):
            labels = ops.squeeze(labels, axis=self.axis)
        labels = ops.reshape(labels, (-1,))
        keep = ops.logical_and(ops.logical_and(ops.greater_equal(labels, 0), ops.less(labels, self.num_classes)),
                               ops.not_equal(labels, self.ignore_index))
        zeros = ops.zeros_like(labels)
        indices = ops.stack([ops.where(keep, labels, zeros), ops.where(keep, pred, zeros)], axis=1)
        counts = ops.scatter(indices, ops.cast(keep, "int32"), (self.num_classes, self.num_classes))
        self.confusion.assign_add(ops.cast(counts, "int32"))

    def per_class_iou(self) -> np.ndarray:
        """IoU of each class (NumPy float64), ``nan`` for a class absent from labels and predictions."""
        cm = np.asarray(keras.ops.convert_to_numpy(self.confusion), np.float64)
        inter = np.diag(cm)
        union = cm.sum(0) + cm.sum(1) - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, inter / np.where(union > 0, union, 1.0), np.nan)

    def result(self):
        cm = ops.cast(self.confusion, "float32")
        inter = ops.diagonal(cm)
        union = ops.sum(cm, axis=0) + ops.sum(cm, axis=1) - inter
        present = ops.cast(ops.greater(union, 0.0), "float32")
        iou = inter / ops.maximum(union, 1.0)
        return ops.sum(iou * present) / ops.maximum(ops.sum(present), 1.0)

    def reset_state(self):
        self.confusion.assign(ops.zeros((self.num_classes, self.num_classes), dtype="int32"))

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, "num_classes": self.num_classes,
                "ignore_index": self.ignore_index, "axis": self.axis}
