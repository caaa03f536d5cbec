"""The one tolerance table of the project.

Every test, the ``danet-parity`` CLI, ``danet-convert --verify`` and the README
take their tolerances from here. A comparison passes when, element-wise,
``|actual - expected| <= atol + rtol * |expected|`` (NumPy's ``allclose``
rule) and the NaN masks are equal.

Scopes:
    ``layer``: one attention layer (PAM, CAM, DualAttention, DANetHead).
    ``model``: a whole DANet (a deep backbone accumulates rounding).
    ``grad``: gradients of a scalar loss, relative to the tensor's largest
    magnitude (a parameter's: the largest of its layer's gradients). Float32
    gradients of a whole DANet in training mode are ill-conditioned: torch
    float32 against torch float64 differs by 1.9 on an input gradient of
    magnitude 218 (0.9%), measured at 65x65 with random weights. So the suite proves DANet's gradients in float64 (both
    frameworks, tight) and the attention layers' gradients in float32 too.
    Gradients that are zero in exact arithmetic are rounding noise at the
    scale of the terms that cancel in them: PAM's key-conv bias cannot
    change a softmax over keys, and its gradient (1e-4 in float32 at 64x70,
    B = 2, in both frameworks and on both paths) is measured against its
    layer's kernel gradient (~200 there), not against ``atol`` alone.

Why float32 ``layer`` allows 3e-4: neither PAM nor CAM scales its energy
(the official math), so the energies are unscaled sums over C/8 or N
products. At 45x45 (N = 2025) CAM's energies reach ~2e3, float32 rounds
them by ~1e-4, and the softmax carries that into the output: 2.0e-4 against
the float64 reference, in torch and Keras alike (an atol of 1e-4 passed
only for some seeds). The table states what float32 can give at the sizes
compared, and the tests use random, non-zero-gamma inputs at such sizes.

Half precision (float16/bfloat16, each framework against float64): ``layer``
is element-wise; ``model`` is relative to the tensor, as gradients are: a
deep network's rounding grows with its activations, not with each output,
and an output near zero carries the rounding of the large terms that cancel
in it. A random-weight DANet-50 in bfloat16 at 65x65 is 4% off normwise in
both frameworks, and element-wise up to 1.4 off where ``|expected|`` is
small (headroom 2.5 under the element-wise rule it had before). The
``grad`` entries serve the tests (``danet-parity --dtype float16`` compares
gradients in float32) and are not measured.

What each entry is measured to need (:data:`MEASURED`, printed beside the
table): the worst, over every Keras backend, seed and component, of the
headroom ``max |a - b| / (atol + rtol * scale)`` (PASS iff <= 1), of the
normwise error ``||a - b|| / ||b||`` and of ``max |a - b|``, with random
weights at the suite's sizes (:data:`MEASURED_BY` says how). An entry more
than 10x above what is reached (worst headroom below 0.1) is to be
tightened. None is, in float32: ``layer`` serves both Keras against torch
(CAM at 9x11) and either framework against the float64 reference, where
float32 CAM at 45x45 reaches max |diff| 2.0e-4 (headroom 1.48 under the
earlier atol of 1e-4, hence 3e-4); ``model`` reaches 0.53 and ``grad`` 0.19. The float64 entries are 1400x or more
above what the parity comparisons reach, but they also bound float64 against the
reference for inputs up to 100 (the hostile-input tests) and DANet-101
at 97x129, which this measurement does not cover.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Tolerance", "TOLERANCES", "tolerance", "compare", "Comparison", "table_markdown", "Measured", "MEASURED",
           "MEASURED_BY"]


@dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= atol + rtol * scale``.

    ``relative_to="element"``: ``scale = |expected|`` element by element
    (NumPy's ``allclose``). ``relative_to="tensor"``: ``scale = max |expected|``
    over the whole tensor, for gradients, whose elements are sums of many
    products that cancel to near zero while the tensor's scale is large; the
    parity suite measures a parameter's gradient against the largest of its
    layer's gradients (a conv's kernel and bias together: :func:`compare`'s
    ``scale``).
    """

    atol: float
    rtol: float
    relative_to: str = "element"


