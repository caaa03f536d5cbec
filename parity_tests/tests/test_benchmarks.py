"""The benchmark scripts run and report every field (tiny sizes; no figure is asserted: speed lives in docs/)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
pytestmark = pytest.mark.skipif(not BENCHMARKS.exists(), reason="benchmarks/ not present (installed package)")
FIELDS = {"size", "N", "dtype", "mode", "official_ms", "official_mib", "efficient_ms", "efficient_mib",
          "time_ratio", "paired_time_ratio", "memory_ratio", "error"}


def _pam_rows(tmp_path, framework: str) -> list:
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(BENCHMARKS / "pam_benchmark.py"), "--framework", framework, "--batch", "1",
           "--sizes", "8", "--channels", "32", "--repeats", "1", "--calls", "1", "--modes", "fwd", "fwd+bwd",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 8x8 | 64 | float32 | fwd |" in proc.stdout and "| 8x8 | 64 | float32 | fwd+bwd |" in proc.stdout
    rows = json.loads(out.read_text())
    printed = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| 8x8 |")]
    for r, cells in zip(rows, printed, strict=True):  # the table's MiB: tenths (an 8x8 map peaks under 1 MiB)
        assert [float(cells[i]) for i in (5, 7)] == pytest.approx([r["official_mib"], r["efficient_mib"]], abs=0.05)
    return rows


def _check(rows):
    assert [r["mode"] for r in rows] == ["fwd", "fwd+bwd"]
    for r in rows:
        assert set(r) == FIELDS and r["error"] == "", r
        assert r["official_ms"] > 0 and r["efficient_ms"] > 0 and r["official_mib"] >= 0, r
        # The ratios the docs quote are the raw figures' quotients, not figures of their own.
        assert r["time_ratio"] == pytest.approx(r["efficient_ms"] / r["official_ms"], rel=1e-12), r
        if r["official_mib"] > 0:
            assert r["memory_ratio"] == pytest.approx(r["efficient_mib"] / r["official_mib"], rel=1e-12), r
        # one repeat: its one pair's quotient is the medians' quotient
        assert r["paired_time_ratio"] == pytest.approx(r["time_ratio"], rel=1e-12), r


@pytest.mark.parametrize("script, argv, message", [
    ("pam_benchmark.py", ["--block-elements", "-5"], "--block-elements takes integers >= 1, got -5"),
    ("pam_benchmark.py", ["--tf-backward-block-elements", "0"], "--tf-backward-block-elements takes integers >= 1"),
    ("pam_benchmark.py", ["--repeats", "0"], "--repeats takes integers >= 1, got 0"),
    ("pam_benchmark.py", ["--calls", "0"], "--calls takes integers >= 1, got 0"),
    ("pam_benchmark.py", ["--sizes", "8", "0"], "--sizes takes integers >= 1, got [8, 0]"),
    ("pam_benchmark.py", ["--channels", "4"], "--channels takes integers >= 8"),
    ("pam_benchmark.py", ["--dtypes", "float33"], "invalid choice: 'float33'"),
    ("tf_pam_ops.py", ["--channels", "4"], "--channels must be an integer >= 8"),
    ("tf_pam_ops.py", ["--top", "-1"], "--top must be an integer >= 0, got -1"),
])
def test_benchmarks_refuse_bad_arguments(script, argv, message, capsys):
    spec = importlib.util.spec_from_file_location(script[:-3], BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_paired_ratio_is_the_median_of_each_pairs_quotient():
    spec = importlib.util.spec_from_file_location("measure", BENCHMARKS / "measure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # the machine slowed down during one efficient process: two pairs say 0.9x, the medians' quotient 2.0x
    pairs = [(100.0, 90.0), (300.0, 270.0), (100.0, 200.0)]
    assert module.paired_ratio(pairs) == pytest.approx(0.9, rel=1e-12)
    assert module.paired_ratio([(10.0, 12.0), (10.0, 8.0), (10.0, 11.0)]) == pytest.approx(1.1, rel=1e-12)
    assert math.isnan(module.paired_ratio([]))


def test_torch_pam_benchmark_runs(tmp_path):
    _check(_pam_rows(tmp_path, "torch"))


def _one_case(framework: str, part: str, path: str, mode: str) -> dict:
    """One measurement of ``pam_benchmark.py`` in this process (its ``--one-case``), as its fresh processes run it."""
    spec = importlib.util.spec_from_file_location("pam_benchmark", BENCHMARKS / "pam_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert module.main(["--framework", framework, "--part", part, "--batch", "1", "--channels", "32",
                            "--calls", "1", "--one-case", path, "8", "float32", mode]) == 0
    (line,) = [x for x in printed.getvalue().splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def _check_cases(framework: str, part: str):
    for path in ("official", "efficient"):
        for mode in ("fwd", "fwd+bwd"):
            result = _one_case(framework, part, path, mode)
            assert result["ms"] > 0 and result["peak_mib"] >= 0 and result["versions"], (path, mode, result)


@pytest.mark.keras
@pytest.mark.parametrize("part", ["layer", "core"])
def test_keras_pam_benchmark_cases_run(part):
    """Every Keras case on this backend, in process (the table around them is the torch test's, shared)."""
    import keras

    previous = keras.config.dtype_policy()
    try:
        _check_cases("keras", part)
    finally:
        keras.config.set_dtype_policy(previous)


@pytest.mark.keras
def test_pam_benchmark_block_overrides_reach_the_blocks_and_the_heading(monkeypatch):
    """``--block-elements`` and ``--tf-backward-block-elements`` set the Keras blocks' sizes in the measuring
    process, and the table's heading names every override."""
    import argparse

    from danet_keras import pam

    for name in ("BLOCK_ELEMENTS", "TF_BACKWARD_BLOCK_ELEMENTS"):
        monkeypatch.setattr(pam, name, getattr(pam, name))  # restored after the test
    spec = importlib.util.spec_from_file_location("pam_benchmark", BENCHMARKS / "pam_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with contextlib.redirect_stdout(io.StringIO()):
        assert module.main(["--framework", "keras", "--part", "core", "--batch", "1", "--channels", "32",
                            "--calls", "1", "--block-elements", "192", "--tf-backward-block-elements", "640",
                            "--one-case", "efficient", "8", "float32", "fwd+bwd"]) == 0
    assert (pam.BLOCK_ELEMENTS, pam.TF_BACKWARD_BLOCK_ELEMENTS) == (192, 640)
    given = argparse.Namespace(block_elements=192, tf_backward_block_elements=640, xla_blocks=[1 << 20, 4])
    assert module.overrides(given) == (", overriding BLOCK_ELEMENTS=192, TF_BACKWARD_BLOCK_ELEMENTS=640, "
                                       "_pam_xla ELEMENTS=1048576, SPLITS=4")
    assert module.overrides(argparse.Namespace(block_elements=None, tf_backward_block_elements=None,
                                               xla_blocks=None)) == ""


def test_torch_pam_benchmark_core_cases_run():
    _check_cases("torch", "core")


@pytest.mark.parametrize("script", ["danet_step_benchmark.py", "tolerance_measure.py", "pam_gpu_kernels.py",
                                    "tf_pam_ops.py"])
def test_other_benchmarks_parse_their_options(script):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.keras
def test_tf_pam_ops_runs():
    """``tf_pam_ops.py`` at a small size: the official path and the blocks, each with its operations' times."""
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf_pam_ops.py measures Keras on TensorFlow")
    spec = importlib.util.spec_from_file_location("tf_pam_ops", BENCHMARKS / "tf_pam_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert module.main(["--size", "6", "--channels", "32", "--backward-rows", "10", "--calls", "1",
                            "--top", "99"]) == 0
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith("official: ") and "(1.000x)" in lines[0], lines
    assert any(line.startswith("blocks, backward rows 10: ") for line in lines), lines
    blocks = lines[next(i for i, line in enumerate(lines) if line.startswith("blocks, ")):]
    assert any(line.endswith(" TensorListSetItem") for line in blocks), lines  # the blocks run in a loop
    assert not any(line.endswith(" TensorListSetItem") for line in lines[:len(lines) - len(blocks)]), lines


def test_tf32x3_candidate_parts_add_up_to_the_attention():
    """``pam_split_k_tf32x3.py`` (measured on a GPU, not adopted): its high parts keep TF32's bits, high and
    low parts add up exactly, and its three products per product give the attention against float64 over
    blocks, runs and a remainder run (on the CPU, where the products are float32's)."""
    torch = pytest.importorskip("torch")

    from parity_tests import reference as ref
    from parity_tests.tests.helpers import check

    spec = importlib.util.spec_from_file_location("pam_split_k_tf32x3", BENCHMARKS / "pam_split_k_tf32x3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for rounding in ("truncate", "nearest"):
        high = module.tf32_high(x, rounding)
        assert not (high.view(torch.int32) & 0x1FFF).any() and torch.equal(high + (x - high), x)
        assert ((x - high).abs() <= x.abs() * 2.0 ** -(10 if rounding == "truncate" else 11)).all()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, c, 45, generator=g) for c in (8, 8, 32))
    expected = ref.position_attention_core(*(t.transpose(1, 2).numpy() for t in (q, k, v)))
    with torch.no_grad():
        for rows, splits in ((16, 4), (45, 7), (7, 1)):
            out = module.position_attention_forward(q, k, v, rows, splits, parts="explicit")
            check(f"TF32x3 candidate rows={rows} splits={splits}", out.transpose(1, 2).numpy(), expected)
    with pytest.raises(ValueError, match="`parts` must be 'explicit', 'truncate' or 'nearest', got 'both'"):
        module.position_attention_forward(q, k, v, parts="both")
