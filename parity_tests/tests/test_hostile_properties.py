"""Property-based tests (hypothesis): random shapes, dtypes, NaN/inf and extreme magnitudes into PAM and CAM.

Every case must end in one of: a clear ``TypeError``/``ValueError`` naming the
argument (`x` / `inputs`); outputs equal to the float64 reference within the
tolerance table with NaN exactly where the reference has NaN; or, where
float32 overflows (magnitudes ~1e19 and more, energies past 3.4e38), NaN/inf
but never a finite number that differs from the reference.
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from parity_tests import reference as ref  # noqa: E402
from weights_convert.tolerances import compare, tolerance  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CHANNELS = 16
# Magnitudes where float32/float64 give reference-equal values (see tolerances.py on unscaled energies).
SAFE_SCALE = {"float32": [1e-6, 1e-3, 0.1, 1.0], "float64": [1e-6, 1e-3, 1.0, 10.0, 100.0]}
OVERFLOW_SCALE = [1e19, 1e25, 3e38]


@st.composite
def cases(draw, dtypes=("float32", "float64")):
    dtype = draw(st.sampled_from(dtypes))
    b, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    scale = draw(st.sampled_from(SAFE_SCALE[dtype]))
    seed = draw(st.integers(0, 2**16))
    specials = draw(st.lists(st.tuples(st.integers(0, b * CHANNELS * h * w - 1),
                                       st.sampled_from([np.nan, np.inf, -np.inf])), max_size=2))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((b, CHANNELS, h, w)) * scale).astype(dtype)
    flat = x.reshape(-1)
    for pos, value in specials:
        flat[pos] = value
    return dtype, x, seed


def _expect_match(name, got, expected, dtype):
    """Reference-equal where the reference is finite, NaN where it is NaN (the mask must match)."""
    result = compare(name, got, expected, tolerance(dtype, "layer"))
    assert result.passed, result.message()


def _expect_no_silent_error(name, got, expected, dtype):
    """Overflow may give NaN/inf; any finite output must still equal the reference."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    finite = np.isfinite(got)
    if finite.any():
        result = compare(name, got[finite], expected[finite], tolerance(dtype, "layer"))
        assert result.passed, result.message() + " (finite output differs from the reference: silent error)"


# -- PyTorch ---------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
import danet_torch as dt  # noqa: E402
from weights_convert.testing import randomize_
from parity_tests.tests.helpers import state_numpy  # noqa: E402


def _torch_modules(dtype):
    pam = randomize_(dt.PositionAttention(CHANNELS), seed=0).eval().to(getattr(torch, dtype))
    cam = randomize_(dt.ChannelAttention(CHANNELS), seed=1).eval().to(getattr(torch, dtype))
    return pam, cam


def _torch_reference(pam, cam, x):
    sd = state_numpy(pam)
    r_pam = ref.position_attention(x, sd["query_conv.weight"], sd["query_conv.bias"], sd["key_conv.weight"],
                                   sd["key_conv.bias"], sd["value_conv.weight"], sd["value_conv.bias"], sd["gamma"])
    return r_pam, ref.channel_attention(x, state_numpy(cam)["gamma"])


@SETTINGS
@given(cases())
def test_torch_random_inputs_match_reference(case):
    dtype, x, seed = case
    pam, cam = _torch_modules(dtype)
    with np.errstate(all="ignore"):
        expected = _torch_reference(pam, cam, x)
    with torch.no_grad():
        got = [m(torch.from_numpy(x)).double().numpy() for m in (pam, cam)]
    for name, g, e in zip(("PAM", "CAM"), got, expected):
        _expect_match(f"torch {name} {dtype} {x.shape} seed {seed}", g, e, dtype)


@SETTINGS
@given(st.sampled_from(OVERFLOW_SCALE), st.integers(0, 2**16), st.integers(1, 5))
def test_torch_overflow_is_never_a_silent_wrong_number(scale, seed, hw):
    pam, cam = _torch_modules("float32")
    with np.errstate(all="ignore"):
        x = (np.random.default_rng(seed).standard_normal((1, CHANNELS, hw, hw)) * scale).astype("float32")
        expected = _torch_reference(pam, cam, x)
        with torch.no_grad():
            got = [m(torch.from_numpy(x)).double().numpy() for m in (pam, cam)]
        for name, g, e in zip(("PAM", "CAM"), got, expected):
            _expect_no_silent_error(f"torch {name} scale {scale:g}", g, e, "float32")


BAD_INPUTS = st.sampled_from([
    ("int32 dtype", lambda: torch.ones(1, CHANNELS, 3, 3, dtype=torch.int32), TypeError),
    ("bool dtype", lambda: torch.ones(1, CHANNELS, 3, 3, dtype=torch.bool), TypeError),
    ("3-D", lambda: torch.ones(CHANNELS, 3, 3), ValueError),
    ("5-D", lambda: torch.ones(1, CHANNELS, 3, 3, 1), ValueError),
    ("wrong channels", lambda: torch.ones(1, CHANNELS + 1, 3, 3), ValueError),
    ("numpy array", lambda: np.ones((1, CHANNELS, 3, 3), "float32"), TypeError),
])


