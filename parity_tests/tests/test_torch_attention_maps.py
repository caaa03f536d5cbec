"""danet_torch.attention_maps against the float64 NumPy reference: PAM rows, CAM's matrix, DANet's maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import danet_torch as dt
from danet_torch.attention_maps import check_points, feature_grid_points
from parity_tests import reference as ref
from parity_tests.tests.helpers import border_points, check, check_segmentation, state_numpy, to_numpy
from weights_convert.testing import randomize_
from weights_convert.tolerances import compare, tolerance


def _input(shape, seed=0, dtype=torch.float32):
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 0.5, shape)).to(dtype)


def _ref_rows(sd, x, points, prefix=""):
    return ref.position_attention_rows(x, sd[f"{prefix}query_conv.weight"], sd[f"{prefix}query_conv.bias"],
                                       sd[f"{prefix}key_conv.weight"], sd[f"{prefix}key_conv.bias"], points)


@pytest.mark.parametrize("shape", [(1, 16, 7, 9), (3, 24, 5, 4), (2, 16, 1, 6)])
def test_attention_rows_match_reference_on_borders_and_corners(shape):
    pam = randomize_(dt.PositionAttention(shape[1]), seed=shape[1]).eval()
    x = _input(shape)
    points = border_points(*shape[2:])
    rows = pam.attention_rows(x, points)
    assert rows.shape == (shape[0], len(points), *shape[2:]) and rows.dtype == torch.float32
    check(f"PAM rows {shape}", to_numpy(rows), _ref_rows(state_numpy(pam), to_numpy(x), points))


def test_rows_of_a_full_frame_without_the_n_by_n_matrix():
    """128 x 256 features (a 1024 x 2048 frame at output stride 8): N = 32768, the matrix would be 4 GiB."""
    pam = randomize_(dt.PositionAttention(16), seed=2).eval()
    x = _input((1, 16, 128, 256), seed=1)
    points = [(0, 0), (127, 255), (64, 100)]
    rows = pam.attention_rows(x, points)
    check("PAM rows 128x256", to_numpy(rows), _ref_rows(state_numpy(pam), to_numpy(x), points))


@pytest.mark.parametrize("pam_path", ["official", "efficient"])
def test_rows_rebuild_the_layer_output_on_each_path(pam_path):
    """The rows come from the formula, not from a path: all N rows rebuild what forward returns."""
    pam = randomize_(dt.PositionAttention(16, pam_path=pam_path), seed=3).double().eval()
    x = _input((2, 16, 6, 5), dtype=torch.float64)
    every = [(r, c) for r in range(6) for c in range(5)]
    attention = pam.attention_rows(x, every).reshape(2, 30, 30)  # (B, N, N)
    with torch.no_grad():
        v = pam.value_conv(x).flatten(2)
        rebuilt = pam.gamma * torch.bmm(v, attention.transpose(1, 2)).reshape(x.shape) + x
        check(f"PAM({pam_path}) from its rows", to_numpy(rebuilt), to_numpy(pam(x)), "float64")


def test_cam_matrix_matches_reference_and_rebuilds_the_output():
    cam = randomize_(dt.ChannelAttention(16), seed=1)
    x = _input((2, 16, 7, 6))
    got = cam.attention_matrix(x)
    assert got.shape == (2, 16, 16)
    check("CAM matrix", to_numpy(got), ref.channel_attention_matrix(to_numpy(x)))
    with torch.no_grad():
        rebuilt = cam.gamma * torch.bmm(got, x.flatten(2)).reshape(x.shape) + x
        check("CAM from its matrix", to_numpy(rebuilt), to_numpy(cam(x)))
    energy = ref.channel_attention_energy(to_numpy(x))
    # the max-subtraction: each channel's largest weight goes to its least similar channel
    np.testing.assert_array_equal(to_numpy(got).argmax(-1), energy.argmin(-1))
    plain = ref.softmax(energy, axis=-1)
    assert not compare("softmax(E)", to_numpy(got), plain, tolerance("float32")).passed


@pytest.mark.parametrize("image, grid", [((33, 41), (5, 6)), ((9, 17), (2, 5)), ((1, 8), (1, 3)),
                                         ((64, 64), (8, 8)), ((7, 7), (1, 1))])
def test_feature_grid_points_match_reference(image, grid):
    points = [(r, c) for r in range(image[0]) for c in range(image[1])]
    got, back = feature_grid_points(points, image, grid)
    want, want_back = ref.feature_grid_points(points, image, grid)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(back, want_back, rtol=1e-12, atol=0)
    corners = feature_grid_points([(0, 0), (image[0] - 1, image[1] - 1)], image, grid)[0]
    np.testing.assert_array_equal(corners, [(0, 0), (grid[0] - 1, grid[1] - 1)])


@pytest.mark.parametrize("points, error, message", [
    ([(0, 0), (7, 2)], ValueError, r"\(7, 2\) outside the 7 x 9 grid; accepted rows 0..6 and cols 0..8"),
    ([(-1, 0)], ValueError, "outside the 7 x 9 grid"),
    ([(0, 9)], ValueError, "cols 0..8"),
    ([(1.5, 2)], TypeError, "`points` must hold integer"),
    ([], ValueError, "`points` must be a non-empty sequence"),
    ([1, 2], ValueError, r"shape \(P, 2\)"),
    ([(1, 2, 3)], ValueError, r"shape \(P, 2\)"),
    ([(True, 1)], TypeError, "integer"),
])
def test_bad_points_raise_clear_errors(points, error, message):
    pam = dt.PositionAttention(16)
    with pytest.raises(error, match=message):
        pam.attention_rows(torch.zeros(1, 16, 7, 9), points)


def test_points_accept_arrays_and_tensors():
    want = np.array([[0, 1], [6, 8]])
    for pts in (want, torch.tensor(want), [tuple(p) for p in want.tolist()], want.astype(np.uint8)):
        np.testing.assert_array_equal(check_points(pts, (7, 9)), want)


@pytest.fixture(scope="module")
def head_case():
    head = randomize_(dt.DANetHead(32, 3), seed=5).eval()
    features = _input((2, 32, 6, 7), seed=2)
    return head, features, state_numpy(head)


def test_head_attention_maps_match_reference(head_case):
    head, features, sd = head_case
    size = (23, 27)
    points = border_points(*size)
    maps = head.attention_maps(features, points, size=size)
    x = to_numpy(features)
    grid, back = ref.feature_grid_points(points, size, (6, 7))
    np.testing.assert_array_equal(maps.points, grid)
    np.testing.assert_allclose(maps.image_points, back, rtol=1e-12)
    np.testing.assert_array_equal(maps.query_points, points)
    rows = _ref_rows(sd, ref.conv_bn_relu(x, sd, "conv5a"), grid, prefix="sa.")
    check("head pam_rows", to_numpy(maps.pam_rows), rows)
    check("head pam", to_numpy(maps.pam), ref.resize_bilinear_align_corners(rows, size))
    cam_in = ref.conv_bn_relu(x, sd, "conv5c")
    check("head cam", to_numpy(maps.cam), ref.channel_attention_matrix(cam_in))
    check("head cam_energy", to_numpy(maps.cam_energy), ref.channel_attention_energy(cam_in))
    logits = ref.resize_bilinear_align_corners(ref.danet_head(x, sd)[0], size)
    check_segmentation("head segmentation", to_numpy(maps.segmentation), logits)
    assert maps.pam.shape == (2, len(points), *size) and maps.segmentation.dtype == torch.int64


def test_head_maps_numpy_and_default_size(head_case):
    head, features, _ = head_case
    maps = head.attention_maps(features, [(0, 0), (5, 6)])  # size: the feature grid itself
    arrays = maps.numpy()
    assert set(arrays) == {"pam", "pam_rows", "cam", "cam_energy", "segmentation", "points", "image_points",
                           "query_points"}
    np.testing.assert_array_equal(arrays["pam"], arrays["pam_rows"])
    np.testing.assert_array_equal(arrays["points"], [(0, 0), (5, 6)])
    with pytest.raises(ValueError, match="outside the 6 x 7 grid"):
        head.attention_maps(features, [(6, 0)])
    with pytest.raises(ValueError, match="`size` must be"):
        head.attention_maps(features, [(0, 0)], size=(0, 5))


def test_danet50_attention_maps_match_reference():
    model = randomize_(dt.DANet(3, backbone="resnet50"), seed=11).eval()
    images = _input((2, 3, 25, 33), seed=4)
    points = border_points(25, 33)
    seen = []
    hook = model.pretrained.register_forward_hook(lambda _m, _args, out: seen.append(out[-1]))
    maps = model.attention_maps(images, points)
    hook.remove()
    c4 = seen[0]  # the backbone features the maps were computed from
    with torch.no_grad():
        fused = model(images)[0]
    assert tuple(c4.shape[-2:]) == (4, 5)  # ceil(25 / 8), ceil(33 / 8)
    sd = {k[5:]: v for k, v in state_numpy(model).items() if k.startswith("head.")}
    x = to_numpy(c4)
    grid, _ = ref.feature_grid_points(points, (25, 33), (4, 5))
    np.testing.assert_array_equal(maps.points, grid)
    rows = _ref_rows(sd, ref.conv_bn_relu(x, sd, "conv5a"), grid, prefix="sa.")
    check("DANet pam", to_numpy(maps.pam), ref.resize_bilinear_align_corners(rows, (25, 33)), scope="model")
    check("DANet cam", to_numpy(maps.cam), ref.channel_attention_matrix(ref.conv_bn_relu(x, sd, "conv5c")),
          scope="model")
    check_segmentation("DANet segmentation", to_numpy(maps.segmentation), to_numpy(fused))
    with pytest.raises(ValueError, match=r"\(25, 0\) outside the 25 x 33 grid"):
        model.attention_maps(images, [(25, 0)])


@pytest.mark.gpu
def test_rows_on_cuda_under_autocast_and_on_the_cuda_paths(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    pam = randomize_(dt.PositionAttention(64, pam_path="efficient"), seed=4).eval()
    x = _input((2, 64, 33, 35), seed=5)
    points = border_points(33, 35)
    want = _ref_rows(state_numpy(pam), to_numpy(x), points)
    pam, x = pam.cuda(), x.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        rows = pam.attention_rows(x, points)
    assert rows.dtype == torch.float32
    check("rows under fp16 autocast", to_numpy(rows), want, "float16")
    every = [(r, c) for r in range(33) for c in range(35)]
    with torch.no_grad():
        attention = pam.attention_rows(x, every).reshape(2, 33 * 35, 33 * 35)
        rebuilt = pam.gamma * torch.bmm(pam.value_conv(x).flatten(2), attention.transpose(1, 2)).reshape(x.shape) + x
        check("PAM (CUDA float32 inference: split products) from its rows", to_numpy(rebuilt), to_numpy(pam(x)))
        with torch.autocast("cuda", dtype=torch.float16):
            half = pam(x)  # the attention kernel
        check("PAM (CUDA float16: the attention kernel) from its rows", to_numpy(rebuilt), to_numpy(half.float()),
              "float16")
