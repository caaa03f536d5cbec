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


def test_a_layer_scale_for_gradients_that_cancel_to_zero():
    """A bias gradient that is 0 in exact arithmetic (PAM's key-conv bias) is rounding noise at the scale of its
    layer's other gradients: measured against that scale, not against its own largest element."""
    tol = tolerance("float32", "grad")
    noise = compare("d/d key_conv.bias", [2.3e-4, -1e-4], [-1.1e-4, 5e-5], tol)
    assert not noise.passed
    at_scale = compare("d/d key_conv.bias", [2.3e-4, -1e-4], [-1.1e-4, 5e-5], tol, scale=185.0)
    assert at_scale.passed and at_scale.headroom == pytest.approx(3.4e-4 / (1e-4 + 1e-4 * 185.0))
    assert not compare("d/d key_conv.bias", [0.03, 0.0], [0.0, 0.0], tol, scale=185.0).passed
    # a scale below the tensor's own changes nothing
    assert compare("g", [0.05, 100.0], [0.0, 100.0], tol, scale=1.0) == compare("g", [0.05, 100.0], [0.0, 100.0], tol)
    with pytest.raises(ValueError, match="`scale` applies to tolerances relative to the tensor"):
        compare("y", [1.0], [1.0], tolerance("float32"), scale=2.0)


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


def _reference(actual, expected, tol):
    """The rule element by element in plain Python: (max_abs, max_rel, passed, normwise, headroom)."""
    pairs = [(float(a), float(e)) for a, e in zip(np.ravel(actual), np.ravel(expected))
             if not (np.isnan(a) or np.isnan(e))]
    diffs = [0.0 if (np.isinf(a) and a == e) else abs(a - e) for a, e in pairs]
    scales = [0.0 if np.isinf(e) else abs(e) for _, e in pairs]
    largest = max(scales)
    allowed = [tol.atol + tol.rtol * (largest if tol.relative_to == "tensor" else s) for s in scales]
    max_abs = max(diffs)
    if tol.relative_to == "tensor" and largest > 0:
        max_rel = max_abs / largest
    else:
        max_rel = max(d / abs(e) if e != 0 else (np.inf if d > 0 else 0.0) for d, (_, e) in zip(diffs, pairs))
    finite = [(a, e) for a, e in pairs if np.isfinite(a) and np.isfinite(e)]
    normwise = np.sqrt(sum((a - e) ** 2 for a, e in finite)) / np.sqrt(sum(e * e for _, e in finite))
    headroom = max(0.0 if d == 0 else d / t for d, t in zip(diffs, allowed))
    return max_abs, max_rel, all(d <= t for d, t in zip(diffs, allowed)), normwise, headroom


@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-and-inf"])
@pytest.mark.parametrize("key", sorted(TOLERANCES))
def test_reported_numbers_equal_the_rule_element_by_element(key, special):
    """Both ways through ``compare`` (no NaN: whole arrays; NaN present: the non-NaN elements)."""
    rng = np.random.default_rng(0)
    tol = TOLERANCES[key]
    expected = rng.standard_normal((4, 5, 3)) * 10.0 ** rng.integers(-3, 3, (4, 5, 3))
    expected[0, 0, 0] = 0.0
    actual = expected + rng.standard_normal(expected.shape) * tol.rtol * np.abs(expected) * 2
    if special:
        actual[1, 1, :2] = expected[1, 1, :2] = np.nan
        actual[2, 2, 0], expected[2, 2, 0] = np.inf, np.inf
        actual[3, 3, 1], expected[3, 3, 1] = -np.inf, -np.inf
    got = compare("r", actual, expected, tol)
    max_abs, max_rel, passed, normwise, headroom = _reference(actual, expected, tol)
    assert (got.max_abs, got.passed) == (max_abs, passed)
    np.testing.assert_allclose([got.max_rel, got.normwise, got.headroom], [max_rel, normwise, headroom], rtol=1e-12)
