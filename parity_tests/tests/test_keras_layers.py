"""danet_keras.layers (torch-semantics leaves) against the float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import danet_keras as dk  # noqa: E402
from parity_tests import reference as ref  # noqa: E402
from parity_tests.tests.helpers import check, nchw, nhwc  # noqa: E402

pytestmark = pytest.mark.keras


@pytest.mark.parametrize("k,stride,pad,dil", [(3, 1, 1, 1), (3, 2, 1, 1), (7, 2, 3, 1), (3, 1, 2, 2),
                                              (3, 2, 2, 2), (1, 2, 0, 1), (3, 2, 4, 4)])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_conv2d_matches_torch_semantics(k, stride, pad, dil, data_format, rng):
    x = rng.normal(0, 1, (2, 5, 11, 9))
    w, b = rng.normal(0, 0.3, (6, 5, k, k)), rng.normal(0, 0.1, 6)
    conv = dk.Conv2d(6, k, strides=stride, padding=pad, dilation_rate=dil, data_format=data_format)
    xin = nhwc(x) if data_format == "channels_last" else x
    conv.build(xin.shape)
    conv.kernel.assign(w.transpose(2, 3, 1, 0).astype("float32"))
    conv.bias.assign(b.astype("float32"))
    y = conv(xin.astype("float32"))
    expected = ref.conv2d(x.astype("float32"), w, b, stride=stride, padding=pad, dilation=dil)
    got = nchw(y) if data_format == "channels_last" else keras.ops.convert_to_numpy(y)
    check(f"Conv2d k{k} s{stride} p{pad} d{dil}", got, expected)
    assert tuple(conv.compute_output_shape(xin.shape)) == tuple(y.shape)
    again = dk.Conv2d.from_config(conv.get_config())
    assert again.get_config() == conv.get_config()


def test_no_init_weights_builds_zero_convolutions_and_keeps_the_initializers():
    shape = (None, 9, 9, 5)
    with dk.layers.no_init_weights():
        inside = dk.Conv2d(6, 3, padding=1, name="conv")
        inside.build(shape)
    outside = dk.Conv2d(6, 3, padding=1, name="conv")
    outside.build(shape)
    assert not np.any(keras.ops.convert_to_numpy(inside.kernel)) and not np.any(keras.ops.convert_to_numpy(inside.bias))
    assert np.any(keras.ops.convert_to_numpy(outside.kernel))
    assert inside.get_config() == outside.get_config()  # the initializers, saved in the config, are unchanged
    with pytest.raises(RuntimeError), dk.layers.no_init_weights():
        raise RuntimeError
    after = dk.Conv2d(6, 3)
    after.build(shape)
    assert np.any(keras.ops.convert_to_numpy(after.kernel))


def test_batchnorm_torch_semantics(rng):
    x = rng.normal(1.0, 2.0, (3, 5, 4, 6)).astype("float32")
    bn = dk.BatchNorm()
    bn.build(x.shape)
    assert bn.epsilon == 1e-5 and bn.momentum == 0.9
    assert [v.name for v in bn.variables] == ["gamma", "beta", "moving_mean", "moving_variance",
                                              "num_batches_tracked"]
    y = keras.ops.convert_to_numpy(bn(x, training=True))
    x64 = x.astype("float64")
    mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
    check("bn train output", y, (x64 - mean) / np.sqrt(var + 1e-5))
    n = x.size // x.shape[-1]
    check("moving_mean", keras.ops.convert_to_numpy(bn.moving_mean), 0.1 * mean)
    check("moving_variance (unbiased)", keras.ops.convert_to_numpy(bn.moving_variance),
          0.9 + 0.1 * var * n / (n - 1))
    assert int(keras.ops.convert_to_numpy(bn.num_batches_tracked)) == 1
    bn(x, training=True)
    bn(x, training=False)
    assert int(keras.ops.convert_to_numpy(bn.num_batches_tracked)) == 2
    mm, mv = (keras.ops.convert_to_numpy(v) for v in (bn.moving_mean, bn.moving_variance))
    check("bn eval output", keras.ops.convert_to_numpy(bn(x)), (x64 - mm) / np.sqrt(mv + 1e-5))


def test_maxpool_pads_with_minus_inf(rng):
    x = rng.normal(-5.0, 1.0, (2, 9, 8, 3)).astype("float32")  # all negative: zero padding would show
    y = keras.ops.convert_to_numpy(dk.MaxPool2d(3, 2, 1)(x))
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho, wo = (9 + 2 - 3) // 2 + 1, (8 + 2 - 3) // 2 + 1
    expected = np.stack([np.stack([xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2)) for j in range(wo)], 1)
                         for i in range(ho)], 1)
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("src,dst", [((5, 7), (33, 33)), ((9, 11), (4, 3)), ((1, 1), (4, 5)), ((6, 4), (1, 1)),
                                     ((5, 5), (5, 5))])
def test_resize_align_corners_matches_reference(src, dst, rng):
    x = rng.normal(0, 1, (2, 3, *src))
    y = dk.resize_bilinear_align_corners(nhwc(x).astype("float32"), dst)
    check(f"resize {src}->{dst}", nchw(y), ref.resize_bilinear_align_corners(x, dst))
    y = dk.resize_bilinear_align_corners(x.astype("float32"), dst, data_format="channels_first")
    check(f"resize NCHW {src}->{dst}", keras.ops.convert_to_numpy(y), ref.resize_bilinear_align_corners(x, dst))


def test_resize_with_dynamic_sizes(rng):
    @keras.saving.register_keras_serializable(package="danet_test")
    class Up(keras.layers.Layer):
        def call(self, x):
            s = keras.ops.shape(x)
            return dk.resize_bilinear_align_corners(x, (2 * s[1] - 1, 2 * s[2] - 1))

    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, Up()(inp))
    x = rng.normal(0, 1, (1, 3, 5, 6))
    y = model.predict(nhwc(x).astype("float32"), verbose=0)
    check("dynamic resize", nchw(y), ref.resize_bilinear_align_corners(x, (9, 11)))


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="the torch backend's `max(initial=)` builds CPU tensors")
def test_row_max_stays_on_the_inputs_device():
    """CAM and PAM's row maxima on another device than the CPU (``meta`` here; CUDA on a GPU machine)."""
    import torch

    from danet_keras.layers import row_max

    x = torch.empty(2, 3, 4, device="meta")
    assert row_max(x).device == x.device and tuple(row_max(x).shape) == (2, 3, 1)
    values = torch.tensor([[[1.0, -2.0, 5.0]], [[-1.0, -3.0, -2.0]]])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(row_max(values)), [[[5.0]], [[-1.0]]])
    assert tuple(row_max(torch.zeros(0, 3, 4)).shape) == (0, 3, 1)
