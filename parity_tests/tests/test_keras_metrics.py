"""danet_keras.metrics.MeanIoU against a NumPy confusion matrix, and against danet_torch.metrics."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from danet_keras.metrics import MeanIoU  # noqa: E402

pytestmark = pytest.mark.keras


def _iou_numpy(pairs, num_classes, ignore_index):
    cm = np.zeros((num_classes, num_classes), np.int64)
    for logits, labels in pairs:
        pred = logits.argmax(-1)
        keep = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
        np.add.at(cm, (labels[keep], pred[keep]), 1)
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return cm, iou, np.nanmean(iou)


def _pair(rng, classes, shape=(2, 6, 5)):
    labels = rng.integers(0, classes, shape)
    labels[rng.random(shape) < 0.2] = 255
    return rng.normal(size=shape + (classes,)).astype("float32"), labels


def test_accumulates_like_numpy(rng):
    pairs = [_pair(rng, 4), _pair(rng, 4)]
    pairs[1][1][pairs[1][1] == 3] = 255  # class 3 only in the first batch's labels
    metric = MeanIoU(num_classes=4, ignore_index=255)
    for logits, labels in pairs:
        metric.update_state(labels, logits)
    cm, iou, miou = _iou_numpy(pairs, 4, 255)
    assert np.array_equal(keras.ops.convert_to_numpy(metric.confusion), cm)
    np.testing.assert_allclose(metric.per_class_iou(), iou, rtol=1e-12)
    np.testing.assert_allclose(float(metric.result()), miou, rtol=1e-6)
    metric.reset_state()
    assert int(keras.ops.convert_to_numpy(metric.confusion).sum()) == 0


def test_absent_classes_channels_first_and_out_of_range_labels(rng):
    logits = np.zeros((1, 2, 2, 5), "float32")
    logits[..., 0] = 1.0  # always predicts class 0
    labels = np.array([[[0, 0], [1, 9]]])  # 9: out of range, left out; classes 2..4 absent
    metric = MeanIoU(num_classes=5, ignore_index=-1, axis=1)
    metric.update_state(labels, np.moveaxis(logits, -1, 1))
    iou = metric.per_class_iou()
    np.testing.assert_allclose(iou[:2], [2 / 3, 0.0])
    assert np.isnan(iou[2:]).all()
    np.testing.assert_allclose(float(metric.result()), (2 / 3) / 2, rtol=1e-6)


def test_equals_danet_torch_metrics(rng):
    torch = pytest.importorskip("torch")
    from danet_torch.metrics import confusion_matrix, segmentation_metrics

    logits, labels = _pair(rng, 3, shape=(3, 8, 8))
    metric = MeanIoU(num_classes=3, ignore_index=255)
    metric.update_state(labels, logits)
    cm = confusion_matrix(torch.from_numpy(logits.argmax(-1)), torch.from_numpy(labels), 3, 255)
    assert np.array_equal(keras.ops.convert_to_numpy(metric.confusion), cm.numpy())
    np.testing.assert_allclose(float(metric.result()), segmentation_metrics(cm)["miou"], rtol=1e-6)


def test_config_round_trip_and_bad_arguments():
    metric = MeanIoU(num_classes=3, ignore_index=255, name="miou")
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
    assert isinstance(again, MeanIoU) and (again.num_classes, again.ignore_index, again.name) == (3, 255, "miou")
    with pytest.raises(ValueError, match="`num_classes`"):
        MeanIoU(num_classes=0)
    with pytest.raises(ValueError, match="`sample_weight`"):
        metric.update_state(np.zeros((1, 2, 2), "int32"), np.zeros((1, 2, 2, 3), "float32"), sample_weight=1.0)
