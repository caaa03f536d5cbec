"""A ``run_layer_test`` in the spirit of keras-hub for every danet_keras layer.

Config round trip (and registration), symbolic call with ``None`` dims,
eager call, one training step that moves gamma off zero, and dtypes under
``mixed_float16`` / ``mixed_bfloat16``.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import danet_keras as dk  # noqa: E402
from parity_tests import reference as ref  # noqa: E402
from parity_tests.tests.helpers import check, nchw, nhwc  # noqa: E402

pytestmark = pytest.mark.keras

CASES = [
    (dk.PositionAttention, {}, 16, 16),
    (dk.PositionAttention, {"reduction": 4, "pam_path": "efficient"}, 16, 16),
    (dk.ChannelAttention, {}, 16, 16),
    (dk.DualAttention, {}, 32, 32),
    (dk.DualAttention, {"out_channels": 8, "inter_channels": 16, "reduction": 2}, 32, 8),
    (dk.DANetHead, {"num_classes": 3, "dropout": 0.2}, 32, 3),
]


def _gammas(layer):
    return [v for v in layer.trainable_weights if v.path.endswith("gamma") and "/1/" not in v.path
            and not v.path.split("/")[-2].isdigit()]


@pytest.mark.parametrize("cls,kwargs,channels,out_channels", CASES)
def test_run_layer_test(cls, kwargs, channels, out_channels):
    # Config round trip, via the registry.
    layer = cls(**kwargs)
    config = layer.get_config()
    for key, value in kwargs.items():
        assert config[key] == value
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is cls and clone.get_config() == config

    # Symbolic call with None batch and spatial sizes.
    inp = keras.Input((None, None, channels))
    out = cls(**kwargs)(inp)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for o in outs:
        assert tuple(o.shape) == (None, None, None, out_channels)

    # Eager call on odd sizes, outputs match compute_output_shape.
    x = np.random.default_rng(1).normal(0, 0.5, (2, 7, 5, channels)).astype("float32")
    layer = cls(**kwargs)
    y = layer(x)
    ys = y if isinstance(y, (tuple, list)) else (y,)
    want = layer.compute_output_shape(x.shape)
    want = want if isinstance(want[0], tuple) else (want,)
    assert [tuple(a.shape) for a in ys] == [tuple(w) for w in want]
    gammas = _gammas(layer)
    assert gammas and all(tuple(g.shape) == (1,) and g.dtype == "float32" for g in gammas)
    assert all(float(keras.ops.convert_to_numpy(g)[0]) == 0.0 for g in gammas)

    # One training step moves every gamma off zero.
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    targets = [np.ones(tuple(a.shape), "float32") for a in ys]
    model.fit(x, targets if len(targets) > 1 else targets[0], epochs=1, batch_size=2, verbose=0)
    assert all(float(keras.ops.convert_to_numpy(g)[0]) != 0.0 for g in _gammas(model))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("cls,kwargs,channels,out_channels", CASES)
def test_mixed_precision_dtypes(policy, cls, kwargs, channels, out_channels):
    layer = cls(dtype=policy, **kwargs)
    x = np.random.default_rng(2).normal(0, 0.5, (1, 6, 5, channels)).astype("float32")
    y = layer(x)
    compute = policy.split("_")[1]
    for a in (y if isinstance(y, (tuple, list)) else (y,)):
        assert keras.backend.standardize_dtype(a.dtype) == compute
        assert np.isfinite(keras.ops.convert_to_numpy(keras.ops.cast(a, "float32"))).all()
    assert all(v.dtype == "float32" for v in layer.trainable_weights)
    inp = keras.Input((None, None, channels))
    out = cls(dtype=policy, **kwargs)(inp)
    for a in (out if isinstance(out, (tuple, list)) else (out,)):
        assert keras.backend.standardize_dtype(a.dtype) == compute


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
