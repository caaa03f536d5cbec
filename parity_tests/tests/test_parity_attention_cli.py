"""``danet-attention``: the PNG and .npz it writes, the maps against the API, bad input exits 2 writing nothing."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import danet_torch as dt
from parity_tests import attention_cli
from parity_tests.tests.helpers import check
from weights_convert.testing import randomize_

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

SIZE = (23, 27)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Head weights (DANetHead(32, 3)), its features, a PNG image, DANet-50 weights: written once."""
    d = tmp_path_factory.mktemp("inputs")
    head = randomize_(dt.DANetHead(32, 3), seed=5).eval()
    torch.save(head.state_dict(), d / "head.pth")
    rng = np.random.default_rng(0)
    features = rng.normal(0, 0.5, (32, 6, 7)).astype("float32")
    np.save(d / "features.npy", features)
    pixels = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(d / "image.png")
    danet = randomize_(dt.DANet(3, backbone="resnet50"), seed=11).eval()
    torch.save(danet.state_dict(), d / "danet50.pth")
    return dict(dir=d, head=head, features=features, pixels=pixels, danet=danet)


def _run(*argv):
    return attention_cli.main([str(a) for a in argv])


def _compare(name, got: dict, want: dict, scope="layer"):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key in ("points", "image_points", "query_points", "segmentation"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")
    for key in ("pam", "pam_rows", "cam", "cam_energy"):
        check(f"{name}: {key}", got[key], want[key], scope=scope)


def test_head_writes_png_and_npz_equal_to_the_api(files, tmp_path):
    d, points = files["dir"], [(0, 0), (22, 26), (11, 13), (0, 26)]
    code = _run(d / "head.pth", d / "image.png", "--features", d / "features.npy", "--points",
                *(f"{r},{c}" for r, c in points), "--out", tmp_path / "fig.png", "--npz", tmp_path / "maps.npz")
    assert code == 0
    with Image.open(tmp_path / "fig.png") as img:
        assert img.format == "PNG" and min(img.size) > 100
        img.load()
    want = files["head"].attention_maps(torch.from_numpy(files["features"][None]), points, size=SIZE).numpy()
    with np.load(tmp_path / "maps.npz") as got:
        _compare("npz vs API", dict(got), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "maps.npz"]  # no temporary files left


def test_grid_points_are_band_centres(files, tmp_path):
    d = files["dir"]
    assert _run(d / "head.pth", d / "image.png", "--features", d / "features.npy", "--grid", "3",
                "--npz", tmp_path / "maps.npz") == 0
    rows = [(2 * i + 1) * SIZE[0] // 6 for i in range(3)]
    cols = [(2 * i + 1) * SIZE[1] // 6 for i in range(3)]
    with np.load(tmp_path / "maps.npz") as got:
        np.testing.assert_array_equal(got["query_points"], [(r, c) for r in rows for c in cols])
        assert got["pam"].shape == (1, 9, *SIZE)


def test_danet_image_is_imagenet_normalised(files, tmp_path):
    d = files["dir"]
    assert _run(d / "danet50.pth", d / "image.png", "--backbone", "resnet50", "--points", "5,7", "22,0",
                "--npz", tmp_path / "maps.npz") == 0
    x = (files["pixels"] / 255.0 - MEAN) / STD  # written here from the documented rule
    images = torch.from_numpy(np.transpose(x, (2, 0, 1))[None].astype("float32"))
    want = files["danet"].attention_maps(images, [(5, 7), (22, 0)]).numpy()
    with np.load(tmp_path / "maps.npz") as got:
        _compare("DANet npz vs API", dict(got), want)


@pytest.mark.parametrize("channels, framework", [(1, "torch"), (4, "torch"),
                                                 pytest.param(1, "keras", marks=pytest.mark.keras)])
def test_a_danet_of_other_input_channels_takes_its_images_as_danet_train_reads_them(channels, framework, tmp_path):
    """A grey (1) or RGBA (4) model, as danet-train trains them: the image converted to that mode and normalised
    with danet-train's rule (the RGB mean for grey, RGB repeated beyond 3 channels); both frameworks."""
    from danet_torch.data import default_normalization

    danet = randomize_(dt.DANet(3, backbone="resnet50", in_channels=channels, output_stride=32, multi_grid=None),
                       seed=12).eval()
    torch.save(danet.state_dict(), tmp_path / "w.pth")
    pixels = np.random.default_rng(1).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    assert _run(tmp_path / "w.pth", tmp_path / "image.png", "--backbone", "resnet50", "--output-stride", "32",
                "--multi-grid", "none", "--points", "5,7", "--npz", tmp_path / "maps.npz", "--framework", framework) == 0
    with Image.open(tmp_path / "image.png") as img:
        converted = np.asarray(img.convert({1: "L", 4: "RGBA"}[channels]), dtype=np.float64).reshape(*SIZE, -1)
    mean, std = (np.asarray(v) for v in default_normalization(channels))
    x = (converted / 255.0 - mean) / std
    want = danet.attention_maps(torch.from_numpy(np.transpose(x, (2, 0, 1))[None].astype("float32")), [(5, 7)])
    with np.load(tmp_path / "maps.npz") as got:
        _compare(f"{channels}-channel DANet, {framework}", dict(got), want.numpy(),
                 "model" if framework == "keras" else "layer")


@pytest.mark.keras
def test_keras_framework_gives_the_torch_maps(files, tmp_path):
    pytest.importorskip("keras")
    d, points = files["dir"], [(0, 0), (22, 26), (11, 13)]
    assert _run(d / "head.pth", d / "image.png", "--features", d / "features.npy", "--framework", "keras",
                "--points", *(f"{r},{c}" for r, c in points), "--npz", tmp_path / "maps.npz") == 0
    want = files["head"].attention_maps(torch.from_numpy(files["features"][None]), points, size=SIZE).numpy()
    with np.load(tmp_path / "maps.npz") as got:
        _compare("keras npz vs torch API", dict(got), want)


def _bad_inputs(d, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image" * 20)
    np.save(tmp_path / "rgba.npy", np.zeros((*SIZE, 4), np.uint8))
    np.save(tmp_path / "feat16.npy", np.zeros((16, 6, 7), np.float32))
    head = [d / "head.pth", d / "image.png", "--features", d / "features.npy"]
    return {
        "point outside": ([*head, "--points", "23,0"], "is outside the image (23 x 27): rows 0..22"),
        "negative point": ([*head, "--points", "0,-1"], "cols 0..26"),
        "unreadable image": ([d / "head.pth", tmp_path / "broken.png", "--features", d / "features.npy",
                              "--points", "0,0"], "is not a readable image"),
        "missing image": ([d / "head.pth", tmp_path / "none.png", "--points", "0,0"], "does not exist"),
        "feature channels": ([d / "head.pth", d / "image.png", "--features", tmp_path / "feat16.npy",
                              "--points", "0,0"], "has 16 channels"),
        "image channels": ([d / "danet50.pth", tmp_path / "rgba.npy", "--backbone", "resnet50", "--points", "0,0"],
                           "IMAGE has 4 channel(s); DANet"),
        "no features": ([d / "head.pth", d / "image.png", "--points", "0,0"], "pass --features"),
        "unreadable weights": ([tmp_path / "broken.pth", d / "image.png", "--points", "0,0"], "broken.pth"),
        "missing weights": ([tmp_path / "none.pth", d / "image.png", "--points", "0,0"],
                            f"WEIGHTS {str(tmp_path / 'none.pth')!r} does not exist or is not a file"),
        "grid too large": ([*head, "--grid", "9"], "`--grid` must be 1..8"),
    }


@pytest.mark.parametrize("case", ["point outside", "negative point", "unreadable image", "missing image",
                                  "feature channels", "image channels", "no features", "unreadable weights",
                                  "missing weights",
                                  "grid too large"])
def test_bad_input_exits_2_and_writes_nothing(case, files, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint" * 10)
    argv, message = _bad_inputs(files["dir"], tmp_path)[case]
    code = _run(*argv, "--out", out_dir / "fig.png", "--npz", out_dir / "maps.npz")
    assert code == 2
    assert message in capsys.readouterr().err
    assert list(out_dir.iterdir()) == []


def test_existing_output_is_kept_without_force(files, tmp_path, capsys):
    d = files["dir"]
    (tmp_path / "fig.png").write_bytes(b"keep me")
    argv = [d / "head.pth", d / "image.png", "--features", d / "features.npy", "--points", "1,1",
            "--out", tmp_path / "fig.png", "--npz", tmp_path / "maps.npz"]
    assert _run(*argv) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "fig.png").read_bytes() == b"keep me" and not (tmp_path / "maps.npz").exists()
    assert _run(*argv, "--force") == 0
    with Image.open(tmp_path / "fig.png") as img:
        assert img.format == "PNG"


@pytest.mark.parametrize("option, name", [("--out", "fig.png"), ("--npz", "maps.npz")])
@pytest.mark.parametrize("where, message", [
    ("missing", "does not exist"), ("file.txt", "not a folder"), ("folder", "is a folder")])
def test_unwritable_output_paths_exit_2_before_the_weights_are_read(tmp_path, capsys, option, name, where, message):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    (tmp_path / "folder" / name).mkdir(parents=True)
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint" * 10)
    path = tmp_path / where / name
    assert _run(tmp_path / "broken.pth", tmp_path / "image.png", "--grid", "2", option, path) == 2
    err = capsys.readouterr().err
    assert f"`{option}` {str(path)!r}" in err and message in err and "broken.pth" not in err, err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_exits_2(tmp_path, capsys):
    (tmp_path / "locked").mkdir(mode=0o500)
    path = tmp_path / "locked" / "maps.npz"
    assert _run(tmp_path / "w.pth", tmp_path / "image.png", "--grid", "2", "--npz", path) == 2
    err = capsys.readouterr().err
    assert f"`--npz` {str(path)!r}" in err and "is not writable" in err, err


@pytest.mark.parametrize("argv, message", [
    (["w.pth", "i.png", "--points", "3;4", "--npz", "m.npz"], "a point is ROW,COL"),
    (["w.pth", "i.png", "--npz", "m.npz"], "one of the arguments --points --grid is required"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        attention_cli.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_nothing_to_write_exits_2(files, capsys):
    d = files["dir"]
    assert _run(d / "head.pth", d / "image.png", "--points", "0,0") == 2
    assert "nothing to write" in capsys.readouterr().err


def test_load_image_rules(tmp_path):
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    Image.fromarray(pixels[:, :, 0], mode="L").save(tmp_path / "gray.png")
    display, x = attention_cli.load_image(tmp_path / "gray.png")  # grayscale -> RGB -> ImageNet
    gray = pixels[:, :, 0, None] / 255.0
    np.testing.assert_allclose(x, (np.repeat(gray, 3, axis=2) - MEAN) / STD, rtol=1e-6)
    np.save(tmp_path / "raw.npy", pixels.astype("float32"))
    display, x = attention_cli.load_image(tmp_path / "raw.npy")  # float .npy: used as is
    np.testing.assert_array_equal(x, pixels.astype("float32"))
    assert display.min() == 0.0 and display.max() == 1.0


@pytest.mark.parametrize("module, source", [("weights_convert.cli", "SRC"), ("parity_tests.cli", "the weights files"),
                                            ("parity_tests.attention_cli", "WEIGHTS")])
def test_help_names_the_commands_own_weights_argument(module, source):
    """The architecture options are shared; their group's title names each command's weights (``danet-attention``
    has no SRC)."""
    import importlib

    text = importlib.import_module(module).build_parser().format_help()
    titles = [line for line in text.splitlines() if line.startswith("architecture (default")]
    assert titles == [f"architecture (default: the record stored in {source}, else inferred from the weights):"]
