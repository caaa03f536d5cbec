"""danet_torch.metrics: the confusion matrix and IoU against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from danet_torch.metrics import confusion_matrix, segmentation_metrics


def test_confusion_matrix_and_iou_match_numpy(rng):
    pred = rng.integers(0, 4, (3, 9, 7))
    target = rng.integers(0, 4, (3, 9, 7))
    target[target == 3] = 255  # class 3 is never a label, only predicted
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 4, 255).numpy()
    keep = target != 255
    expected = np.zeros((4, 4), np.int64)
    np.add.at(expected, (target[keep], pred[keep]), 1)
    assert np.array_equal(cm, expected)
    m = segmentation_metrics(torch.from_numpy(cm))
    inter = np.diag(expected)
    union = expected.sum(0) + expected.sum(1) - inter
    np.testing.assert_allclose(m["iou"], inter / union, rtol=1e-12)
    np.testing.assert_allclose(m["miou"], np.mean(inter / union), rtol=1e-12)
    np.testing.assert_allclose(m["pixel_acc"], inter.sum() / expected.sum(), rtol=1e-12)
    absent = segmentation_metrics(torch.tensor([[2, 0, 0], [0, 0, 0], [1, 0, 0]]))
    assert absent["iou"][1] is None and absent["miou"] == pytest.approx((2 / 3 + 0.0) / 2)
    with pytest.raises(ValueError, match="outside 0..3"):
        confusion_matrix(torch.tensor([0]), torch.tensor([9]), 4, 255)
