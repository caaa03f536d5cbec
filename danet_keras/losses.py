"""DANet's training loss as Keras objects: cross-entropy with an ignore label, summed over the three outputs.

Upstream (``encoding.nn.SegmentationMultiLosses``) trains on the sum of
three equally weighted cross-entropies, one per DANet output, each the
mean over the pixels whose label is not ``ignore_index`` (PyTorch's
``F.cross_entropy(..., ignore_index)``). In Keras the model has three
outputs, so compile with one :class:`SegmentationCrossEntropy` per output
(Keras sums the outputs' losses)::

    loss = SegmentationCrossEntropy(ignore_index=255)
    model.compile(optimizer, loss=[loss, loss, loss])   # y = (mask, mask, mask)

:func:`danet_loss` is the same sum as a function of the three outputs.
"""

from __future__ import annotations

import keras
from keras import ops

__all__ = ["SegmentationCrossEntropy", "danet_loss"]


def _pixel_losses(y_true, y_pred, ignore_index: int, axis: int):
    """``(-log p[label] per pixel, 1.0 where the label is kept)``, both ``(B, H, W)``.

    A kept label outside ``0 .. classes - 1`` (255 with ``ignore_index=-1``, a too small class count) gives NaN:
    the gather would read out of range, which each backend answers differently (a finite wrong value on torch,
    NaN on JAX, an error on TensorFlow), and NaN is what a traced loss can say on all of them."""
    dtype = "float64" if keras.backend.standardize_dtype(y_pred.dtype) == "float64" else "float32"
    logits = ops.cast(y_pred, dtype)
    labels = ops.cast(y_true, "int32")
    if len(labels.shape) == len(logits.shape):  # (B, H, W, 1) masks
        labels = ops.squeeze(labels, axis=axis)
    keep = ops.not_equal(labels, ignore_index)
    known = ops.logical_and(ops.greater_equal(labels, 0), ops.less(labels, ops.shape(logits)[axis]))
    safe = ops.where(ops.logical_and(keep, known), labels, ops.zeros_like(labels))
    log_p = ops.log_softmax(logits, axis=axis)
    picked = ops.squeeze(ops.take_along_axis(log_p, ops.expand_dims(safe, axis), axis=axis), axis=axis)
    unknown = ops.logical_and(keep, ops.logical_not(known))
    return ops.where(unknown, ops.full_like(picked, float("nan")), -picked), ops.cast(keep, dtype)


def _cross_entropy(y_true, y_pred, ignore_index: int, axis: int):
    losses, weight = _pixel_losses(y_true, y_pred, ignore_index, axis)
    return ops.sum(losses * weight) / ops.maximum(ops.sum(weight), 1.0)


@keras.saving.register_keras_serializable(package="danet")
class SegmentationCrossEntropy(keras.losses.Loss):
    """Cross-entropy of logits, the mean over the pixels whose label is not ``ignore_index``.

    Equals ``torch.nn.functional.cross_entropy(logits, labels, ignore_index=...)``
    (mean reduction) on the same numbers; a batch whose every pixel is ignored
    gives 0 (PyTorch gives NaN), a kept label outside ``0 .. num_classes - 1``
    gives NaN on every backend (PyTorch raises). Computed in float32 (float64
    stays float64).

    Args:
        ignore_index: Label of pixels left out (``-1`` upstream; ``255`` in the folder format).
        axis: Class axis of the logits (``-1`` channels_last, ``1`` channels_first).

    ``call`` returns per-pixel values ``(B, H, W)``: the loss of each kept
    pixel times ``pixels / kept pixels`` (0 where ignored), so Keras' default
    reduction (the mean over all pixels, divided by the replica count under
    ``tf.distribute``) gives the mean over the kept pixels.

    Shape:
        ``y_true`` ``(B, H, W)`` (or ``(B, H, W, 1)``) integer labels; ``y_pred``
        ``(B, H, W, num_classes)`` logits. Returns a scalar.
    """

    def __init__(self, ignore_index: int = -1, axis: int = -1, name: str = "segmentation_cross_entropy",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"`ignore_index` must be an int, got {ignore_index!r}.")
        if axis not in (-1, 1, 3):
            raise ValueError(f"`axis` must be -1 (or 3, channels_last) or 1 (channels_first), got {axis!r}.")
        self.ignore_index, self.axis = ignore_index, axis

    def call(self, y_true, y_pred):
        losses, weight = _pixel_losses(y_true, y_pred, self.ignore_index, self.axis)
        pixels = ops.cast(ops.prod(ops.convert_to_tensor(ops.shape(weight), dtype="int32")), weight.dtype)
        return losses * weight * (pixels / ops.maximum(ops.sum(weight), 1.0))

    def get_config(self):
        config = super().get_config()
        config.update(ignore_index=self.ignore_index, axis=self.axis)
        return config


def danet_loss(outputs, target, ignore_index: int = -1, axis: int = -1):
    """Upstream's training loss: the sum of the cross-entropies of DANet's three outputs ``(fused, pam, cam)``."""
    return sum(_cross_entropy(target, o, ignore_index, axis) for o in outputs)
