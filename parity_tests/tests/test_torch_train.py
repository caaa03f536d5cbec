"""danet-train end to end on a synthetic folder dataset: learning, checkpoints, bit-exact resume, data errors."""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch

from danet_torch import DANet
from danet_torch.train import main, poly_lr
from parity_tests.tests.helpers import hostile_pth, make_segmentation_folder

pytest.importorskip("PIL")

# DANet-50 at output stride 16 on 32x32 crops; the recipe's SGD + poly with the head at 10x, a small rate.
COMMON = ["--num-classes", "3", "--backbone", "resnet50", "--output-stride", "16", "--multi-grid", "none",
          "--crop", "32", "--lr", "0.002", "--workers", "0", "--device", "cpu", "--log-every", "1"]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """Fit two images from random weights (8 epochs of one step, validated on the same images with precise
    BatchNorm statistics): the classic check that a training loop learns. Epoch 6 is kept for --resume."""
    root = tmp_path_factory.mktemp("train")
    data = make_segmentation_folder(root / "ds", 2, size=32, block=16, seed=0, jpeg_every=2)
    out = root / "a"
    argv = ["--data", str(data), "--val", str(data), "--out", str(out), "--epochs", "8", "--batch-size", "2",
            "--scale-range", "1", "1", "--precise-bn", "1", "--save-every", "6", *COMMON]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return argv, out, data, printed.getvalue()


def test_loss_falls_and_miou_beats_chance(run_a):
    _, out, data, _ = run_a
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == list(range(1, 9)) and rows[-1]["step"] == 8
    assert rows[-1]["train_loss"] < 0.6 * rows[0]["train_loss"], rows
    from PIL import Image

    masks = np.stack([np.asarray(Image.open(p)) for p in sorted((data / "masks").iterdir())])
    present = [c for c in range(3) if (masks == c).any()]
    chance = max((masks == c).sum() for c in present) / (masks != 255).sum() / len(present)  # best constant guess
    assert rows[-1]["val_miou"] > chance + 0.1, ([r["val_miou"] for r in rows], chance)
    assert len(rows[-1]["val_iou"]) == 3


def test_checkpoint_is_official_and_convertible(run_a):
    _, out, _, _ = run_a
    ckpt = torch.load(out / "last.pth", weights_only=True)
    reference = DANet(3, backbone="resnet50", output_stride=16, multi_grid=None).state_dict()
    assert list(ckpt["state_dict"]) == list(reference)
    assert ckpt["arch"]["num_classes"] == 3 and ckpt["arch"]["backbone"] == "resnet50"
    assert ckpt["arch"]["output_stride"] == 16 and ckpt["arch"]["multi_grid"] is None
    assert ckpt["arch"]["in_channels"] == 3 and ckpt["epoch"] == 8 and ckpt["step"] == 8
    assert (out / "best.pth").is_file() and (out / "epoch_0006.pth").is_file()
    from weights_convert.api import load

    ckpt_read = load(out / "last.pth")
    neutral, spec = ckpt_read
    assert ckpt_read.stored_record and spec.to_dict() == ckpt["arch"]
    assert spec.kind == "danet" and spec.num_classes == 3 and len(neutral) == len(reference)
    assert np.array_equal(neutral["head.conv8.1.weight"], ckpt["state_dict"]["head.conv8.1.weight"].numpy())


