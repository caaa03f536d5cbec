"""The tolerance table and its comparison rule (what every other test relies on)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from weights_convert.tolerances import TOLERANCES, Tolerance, compare, table_markdown, tolerance

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_prints_the_table_from_the_code():
    if not README.exists():
        pytest.skip("README.md is not beside the installed package (installed without the source tree)")
    assert table_markdown() in README.read_text()


def test_allclose_rule_and_reported_numbers():
    tol = Tolerance(atol=1e-3, rtol=1e-2)
    ok = compare("x", [1.0, 100.5], [1.0005, 100.0], tol)
    assert ok.passed and ok.max_abs == pytest.approx(0.5) and ok.max_rel == pytest.approx(0.005)
    bad = compare("x", [1.0, 102.0], [1.0, 100.0], tol)
    assert not bad.passed and "x: FAIL" in bad.message() and "max|diff|=2.000e+00" in bad.message()


def test_tensor_relative_scale_for_gradients():
    tol = Tolerance(atol=0.0, rtol=1e-3, relative_to="tensor")
    # 0.05 off on an element near zero is fine next to an element of 100 ...
    assert compare("g", [0.05, 100.0], [0.0, 100.0], tol).passed
    # ... but not element-wise.
    assert not compare("g", [0.05, 100.0], [0.0, 100.0], Tolerance(atol=0.0, rtol=1e-3)).passed


def test_nan_and_inf_handling():
    tol = tolerance("float32")
    assert compare("n", [np.nan, 1.0], [np.nan, 1.0], tol).passed
    mismatch = compare("n", [np.nan, 1.0], [0.0, 1.0], tol)
    assert not mismatch.passed and mismatch.nan_mismatch
    assert compare("i", [np.inf, 1.0], [np.inf, 1.0], tol).passed
    assert not compare("i", [np.inf, 1.0], [1e30, 1.0], tol).passed


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"shape \(2,\) differs from the expected \(3,\)"):
        compare("s", np.zeros(2), np.zeros(3), tolerance("float32"))


def test_lookup_errors_name_what_is_accepted():
    with pytest.raises(ValueError, match=r"No tolerance for `dtype`='int8'.*accepted dtypes"):
        tolerance("int8")
    assert all(t.atol > 0 and t.rtol > 0 for t in TOLERANCES.values())
