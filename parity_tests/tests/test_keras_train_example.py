"""A short run of ``examples/train_keras.py``: DANet-50 with model.fit on a synthetic folder dataset, saved, reloaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("PIL")

from parity_tests.tests.helpers import imagenet_resnet_state_dict, make_segmentation_folder  # noqa: E402

pytestmark = pytest.mark.keras

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_keras.py"


def _example():
    spec = importlib.util.spec_from_file_location("train_keras", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The example is plain Keras: the eager torch backend runs it in CI (about 30 s); compiling DANet-50's training and
# validation steps on TensorFlow and JAX takes a minute more each, so there it runs with --slow.
_SLOW_HERE = (lambda f: f) if keras.backend.backend() == "torch" else pytest.mark.slow(
    reason="compiles DANet-50's train and validation steps: a minute on 2 cores (runs in CI on the torch backend)")


@_SLOW_HERE
@pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/ not present (installed package)")
def test_train_keras_example_runs_and_reloads(tmp_path):
    train = make_segmentation_folder(tmp_path / "train", 4, size=32, block=16, seed=0, jpeg_every=2)
    val = make_segmentation_folder(tmp_path / "val", 1, size=32, block=16, seed=1)
    with open(tmp_path / "resnet50.npz", "wb") as f:  # ImageNet weights in torchvision's layout (random values)
        np.savez(f, **imagenet_resnet_state_dict(np.random.default_rng(0), depth=50))
    result = _example().main(["--data", str(train), "--val", str(val), "--num-classes", "3", "--backbone", "resnet50",
                              "--pretrained-backbone", str(tmp_path / "resnet50.npz"),
                              "--output-stride", "16", "--multi-grid", "none", "--crop", "32", "--epochs", "1",
                              "--steps-per-epoch", "2", "--batch-size", "2", "--out", str(tmp_path / "out")])
    history = result["history"]
    assert {"loss", "mean_iou", "val_loss", "val_mean_iou"} <= set(history), history
    assert np.isfinite(history["loss"]).all() and 0.0 <= history["mean_iou"][0] <= 1.0
    assert any(n.startswith("ignored the ImageNet classifier") for n in result["model"].backbone_notes)
    reloaded = keras.saving.load_model(tmp_path / "out" / "model.keras")
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype("float32")
    for a, b in zip(result["model"](x, training=False), reloaded(x, training=False)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_scan_reports_bad_pairs(tmp_path):
    data = make_segmentation_folder(tmp_path / "ds", 2, size=16, block=8)
    (data / "masks" / "001.png").unlink()
    with pytest.raises(ValueError, match=r"001.png: no `001.png` in masks/"):
        _example().scan(data, 3)


def test_scan_reports_a_truncated_image(tmp_path):
    data = make_segmentation_folder(tmp_path / "ds", 2, size=16, block=8)
    raw = (data / "images" / "001.png").read_bytes()
    (data / "images" / "001.png").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match=r"1 problem\(s\).*\n  001: cannot be read \(image file is truncated"):
        _example().scan(data, 3)


@pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/ not present (installed package)")
def test_train_keras_refuses_what_cannot_run_before_building_a_model(tmp_path, capsys):
    data = make_segmentation_folder(tmp_path / "train", 3, size=16, block=8)
    base = ["--data", str(data), "--num-classes", "3", "--backbone", "resnet50", "--crop", "16",
            "--out", str(tmp_path / "out")]
    other = {"jax": "mirrored", "tensorflow": "data-parallel", "torch": "mirrored"}[keras.backend.backend()]
    needs = {"mirrored": "KERAS_BACKEND=tensorflow", "data-parallel": "KERAS_BACKEND=jax"}[other]
    # 1 batch of 2 a pass: Keras ran 1 step an epoch while printing 2/2, and the poly decay was set for 2 steps
    for argv, message in ((["--batch-size", "4"], "3 training image(s) make no batch of --batch-size 4"),
                          (["--batch-size", "2", "--steps-per-epoch", "2"],
                           "--steps-per-epoch 2 is more than the 1 batch(es) of 2 in the training set (3 images)"),
                          (["--batch-size", "2", "--steps-per-epoch", "0"], "--steps-per-epoch must be >= 1, got 0"),
                          (["--lr", "-0.01"], "--lr must be a finite number >= 0, got -0.01"),
                          (["--crop", "0"], "--crop must be >= 1, got 0"),
                          (["--distribute", other], f"--distribute {other} needs {needs}")):
        with pytest.raises(SystemExit) as info:
            _example().main(base + argv)
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _image_folder(root, mode, n=2, size=12, seed=0):
    """``n`` random ``mode`` PNGs (``L`` grey, ``RGBA``) with all-zero masks; returns the images as arrays."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    pixels = []
    for i in range(n):
        p = rng.integers(0, 256, (size, size) if mode == "L" else (size, size, len(mode)), dtype=np.uint8)
        Image.fromarray(p, mode).save(root / "images" / f"{i}.png")
        Image.fromarray(np.zeros((size, size), np.uint8)).save(root / "masks" / f"{i}.png")
        pixels.append(p.reshape(size, size, -1))
    return np.stack(pixels)


@pytest.mark.parametrize("mode, mean, std", [
    ("L", [(0.485 + 0.456 + 0.406) / 3], [(0.229 + 0.224 + 0.225) / 3]),  # grey: the RGB average (danet-train's)
    ("RGBA", [0.485, 0.456, 0.406, 0.485], [0.229, 0.224, 0.225, 0.229]),  # RGB repeated
])
def test_folder_dataset_reads_every_input_channel(tmp_path, mode, mean, std):
    """`--in-channels` 1 and 4 read grey and RGBA images as they are, normalised as danet-train normalises them
    (the example read every image as RGB: a grey MRI slice became three copies, an RGBA's fourth band was lost)."""
    pixels = _image_folder(tmp_path / "ds", mode)
    example = _example()
    x, _ = example.FolderDataset(example.scan(tmp_path / "ds", 2), 2, in_channels=len(mode))[0]
    assert x.shape == (2, 12, 12, len(mode))
    np.testing.assert_allclose(x, (pixels / 255.0 - np.array(mean)) / np.array(std), rtol=1e-6, atol=1e-6)


@_SLOW_HERE
@pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/ not present (installed package)")
def test_train_keras_trains_a_grey_model(tmp_path):
    _image_folder(tmp_path / "train", "L", size=32)
    result = _example().main(["--data", str(tmp_path / "train"), "--num-classes", "2", "--in-channels", "1",
                              "--backbone", "resnet50", "--output-stride", "16", "--multi-grid", "none", "--crop", "32",
                              "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2",
                              "--out", str(tmp_path / "out")])
    assert result["model"].in_channels == 1 and np.isfinite(result["history"]["loss"]).all()
    reloaded = keras.saving.load_model(tmp_path / "out" / "model.keras")
    assert tuple(reloaded(np.zeros((1, 32, 32, 1), "float32"))[0].shape) == (1, 32, 32, 2)