# (dtype, scope) -> Tolerance. float32 against float64 or across frameworks;
# float16/bfloat16 against the float64 reference (compute-dtype rounding).
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("float64", "layer"): Tolerance(atol=1e-10, rtol=1e-9),
    ("float64", "model"): Tolerance(atol=1e-9, rtol=1e-8),
    ("float64", "grad"): Tolerance(atol=1e-9, rtol=1e-9, relative_to="tensor"),
    ("float32", "layer"): Tolerance(atol=3e-4, rtol=1e-4),
    ("float32", "model"): Tolerance(atol=1e-4, rtol=1e-3),
    ("float32", "grad"): Tolerance(atol=1e-4, rtol=1e-4, relative_to="tensor"),
    ("float16", "layer"): Tolerance(atol=2e-2, rtol=2e-2),
    ("float16", "model"): Tolerance(atol=1e-1, rtol=5e-2, relative_to="tensor"),
    ("float16", "grad"): Tolerance(atol=1e-2, rtol=2e-2, relative_to="tensor"),
    ("bfloat16", "layer"): Tolerance(atol=1e-1, rtol=5e-2),
    ("bfloat16", "model"): Tolerance(atol=3e-1, rtol=1.5e-1, relative_to="tensor"),
    ("bfloat16", "grad"): Tolerance(atol=5e-2, rtol=1e-1, relative_to="tensor"),
}


@dataclass(frozen=True)
class Measured:
    """The worst seen for one entry: headroom (PASS iff <= 1), normwise error, max |diff|, and where."""

    headroom: float
    normwise: float
    max_abs: float
    where: str


MEASURED_BY = ("`python benchmarks/tolerance_measure.py --seeds 0 1 2` on CPU (x86_64, 2 cores; torch 2.13.0, "
               "Keras 3.15.1 on TensorFlow 2.21.0, JAX 0.10.2 and torch), 2026-11-27")
# (dtype, scope) -> the worst over every backend, seed and component (normwise: besides PAM's key-conv bias
# gradient, zero in exact arithmetic). Half precision: outputs only (its `grad` entries are not measured).
MEASURED: dict[tuple[str, str], Measured] = {
    ("float64", "layer"): Measured(1.5e-4, 3.3e-14, 2.0e-14, "CAM outputs, 9x11; DANet-50 BatchNorm statistics, 33x33"),
    ("float64", "model"): Measured(3.2e-4, 2.5e-14, 5.0e-13, "DANet-50 outputs, 65x65"),
    ("float64", "grad"): Measured(7.2e-4, 7.1e-13, 1.3e-9, "DANet-50 parameter gradients, 33x33"),
    ("float32", "layer"): Measured(0.55, 9.5e-6, 2.0e-4, "CAM at 45x45 against the float64 reference, torch and "
                                   "Keras alike"),
    ("float32", "model"): Measured(0.53, 6.7e-6, 1.6e-4, "DANet-50 outputs, 65x65"),
    ("float32", "grad"): Measured(0.19, 4.5e-5, 1.7e-4, "DualAttention gradients, 9x11"),
    ("float16", "layer"): Measured(0.35, 2.1e-3, 1.4e-2, "DualAttention and PAM against float64, 9x11"),
    ("float16", "model"): Measured(0.28, 6.5e-3, 1.9e-1, "DANet-50 against float64, 65x65"),
    ("bfloat16", "layer"): Measured(0.70, 9.4e-3, 7.1e-2, "CAM against float64 (Keras), 9x11"),
    ("bfloat16", "model"): Measured(0.69, 5.5e-2, 1.4, "DANet-50 against float64, 65x65"),
}


def tolerance(dtype: str, scope: str = "layer") -> Tolerance:
    """Look up the tolerance for ``dtype`` (a name such as ``"float32"``) and ``scope``."""
    key = (str(dtype).replace("torch.", ""), scope)
    if key not in TOLERANCES:
        accepted = sorted({d for d, _ in TOLERANCES}), sorted({s for _, s in TOLERANCES})
        raise ValueError(
            f"No tolerance for `dtype`={dtype!r}, `scope`={scope!r}; "
            f"accepted dtypes {accepted[0]}, scopes {accepted[1]}.")
    return TOLERANCES[key]


