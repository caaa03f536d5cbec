"""The numbers danet-parity reports and the report's forms (table, JSON, JUnit), without any framework."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from parity_tests import report as rep
from parity_tests.weights_check import compare_weights
from weights_convert.tolerances import Tolerance, compare

LONG = "d/d pretrained.layer3.22.downsample.0.weight"


def test_normwise_error_and_headroom_are_what_their_formulas_say():
    rng = np.random.default_rng(0)
    expected = rng.standard_normal((4, 5))
    actual = expected + 1e-5 * rng.standard_normal((4, 5))
    tol = Tolerance(atol=1e-6, rtol=1e-5)
    c = compare("x", actual, expected, tol)
    assert c.normwise == pytest.approx(np.linalg.norm(actual - expected) / np.linalg.norm(expected), rel=1e-12)
    headroom = np.max(np.abs(actual - expected) / (1e-6 + 1e-5 * np.abs(expected)))
    assert c.headroom == pytest.approx(headroom, rel=1e-12)
    assert c.passed == (headroom <= 1)
    # relative to the tensor: the scale is max |expected| for every element
    g = compare("g", actual, expected, Tolerance(1e-6, 1e-5, "tensor"))
    assert g.headroom == pytest.approx(np.max(np.abs(actual - expected)) / (1e-6 + 1e-5 * np.abs(expected).max()))


@pytest.mark.parametrize("actual, expected, headroom, passed", [
    ([1.0, 2.0], [1.0, 2.0], 0.0, True),
    ([1.0, 2.0 + 2e-4], [1.0, 2.0], 2e-4 / (1e-4 + 2e-4), True),
    ([np.nan, 1.0], [0.0, 1.0], np.inf, False),
    ([0.0, 1.0], [0.0, 1.0 + 1e-3], 1e-3 / (1e-4 + 1e-4 * (1 + 1e-3)), False),
])
def test_pass_exactly_when_headroom_is_at_most_one(actual, expected, headroom, passed):
    c = compare("x", actual, expected, Tolerance(1e-4, 1e-4))
    assert c.headroom == pytest.approx(headroom) and c.passed is passed


def _row(output, headroom, check="outputs", dtype="float32", backend="jax", component="danet50"):
    return {"component": component, "output": output, "backend": backend, "device": "torch:cpu/keras:cpu",
            "dtype": dtype, "max_abs": 1e-6 * headroom, "max_rel": 0.0, "atol": 1e-4, "rtol": 1e-4,
            "passed": headroom <= 1, "against": "torch", "check": check, "normwise": 1e-7 * headroom,
            "headroom": headroom, "relative_to": "tensor" if check == "gradients" else "element", "norm": 1.0}


def _report(rows, divergences=(), errors=(), weights=None):
    results = [{"component": "danet50", "backend": "jax", "status": "fail", "seconds": 2.0, "notes": [],
                "divergences": list(divergences), "error": None}]
    report = {"rows": rows, "results": results, "errors": list(errors), "weights": weights, "seconds": 3.0,
              "backends": [{"name": "jax", "seconds": 3.0}]}
    report["exit_code"] = rep.exit_code(report)
    report["totals"] = rep.totals(report)
    return report


DIVERGENCE = {"module": "head.conv5a.0", "class": "Conv2d", "keras_path": "head.conv5a.layers[0]", "call": 0,
              "mode": "forward", "dtype": "float64", "what": "output", "max_abs": 0.04, "error": 3.3e-4,
              "headroom": 5.7e6, "tolerance": {"atol": 1e-9, "rtol": 1e-8, "relative_to": "element"},
              "input_error": 1e-15, "input_headroom": 2e-5}


def test_table_keeps_full_labels_and_a_few_lines_per_group():
    rows = [_row("fused", 0.2)] + [_row(f"d/d pretrained.layer{i}.weight", 3.0 + i, "gradients") for i in range(200)]
    rows.append(_row(LONG, 900.0, "gradients"))
    lines = rep.table(_report(rows))
    text = "\n".join(lines)
    assert LONG in text  # never cut
    grad = next(line for line in lines if " gradients " in line)
    assert grad.split(" FAIL ")[1].strip() == LONG and "9.00e+02" in grad
    assert sum(line.strip().startswith("FAIL") for line in lines) == rep.SHOWN_FAILURES
    assert "... and 197 more failing" in text and len(lines) < 10
    assert next(line for line in lines if " outputs " in line).split()[-2:] == ["PASS", "fused"]
    assert len(rep.table(_report(rows), verbose=True)) > 200


def test_divergences_are_printed_once_for_all_backends_that_agree():
    report = _report([_row("fused", 5.0)], [DIVERGENCE])
    report["results"].append({**report["results"][0], "backend": "torch"})
    lines = rep.divergence_lines(report)
    assert "danet50, float64 forward, on jax, torch:" in lines[2]
    assert lines[3].strip().startswith("first head.conv5a.0 [Conv2d] -> Keras head.conv5a.layers[0]")
    assert "its input in the whole Keras run agrees" in lines[3]
    assert rep.divergence_lines(_report([_row("fused", 0.5)])) == []


def test_exit_codes_crash_over_mismatch_over_pass():
    assert rep.exit_code(_report([_row("fused", 0.5)])) == 0
    assert rep.exit_code(_report([_row("fused", 1.5)])) == 1
    assert rep.exit_code(_report([_row("fused", 0.5)], weights={"passed": False})) == 1
    assert rep.exit_code(_report([_row("fused", 0.5)], weights={"passed": True})) == 0
    crash = {"backend": "torch", "component": None, "type": "WorkerCrash", "message": "exit 3", "traceback": ""}
    assert rep.exit_code(_report([_row("fused", 1.5)], errors=[crash])) == 2


def test_junit_counts_failures_and_errors_and_parses():
    crash = {"backend": "jax", "component": "head", "type": "RuntimeError", "message": "boom <&>", "traceback": "tb"}
    report = _report([_row("fused", 0.5), _row("pam", 7.0, dtype="float64"), _row("d/d x", 0.1, "gradients")],
                     [DIVERGENCE], [crash])
    root = ET.fromstring(rep.junit_xml(report).split("?>", 1)[1])
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("4", "1", "1")
    failure = root.find(".//failure")
    assert "pam headroom 7.00e+00" in failure.get("message") and "head.conv5a.0" in failure.text
    assert root.find(".//error").get("message") == "RuntimeError: boom <&>"


def test_json_has_no_nan_or_infinity():
    text = json.dumps(rep.plain_json({"a": [float("inf"), float("nan"), -float("inf"), 1.5]}), allow_nan=False)
    assert json.loads(text) == {"a": ["inf", "nan", "-inf", 1.5]}


def test_weights_are_compared_exactly_after_the_mapping():
    a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(5, np.int64)}
    same = compare_weights(a, {k: v.copy() for k, v in a.items()})
    assert same["identical"] and same["passed"] and same["lines"][0].startswith("weights: identical (2 tensors")
    b = {"w": a["w"].copy(), "n": a["n"]}
    b["w"][1, 2] += np.float32(1e-5)
    diff = compare_weights(a, b)
    assert not diff["passed"] and [d["name"] for d in diff["differing"]] == ["w"]
    assert diff["differing"][0]["elements"] == 1 and diff["differing"][0]["max_abs"] == pytest.approx(1e-5, rel=1e-2)
    assert compare_weights(a, b, allow_differences=True)["passed"]
    # float16 storage rounds: a dtype difference is a value difference
    half = compare_weights({"w": np.array([0.1], np.float32)}, {"w": np.array([0.1], np.float16)})
    assert not half["passed"] and "(float32 vs float16)" in half["lines"][1]
    missing = compare_weights(a, {"w": a["w"]})
    assert missing["missing"] == ["n"] and "  n: only in the torch file" in missing["lines"]


def test_tensors_that_hold_nan_or_inf_are_flagged_even_when_they_agree():
    """Equal NaN masks pass (both frameworks computed the same thing), but a report that passes on NaN outputs
    (say, from a negative running_var) must say so."""
    clean = _report([_row("fused", 0.1), _row("pam", 0.2)])
    assert not any("NaN" in line for line in rep.summary_lines(clean))
    rows = [_row("fused", 0.0), dict(_row("pam", 0.0), nonfinite=12, size=20)]
    lines = rep.summary_lines(_report(rows))
    assert lines[-1].startswith("PASS") and ("WARNING: 1 compared tensor(s) hold NaN or inf (first: danet50/pam, "
                                             "12 of 20 elements)") in "\n".join(lines), lines


def test_compare_counts_the_nan_and_inf_it_could_not_measure():
    """The count the report's warning and ``--verify`` rely on: NaN and inf elements of the expected tensor."""
    expected = np.arange(20, dtype=np.float64).reshape(4, 5)
    expected[0, :3], expected[2, 1], expected[3, 4] = np.nan, np.inf, -np.inf
    c = compare("x", expected.copy(), expected, Tolerance(1e-6, 1e-5))
    assert (c.passed, c.nonfinite, c.size) == (True, int((~np.isfinite(expected)).sum()), 20) == (True, 5, 20)
    assert "(5 of 20 elements NaN or inf, not measured)" in c.message()
    clean = compare("y", expected[1], expected[1], Tolerance(1e-6, 1e-5))
    assert (clean.nonfinite, clean.size) == (0, 5) and "NaN" not in clean.message()
