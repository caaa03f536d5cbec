"""danet_keras.pam on the current Keras backend: the efficient path equals the official one, values and
gradients (input, q/k/v kernels and biases, gamma); old ``fused`` configs still load; the path vocabulary.

The official path (matmul + softmax under the backend's autodiff) is the
reference for the efficient path's custom gradient; it is itself checked
against the float64 NumPy reference in ``test_keras_attention.py``.
"""

from __future__ import annotations

import contextlib
import json
import zipfile

import ml_dtypes
import numpy as np
import pytest

keras = pytest.importorskip("keras")

import danet_keras as dk  # noqa: E402
from danet_keras import pam  # noqa: E402
from parity_tests import reference as ref  # noqa: E402
from parity_tests.keras_grad import keras_loss_and_grads  # noqa: E402
from parity_tests.tests.helpers import (  # noqa: E402
    check, nchw, nhwc, pam_state_dict, set_torch_weights, subnormal_products)
from weights_convert.tolerances import compare, tolerance  # noqa: E402

pytestmark = pytest.mark.keras
BACKEND = keras.backend.backend()


@contextlib.contextmanager
def _dtype_enabled(dtype):
    """JAX computes float64 only with 64-bit arrays switched on; other backends always do."""
    if BACKEND == "jax" and dtype == "float64":
        import jax

        with jax.enable_x64(True):
            yield
    else:
        yield


def _core_grads(fn, q, k, v, weight):
    """``[out, dq, dk, dv]`` of ``sum(fn(q, k, v) * weight)`` as NumPy, on the current backend."""
    ops = keras.ops
    if BACKEND == "tensorflow":
        import tensorflow as tf

        q, k, v = (tf.convert_to_tensor(t) for t in (q, k, v))
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            y = fn(q, k, v)
            loss = tf.reduce_sum(y * weight)
        grads = [y] + tape.gradient(loss, [q, k, v])
    elif BACKEND == "jax":
        import jax

        grads = [fn(q, k, v)] + list(jax.jit(jax.grad(lambda *t: ops.sum(fn(*t) * weight), argnums=(0, 1, 2)))(
            q, k, v))
    else:
        q, k, v = (ops.convert_to_tensor(t).detach().requires_grad_(True) for t in (q, k, v))  # Keras' device
        y = fn(q, k, v)
        (y * ops.convert_to_tensor(weight)).sum().backward()
        grads = [y, q.grad, k.grad, v.grad]
    return [np.asarray(ops.convert_to_numpy(g)) for g in grads]


