"""danet-train end to end on a synthetic folder dataset: learning, checkpoints, bit-exact resume, data errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from danet_torch import DANet
from danet_torch.train import main, poly_lr
from parity_tests.tests.helpers import make_segmentation_folder

pytest.importorskip("PIL")

COMMON = ["--num-classes", "3", "--backbone", "resnet50", "--output-stride", "16", "--multi-grid", "none",
          "--crop", "32", "--scale-range", "0.8", "1.25", "--batch-size", "4", "--lr", "0.005", "--workers", "0",
          "--device", "cpu", "--log-every", "2"]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """Three epochs of 4 steps on 16 images (validated on 4 others), a checkpoint kept every epoch."""
    root = tmp_path_factory.mktemp("train")
    train = make_segmentation_folder(root / "train", 16, size=32, block=16, seed=0, jpeg_every=4)
    val = make_segmentation_folder(root / "val", 4, size=32, block=16, seed=1)
    out = root / "a"
    argv = ["--data", str(train), "--val", str(val), "--out", str(out), "--epochs", "3", "--save-every", "1", *COMMON]
    assert main(argv) == 0
    return argv, out, val


def test_loss_falls_and_miou_beats_chance(run_a):
    _, out, val = run_a
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["step"] == 12
    assert rows[-1]["train_loss"] < 0.8 * rows[0]["train_loss"], rows
    from PIL import Image

    masks = np.stack([np.asarray(Image.open(p)) for p in sorted((val / "masks").iterdir())])
    freq = np.array([(masks == c).sum() for c in range(3)], np.float64) / (masks != 255).sum()
    chance = freq.max() / 3  # the best constant prediction: IoU = frequency for its class, 0 for the others
    assert rows[-1]["val_miou"] > max(0.5, 2 * chance), (rows[-1], chance)
    assert len(rows[-1]["val_iou"]) == 3


def test_checkpoint_is_official_and_convertible(run_a):
    _, out, _ = run_a
    ckpt = torch.load(out / "last.pth", weights_only=True)
    reference = DANet(3, backbone="resnet50", output_stride=16, multi_grid=None).state_dict()
    assert list(ckpt["state_dict"]) == list(reference)
    assert ckpt["arch"]["num_classes"] == 3 and ckpt["arch"]["backbone"] == "resnet50"
    assert ckpt["arch"]["output_stride"] == 16 and ckpt["arch"]["multi_grid"] is None
    assert ckpt["arch"]["in_channels"] == 3 and ckpt["epoch"] == 3 and ckpt["step"] == 12
    assert (out / "best.pth").is_file() and (out / "epoch_0001.pth").is_file()
    from weights_convert.api import load

    neutral, spec = load(out / "last.pth")
    assert spec.arch == "danet" and spec.num_classes == 3 and len(neutral) == len(reference)
    assert np.array_equal(neutral["head.conv8.1.weight"], ckpt["state_dict"]["head.conv8.1.weight"].numpy())


def test_resume_continues_bit_exactly(run_a, tmp_path):
    argv, out, _ = run_a
    i = argv.index("--out")
    resumed = argv[:i] + ["--out", str(tmp_path / "b")] + argv[i + 2:] + ["--resume", str(out / "epoch_0002.pth")]
    assert main(resumed) == 0
    a = torch.load(out / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pth", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for idx, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][idx]["momentum_buffer"]), idx
    assert _metrics(tmp_path / "b")[0]["train_loss"] == _metrics(out)[2]["train_loss"]


def test_plain_progress_lines_off_a_terminal(run_a, capsys):
    argv, out, _ = run_a
    i = argv.index("--out")
    assert main(argv[:i] + ["--out", str(out), "--epochs", "1"] + argv[i + 2:]) == 2  # refuses to overwrite a run
    assert "already holds a run" in capsys.readouterr().err


def _bad(tmp_path, damage):
    data = make_segmentation_folder(tmp_path / "ds", 3, size=16, block=8)
    damage(data)
    return ["--data", str(data), "--out", str(tmp_path / "out"), "--val-fraction", "0", *COMMON]


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "masks" / "001.png").unlink(), "have no mask"),
    (lambda d: __import__("PIL.Image").Image.fromarray(np.full((16, 16), 5, np.uint8)).save(d / "masks" / "002.png"),
     "class id(s) [5] outside 0..2"),
    (lambda d: __import__("PIL.Image").Image.fromarray(np.zeros((8, 16), np.uint8)).save(d / "masks" / "000.png"),
     "image 16x16, mask 16x8"),
    (lambda d: [p.unlink() for p in (d / "images").iterdir()], "the dataset is empty"),
])
def test_bad_data_is_refused_before_training(tmp_path, capsys, damage, message):
    assert main(_bad(tmp_path, damage)) == 2
    err = capsys.readouterr().err
    assert err.startswith("danet-train: error:") and message in err, err
    assert not (tmp_path / "out").exists()


def test_poly_schedule():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(0.01, 100, 100) == 0.0
