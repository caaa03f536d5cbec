"""danet_keras.attention_maps against the float64 NumPy reference and against danet_torch, on the current backend."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import danet_keras as dk  # noqa: E402
from danet_keras.attention_maps import check_points, feature_grid_points  # noqa: E402
from parity_tests import reference as ref  # noqa: E402
from parity_tests.tests.helpers import (border_points, check, check_segmentation, head_state_dict, nhwc,  # noqa: E402
                                        pam_state_dict, set_torch_weights)
from weights_convert.tolerances import compare, tolerance  # noqa: E402

pytestmark = pytest.mark.keras
ops = keras.ops


def _np(t):
    return np.asarray(ops.convert_to_numpy(t))


def _ref_rows(sd, x, points, prefix=""):
    return ref.position_attention_rows(x, sd[f"{prefix}query_conv.weight"], sd[f"{prefix}query_conv.bias"],
                                       sd[f"{prefix}key_conv.weight"], sd[f"{prefix}key_conv.bias"], points)


def _pam(rng, c, data_format="channels_last", pam_path="auto"):
    layer = dk.PositionAttention(pam_path=pam_path, data_format=data_format)
    layer.build((None, c, None, None) if data_format == "channels_first" else (None, None, None, c))
    sd = pam_state_dict(rng, c)
    set_torch_weights(layer, sd)
    return layer, sd


@pytest.mark.parametrize("shape", [(1, 16, 7, 9), (3, 24, 5, 4), (2, 16, 1, 6)])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_attention_rows_match_reference_on_borders_and_corners(shape, data_format, rng):
    layer, sd = _pam(rng, shape[1], data_format)
    x = rng.normal(0, 0.5, shape).astype("float32")
    points = border_points(*shape[2:])
    rows = layer.attention_rows(x if data_format == "channels_first" else nhwc(x), points)
    assert tuple(rows.shape) == (shape[0], len(points), *shape[2:])
    check(f"PAM rows {shape} {data_format}", _np(rows), _ref_rows(sd, x, points))


def test_rows_of_a_full_frame_without_the_n_by_n_matrix(rng):
    """128 x 256 features (a 1024 x 2048 frame at output stride 8): N = 32768, the matrix would be 4 GiB."""
    layer, sd = _pam(rng, 16)
    x = rng.normal(0, 0.5, (1, 16, 128, 256)).astype("float32")
    points = [(0, 0), (127, 255), (64, 100)]
    check("PAM rows 128x256", _np(layer.attention_rows(nhwc(x), points)), _ref_rows(sd, x, points))


@pytest.mark.parametrize("pam_path", ["official", "efficient"])
def test_rows_rebuild_the_layer_output_on_each_path(pam_path, rng):
    """The rows come from the formula, not from a path: all N rows rebuild what call returns."""
    layer, sd = _pam(rng, 16, pam_path=pam_path)
    layer.gamma.assign(np.array([0.8], "float32"))
    x = nhwc(rng.normal(0, 0.5, (2, 16, 6, 5))).astype("float32")
    every = [(r, c) for r in range(6) for c in range(5)]
    attention = _np(layer.attention_rows(x, every)).reshape(2, 30, 30)  # (B, N, N)
    v = _np(layer.value_conv(x)).reshape(2, 30, 16)
    rebuilt = 0.8 * np.einsum("bnm,bmc->bnc", attention, v).reshape(x.shape) + x
    check(f"PAM({pam_path}) from its rows", _np(layer(x)), rebuilt)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_cam_matrix_matches_reference_and_rebuilds_the_output(data_format, rng):
    x = rng.normal(0, 0.5, (2, 16, 7, 6)).astype("float32")
    inp = x if data_format == "channels_first" else nhwc(x)
    layer = dk.ChannelAttention(data_format=data_format)
    layer.build(inp.shape)
    layer.gamma.assign(np.array([-0.6], "float32"))
    got = _np(layer.attention_matrix(inp))
    check("CAM matrix", got, ref.channel_attention_matrix(x))
    rebuilt = -0.6 * np.einsum("bcd,bdn->bcn", got, x.reshape(2, 16, -1)).reshape(x.shape) + x
    out = _np(layer(inp))
    check("CAM from its matrix", out if data_format == "channels_first" else np.transpose(out, (0, 3, 1, 2)),
          rebuilt)
    energy = ref.channel_attention_energy(x)
    np.testing.assert_array_equal(got.argmax(-1), energy.argmin(-1))  # least similar channel weighs most
    assert not compare("softmax(E)", got, ref.softmax(energy), tolerance("float32")).passed


def test_none_spatial_sizes(rng):
    """A functional model with ``None`` height and width computes rows and the CAM matrix at any size."""
    layer, sd = _pam(rng, 16)
    cam = dk.ChannelAttention()
    inputs = keras.Input((None, None, 16))
    points = [(0, 0), (2, 3), (4, 1)]
    model = keras.Model(inputs, [layer.attention_rows(inputs, points), cam.attention_matrix(inputs)])
    for hw in ((5, 4), (6, 9)):
        x = rng.normal(0, 0.5, (2, 16, *hw)).astype("float32")
        rows, matrix = model(nhwc(x))
        check(f"rows at {hw}", _np(rows), _ref_rows(sd, x, points))
        check(f"CAM matrix at {hw}", _np(matrix), ref.channel_attention_matrix(x))


@pytest.mark.parametrize("hw", [(1, 9), (5, 3)])
def test_none_spatial_sizes_a_point_outside_the_run_time_grid_gives_nan_rows(hw, rng):
    """Traced with ``None`` sizes, a point cannot be checked until the model runs, where a functional model
    cannot raise on every backend: its row is NaN (JAX's indexing would clamp it to another point's row), and
    the other points' rows are right."""
    layer, sd = _pam(rng, 16)
    inputs = keras.Input((None, None, 16))
    points = [(0, 0), (2, 3), (0, 2)]
    model = keras.Model(inputs, layer.attention_rows(inputs, points))
    x = rng.normal(0, 0.5, (2, 16, *hw)).astype("float32")
    rows = _np(model(nhwc(x)))
    inside = [i for i, (r, c) in enumerate(points) if r < hw[0] and c < hw[1]]
    outside = [i for i in range(len(points)) if i not in inside]
    assert outside and np.isnan(rows[:, outside]).all()
    check(f"rows inside {hw}", rows[:, inside], _ref_rows(sd, x, [points[i] for i in inside]))