@settings(max_examples=12, deadline=None, derandomize=True)
@given(BAD_INPUTS, st.sampled_from(["pam", "cam"]))
def test_torch_bad_inputs_give_clear_errors(bad, which):
    name, make, error = bad
    module = dt.PositionAttention(CHANNELS) if which == "pam" else dt.ChannelAttention(CHANNELS)
    with pytest.raises(error, match="`x`"):
        module(make())


# -- Keras (every backend) ------------------------------------------------------------------------
def _keras_layers():
    import danet_keras as dk
    import weights_convert as wc

    specs = (wc.ArchSpec("pam", in_channels=CHANNELS), wc.ArchSpec("cam", in_channels=CHANNELS))
    layers = []
    for i, spec in enumerate(specs):
        rng = np.random.default_rng(10 + i)
        neutral = {k: (rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[1:]))))).astype("float32")
                   if not k.endswith("gamma") else np.array([0.5 + rng.random()], "float32")
                   for k, shape in wc.expected_shapes(spec).items()}
        layers.append((wc.to_keras(neutral, spec), neutral))
    assert type(layers[0][0]) is dk.PositionAttention
    return layers


def _keras_run(layers, x_nchw):
    import keras

    from parity_tests.harness import keras_inference

    x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))
    outs = [np.asarray(keras.ops.convert_to_numpy(keras_inference(layer, x)), np.float64).transpose(0, 3, 1, 2)
            for layer, _ in layers]
    (_, n_pam), (_, n_cam) = layers
    expected = (ref.position_attention(x_nchw, n_pam["query_conv.weight"], n_pam["query_conv.bias"],
                                       n_pam["key_conv.weight"], n_pam["key_conv.bias"], n_pam["value_conv.weight"],
                                       n_pam["value_conv.bias"], n_pam["gamma"]),
                ref.channel_attention(x_nchw, n_cam["gamma"]))
    return outs, expected


@pytest.mark.keras
@SETTINGS
@given(cases(dtypes=("float32",)))
def test_keras_random_inputs_match_reference(case):
    dtype, x, seed = case
    with np.errstate(all="ignore"):
        got, expected = _keras_run(_keras_layers(), x)
    for name, g, e in zip(("PAM", "CAM"), got, expected):
        _expect_match(f"keras {name} {x.shape} seed {seed}", g, e, dtype)


@pytest.mark.keras
@settings(max_examples=10, deadline=None, derandomize=True)
@given(st.sampled_from(OVERFLOW_SCALE), st.integers(0, 2**16), st.integers(1, 5))
def test_keras_overflow_is_never_a_silent_wrong_number(scale, seed, hw):
    with np.errstate(all="ignore"):
        x = (np.random.default_rng(seed).standard_normal((1, CHANNELS, hw, hw)) * scale).astype("float32")
        got, expected = _keras_run(_keras_layers(), x)
        for name, g, e in zip(("PAM", "CAM"), got, expected):
            _expect_no_silent_error(f"keras {name} scale {scale:g}", g, e, "float32")


@pytest.mark.keras
@pytest.mark.parametrize("shape", [(CHANNELS, 3, 3), (1, 3, 3, CHANNELS, 1), (1, 3, 3, CHANNELS + 1)])
def test_keras_bad_shapes_give_clear_errors(shape):
    for layer, _ in _keras_layers():
        with pytest.raises(ValueError, match="`inputs`"):
            layer(np.ones(shape, "float32"))


def _keras_blocks():
    """Every public Keras block, unbuilt, with the channels it accepts (DualAttention and the head need >= 32)."""
    import danet_keras as dk

    return [(dk.PositionAttention(), CHANNELS), (dk.ChannelAttention(), CHANNELS),
            (dk.DualAttention(), 32), (dk.DANetHead(num_classes=3), 32)]


@pytest.mark.keras
@pytest.mark.parametrize("dtype", ["int32", "uint8", "bool"])
def test_keras_non_float_inputs_are_refused(dtype):
    for layer, c in _keras_blocks():
        with pytest.raises(TypeError, match=f"`inputs` must be a floating-point tensor, got dtype {dtype}"):
            layer(np.ones((1, 3, 3, c), dtype))


@pytest.mark.keras
def test_keras_empty_batch_gives_empty_outputs():
    for layer, c in _keras_blocks():
        outs = layer(np.zeros((0, 5, 4, c), "float32"))
        for y in outs if isinstance(outs, (tuple, list)) else (outs,):
            assert tuple(y.shape)[:3] == (0, 5, 4), (type(layer).__name__, tuple(y.shape))


def test_torch_empty_batch_gives_empty_outputs():
    for module, c in ((dt.PositionAttention(CHANNELS), CHANNELS), (dt.ChannelAttention(CHANNELS), CHANNELS),
                      (dt.DualAttention(32), 32), (dt.DANetHead(32, 3), 32)):
        x = torch.zeros(0, c, 5, 4, requires_grad=True)
        outs = module.eval()(x)
        outs = outs if isinstance(outs, tuple) else (outs,)
        assert all(tuple(y.shape) == (0, y.shape[1], 5, 4) for y in outs), type(module).__name__
        sum(y.sum() for y in outs).backward()
        assert x.grad.shape == x.shape