def test_resume_continues_bit_exactly(run_a, tmp_path):
    argv, out, _, _ = run_a
    i = argv.index("--out")
    resumed = argv[:i] + ["--out", str(tmp_path / "b")] + argv[i + 2:] + ["--resume", str(out / "epoch_0006.pth")]
    assert main(resumed) == 0
    a = torch.load(out / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pth", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for idx, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][idx]["momentum_buffer"]), idx
    assert [r["train_loss"] for r in _metrics(tmp_path / "b")] == [r["train_loss"] for r in _metrics(out)[6:]]


def test_resume_with_another_batch_size_continues_the_schedule(tmp_path):
    """3 steps per epoch resumed at 1 (a larger --batch-size, or more processes): the schedule goes on from the
    epoch reached, as upstream's ``T = epoch * iters_per_epoch + i``; the optimiser's step count (3 > 2 steps in
    all now) made ``1 - step / steps`` negative and its 0.9th power complex, which SGD refused mid-run."""
    data = make_segmentation_folder(tmp_path / "ds", 3, size=32, block=16, seed=0)
    argv = ["--data", str(data), "--val-fraction", "0", "--scale-range", "1", "1", "--out", str(tmp_path / "a"),
            *COMMON]
    assert main([*argv, "--epochs", "1", "--batch-size", "1"]) == 0
    assert main([*argv, "--epochs", "2", "--batch-size", "3", "--resume", str(tmp_path / "a")]) == 0
    rows = _metrics(tmp_path / "a")
    assert [r["step"] for r in rows] == [3, 4]
    assert rows[0]["lr"] == pytest.approx(0.002 * (1 - 2 / 3) ** 0.9, rel=1e-12)
    assert rows[1]["lr"] == pytest.approx(0.002 * (1 - 1 / 2) ** 0.9, rel=1e-12)


def test_plain_progress_lines_off_a_terminal(run_a):
    printed = run_a[3]
    assert "danet-train: 1 process(es) on cpu (single), DANet resnet50 3 classes, 2 training / 2 validation" in printed
    assert "epoch 1/8 step 1/1 loss " in printed and "epoch 8/8: train loss " in printed, printed


def test_an_existing_run_is_not_overwritten(run_a, capsys):
    argv, out, _, _ = run_a
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err


def _bad(tmp_path, damage):
    data = make_segmentation_folder(tmp_path / "ds", 3, size=16, block=8)
    damage(data)
    return ["--data", str(data), "--out", str(tmp_path / "out"), "--val-fraction", "0", "--batch-size", "2", *COMMON]


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


@pytest.mark.parametrize("option, value, accepted", [
    ("--log-every", "0", ">= 1"), ("--workers", "-1", ">= 0"), ("--save-every", "-2", ">= 0"),
    ("--precise-bn", "-1", ">= 0"), ("--lr", "-0.01", "a finite number >= 0"), ("--lr", "nan", "a finite number >= 0"),
    ("--head-lr-mult", "-1", "a finite number >= 0"), ("--momentum", "-0.9", "a finite number >= 0"),
    ("--weight-decay", "inf", "a finite number >= 0"), ("--poly-power", "-1", "a finite number >= 0"),
    ("--dropout", "1", "in [0, 1)"), ("--val-fraction", "1", "in [0, 1)"),
])
def test_option_values_are_refused_naming_the_option(tmp_path, capsys, option, value, accepted):
    """Each refused up front (before the data is read or a model built), naming the option, the value and what
    is accepted; before, `--log-every 0` crashed in the first step, NaN or negative rates trained silently, and
    torch's own messages ("Invalid learning rate") named no option."""
    argv = [*_bad(tmp_path, lambda d: None), "--epochs", "1", option, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"danet-train: error: `{option}` must be {accepted}, got {value}"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["code-running pickle", "text file", "cut short", "other weights"])
def test_unreadable_resume_checkpoints_are_refused_without_running_code(run_a, tmp_path, capsys, kind):
    marker = tmp_path / "PWNED"
    path = tmp_path / "t.pth"
    if kind == "code-running pickle":
        hostile_pth(path, marker)
    elif kind == "text file":
        path.write_text("epoch 6, not a checkpoint\n" * 4)
    elif kind == "cut short":
        path.write_bytes((run_a[1] / "last.pth").read_bytes()[:5000])
    else:  # a readable dict of the right entries whose weights are not this model's
        torch.save({"state_dict": {"conv.weight": torch.zeros(1)}, "optimizer": {}}, path)
    assert main([*_bad(tmp_path, lambda d: None), "--resume", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("danet-train: error:") and f"`--resume` {str(path)!r}" in err, err
    assert "weights_only" not in err and "Weights only" not in err, err  # never a hint to load it unsafely
    assert not marker.exists() and not (tmp_path / "out").exists()
    if kind == "code-running pickle":
        assert "Refused" in err and "Nothing was executed" in err, err


def test_help_shows_the_recipe_defaults(capsys):
    """The defaults TRAINING.md's recipe table gives; options without help text showed none, and options
    without a default said "(default: None)" after their own words for it."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split()[1:])
    options = text[text.index("options:"):]
    for option, default in (("--epochs", "50"), ("--backbone", "resnet101"), ("--output-stride", "8"),
                            ("--head-lr-mult", "10.0"), ("--momentum", "0.9"), ("--weight-decay", "0.0001"),
                            ("--poly-power", "0.9"), ("--dropout", "0.1"), ("--lr", "0.01"), ("--crop", "768")):
        entry = re.search(rf" {option} [A-Z{{].*?\(default: [^)]*\)", options).group(0)  # up to the next default shown
        assert entry.endswith(f"(default: {default})"), entry
    assert "(default: None)" not in text and "``" not in text


def test_poly_schedule():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(0.01, 100, 100) == 0.0
    assert poly_lr(0.01, 150, 100) == 0.0  # past the end: 0, not the complex (-0.5) ** 0.9


def test_a_diverged_run_stops_keeping_the_finite_epochs(tmp_path, capsys):
    """A rate that blows the weights up: the run stops at the first epoch whose loss is not finite, exit 1,
    and writes no checkpoint or metrics row of it (it trained on to the end and could write best.pth)."""
    data = make_segmentation_folder(tmp_path / "ds", 2, size=32, block=16, seed=0)
    argv = ["--data", str(data), "--val", str(data), "--out", str(tmp_path / "a"), "--epochs", "6",
            "--batch-size", "2", "--scale-range", "1", "1", *COMMON]
    argv[argv.index("--lr") + 1] = "1e12"
    assert main(argv) == 1
    err = capsys.readouterr().err
    rows = _metrics(tmp_path / "a") if (tmp_path / "a" / "metrics.jsonl").exists() else []
    assert all(np.isfinite(r["train_loss"]) for r in rows) and len(rows) < 6
    assert re.search(rf"danet-train: error: the training loss of epoch {len(rows) + 1} is (nan|inf): the run "
                     rf"diverged", err), err
    if rows:  # the last finite epoch is what last.pth holds
        ckpt = torch.load(tmp_path / "a" / "last.pth", weights_only=True)
        assert ckpt["epoch"] == len(rows) and all(torch.isfinite(t).all() for t in ckpt["state_dict"].values()
                                                  if t.is_floating_point())


def test_resume_with_nothing_left_to_train_says_so(run_a, tmp_path, capsys):
    argv, out, _, _ = run_a
    i = argv.index("--out")
    again = argv[:i] + ["--out", str(tmp_path / "b")] + argv[i + 2:] + ["--resume", str(out / "last.pth")]
    assert main(again) == 0
    printed = capsys.readouterr().out
    assert f"nothing to train: {out / 'last.pth'} has 8 epoch(s) done, --epochs 8" in printed, printed
    assert not (tmp_path / "b").exists()
