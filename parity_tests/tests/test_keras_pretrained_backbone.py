"""danet_keras.DANet(pretrained_backbone=..., in_channels=...): ImageNet ResNet weights in, the same features out."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("torch")  # the reference ResNet uses torch.nn.functional in float64

import danet_keras as dk  # noqa: E402
from parity_tests.tests.helpers import (check, imagenet_resnet_state_dict, nchw, nhwc,  # noqa: E402
                                        reference_dilated_resnet, resolve)

pytestmark = pytest.mark.keras

STAGES_OS8_MG = [(1, [1, 1, 1]), (2, [1, 1, 1, 1]), (1, [1, 2, 2, 2, 2, 2]), (1, [4, 8, 16])]


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """A torchvision-format ResNet-50 (float32, with fc) as .npz, and its tensors.

    Float32 (JAX runs without x64): the variables must equal the file bit for bit, the features the
    float64 reference within the float32 model tolerance."""
    sd = imagenet_resnet_state_dict(np.random.default_rng(11), depth=50)
    path = tmp_path_factory.mktemp("imagenet") / "resnet50.npz"
    with open(path, "wb") as f:
        np.savez(f, **sd)
    return path, sd


def test_loaded_backbone_equals_file_and_reference_features(imagenet_file):
    path, sd = imagenet_file
    model = dk.DANet(4, backbone="resnet50", pretrained_backbone=str(path))
    assert model.built
    model.build((None, None, None, 3))  # building again keeps the loaded weights
    for key, value in sd.items():
        if key.startswith("fc."):
            continue
        var, is_kernel = resolve(model.pretrained, key)
        got = keras.ops.convert_to_numpy(var)
        assert np.array_equal(got.transpose(3, 2, 0, 1) if is_kernel else got, value), key
    assert any(n.startswith("ignored the ImageNet classifier") for n in model.backbone_notes)
    head_kernels = [v for v in model.head.weights if v.path.endswith("/kernel")]
    assert head_kernels and all(np.any(keras.ops.convert_to_numpy(v)) for v in head_kernels)  # drawn, not zeros
    x = np.random.default_rng(0).normal(size=(2, 3, 40, 32)).astype("float32")
    got = model.pretrained(nhwc(x), training=False)
    expected = reference_dilated_resnet(sd, x, STAGES_OS8_MG)
    for i, (g, e) in enumerate(zip(got, expected), start=1):
        check(f"c{i}", nchw(g), e, dtype="float32", scope="model")
    outs = model(nhwc(x), training=False)
    assert [tuple(o.shape) for o in outs] == [(2, 40, 32, 4)] * 3


def test_one_channel_and_config(imagenet_file):
    path, sd = imagenet_file
    model = dk.DANet(2, backbone="resnet50", in_channels=1, pretrained_backbone=path)
    assert tuple(model.pretrained.conv1.kernel.shape) == (7, 7, 1, 64)
    x = np.random.default_rng(1).normal(size=(1, 1, 32, 32)).astype("float32")
    got = model.pretrained(nhwc(x), training=False)[-1]
    expected = reference_dilated_resnet(sd, np.repeat(x, 3, axis=1), STAGES_OS8_MG)[-1]
    check("c4 (1 channel)", nchw(got), expected, dtype="float32", scope="model")
    config = model.get_config()
    assert config["in_channels"] == 1 and "pretrained_backbone" not in config
    assert dk.DANet.from_config(config).in_channels == 1
    with pytest.raises(ValueError, match="1 channels"):
        model(np.zeros((1, 16, 16, 3)))


def test_wrong_depth_fails_clearly(imagenet_file):
    from weights_convert.errors import ConvertError

    with pytest.raises(ConvertError, match="ResNet-50, but the model's backbone is ResNet-101"):
        dk.DANet(3, backbone="resnet101", pretrained_backbone=imagenet_file[0])
