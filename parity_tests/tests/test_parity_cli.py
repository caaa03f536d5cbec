"""``danet-parity`` as CI runs it: exit codes, the JSON and JUnit reports, weight files, crashes, warnings."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

import weights_convert as wc
from weights_convert.testing import randomize_

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
OTHER = next(b for b in ("torch", "tensorflow", "jax") if b != BACKEND and importlib.util.find_spec(b))
SMALL = ("--keras-backend", BACKEND, "--components", "cam", "--no-gradients", "--input-size", "5", "5")


def _run(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "parity_tests.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))
    return proc.returncode, proc.stdout, proc.stderr


def _head_files(tmp_path, change=None):
    """``(torch .pth, Keras-side .npz)`` of one random DANetHead; ``change(state)`` edits the second."""
    import danet_torch as dt

    head = randomize_(dt.DANetHead(32, 3), seed=7)
    spec = wc.ArchSpec("head", in_channels=32, num_classes=3)
    first, second = tmp_path / "head.pth", tmp_path / "other.npz"
    torch.save(head.state_dict(), first)
    state = wc.from_torch(head)
    if change:
        change(state)
    wc.save(state, second, spec)
    return str(first), str(second)


def test_random_weights_pass_with_a_complete_report(tmp_path):
    report, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    code, out, err = _run("--components", "pam,cam", "--keras-backend", BACKEND, "--seed", "3",
                          "--json", str(report), "--junit-xml", str(junit))
    assert code == 0, out + err
    r = json.loads(report.read_text())
    assert r["schema"] == "danet-parity-report/2" and r["exit_code"] == 0 and r["result"] == "pass"
    assert {"python", "torch", "keras", "tensorflow", "jax"} <= set(r["versions"]) and r["versions"]["torch"]
    assert r["device"]["torch"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert r["options"]["seed"] == 3 and r["options"]["dtype"] == "float32" and r["options"]["float64"]
    assert [(x["component"], x["backend"], x["size"], x["batch"], x["divergences"]) for x in r["results"]] == [
        ("pam", BACKEND, [9, 11], 2, []), ("cam", BACKEND, [9, 11], 2, [])]
    assert r["backends"][0]["name"] == BACKEND and r["backends"][0]["seconds"] > 0 and r["seconds"] > 0
    rows = r["rows"]
    assert {x["dtype"] for x in rows if x["check"] == "outputs"} == {"float32", "float64"}
    assert all(x["passed"] and x["headroom"] <= 1 for x in rows) and any(x["output"] == "d/d gamma" for x in rows)
    assert r["totals"] == {**r["totals"], "rows": len(rows), "passed": len(rows), "failed": 0, "errors": 0}
    suites = ET.parse(junit).getroot()
    assert suites.get("failures") == "0" and int(suites.get("tests")) == 6  # float32, float64, gradients; x2
    assert f"PASS: {len(rows)} passed, 0 failed" in out
    assert f"danet-parity: {BACKEND}: 2 component(s), 0 not passing" in err


def test_two_weight_files_that_differ_by_1e5_are_a_mismatch(tmp_path):
    """A classifier bias 1e-5 off: the weights check says which, the float64 forward fails, the trace names it."""
    def nudge(state):
        state["conv6.1.bias"][2] += 1e-5

    first, second = _head_files(tmp_path, nudge)
    report = tmp_path / "report.json"
    code, out, err = _run("--torch-weights", first, "--keras-weights", second, "--keras-backend", BACKEND,
                          "--no-gradients", "--weights-may-differ", "--json", str(report))
    assert code == 1, out + err  # allowed to differ, and the float64 forward shows that they do
    r = json.loads(report.read_text())
    assert r["weights"]["passed"] and [d["name"] for d in r["weights"]["differing"]] == ["conv6.1.bias"]
    assert r["weights"]["differing"][0]["max_abs"] == pytest.approx(1e-5, rel=1e-2)
    failing = {(x["output"], x["dtype"]) for x in r["rows"] if not x["passed"]}
    assert failing == {("pam", "float64")}, failing  # the float32 run alone would pass
    first_divergence = r["results"][0]["divergences"][0]
    assert (first_divergence["module"], first_divergence["keras_path"]) == ("conv6.1", "conv6.layers[1]")
    assert "conv6.1.bias: 1 of 3 elements differ" in out and "first conv6.1 [Conv2d] -> Keras conv6.layers[1]" in out

    code, out, err = _run("--torch-weights", first, "--keras-weights", second, "--keras-backend", BACKEND,
                          "--no-gradients", "--no-float64")
    assert code == 1 and "a mismatch (exit 1) unless --weights-may-differ" in out, out + err


def test_identical_files_in_two_formats_pass_and_inapplicable_options_warn(tmp_path):
    first, second = _head_files(tmp_path)
    code, out, err = _run("--torch-weights", first, "--keras-weights", second, "--keras-backend", BACKEND,
                          "--input-size", "7", "9", "--no-gradients", "--components", "pam")
    assert code == 0, out + err
    assert "weights: identical (" in out and "head            outputs" in out
    assert "warning: --components does not apply with --torch-weights" in err


def test_a_crashing_backend_is_an_error_and_the_others_are_reported(tmp_path):
    """One worker dies at start (planted with a sitecustomize); the other backend still runs; exit 2."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"if '--worker' in sys.argv and os.environ.get('KERAS_BACKEND') == {OTHER!r}:\n"
        "    sys.stderr.write('planted crash\\n'); os._exit(3)\n")
    report, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    code, out, err = _run("--components", "cam", "--keras-backend", f"{OTHER},{BACKEND}", "--no-gradients",
                          "--json", str(report), "--junit-xml", str(junit),
                          env={"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])})
    assert code == 2, out + err
    r = json.loads(report.read_text())
    assert r["result"] == "error" and [e["backend"] for e in r["errors"]] == [OTHER]
    assert "planted crash" in r["errors"][0]["message"]
    assert [b["status"] for b in r["backends"]] == ["error", "ok"]
    assert {x["backend"] for x in r["rows"]} == {BACKEND} and all(x["passed"] for x in r["rows"])
    assert ET.parse(junit).getroot().get("errors") == "1"
    assert f"ERROR {OTHER}:" in out


@pytest.mark.parametrize("args, message", [
    (["--components", "pam,vgg"], "--components has ['vgg']"),
    (["--keras-backend", "mxnet"], "--keras-backend has ['mxnet']"),
    (["--torch-weights", "/nonexistent/w.pth"], "does not exist"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--in-process", "--keras-backend", OTHER], "--in-process runs on this process's KERAS_BACKEND"),
])
def test_bad_usage_exits_2(args, message):
    code, _, err = _run(*args, env={"KERAS_BACKEND": BACKEND})
    assert code == 2 and message in err, err


@pytest.mark.parametrize("option", ["--json", "--junit-xml"])
@pytest.mark.parametrize("where, message", [
    ("missing/report", "does not exist"), ("", "is a folder"), ("file.txt/report", "not a folder")])
def test_unwritable_report_paths_exit_2_before_any_backend_runs(tmp_path, option, where, message):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    path = tmp_path / where
    code, out, err = _run(option, str(path), *SMALL)
    assert code == 2 and f"{option} {str(path)!r}" in err and message in err, out + err
    assert "Traceback" not in err and "component(s)" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_one_file_for_both_reports_exits_2(tmp_path):
    path = str(tmp_path / "report")
    code, out, err = _run("--json", path, "--junit-xml", path, *SMALL)
    assert code == 2 and "--json and --junit-xml name the same file" in err and "component(s)" not in err, out + err


def test_unreadable_weights_exit_2_before_any_backend_runs(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint" * 10)
    code, out, err = _run("--torch-weights", str(bad), "--keras-backend", BACKEND)
    assert code == 2 and "broken.pth" in err and "component(s)" not in err, out + err


def test_the_attention_block_of_a_larger_keras_model_with_allow_partial(tmp_path):
    """A team's own model: ``save_weights`` of a Keras model with a DualAttention inside. Refused as a whole
    (its other layers have no torch side), compared with --allow-partial, which says what it left out."""
    import keras

    import danet_keras as dk

    keras.utils.set_random_seed(3)
    inputs = keras.Input((None, None, 32))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1, name="logits")(dk.DualAttention(name="attention")(inputs)))
    model.get_layer("attention").sa.gamma.assign([0.5])
    path = str(tmp_path / "unet.weights.h5")
    model.save_weights(path)
    run = ("--keras-weights", path, "--keras-backend", BACKEND, "--no-gradients", "--input-size", "5", "5")
    code, out, err = _run(*run)
    assert code == 2 and "pass --allow-partial" in err, out + err
    code, out, err = _run(*run, "--allow-partial", "--json", str(tmp_path / "r.json"))
    assert code == 0 and "PASS" in out, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert any("left out layers/conv2d (2 arrays)" in w for w in report["warnings"]), report["warnings"]
    assert report["rows"] and all(r["passed"] for r in report["rows"])


def test_allow_partial_still_needs_every_weight_of_the_layer(tmp_path):
    torch_file, _ = _head_files(tmp_path)
    state = torch.load(torch_file, weights_only=True)
    del state["sa.value_conv.bias"]
    torch.save(state, tmp_path / "lacking.pth")
    code, out, err = _run("--torch-weights", str(tmp_path / "lacking.pth"), "--keras-backend", BACKEND,
                          "--allow-partial")
    assert code == 2 and "lacks 1 weight(s)" in err and "sa.value_conv.bias" in err, out + err


def test_tolerance_table_is_printed():
    code, out, _ = _run("--tolerances")
    assert code == 0 and "| float32 | layer |" in out
