"""Every danet_keras layer through the shared Keras layer tester (:mod:`parity_tests.tests.testers`).

Weight counts and output shapes are written out by hand from the official
architecture (a conv: kernel [+ bias]; a BatchNorm: gamma, beta trainable and
moving mean, variance and ``num_batches_tracked`` not), never read from the
layers under test.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import danet_keras as dk  # noqa: E402
from parity_tests import reference as ref  # noqa: E402
from parity_tests.tests.helpers import check, nchw, nhwc  # noqa: E402
from parity_tests.tests.testers import run_keras_layer_test  # noqa: E402

pytestmark = pytest.mark.keras

B, H, W = 2, 7, 5
# (id, class, kwargs, input shape, output shapes, trainable, non-trainable)
CASES = [
    ("pam", dk.PositionAttention, {}, (B, H, W, 16), [(B, H, W, 16)], 7, 0),
    ("pam_r4", dk.PositionAttention, {"reduction": 4, "pam_path": "efficient"}, (B, H, W, 16), [(B, H, W, 16)], 7, 0),
    ("cam", dk.ChannelAttention, {}, (B, H, W, 16), [(B, H, W, 16)], 1, 0),
    ("cam_nchw", dk.ChannelAttention, {"data_format": "channels_first"}, (B, 16, H, W), [(B, 16, H, W)], 1, 0),
    # 4 conv-BN-ReLU (3 trainable, 3 not each) + PAM (7) + CAM (1)
    ("dual", dk.DualAttention, {}, (B, H, W, 32), [(B, H, W, 32)], 20, 12),
    ("dual_custom", dk.DualAttention, {"out_channels": 8, "inter_channels": 16, "reduction": 2},
     (B, H, W, 32), [(B, H, W, 8)], 20, 12),
    # DualAttention + 3 classifiers (kernel, bias)
    ("head", dk.DANetHead, {"num_classes": 3, "dropout": 0.2}, (B, H, W, 32), [(B, H, W, 3)] * 3, 26, 12),
    ("conv", dk.Conv2d, {"filters": 4, "kernel_size": 3, "strides": 2, "padding": 1}, (B, H, W, 3),
     [(B, 4, 3, 4)], 2, 0),
    ("batchnorm", dk.BatchNorm, {}, (B, H, W, 6), [(B, H, W, 6)], 2, 3),
    ("maxpool", dk.MaxPool2d, {}, (B, H, W, 6), [(B, 4, 3, 6)], 0, 0),
    # 3 convs + 3 BN, and downsample's conv + BN
    ("bottleneck", dk.Bottleneck, {"planes": 4, "stride": 2, "dilation": 1, "downsample": True}, (B, H, W, 8),
     [(B, 4, 3, 16)], 12, 12),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_layer_contract(case, tmp_path):
    _, cls, kwargs, shape, outputs, trainable, non_trainable = case
    run_keras_layer_test(cls, kwargs, shape, expected_output_shapes=outputs, expected_trainable=trainable,
                         expected_non_trainable=non_trainable, tmp_path=tmp_path)


def test_resnet_and_danet_contract(tmp_path):
    """ResNet-50: 53 convs and 53 BatchNorms (stem 1, 16 blocks x 3, 4 downsamples); DANet adds the head.

    The ResNet's training step is DANet's (every backbone weight is among
    DANet's trainable weights, every BatchNorm among its statistics), checked once.
    """
    s = 33  # stem /2 -> 17, maxpool /2 -> 9, layer2 /2 -> 5, output stride 8 keeps 5
    run_keras_layer_test(dk.DilatedResNet, {"depth": 50}, (1, s, s, 3),
                         expected_output_shapes=[(1, 9, 9, 256), (1, 5, 5, 512), (1, 5, 5, 1024), (1, 5, 5, 2048)],
                         expected_trainable=53 + 2 * 53, expected_non_trainable=3 * 53, mixed_precision=False,
                         training_step=False)
    run_keras_layer_test(dk.DANet, {"num_classes": 3, "backbone": "resnet50"}, (1, s, s, 3),
                         expected_output_shapes=[(1, s, s, 3)] * 3, expected_trainable=159 + 26,
                         expected_non_trainable=159 + 12, tmp_path=tmp_path, mixed_precision=False)


def test_cam_energy_does_not_overflow_in_float16():
    rng = np.random.default_rng(3)
    x = rng.uniform(3.0, 5.0, (1, 8, 64, 64))  # energy ~ 4096 * 16 = 65536 > float16's 65504
    x16 = x.astype("float16").astype("float64")
    layer = dk.ChannelAttention(dtype="mixed_float16")
    layer.build(nhwc(x).shape)
    layer.gamma.assign(np.array([0.5], "float32"))
    y = layer(nhwc(x).astype("float32"))
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    got = nchw(keras.ops.cast(y, "float32"))
    assert np.isfinite(got).all()
    check("CAM mixed_float16", got, ref.channel_attention(x16, 0.5), dtype="float16")


FROZEN = [(dk.PositionAttention, {}, 16), (dk.ChannelAttention, {}, 16), (dk.DualAttention, {}, 32),
          (dk.DANetHead, {"num_classes": 3}, 32), (dk.Bottleneck, {"planes": 4, "downsample": True}, 8),
          (dk.DilatedResNet, {"depth": 50}, 3), (dk.DANet, {"num_classes": 3, "backbone": "resnet50"}, 3)]


@pytest.mark.parametrize("cls, kwargs, c", FROZEN, ids=[f[0].__name__ for f in FROZEN])
def test_frozen_before_built_trains_nothing(cls, kwargs, c):
    """``trainable=False`` given to the constructor (or restored from a config) freezes every variable the layer
    makes when it is built, its sublayers' included: a model around it has nothing to train. (Keras freezes
    the sublayers a layer has when the flag is set; ours are made later, in ``build``.)"""
    layer = cls(**kwargs, trainable=False)
    inp = keras.Input((None, None, c))
    model = keras.Model(inp, layer(inp))
    assert layer.weights and model.trainable_variables == []
    assert not any(v.trainable for v in layer.weights)


def test_frozen_block_stays_frozen_in_fit_and_after_reload(tmp_path):
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 32)).astype("float32")
    inp = keras.Input((None, None, 32))
    block = dk.DualAttention(name="attention")
    model = keras.Model(inp, keras.layers.Conv2D(1, 1, name="out")(block(inp)))
    block.trainable = False  # after build: Keras' setter reaches the sublayers
    model.save(tmp_path / "frozen.keras")
    for m in (model, keras.saving.load_model(tmp_path / "frozen.keras")):
        frozen = m.get_layer("attention")
        before = [np.array(keras.ops.convert_to_numpy(v)) for v in frozen.weights]
        m.compile("sgd", "mse")
        m.fit(x, np.ones((2, 5, 7, 1), "float32"), epochs=1, verbose=0)
        moved = [v.path for v, b in zip(frozen.weights, before) if not np.array_equal(keras.ops.convert_to_numpy(v), b)]
        assert moved == [] and [v.path for v in m.trainable_variables] == ["out/kernel", "out/bias"]
