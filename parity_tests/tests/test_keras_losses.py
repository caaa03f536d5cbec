"""danet_keras.losses: cross-entropy with an ignore label, against NumPy (float64) and danet_torch.danet_loss."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from danet_keras.losses import SegmentationCrossEntropy, danet_loss  # noqa: E402
from parity_tests.tests.helpers import check  # noqa: E402

pytestmark = pytest.mark.keras


def _cross_entropy_numpy(logits, labels, ignore_index, axis=-1):
    """Mean over the kept pixels of -log softmax(logits)[label], float64, classes on ``axis``."""
    z = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
    z = z - z.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    keep = labels != ignore_index
    picked = np.take_along_axis(log_p, np.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
    return -picked[keep].mean()


def _batch(rng, classes=5, shape=(2, 7, 9), ignore=255):
    logits = rng.normal(0, 3, shape + (classes,)).astype("float32")
    labels = rng.integers(0, classes, shape)
    labels[rng.random(shape) < 0.3] = ignore
    return logits, labels


@pytest.mark.parametrize("ignore", [255, -1])
def test_matches_numpy_channels_last(rng, ignore):
    logits, labels = _batch(rng, ignore=ignore)
    loss = SegmentationCrossEntropy(ignore_index=ignore)
    check("ce", keras.ops.convert_to_numpy(loss(labels, logits)), _cross_entropy_numpy(logits, labels, ignore))
    check("ce (B, H, W, 1) labels", keras.ops.convert_to_numpy(loss(labels[..., None], logits)),
          _cross_entropy_numpy(logits, labels, ignore))


def test_matches_numpy_channels_first(rng):
    logits, labels = _batch(rng)
    nchw = np.ascontiguousarray(np.moveaxis(logits, -1, 1))
    got = SegmentationCrossEntropy(ignore_index=255, axis=1)(labels, nchw)
    check("ce channels_first", keras.ops.convert_to_numpy(got), _cross_entropy_numpy(nchw, labels, 255, axis=1))


def test_all_ignored_is_zero_and_sum_of_three(rng):
    logits, labels = _batch(rng)
    assert float(SegmentationCrossEntropy(ignore_index=255)(np.full_like(labels, 255), logits)) == 0.0
    outs = [logits, logits * 0.5, -logits]
    expected = sum(_cross_entropy_numpy(o, labels, 255) for o in outs)
    check("danet_loss", keras.ops.convert_to_numpy(danet_loss(outs, labels, ignore_index=255)), expected)


def test_equals_danet_torch_loss(rng):
    torch = pytest.importorskip("torch")
    from danet_torch import danet_loss as torch_loss

    logits, labels = _batch(rng)
    outs = [logits, logits[..., ::-1].copy(), logits * 2]
    expected = torch_loss([torch.from_numpy(np.moveaxis(o, -1, 1)) for o in outs], torch.from_numpy(labels),
                          ignore_index=255)
    check("danet_loss vs torch", keras.ops.convert_to_numpy(danet_loss(outs, labels, ignore_index=255)),
          expected.numpy())


def test_config_round_trip_and_bad_arguments():
    loss = SegmentationCrossEntropy(ignore_index=255, axis=1, name="ce")
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(again, SegmentationCrossEntropy) and (again.ignore_index, again.axis, again.name) == (255, 1, "ce")
    with pytest.raises(ValueError, match="`ignore_index`"):
        SegmentationCrossEntropy(ignore_index=0.5)
    with pytest.raises(ValueError, match="`axis`"):
        SegmentationCrossEntropy(axis=2)


@pytest.mark.parametrize("axis", [-1, 1])
def test_labels_outside_the_classes_give_nan_on_every_backend(rng, axis):
    """255-marked masks with the default ``ignore_index=-1`` (or a too small ``num_classes``): the gather of
    ``log p[label]`` read out of range, a finite wrong loss on the torch backend, NaN on JAX and an error on
    TensorFlow. NaN everywhere, so ``fit`` shows ``loss: nan``; the kept in-range pixels still give the NumPy loss."""
    logits, labels = _batch(rng)
    if axis == 1:
        logits = np.ascontiguousarray(np.moveaxis(logits, -1, 1))
    for bad in (255, 5, -3):
        wrong = labels.copy()
        wrong[0, 0, 0] = bad
        loss = keras.ops.convert_to_numpy(SegmentationCrossEntropy(axis=axis)(wrong, logits))
        assert np.isnan(loss), (bad, loss)
        assert np.isnan(keras.ops.convert_to_numpy(danet_loss([logits] * 3, wrong, axis=axis))), bad
    wrong = np.where(labels == 255, 7, labels)  # in-range labels and ignore_index=7 still match NumPy
    check("ce ignore 7", keras.ops.convert_to_numpy(SegmentationCrossEntropy(ignore_index=7, axis=axis)(wrong, logits)),
          _cross_entropy_numpy(logits, wrong, 7, axis=axis))