# (N, rows): one block, several full blocks, a last block that is not full, one row per block.
BLOCKINGS = [(63, 64), (64, 16), (63, 10), (45 * 45, 256), (7, 1)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n, rows", BLOCKINGS)
def test_blocks_equal_official_values_and_gradients(n, rows, dtype, rng):
    q, k = (rng.standard_normal((2, n, 4)).astype(dtype) for _ in range(2))
    v, weight = (rng.standard_normal((2, n, 12)).astype(dtype) for _ in range(2))
    with _dtype_enabled(dtype):
        official = _core_grads(pam.position_attention_official, q, k, v, weight)
        blocks = _core_grads(lambda *t: pam.position_attention_blocks(*t, rows=rows), q, k, v, weight)
    assert all(g.dtype == np.dtype(dtype) for g in blocks)
    check(f"blocks n={n} rows={rows} output", blocks[0], official[0], dtype)
    for name, got, expected in zip(("dq", "dk", "dv"), blocks[1:], official[1:]):
        check(f"blocks n={n} rows={rows} {name}", got, expected, dtype, "grad")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_blocks_against_float64(dtype, rng):
    """Half precision through the blocks (on a GPU, what JAX differentiates), a last block not full: values
    and gradients against the float64 official path."""
    q, k = (rng.standard_normal((2, 63, 16)).astype("float32") for _ in range(2))
    v, weight = (rng.standard_normal((2, 63, 32)).astype("float32") for _ in range(2))
    with _dtype_enabled("float64"):
        expected = _core_grads(pam.position_attention_official, *(t.astype("float64") for t in (q, k, v)),
                               weight.astype("float64"))
    got = _core_grads(lambda *t: keras.ops.cast(pam.position_attention_blocks(
        *(keras.ops.cast(x, dtype) for x in t), rows=10), "float32"), q, k, v, weight)
    check(f"half blocks {dtype}", got[0], expected[0], dtype)
    for name, g, e in zip(("dq", "dk", "dv"), got[1:], expected[1:]):
        check(f"half blocks {dtype} {name}", g, e, dtype, "grad")


@pytest.mark.parametrize("batch", [2, 0])
def test_empty_map_through_the_blocks(batch):
    """N = 0 (an empty feature map, eagerly): empty output and gradients of the official path's shapes and
    dtypes, as for any N; the blocks run one block of padding."""
    q, v = np.zeros((batch, 0, 4), "float32"), np.zeros((batch, 0, 6), "float32")
    official = _core_grads(pam.position_attention_official, q, q, v, v)
    blocks = _core_grads(pam.position_attention_blocks, q, q, v, v)
    assert [(g.shape, g.dtype) for g in blocks] == [(g.shape, g.dtype) for g in official]
    assert [g.shape for g in blocks] == [(batch, 0, 6), (batch, 0, 4), (batch, 0, 4), (batch, 0, 6)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_blocks_gradients_with_energies_far_below_zero(dtype, rng):
    """Every energy near -1000, so ``exp(-lse)`` overflows even float64: the keys appended to fill the last
    block must add nothing, not inf or NaN. Values and gradients against the float64 NumPy reference."""
    q = (16.0 + 0.1 * rng.standard_normal((2, 45, 4))).astype(dtype)
    k = (-16.0 + 0.1 * rng.standard_normal((2, 45, 4))).astype(dtype)
    v, weight = (rng.standard_normal((2, 45, 12)).astype(dtype) for _ in range(2))
    expected = [ref.position_attention_core(q, k, v), *ref.position_attention_core_grads(q, k, v, weight)]
    with _dtype_enabled(dtype):
        blocks = _core_grads(lambda *t: pam.position_attention_blocks(*t, rows=16), q, k, v, weight)
    for name, got, want in zip(("output", "dq", "dk", "dv"), blocks, expected):
        assert np.isfinite(got).all(), name
        check(f"blocks, energies near -1000, {name}", got, want, dtype, "layer" if name == "output" else "grad")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("path", ["official", "blocks"])
def test_half_precision_energies_are_float32_on_both_paths(path, dtype, rng):
    """Energies spread over hundreds (unscaled, as DANet's are) from half-precision q and k: both paths compute
    them in float32, so that a half-precision model agrees with its export (which takes the official path).
    Rounded to bfloat16 they moved the official output by 1.1 (float16 0.15), the blocks' by 0.01. Values
    against float64 of the same rounded inputs."""
    q, k = (6.0 * rng.standard_normal((1, 200, 16)) for _ in range(2))
    v = rng.standard_normal((1, 200, 32))
    assert np.abs(np.einsum("bnc,bmc->bnm", q, k)).max() > 500
    half = [keras.ops.cast(t, dtype) for t in (q, k, v)]
    expected = ref.position_attention_core(*(keras.ops.convert_to_numpy(keras.ops.cast(t, "float32"))
                                             .astype(np.float64) for t in half))
    fn = pam.position_attention_official if path == "official" else pam.position_attention_blocks
    got = fn(*half)
    assert keras.backend.standardize_dtype(got.dtype) == dtype
    check(f"{path} {dtype}, energies over hundreds", keras.ops.convert_to_numpy(keras.ops.cast(got, "float32")),
          expected, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_efficient_path_half_precision_keys_far_from_zero(dtype, rng):
    """Keys near 2, their spread 0.07 (a key conv whose bias outweighs its kernel): the blocks' backward took
    dQ = dS K, each row of dS summing to 0 only up to rounding, and that rounding times the keys' mean put
    the query conv's gradients outside the tolerance, where the official path is inside it. Every gradient
    of a ``mixed_{dtype}`` layer against torch's float64 official path."""
    import torch

    from danet_torch import PositionAttention
    from weights_convert.testing import randomize_

    reference = PositionAttention(8, pam_path="official").double()
    randomize_(reference, seed=0)
    with torch.no_grad():
        reference.key_conv.weight.mul_(0.1)
        reference.key_conv.bias.fill_(2.0)
    x = np.maximum(rng.standard_normal((2, 8, 9, 11)), 0.0)
    x = x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16).astype(np.float64)
    weight = rng.standard_normal(x.shape)
    layer = dk.PositionAttention(pam_path="efficient", dtype=f"mixed_{dtype}")
    layer.build(nhwc(x).shape)
    set_torch_weights(layer, {k: v.numpy() for k, v in reference.state_dict().items()})
    _, dx, grads = keras_loss_and_grads(layer, nhwc(x).astype(dtype), [nhwc(weight)])
    x64 = torch.from_numpy(x).requires_grad_(True)
    (reference(x64) * torch.from_numpy(weight)).sum().backward()
    check(f"PAM mixed_{dtype} d/dx", nchw(dx), x64.grad.numpy(), dtype, "grad")
    for name in ("query_conv", "key_conv", "value_conv"):
        conv, expected = getattr(layer, name), getattr(reference, name)
        scale = max(float(expected.weight.grad.abs().max()), float(expected.bias.grad.abs().max()))
        for got, want in ((grads[id(conv.kernel)].transpose(3, 2, 0, 1), expected.weight.grad),
                          (grads[id(conv.bias)], expected.bias.grad)):
            result = compare(f"PAM mixed_{dtype} d/d {name}", got, want.numpy(), tolerance(dtype, "grad"), scale)
            assert result.passed, result.message()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_blocks_with_energies_spread_over_hundreds(dtype, rng):
    """Energies spread over hundreds, as Keras' default initialisation gives the layer: most terms of a
    float32 softmax row are subnormal or zero. Values and gradients against the float64 NumPy reference; on
    Keras' torch backend no product has a subnormal operand (TensorFlow and XLA flush subnormal numbers to
    zero themselves)."""
    q, k = (6.0 * rng.standard_normal((2, 300, 4)) for _ in range(2))
    v, weight = (rng.standard_normal((2, 300, 12)) for _ in range(2))
    energies = np.einsum("bnc,bmc->bnm", q, k)
    assert (energies - energies.max(-1, keepdims=True) < -87.4).mean() > 0.5  # float32's exp is subnormal there
    q, k, v, weight = (t.astype(dtype) for t in (q, k, v, weight))
    expected = [ref.position_attention_core(q, k, v), *ref.position_attention_core_grads(q, k, v, weight)]
    got = []
    with _dtype_enabled(dtype):
        run = lambda: got.extend(_core_grads(  # noqa: E731
            lambda *t: pam.position_attention_blocks(*t, rows=64), q, k, v, weight))
        if BACKEND == "torch":
            products, subnormal = subnormal_products(run)
            assert products >= 4 * 5 and subnormal == 0  # 5 blocks: P V; P^T dO, dS^T Q, dS K
        else:
            run()
    for name, g, e in zip(("output", "dq", "dk", "dv"), got, expected):
        check(f"blocks, spread energies, {name}", g, e, dtype, "layer" if name == "output" else "grad")


@pytest.mark.skipif(BACKEND != "jax", reason="eager JAX compiles; the blocks are compiled whole there")
def test_eager_jax_blocks_compile_once_per_shape(rng):
    """Called eagerly, the blocks run as one compiled function per shape (a repeat compiles nothing)."""
    compiled = pam._jax_blocks_jit()
    q, k = (rng.standard_normal((1, 37, 4)).astype("float32") for _ in range(2))
    v = rng.standard_normal((1, 37, 12)).astype("float32")
    before = compiled._cache_size()
    first = pam.position_attention_blocks(q, k, v, rows=5)
    assert compiled._cache_size() == before + 1
    again = pam.position_attention_blocks(q, k, v, rows=5)
    assert compiled._cache_size() == before + 1 and np.array_equal(np.asarray(first), np.asarray(again))
    check("eager blocks", np.asarray(first), ref.position_attention_core(q, k, v), "float32")


def test_kernel_path_equals_official(rng):
    q, k = (rng.standard_normal((2, 63, 4)).astype("float32") for _ in range(2))
    v = rng.standard_normal((2, 63, 32)).astype("float32")
    expected = keras.ops.convert_to_numpy(pam.position_attention_official(q, k, v))
    check("kernel path", keras.ops.convert_to_numpy(pam.position_attention_kernel(q, k, v)), expected)


def _no_pallas_triton() -> bool:
    if BACKEND != "jax":
        return True
    from danet_keras import _pam_pallas

    return _pam_pallas.plgpu is None


PALLAS = pytest.mark.skipif(_no_pallas_triton(), reason="the Pallas kernel is JAX's, with Pallas' Triton backend")


@PALLAS
@pytest.mark.parametrize("n", [45, 48, 10], ids=["last-blocks-partial", "whole-blocks", "under-one-block"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_pallas_kernel_against_float64(dtype, n, rng):
    """The kernel in Pallas' interpreter (on any device), tiles of 16 queries and keys: several blocks, the
    last ones read and written through masks where they are not full."""
    from danet_keras import _pam_pallas

    q, k = (rng.standard_normal((2, n, 16)).astype(dtype) for _ in range(2))
    v = rng.standard_normal((2, n, 64)).astype(dtype)
    out = _pam_pallas.position_attention_forward(q, k, v, block_q=16, block_k=16, block_v=32, interpret=True)
    assert out.shape == (2, n, 64)
    check(f"Pallas kernel {dtype} n={n}", np.asarray(out), ref.position_attention_core(q, k, v), dtype)


@pytest.mark.skipif(BACKEND != "jax", reason="the Pallas kernel is JAX's")
def test_pallas_kernel_takes_what_it_was_checked_on(monkeypatch):
    """``available``: float32 and half precision, q/k 16 to 64 wide, whole V tiles, a supported GPU."""
    import jax.numpy as jnp

    from danet_keras import _pam_pallas

    def takes(dtype, ck=64, c=512):
        return _pam_pallas.available(jnp.zeros((2, 40, ck), dtype), jnp.zeros((2, 40, c), dtype))

    monkeypatch.setattr(_pam_pallas, "device_supported", lambda: True)
    assert all(takes(dtype) for dtype in ("float32", "bfloat16", "float16"))
    assert takes("float32", ck=16, c=32)  # V narrower than one tile: one tile of 32 columns
    assert not takes("int32")
    assert not takes("float32", ck=8)  # below the products' smallest tile
    assert not takes("float32", ck=48)  # not a power of two
    assert not takes("bfloat16", ck=128, c=1024)  # wider q/k than the tiles were checked with
    assert not takes("float32", c=384)  # not a whole number of 256-column tiles
    monkeypatch.setattr(_pam_pallas, "device_supported", lambda: False)
    assert not takes("float32")


@pytest.mark.skipif(BACKEND != "jax", reason="the Pallas kernel is JAX's")
@pytest.mark.parametrize("platform, capability, supported", [
    ("gpu", "9.0", True), ("gpu", "10.0", True), ("gpu", "8.0", False), ("gpu", "12.0", False),
    ("cpu", None, False)])
def test_pallas_kernel_runs_on_the_gpus_its_tiles_fit(platform, capability, supported, monkeypatch):
    import jax

    from danet_keras import _pam_pallas

    device = type("Device", (), {"platform": platform, "compute_capability": capability})()
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    assert _pam_pallas.device_supported.__wrapped__() is (supported and _pam_pallas.plgpu is not None)


@PALLAS
def test_pallas_kernel_refuses_tiles_it_cannot_use():
    from danet_keras import _pam_pallas

    q = np.zeros((1, 40, 16), "float32")
    with pytest.raises(ValueError, match="`block_v` must divide v's 48 columns"):
        _pam_pallas.position_attention_forward(q, q, np.zeros((1, 40, 48), "float32"), block_q=16, block_k=16,
                                               block_v=32, interpret=True)
    with pytest.raises(ValueError, match="`block_q` must be a power of two from 16 to 256, got 24"):
        _pam_pallas.position_attention_forward(q, q, np.zeros((1, 40, 32), "float32"), block_q=24, block_k=16,
                                               block_v=32, interpret=True)


@pytest.mark.skipif(BACKEND != "jax", reason="XLA's float32 blocks are JAX's")
@pytest.mark.parametrize("rows, splits", [(None, None), (16, 1), (16, 3), (45, 4), (7, 45)],
                         ids=["defaults", "blocks", "blocks-and-runs", "one-block-runs", "one-key-runs"])
def test_xla_blocks_against_float64(rows, splits, rng):
    """``_pam_xla``'s forward pass (on the CPU with the default products): several blocks of queries, the
    last one partial, and runs of keys, the last one padded."""
    from danet_keras import _pam_xla

    q, k = (rng.standard_normal((2, 45, 16)).astype("float32") for _ in range(2))
    v = rng.standard_normal((2, 45, 64)).astype("float32")
    out = _pam_xla.position_attention_forward(q, k, v, rows=rows, splits=splits)
    assert out.shape == (2, 45, 64)
    check(f"XLA blocks rows={rows} splits={splits}", np.asarray(out), ref.position_attention_core(q, k, v))


@pytest.mark.skipif(BACKEND != "jax", reason="XLA's float32 blocks are JAX's")
@pytest.mark.parametrize("platform, capability, supported", [
    ("gpu", "9.0", True), ("gpu", "8.6", True), ("gpu", "10.0", True), ("gpu", "7.5", False), ("cpu", None, False)])
def test_xla_blocks_take_float32_on_gpus_with_tf32(platform, capability, supported, monkeypatch):
    """Three TF32 products need TF32 tensor cores (compute capability 8.0 on); float32 inputs only."""
    import jax
    import jax.numpy as jnp

    from danet_keras import _pam_xla

    device = type("Device", (), {"platform": platform, "compute_capability": capability})()
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    _pam_xla.tf32_supported.cache_clear()
    try:
        assert _pam_xla.tf32_supported() is supported
        assert (_pam_xla.precision("float32") is not None) is supported
        assert _pam_xla.precision("bfloat16") is None
        q = jnp.zeros((2, 40, 8), "float32")
        assert _pam_xla.available(q, q) is supported
        assert not _pam_xla.available(q.astype("bfloat16"), q.astype("bfloat16"))
    finally:
        _pam_xla.tf32_supported.cache_clear()


def _forward_only_route(route):
    """``(q, k, v, differentiable) -> out``: a forward-only kernel's value with ``differentiable``'s gradients."""
    if route == "pallas":
        from danet_keras import _pam_pallas

        return lambda q, k, v, differentiable: _pam_pallas.position_attention(q, k, v, differentiable, True)
    from danet_keras import _pam_xla

    return _pam_xla.position_attention


@pytest.mark.skipif(BACKEND != "jax", reason="the forward-only kernels are JAX's")
@pytest.mark.parametrize("route", [pytest.param("pallas", marks=PALLAS), "xla"])
def test_forward_only_path_runs_its_kernel_and_differentiates_the_given_function(route, rng):
    """The Pallas kernel (in Pallas' interpreter) and XLA's blocks: a plain call runs the kernel alone; the
    gradients are the given function's, exactly."""
    import jax

    attend = _forward_only_route(route)
    q, k = (rng.standard_normal((2, 45, 16)).astype("float32") for _ in range(2))
    v, weight = (rng.standard_normal((2, 45, 64)).astype("float32") for _ in range(2))
    calls = []

    def differentiable(*t):
        calls.append(1)
        return pam.position_attention_official(*t)

    got = attend(q, k, v, differentiable)
    assert not calls  # a plain call runs the kernel alone
    check(f"{route} path output", np.asarray(got), ref.position_attention_core(q, k, v))
    grads = jax.grad(lambda *t: (attend(*t, differentiable) * weight).sum(), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *t: (pam.position_attention_official(*t) * weight).sum(), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(BACKEND != "jax", reason="XLA's float32 blocks are JAX's")
@pytest.mark.parametrize("rows, splits", [(256, 1), (256, 8), (1024, 32)])
def test_gpu_xla_blocks_against_float64(rows, splits, rng):
    """Three TF32 products per product, at N = 33 x 35: several blocks (the last partial) and runs of keys."""
    from danet_keras import _pam_xla

    q, k = (rng.standard_normal((2, 33 * 35, 64)).astype("float32") for _ in range(2))
    v = rng.standard_normal((2, 33 * 35, 512)).astype("float32")
    out = _pam_xla.position_attention_forward(q, k, v, rows=rows, splits=splits)
    check(f"GPU XLA blocks rows={rows} splits={splits}", np.asarray(out), ref.position_attention_core(q, k, v))


@pytest.mark.gpu
@pytest.mark.skipif(BACKEND == "tensorflow", reason="the GPU kernels run on JAX and torch")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gpu_efficient_path_against_float64(dtype, rng, monkeypatch):
    """Values (JAX: XLA's blocks in float32, three TF32 products per product; the Pallas kernel in half
    precision) and gradients (JAX: the blocks'); other float32 matmuls at full precision."""
    calls = []
    precision = contextlib.nullcontext()
    if BACKEND == "jax":
        import jax

        from danet_keras import _pam_pallas, _pam_xla

        precision = jax.default_matmul_precision("highest")
        kernel = _pam_pallas.position_attention_forward
        monkeypatch.setattr(_pam_pallas, "position_attention_forward", lambda *a, **kw: calls.append(1) or kernel(
            *a, **kw))
        xla = _pam_xla.position_attention_forward
        monkeypatch.setattr(_pam_xla, "position_attention_forward", lambda *a, **kw: calls.append("xla") or xla(
            *a, **kw))
        blocks = pam.position_attention_blocks
        monkeypatch.setattr(pam, "position_attention_blocks", lambda *a, **kw: calls.append("blocks") or blocks(
            *a, **kw))
    q, k = (rng.standard_normal((2, 33 * 35, 64)).astype("float32") for _ in range(2))
    v, weight = (rng.standard_normal((2, 33 * 35, 512)).astype("float32") for _ in range(2))
    with _dtype_enabled("float64"):
        expected = _core_grads(pam.position_attention_official, *(t.astype("float64") for t in (q, k, v)),
                               weight.astype("float64"))
    inputs = [keras.ops.cast(t, dtype) for t in (q, k, v)]
    with precision:
        value = keras.ops.convert_to_numpy(keras.ops.cast(pam.position_attention_efficient(*inputs), "float32"))
        if BACKEND == "jax" and dtype == "float32" and _pam_xla.tf32_supported():
            assert calls == ["xla"]  # XLA's blocks gave the value
        elif BACKEND == "jax" and _pam_pallas.device_supported():
            assert calls == [1]  # the Pallas kernel gave the value
        got = _core_grads(lambda *t: keras.ops.cast(pam.position_attention_efficient(
            *(keras.ops.cast(x, dtype) for x in t)), "float32"), q, k, v, weight)
    if BACKEND == "jax":  # the gradients: the blocks'
        assert "blocks" in calls
    check(f"GPU efficient {dtype}", value, expected[0], dtype)
    for name, g, e in zip(("dq", "dk", "dv"), got[1:], expected[1:]):
        check(f"GPU efficient {dtype} {name}", g, e, dtype, "grad")


def _layer_pair(shape, dtype, rng):
    """An official and an efficient PAM with the same random weights (gamma 0.9)."""
    layers = {}
    for path in ("official", "efficient"):
        layer = dk.PositionAttention(pam_path=path, dtype=dtype)
        layer.build(shape)
        layers[path] = layer
    layers["efficient"].set_weights([w + rng.normal(0, 0.1, w.shape).astype(w.dtype) if w.shape != (1,)
                                     else np.full((1,), 0.9, w.dtype) for w in layers["efficient"].get_weights()])
    layers["official"].set_weights(layers["efficient"].get_weights())
    return layers


def _check_layer_gradients(label, layers, x, weight, dtype):
    results = {path: keras_loss_and_grads(layer, x, [weight]) for path, layer in layers.items()}
    (out_o, dx_o, g_o), (out_e, dx_e, g_e) = results["official"], results["efficient"]
    check(f"{label} output", out_e[0], out_o[0], dtype)
    check(f"{label} d/dx", dx_e, dx_o, dtype, "grad")
    pairs = {v_o.path.split("/", 1)[-1]: (g_o[id(v_o)], g_e[id(v_e)]) for v_o, v_e in zip(
        layers["official"].trainable_variables, layers["efficient"].trainable_variables)}
    assert sorted(pairs) == ["gamma", "key_conv/bias", "key_conv/kernel", "query_conv/bias", "query_conv/kernel",
                             "value_conv/bias", "value_conv/kernel"]
    for name, (official, efficient) in pairs.items():
        if name != "key_conv/bias":
            check(f"{label} d/d{name}", efficient, official, dtype, "grad")
    # d/d key_conv.bias is 0 in exact arithmetic (one constant added to every key's energy leaves the
    # softmax unchanged): on both paths it is rounding noise, checked against 0 at the key kernel's scale.
    tol = tolerance(dtype, "grad")
    bound = tol.atol + tol.rtol * np.abs(pairs["key_conv/kernel"][0]).max()
    assert max(np.abs(g).max() for g in pairs["key_conv/bias"]) <= bound


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("hw", [(33, 35), (9, 7), (1, 1)])
def test_layer_efficient_equals_official_for_every_gradient(hw, dtype, rng, monkeypatch):
    monkeypatch.setattr(pam, "BLOCK_ELEMENTS", 2 * 150 * hw[0] * hw[1])  # 8 blocks, the last one partial, at 33x35
    # TensorFlow's backward pass: 4 blocks of queries, the last one partial, at 33x35
    monkeypatch.setattr(pam, "TF_BACKWARD_BLOCK_ELEMENTS", 2 * 350 * hw[0] * hw[1])
    monkeypatch.setattr(pam, "TF_BACKWARD_MIN_BLOCKS", 2)
    x = rng.normal(0, 0.5, (2, *hw, 16)).astype(dtype)
    weight = rng.standard_normal(x.shape).astype(dtype)
    with _dtype_enabled(dtype):
        layers = _layer_pair(x.shape, dtype, rng)
        _check_layer_gradients(f"PAM {hw} {dtype}", layers, x, weight, dtype)


def test_none_spatial_sizes_in_a_functional_model(rng, monkeypatch):
    monkeypatch.setattr(pam, "BLOCK_ELEMENTS", 2 * 40 * 13 * 11)
    monkeypatch.setattr(pam, "TF_BACKWARD_BLOCK_ELEMENTS", 2 * 60 * 13 * 11)  # 3 backward blocks at 13x11
    monkeypatch.setattr(pam, "TF_BACKWARD_MIN_BLOCKS", 2)
    models = {}
    for path in ("official", "efficient"):
        inp = keras.Input((None, None, 16))
        models[path] = keras.Model(inp, dk.PositionAttention(pam_path=path, name="sa")(inp))
    models["efficient"].set_weights([w + 0.3 for w in models["efficient"].get_weights()])
    models["official"].set_weights(models["efficient"].get_weights())
    for hw in ((13, 11), (6, 9)):
        x = rng.normal(0, 0.5, (2, *hw, 16)).astype("float32")
        _check_layer_gradients(f"functional PAM {hw}", models, x, rng.standard_normal(x.shape).astype("float32"),
                               "float32")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="only TensorFlow traces graphs with unknown sizes "
                                                     "(JAX and torch always see the call's sizes)")
@pytest.mark.parametrize("spatial, blocks_expected", [((13, 11), True), ((None, None), False), ((1, 1), True)])
def test_tensorflow_graph_with_unknown_sizes(spatial, blocks_expected, rng, monkeypatch):
    """Unknown batch: the blocks, sized in the graph (at 1 x 1 too: the loop that carries dQ needs N = 1 to stay
    known through the blocks' merge). Unknown H, W (exports): the official computation."""
    import tensorflow as tf

    monkeypatch.setattr(pam, "BLOCK_ELEMENTS", 2 * 40 * 13 * 11)  # several blocks at batch 2
    monkeypatch.setattr(pam, "TF_BACKWARD_BLOCK_ELEMENTS", 2 * 60 * 13 * 11)  # fewer, larger backward blocks
    monkeypatch.setattr(pam, "TF_BACKWARD_MIN_BLOCKS", 2)
    calls = []
    blocks = pam.position_attention_blocks
    monkeypatch.setattr(pam, "position_attention_blocks", lambda *t, **kw: calls.append(1) or blocks(*t, **kw))
    layers = _layer_pair((None, None, None, 16), "float32", rng)
    x = rng.normal(0, 0.5, (2, *((13, 11) if spatial[0] is None else spatial), 16)).astype("float32")
    results = {}
    for path, layer in layers.items():
        @tf.function(input_signature=[tf.TensorSpec((None, *spatial, 16), tf.float32)] * 2)
        def step(x, w, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
                loss = tf.reduce_sum(y * w)
            return [y] + tape.gradient(loss, [x] + layer.trainable_variables)
        results[path] = [t.numpy() for t in step(x, np.ones_like(x) * 0.5)]
    assert bool(calls) == blocks_expected
    names = ["output", "d/dx"] + [v.path.split("/", 1)[-1] for v in layers["official"].trainable_variables]
    for name, got, expected in zip(names, results["efficient"], results["official"]):
        if name != "key_conv/bias":  # rounding noise around 0 on both paths (see _check_layer_gradients)
            check(f"tf.function {spatial}, {name}", got, expected, "float32", "layer" if name == "output" else "grad")


def test_efficient_layer_under_mixed_bfloat16(rng):
    x = rng.normal(0, 0.5, (1, 16, 12, 10))
    sd = pam_state_dict(rng, 16)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        layer = dk.PositionAttention(pam_path="efficient")
        layer.build(nhwc(x).shape)
        set_torch_weights(layer, sd)
        out, dx, grads = keras_loss_and_grads(layer, nhwc(x).astype("float32"), [np.ones(nhwc(x).shape)])
    finally:
        keras.config.set_dtype_policy(previous)
    expected = ref.position_attention(x, *(sd[k] for k in (
        "query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
        "value_conv.weight", "value_conv.bias", "gamma")))
    check("efficient PAM, mixed_bfloat16", nchw(out[0]), expected, "bfloat16")
    assert np.isfinite(dx).all() and all(np.isfinite(g).all() for g in grads.values())


def test_efficient_layer_takes_the_blocks_path(rng, monkeypatch):
    calls = []
    blocks = pam.position_attention_blocks
    monkeypatch.setattr(pam, "position_attention_blocks", lambda *t, **kw: calls.append(1) or blocks(*t, **kw))
    x = rng.normal(0, 0.5, (1, 5, 6, 16)).astype("float32")
    dk.PositionAttention(pam_path="official")(x)
    assert not calls
    dk.PositionAttention(pam_path="efficient")(x)
    assert calls == [1]


# --- the vocabulary: pam_path, "auto" resolved once, old ``fused`` configs --------------------------------


def test_auto_is_resolved_once_at_construction(monkeypatch):
    monkeypatch.setattr(pam, "ENV_PATH", "auto")
    layer = dk.PositionAttention()
    assert (layer.pam_path, layer.resolved_pam_path) == ("auto", "efficient")
    monkeypatch.setattr(pam, "ENV_PATH", "official")
    assert layer.resolved_pam_path == "efficient"
    assert dk.PositionAttention().resolved_pam_path == "official"
    assert dk.PositionAttention(pam_path="efficient").resolved_pam_path == "efficient"
    assert dk.PositionAttention().get_config()["pam_path"] == "auto"  # a saved "auto" resolves again on load
    monkeypatch.setattr(pam, "ENV_PATH", "sometimes")
    with pytest.raises(ValueError, match=r"`DANET_PAM_PATH` must be one of .* got 'sometimes'"):
        dk.PositionAttention()


@pytest.mark.parametrize("env, expected", [
    ({}, "auto"), ({"DANET_PAM_PATH": "official"}, "official"), ({"DANET_FUSED_ATTN": "0"}, "official"),
    ({"DANET_FUSED_ATTN": "0", "DANET_PAM_PATH": "efficient"}, "efficient"),
])
def test_environment_switch(env, expected, monkeypatch):
    for name in ("DANET_PAM_PATH", "DANET_FUSED_ATTN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert pam._env_path() == expected


@pytest.mark.parametrize("fused, expected", [(True, "efficient"), (False, "official"), (None, "auto")])
def test_old_fused_configs_load(fused, expected):
    for cls, config in ((dk.PositionAttention, {"reduction": 4}), (dk.DualAttention, {"out_channels": 8}),
                        (dk.DANetHead, {"num_classes": 3})):
        config = dict(cls(**config).get_config())
        config.pop("pam_path")
        layer = cls.from_config({**config, "fused": fused})
        assert layer.pam_path == expected and "fused" not in layer.get_config()
    model = dk.DANet(3, backbone="resnet50", fused=fused)
    assert model.pam_path == model.head.pam_path == expected


def test_old_keras_file_with_fused_loads(tmp_path, rng):
    inp = keras.Input((7, 6, 32))
    out = dk.DualAttention(out_channels=8, pam_path="official", name="dual")(
        dk.PositionAttention(pam_path="efficient", name="sa_alone")(inp))
    model = keras.Model(inp, out)
    model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in model.get_weights()])
    new, old = tmp_path / "new.keras", tmp_path / "old.keras"
    model.save(new)
    with zipfile.ZipFile(new) as src, zipfile.ZipFile(old, "w") as dst:  # rewrite as an older release wrote it
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                text = data.decode()
                assert text.count('"pam_path"') == 2
                text = text.replace('"pam_path": "efficient"', '"fused": true').replace(
                    '"pam_path": "official"', '"fused": false')
                data = text.encode()
            dst.writestr(item, data)
    assert '"fused"' in zipfile.ZipFile(old).read("config.json").decode()
    loaded = keras.saving.load_model(old)
    assert loaded.get_layer("sa_alone").pam_path == "efficient"
    assert loaded.get_layer("dual").pam_path == "official" == loaded.get_layer("dual").sa.pam_path
    x = rng.normal(0, 0.5, (2, 7, 6, 32)).astype("float32")
    check("old .keras file", keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)))
    json.loads(zipfile.ZipFile(new).read("config.json"))  # the new file is plain JSON with pam_path


@pytest.mark.parametrize("kwargs, match", [
    (dict(pam_path="fast"), r"`pam_path` must be one of 'auto', 'official', 'efficient', got 'fast'"),
    (dict(pam_path=None), r"`pam_path` must be one of .* got None"),
    (dict(fused="yes"), r"`fused` \(the old name of `pam_path`\) must be None, True or False, got 'yes'"),
    (dict(fused=True, pam_path="official"), r"both `pam_path`='official' and the old `fused`=True"),
])
def test_bad_pam_path_is_refused(kwargs, match):
    for cls in (dk.PositionAttention, dk.DualAttention):
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)
    with pytest.raises(ValueError, match=match):
        dk.DANetHead(3, **kwargs)


def test_block_rows_rule():
    assert pam.block_rows(1, 9216) == pam.BLOCK_ELEMENTS // 9216
    assert pam.block_rows(2, 9216) * 2 * 9216 <= pam.BLOCK_ELEMENTS
    assert pam.block_rows(1, 100) == 100
    assert pam.block_rows(64, pam.BLOCK_ELEMENTS) == 1
    assert pam._even_rows(pam.block_rows(1, 9216), 9216) == 439  # 21 blocks hold 9219 rows, not 21 * 455 = 9555
    assert pam.block_rows(1, 9216, pam.TF_BACKWARD_BLOCK_ELEMENTS) == pam.TF_BACKWARD_BLOCK_ELEMENTS // 9216


@pytest.mark.parametrize("batch, n, expected", [
    (1, 9216, 1536),  # 6 blocks, 2^24 elements at most
    (1, 4096, 1024),  # a sixth would be 683: the forward pass's 1024
    (1, 16384, 1024),  # 2^24 elements: 16 blocks
    (2, 9216, 838),  # 2^24 elements over a batch of 2: 11 blocks, spread evenly
    (2, 32761, 256),
    (1, 100, 100),
    (1, 1, 1),
])
def test_tensorflow_backward_rows_rule(batch, n, expected):
    assert pam._tf_backward_rows(batch, n) == expected
    rows = pam._even_rows(expected, n)
    assert rows == expected
    assert batch * rows * n <= max(pam.TF_BACKWARD_BLOCK_ELEMENTS, batch * n)  # one row at least
    assert rows >= pam._even_rows(pam.block_rows(batch, n), n)
    # the same rule in a TensorFlow graph whose batch size is a tensor
    assert int(pam._tf_backward_rows(keras.ops.convert_to_tensor(batch), n)) == expected


@pytest.mark.skipif(BACKEND == "torch", reason="Keras' torch backend runs its own blocks, one size for both passes")
@pytest.mark.parametrize("given, expected", [
    ({}, (439, 1536 if BACKEND == "tensorflow" else 439)),
    ({"rows": 100}, (100, 100)),
    ({"rows": 100, "backward_rows": 3000}, (100, 3000)),
    ({"backward_rows": 20000}, (439, 9216)),
])
def test_blocks_rows_per_pass(given, expected, monkeypatch):
    """Default rows: the forward pass's from BLOCK_ELEMENTS; the backward pass's from TF_BACKWARD_BLOCK_ELEMENTS on
    TensorFlow. Given rows serve both passes unless ``backward_rows`` is given; both are capped at N."""
    seen = []
    monkeypatch.setattr(pam, "_attend_blocks", lambda q, k, v, *rows: seen.append(rows) or v)
    monkeypatch.setattr(pam, "_jax_blocks_jit", lambda: pam._attend_blocks)
    q = np.zeros((1, 9216, 2), "float32")
    pam.position_attention_blocks(q, q, np.zeros((1, 9216, 3), "float32"), **given)
    assert seen == [expected]


@pytest.mark.parametrize("given, name", [({"rows": 0}, "rows"), ({"backward_rows": -3}, "backward_rows"),
                                         ({"rows": 2.5}, "rows"), ({"backward_rows": True}, "backward_rows")])
def test_bad_block_rows_are_refused(given, name):
    q = np.zeros((1, 12, 2), "float32")
    with pytest.raises(ValueError, match=f"`{name}` must be an int >= 1, got {given[name]!r}"):
        pam.position_attention_blocks(q, q, np.zeros((1, 12, 3), "float32"), **given)


@pytest.mark.skipif(BACKEND == "torch", reason="Keras' torch backend runs danet_torch's blocks")
@pytest.mark.parametrize("blocking", ["keys", "queries"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_either_backward_blocking_against_float64(blocking, dtype, rng):
    """Both backward passes on this backend, called directly: blocks of keys from the log-sum-exp (JAX's) and
    blocks of queries that recompute their softmax (TensorFlow's); 3 blocks, the last one partial. dQ, dK, dV
    of ``sum(y * weight)`` against float64 NumPy."""
    q, k = (rng.normal(0, 0.7, (2, 50, 4)) for _ in range(2))
    v, weight = (rng.standard_normal((2, 50, 12)) for _ in range(2))
    energy = np.einsum("bnc,bmc->bnm", q, k)
    peak = energy.max(-1, keepdims=True)
    lse = peak + np.log(np.exp(energy - peak).sum(-1, keepdims=True))
    out = ref.position_attention_core(q, k, v)
    expected = ref.position_attention_core_grads(q, k, v, weight)
    with _dtype_enabled(dtype):
        q, k, v, weight, out, lse = (keras.ops.convert_to_tensor(t.astype(dtype)) for t in (q, k, v, weight, out, lse))
        if blocking == "keys":
            got = pam._key_blocks_backward(q, k, v, out, lse, weight, 18)
        else:
            got = pam._query_blocks_backward(q, k, v, out, weight, 18)
        got = [keras.ops.convert_to_numpy(g) for g in got]
    for name, g, want in zip(("dq", "dk", "dv"), got, expected):
        assert g.dtype == np.dtype(dtype), name
        check(f"backward over blocks of {blocking}, {dtype}, {name}", g, want, dtype, "grad")


@pytest.mark.skipif(BACKEND == "torch", reason="Keras' torch backend runs its own blocks, one size for both passes")
def test_each_pass_runs_its_own_rows(rng, monkeypatch):
    """``rows`` reach the forward pass's blocks and ``backward_rows`` the backward pass's, through the custom
    gradient (and JAX's ``jit``); the gradients stay the reference's."""
    seen = {}
    forward, backward = pam._blocks_forward, pam._blocks_backward

    def spy_forward(q, k, v, rows):
        seen["forward"] = rows
        return forward(q, k, v, rows)

    def spy_backward(q, k, v, out, lse, dout, rows):
        seen["backward"] = rows
        return backward(q, k, v, out, lse, dout, rows)

    monkeypatch.setattr(pam, "_blocks_forward", spy_forward)
    monkeypatch.setattr(pam, "_blocks_backward", spy_backward)
    q, k = (rng.normal(0, 0.7, (1, 37, 4)).astype("float32") for _ in range(2))
    v, weight = (rng.standard_normal((1, 37, 6)).astype("float32") for _ in range(2))
    got = _core_grads(lambda *t: pam.position_attention_blocks(*t, rows=5, backward_rows=9), q, k, v, weight)
    assert seen == {"forward": 5, "backward": 9}
    expected = [ref.position_attention_core(q, k, v), *ref.position_attention_core_grads(q, k, v, weight)]
    for name, g, want in zip(("output", "dq", "dk", "dv"), got, expected):
        check(f"rows per pass, {name}", g, want, "float32", "layer" if name == "output" else "grad")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's fused product (the other backends subtract)")
def test_tensorflow_forms_the_fused_product():
    """Where the blocks use it (TensorFlow's oneDNN kernels, float32), Grappler does turn ``_product_less`` into
    one ``_MklFusedBatchMatMulV2``: without it the form costs a pass more than a subtraction."""
    import tensorflow as tf

    if not pam._fuses("float32"):
        pytest.skip("this TensorFlow runs without oneDNN's CPU kernels (or on a GPU): the blocks subtract")
    graph = tf.Graph()
    with graph.as_default():
        a, b = tf.compat.v1.placeholder(tf.float32, (2, 37, 24)), tf.compat.v1.placeholder(tf.float32, (2, 11, 24))
        c = tf.compat.v1.placeholder(tf.float32, (2, 37, 1))
        out = pam._product_less(a, b, c)
    metadata = tf.compat.v1.RunMetadata()
    with tf.compat.v1.Session(graph=graph) as session:
        session.run(out, {a: np.ones((2, 37, 24)), b: np.ones((2, 11, 24)), c: np.ones((2, 37, 1))},
                    options=tf.compat.v1.RunOptions(output_partition_graphs=True), run_metadata=metadata)
    ops = {node.op for g in metadata.partition_graphs for node in g.node}
    assert "_MklFusedBatchMatMulV2" in ops, sorted(ops)
    assert not ops & {"BatchMatMulV2", "_MklBatchMatMulV2", "AddV2", "Mul"}, sorted(ops)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's fused product (the other backends subtract)")
@pytest.mark.parametrize("batch", [1, 2])
def test_tensorflow_product_less_in_a_graph(batch, rng):
    """``_product_less(a, b / 2, c) = a b^T - c``, traced: Grappler forms oneDNN's fused product there (with
    oneDNN); against float64."""
    import tensorflow as tf

    a, b = rng.standard_normal((batch, 37, 24)), rng.standard_normal((batch, 11, 24))
    c = 30 * rng.standard_normal((batch, 37, 1))
    got = tf.function(pam._product_less)(*(tf.constant(t, tf.float32) for t in (a, 0.5 * b, c)))
    check(f"product less, batch {batch}", got.numpy(), np.einsum("bnc,bjc->bnj", a, b) - c, "float32", "grad")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="a traced TensorFlow graph, where Grappler rewrites the blocks")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_tensorflow_traced_blocks_against_float64(dtype, rng):
    """The blocks' value and gradients in a ``tf.function`` (Grappler's rewrites: the fused product, the folded
    transposes), 5 blocks of queries forward and 3 backward, both with a partial last block; against float64
    NumPy."""
    import tensorflow as tf

    q, k = (rng.normal(0, 0.7, (2, 123, 8)) for _ in range(2))
    v, weight = (rng.standard_normal((2, 123, 20)) for _ in range(2))
    q, k, v, weight = (t.astype(dtype) for t in (q, k, v, weight))

    @tf.function
    def step(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            y = pam.position_attention_blocks(q, k, v, rows=25, backward_rows=42)
            loss = tf.reduce_sum(y * weight)
        return [y] + tape.gradient(loss, [q, k, v])

    got = step(*(tf.constant(t) for t in (q, k, v)))
    expected = [ref.position_attention_core(q, k, v), *ref.position_attention_core_grads(q, k, v, weight)]
    for name, g, want in zip(("output", "dq", "dk", "dv"), got, expected):
        check(f"traced blocks {dtype} {name}", g.numpy(), want, dtype, "layer" if name == "output" else "grad")


@pytest.mark.parametrize("n, cap", [(9216, 455), (1155, 150), (63, 10), (64, 16), (7, 1), (5, 9), (0, 1)])
def test_even_rows_keep_the_cap_and_the_block_count(n, cap):
    rows = pam._even_rows(cap, n)
    blocks = max(1, -(-n // cap))
    assert 1 <= rows <= cap
    assert -(-max(1, n) // rows) == blocks  # as few blocks as the cap allows
    assert blocks * rows - max(1, n) < blocks  # fewer padded rows than blocks


def test_same_vocabulary_and_block_rule_as_torch():
    torch_pam = pytest.importorskip("danet_torch.pam")
    assert pam.PAM_PATHS == torch_pam.PAM_PATHS == ("auto", "official", "efficient")
    assert pam.BLOCK_ELEMENTS == torch_pam.BLOCK_ELEMENTS
    for batch, n in ((1, 9216), (2, 9216), (3, 1155), (1, 100)):
        assert pam.block_rows(batch, n) == torch_pam.block_rows(batch, n)
