"""``danet-parity``: exit codes, the report, and a one-element mismatch caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import weights_convert as wc
from weights_convert.testing import randomize_

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")


def _run(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "parity_tests.cli", "--keras-backend", BACKEND, *args],
                          capture_output=True, text=True, cwd=cwd)
    return proc.returncode, proc.stdout + proc.stderr


def _head_weights(tmp_path, name="head.pth"):
    import danet_torch as dt

    head = randomize_(dt.DANetHead(32, 3), seed=7)
    path = tmp_path / name
    torch.save(head.state_dict(), path)
    return path, head.state_dict()


def test_random_weights_pass_and_report_json(tmp_path):
    report = tmp_path / "report.json"
    code, out = _run("--components", "pam,cam", "--json", str(report))
    assert code == 0, out
    rows = json.loads(report.read_text())["rows"]
    assert {r["component"] for r in rows} == {"pam", "cam"}
    assert all(r["passed"] and r["backend"] == BACKEND for r in rows)
    assert any(r["output"] == "d/d gamma" for r in rows)
    assert f"{len(rows)} passed, 0 failed" in out


def test_user_weights_in_any_format(tmp_path):
    path, state = _head_weights(tmp_path)
    npz = tmp_path / "head.npz"
    wc.save(wc.from_torch(_rebuild(state)), npz, wc.ArchSpec("head", in_channels=32, num_classes=3))
    code, out = _run("--torch-weights", str(path), "--keras-weights", str(npz), "--input-size", "7", "9",
                     "--no-gradients")
    assert code == 0, out
    assert "head/outputs" in out


def _rebuild(state):
    import danet_torch as dt

    head = dt.DANetHead(32, 3)
    head.load_state_dict(state)
    return head


def test_a_single_differing_element_is_caught(tmp_path):
    path, state = _head_weights(tmp_path)
    state = {k: v.clone() for k, v in state.items()}
    state["conv6.1.bias"][2] += 1e-2  # one element of the PAM branch's classifier
    other = tmp_path / "other.pth"
    torch.save(state, other)
    code, out = _run("--torch-weights", str(path), "--keras-weights", str(other), "--no-gradients")
    assert code == 1, out
    failing = [line for line in out.splitlines() if "FAIL" in line]
    assert any(line.strip().startswith("head/pam ") for line in failing), out
    assert not any(line.strip().startswith("head/cam ") for line in failing), out


@pytest.mark.parametrize("args, message", [
    (["--components", "pam,vgg"], "--components has ['vgg']"),
    (["--keras-backend", "mxnet"], "--keras-backend has ['mxnet']"),
    (["--torch-weights", "/nonexistent/w.pth"], "does not exist"),
    (["--batch", "0"], "--batch must be >= 1"),
])
def test_bad_usage_exits_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "parity_tests.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr


def test_unreadable_weights_exit_2(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint" * 10)
    code, out = _run("--torch-weights", str(bad))
    assert code == 2
    assert "broken.pth" in out


def test_tolerance_table_is_printed():
    proc = subprocess.run([sys.executable, "-m", "parity_tests.cli", "--tolerances"], capture_output=True, text=True)
    assert proc.returncode == 0 and "| float32 | layer |" in proc.stdout