def test_feature_grid_points_match_reference():
    for image, grid in (((33, 41), (5, 6)), ((9, 17), (2, 5)), ((1, 8), (1, 3)), ((7, 7), (1, 1))):
        points = [(r, c) for r in range(image[0]) for c in range(image[1])]
        got, back = feature_grid_points(points, image, grid)
        want, want_back = ref.feature_grid_points(points, image, grid)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(back, want_back, rtol=1e-12, atol=0)


@pytest.mark.parametrize("points, error, message", [
    ([(0, 0), (7, 2)], ValueError, r"\(7, 2\) outside the 7 x 9 grid; accepted rows 0..6 and cols 0..8"),
    ([(-1, 0)], ValueError, "outside the 7 x 9 grid"),
    ([(1.5, 2)], TypeError, "`points` must hold integer"),
    ([], ValueError, "`points` must be a non-empty sequence"),
    ([(True, 1)], TypeError, "integer"),
])
def test_bad_points_raise_clear_errors(points, error, message):
    layer = dk.PositionAttention()
    with pytest.raises(error, match=message):
        layer.attention_rows(np.zeros((1, 7, 9, 16), "float32"), points)
    np.testing.assert_array_equal(check_points(np.array([[1, 2]]), (None, None)), [[1, 2]])


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_head_attention_maps_match_reference(data_format, rng):
    x = rng.normal(0, 0.5, (2, 32, 6, 7)).astype("float32")
    head = dk.DANetHead(3, data_format=data_format)
    head.build((None, 32, None, None) if data_format == "channels_first" else (None, None, None, 32))
    sd = head_state_dict(rng, 32, 3)
    set_torch_weights(head, sd)
    size = (23, 27)
    points = border_points(*size)
    maps = head.attention_maps(x if data_format == "channels_first" else nhwc(x), points, size=size)
    grid, back = ref.feature_grid_points(points, size, (6, 7))
    np.testing.assert_array_equal(maps.points, grid)
    np.testing.assert_allclose(maps.image_points, back, rtol=1e-12)
    rows = _ref_rows(sd, ref.conv_bn_relu(x, sd, "conv5a"), grid, prefix="sa.")
    arrays = maps.numpy()
    check("head pam_rows", arrays["pam_rows"], rows)
    check("head pam", arrays["pam"], ref.resize_bilinear_align_corners(rows, size))
    cam_in = ref.conv_bn_relu(x, sd, "conv5c")
    check("head cam", arrays["cam"], ref.channel_attention_matrix(cam_in))
    check("head cam_energy", arrays["cam_energy"], ref.channel_attention_energy(cam_in))
    logits = ref.resize_bilinear_align_corners(ref.danet_head(x, sd)[0], size)
    check_segmentation("head segmentation", arrays["segmentation"], logits)


def test_danet50_maps_equal_torch_maps():
    """The same weights give the same maps in danet_torch and danet_keras (DANet-50, once per backend)."""
    torch = pytest.importorskip("torch")
    import danet_torch as dt
    import weights_convert as wc
    from weights_convert.testing import randomize_

    tmodel = randomize_(dt.DANet(3, backbone="resnet50"), seed=11).eval()
    kmodel = wc.to_keras(wc.from_torch(tmodel), wc.ArchSpec("danet", num_classes=3, backbone="resnet50"))
    x = np.random.default_rng(4).normal(0, 0.5, (2, 3, 25, 33)).astype("float32")
    points = border_points(25, 33)
    want = tmodel.attention_maps(torch.from_numpy(x), points).numpy()
    got = kmodel.attention_maps(nhwc(x), points).numpy()
    for name in ("points", "image_points", "query_points"):
        np.testing.assert_array_equal(got[name], want[name])
    for name in ("pam", "pam_rows", "cam"):
        check(f"DANet-50 {name}: keras vs torch", got[name], want[name], scope="model")
    with torch.no_grad():
        logits = tmodel(torch.from_numpy(x))[0].numpy()
    check_segmentation("DANet-50 segmentation: keras vs torch logits", got["segmentation"], logits)