@dataclass(frozen=True)
class Comparison:
    """Outcome of comparing one output: the numbers a failure message needs."""

    name: str
    max_abs: float
    max_rel: float
    tol: Tolerance
    passed: bool
    nan_mismatch: bool = False
    normwise: float = 0.0
    headroom: float = 0.0
    nonfinite: int = 0  # NaN or inf elements of the expected array: left out (NaN) or equal (inf), not measured
    size: int = 0  # elements of the expected array

    def message(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        nan = " (NaN masks differ)" if self.nan_mismatch else ""
        if self.nonfinite:
            nan += f" ({self.nonfinite} of {self.size} elements NaN or inf, not measured)"
        return (f"{self.name}: {status}{nan} max|diff|={self.max_abs:.3e} "
                f"max rel={self.max_rel:.3e} normwise={self.normwise:.3e} headroom={self.headroom:.3g} "
                f"tolerance atol={self.tol.atol:g} rtol={self.tol.rtol:g}")


def _max_relative(diff, scale) -> float:
    """``max(diff / scale)``; a difference where the expected value is 0 is infinitely relative."""
    positive = scale > 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rel = diff / np.where(positive, scale, 1.0)
    if not positive.all():
        rel[~positive] = np.where(diff[~positive] > 0, np.inf, 0.0)
    return float(rel.max())


def compare(name: str, actual, expected, tol: Tolerance, scale: float | None = None) -> Comparison:
    """Compare two arrays (any framework's, converted to NumPy float64) under ``tol``.

    NaN positions must agree and are then left out; ``inf`` equal to ``inf``
    counts as no difference, ``inf`` against anything else as an infinite one.
    A few passes over the data: gradient checks compare tens of millions of
    elements.

    ``scale`` (tolerances relative to the tensor only): a magnitude the
    tensor's rounding is measured against where it exceeds the tensor's own
    largest, such as the largest gradient of the tensor's layer. A gradient
    that is 0 in exact arithmetic (PAM's key-conv bias: one constant added to
    a row's energies leaves its softmax unchanged) is a sum of terms that
    cancel, whose rounding is that of the terms, not of the result.
    """
    if scale is not None and tol.relative_to != "tensor":
        raise ValueError(f"{name}: `scale` applies to tolerances relative to the tensor (relative_to='tensor'), "
                         f"got relative_to={tol.relative_to!r}.")
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"{name}: shape {a.shape} differs from the expected {e.shape}")
    size, nonfinite = int(e.size), int(e.size - np.isfinite(e).sum())
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    nan_mismatch = bool((nan_a != nan_e).any())
    if nan_a.any() or nan_e.any():
        both = ~(nan_a | nan_e)
        a, e = a[both], e[both]
    else:  # the usual case: no NaN, no copies
        a, e = a.reshape(-1), e.reshape(-1)
    if not a.size:
        return Comparison(name, 0.0, 0.0, tol, not nan_mismatch, nan_mismatch, 0.0,
                          float("inf") if nan_mismatch else 0.0, nonfinite, size)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN here, zero below where they are equal
        delta = a - e
    diff = np.abs(delta)
    inf_a = np.isinf(a)
    if inf_a.any():
        diff[inf_a & (a == e)] = 0.0
    magnitude = np.abs(e)
    max_abs, max_scale = float(diff.max()), float(magnitude.max())
    finite_scale = magnitude if np.isfinite(max_scale) else np.where(np.isinf(magnitude), 0.0, magnitude)
    largest = max_scale if np.isfinite(max_scale) else float(finite_scale.max())
    if scale is not None and np.isfinite(scale):
        largest = max(largest, float(scale))
    if tol.relative_to == "tensor":  # one bound for the whole tensor
        allowed = tol.atol + tol.rtol * largest
        ok = max_abs <= allowed
        headroom = max_abs / allowed if allowed > 0 else (float("inf") if max_abs > 0 else 0.0)
        max_rel = max_abs / largest if largest > 0 else _max_relative(diff, magnitude)
    else:
        allowed = tol.atol + tol.rtol * finite_scale
        ok = bool(np.all(diff <= allowed))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            headroom = float(np.where(diff == 0, 0.0, diff / allowed).max())
        max_rel = _max_relative(diff, magnitude)
    with np.errstate(over="ignore"):
        if np.isfinite(max_abs) and np.isfinite(max_scale):  # every a, e and a - e finite
            err, ref = np.linalg.norm(delta), np.linalg.norm(e)
        else:
            finite = np.isfinite(a) & np.isfinite(e)
            err, ref = np.linalg.norm(delta[finite]), np.linalg.norm(e[finite])
    normwise = float(err / ref) if ref > 0 else (0.0 if err == 0 else float("inf"))
    if nan_mismatch or not np.isfinite(max_abs):
        headroom = float("inf")
    return Comparison(name, max_abs, max_rel, tol, ok and not nan_mismatch, nan_mismatch, normwise, headroom,
                      nonfinite, size)


def table_markdown() -> str:
    """The table as Markdown with what was measured beside it, for the README and ``danet-parity --tolerances``."""
    rows = ["| dtype | scope | atol | rtol | rtol relative to | measured: worst headroom | normwise | max abs |",
            "|---|---|---|---|---|---|---|---|"]
    for (d, s), t in TOLERANCES.items():
        m = MEASURED.get((d, s))
        seen = f"{m.headroom:.2g} | {m.normwise:.1e} | {m.max_abs:.1e}" if m else "not measured | | "
        rows.append(f"| {d} | {s} | {t.atol:g} | {t.rtol:g} | {t.relative_to} | {seen} |")
    return "\n".join(rows)
