"""danet_torch.pam: the efficient path equals the official one, values and gradients; the path vocabulary.

The official path (``bmm`` + softmax under autograd) is the reference for the
efficient path's hand-written backward; it is itself checked against the
float64 NumPy reference in ``test_torch_attention.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from danet_torch import DANet, DANetHead, DualAttention, PositionAttention, pam
from danet_torch import attention as torch_attention
from parity_tests import reference as ref
from parity_tests.tests.helpers import state_numpy, subnormal_products, to_numpy
from weights_convert.testing import randomize_
from weights_convert.tolerances import compare, tolerance


def _qkv(b, ck, c, n, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, ch, n, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
            for ch in (ck, ck, c)]


def _np(t):
    return t if isinstance(t, np.ndarray) else to_numpy(t)


def _check(name, got, expected, dtype, scope="layer"):
    result = compare(name, _np(got), _np(expected), tolerance(str(dtype).replace("torch.", ""), scope))
    assert result.passed, result.message()


def _core_float64(q, k, v):
    """The float64 NumPy reference for ``(B, C', N), (B, C', N), (B, C, N)``: ``(B, C, N)``."""
    tokens = (to_numpy(t).astype(np.float64).transpose(0, 2, 1) for t in (q, k, v))
    return ref.position_attention_core(*tokens).transpose(0, 2, 1)


def _value_and_grads(fn, tensors, weight):
    for t in tensors:
        t.grad = None
    y = fn(*tensors)
    (y.double() * weight).sum().backward()
    return [y.detach()] + [t.grad.clone() for t in tensors]


# (N, rows): one block, several full blocks, a last block that is not full, one row per block.
BLOCKINGS = [(63, 64), (64, 16), (63, 10), (45 * 45, 256), (7, 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, rows", BLOCKINGS)
def test_blocks_equal_official_values_and_gradients(n, rows, dtype):
    q, k, v = _qkv(2, 4, 12, n, dtype, requires_grad=True)
    weight = torch.randn(2, 12, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    official = _value_and_grads(pam.position_attention_official, (q, k, v), weight)
    blocks = _value_and_grads(lambda *t: pam.position_attention_blocks(*t, rows=rows), (q, k, v), weight)
    _check(f"blocks n={n} rows={rows} output", blocks[0], official[0], dtype)
    for name, got, expected in zip(("dq", "dk", "dv"), blocks[1:], official[1:]):
        _check(f"blocks n={n} rows={rows} {name}", got, expected, dtype, scope="grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blocks_half_precision_against_float64(dtype):
    q, k, v = _qkv(1, 8, 16, 99, dtype, requires_grad=True)
    weight = torch.randn(1, 16, 99, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    expected = _value_and_grads(pam.position_attention_official, (q64, k64, v64), weight)
    got = _value_and_grads(lambda *t: pam.position_attention_blocks(*t, rows=16), (q, k, v), weight)
    assert all(t.dtype == dtype for t in got)
    _check(f"blocks {dtype} output", got[0], expected[0], dtype)
    for name, g, e in zip(("dq", "dk", "dv"), got[1:], expected[1:]):
        _check(f"blocks {dtype} {name}", g, e, dtype, scope="grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_efficient_path_half_precision_keys_far_from_zero(dtype):
    """Keys near 2, their spread 0.07 (a key conv whose bias outweighs its kernel): the blocks' backward took
    dQ = dS K, each row of dS summing to 0 only up to rounding, and that rounding times the keys' mean put
    the query conv's weight gradient 7x (bfloat16; float16 3x) outside the tolerance, where the official
    path is inside it. Every gradient of a half-precision module against the float64 official path."""
    module = PositionAttention(8, pam_path="efficient")
    randomize_(module, seed=0)
    with torch.no_grad():
        module.key_conv.weight.mul_(0.1)
        module.key_conv.bias.fill_(2.0)
    reference = PositionAttention(8, pam_path="official").double()
    reference.load_state_dict(module.state_dict())
    module.to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(2, 8, 9, 11, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    weight = torch.randn(2, 8, 9, 11, generator=g, dtype=torch.float64)
    x64 = x.detach().double().requires_grad_(True)
    (module(x).double() * weight).sum().backward()
    (reference(x64) * weight).sum().backward()
    expected = dict(reference.named_parameters())
    _check(f"PAM {dtype} d/dx", x.grad, x64.grad, dtype, scope="grad")
    for name, p in module.named_parameters():
        layer = name.rpartition(".")[0]
        scale = max(float(q.grad.abs().max()) for n, q in expected.items() if n.rpartition(".")[0] == layer)
        result = compare(f"PAM {dtype} d/d{name}", to_numpy(p.grad), to_numpy(expected[name].grad),
                         tolerance(str(dtype).replace("torch.", ""), "grad"), scale)
        assert result.passed, result.message()


def _spread_half(dtype, seed=4):
    """``(q, k, v)`` in ``dtype`` whose energies spread over hundreds (unscaled, as DANet's are), and the
    float64 NumPy output of those rounded inputs."""
    g = torch.Generator().manual_seed(seed)
    q, k = (6.0 * torch.randn(1, 16, 200, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    v = torch.randn(1, 32, 200, generator=g, dtype=torch.float64).to(dtype)
    assert torch.einsum("bcn,bcm->bnm", q.double(), k.double()).abs().max() > 500
    return (q, k, v), _core_float64(q, k, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_official_path_half_precision_energies_are_float32(dtype):
    """Half-precision q and k give the official path their energy in float32, as the blocks and CAM do:
    energies of hundreds rounded to bfloat16 moved the output by 1.1 (float16 0.15), the blocks' by 0.01.
    Values against float64 of the same rounded inputs, directly and under autocast (what a module sees)."""
    (q, k, v), expected = _spread_half(dtype)
    _check(f"official {dtype}", pam.position_attention_official(q, k, v).double(), expected, dtype)
    with torch.autocast("cpu", dtype=dtype):
        _check(f"official {dtype} under autocast", pam.position_attention_official(q, k, v).double(), expected,
               dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocks_with_energies_spread_over_hundreds(dtype):
    """Energies spread over hundreds, as large weights give them: most terms of a float32 softmax row are
    subnormal or zero. The blocks multiply no subnormal number (their exp's argument stops at
    ``EXP_FLOOR``) and still equal the float64 NumPy reference, values and gradients."""
    g = torch.Generator().manual_seed(3)
    q, k = (6.0 * torch.randn(2, 4, 300, generator=g, dtype=torch.float64) for _ in range(2))
    v, weight = (torch.randn(2, 12, 300, generator=g, dtype=torch.float64) for _ in range(2))
    energies = torch.einsum("bcn,bcm->bnm", q, k)
    spread = energies - energies.amax(-1, keepdim=True)
    assert (spread < -87.4).double().mean() > 0.5  # float32's exp is subnormal below -87.3
    q, k, v = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
    got = []
    products, subnormal = subnormal_products(
        lambda: got.extend(_value_and_grads(lambda *t: pam.position_attention_blocks(*t, rows=64), (q, k, v), weight)))
    assert products >= 4 * 5 and subnormal == 0  # 5 blocks: P V forward; P^T dO, dS^T Q, dS K backward
    tokens = [to_numpy(t.detach()).transpose(0, 2, 1) for t in (q, k, v, weight)]
    expected = [ref.position_attention_core(*tokens[:3]), *ref.position_attention_core_grads(*tokens)]
    for name, g_, e in zip(("output", "dq", "dk", "dv"), got, expected):
        _check(f"blocks, spread energies, {name}", g_, e.transpose(0, 2, 1), dtype,
               scope="layer" if name == "output" else "grad")


def test_numpy_reference_gradients_equal_torch_autograd():
    """The float64 NumPy gradients (``reference.position_attention_core_grads``, the chain rule written out)
    against torch autograd through the official path, itself float64."""
    q, k, v = _qkv(2, 4, 12, 45, torch.float64, requires_grad=True)
    weight = torch.randn(2, 12, 45, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = _value_and_grads(pam.position_attention_official, (q, k, v), weight)[1:]
    tokens = [to_numpy(t.detach()).transpose(0, 2, 1) for t in (q, k, v, weight)]
    for name, got, want in zip(("dq", "dk", "dv"), ref.position_attention_core_grads(*tokens), expected):
        _check(f"NumPy reference {name}", got.transpose(0, 2, 1), want, torch.float64, scope="grad")


# (N, rows, splits): one block, runs with a remainder, N a square with a partial last block, splits > N.
SPLITS = [(63, 64, 1), (63, 10, 4), (45 * 45, 256, 32), (64, 16, 8), (7, 3, 9)]


def test_split_k_defaults_against_float64(monkeypatch):
    """Default rows (from ``SPLIT_K_ELEMENTS``: here 50 queries a block) and runs (N = 300: 2 runs of 150 keys)."""
    monkeypatch.setattr(pam, "SPLIT_K_ELEMENTS", 2 * 50 * 300)
    q, k, v = _qkv(2, 4, 12, 300, torch.float32)
    with torch.no_grad():
        got = pam.position_attention_split_k(q, k, v)
    _check("split-K defaults", got, _core_float64(q, k, v), torch.float32)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"v": (3, 12, 45)}, ValueError, r"one B and N, got q \(2, 4, 45\), k \(2, 4, 45\), v \(3, 12, 45\)"),
    ({"v": (2, 12, 46)}, ValueError, r"v \(2, 12, 46\)"),
    ({"rows": 0}, ValueError, r"`rows` must be an int >= 1, got 0"),
    ({"splits": 2.5}, ValueError, r"`splits` must be an int >= 1, got 2.5"),
    ({"requires_grad": True}, RuntimeError, r"computes no gradients: call it under torch.no_grad\(\)"),
])
def test_split_k_refuses_what_it_cannot_compute(kwargs, error, match):
    q, k, v = _qkv(2, 4, 12, 45, torch.float32, requires_grad=kwargs.pop("requires_grad", False))
    if "v" in kwargs:
        v = torch.randn(*kwargs.pop("v"))
    with pytest.raises(error, match=match):
        pam.position_attention_split_k(q, k, v, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, rows, splits", SPLITS)
def test_split_k_against_float64(n, rows, splits, dtype):
    q, k, v = _qkv(2, 4, 12, n, dtype)
    expected = _core_float64(q, k, v)
    with torch.no_grad():
        got = pam.position_attention_split_k(q, k, v, rows=rows, splits=splits)
    assert got.shape == (2, 12, n) and got.dtype == dtype
    _check(f"split-K n={n} rows={rows} splits={splits}", got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_equals_official(dtype):
    # The CUDA half-precision path; scaled_dot_product_attention also runs on CPU.
    q, k, v = _qkv(2, 32, 64, 7 * 9, dtype)
    expected = pam.position_attention_official(q.double(), k.double(), v.double())
    _check(f"kernel {dtype}", pam.position_attention_kernel(q, k, v), expected, dtype)


def _module_grads(module, x):
    x = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    (y * y).sum().backward()
    params = {name: p.grad.clone() for name, p in module.named_parameters()}
    return y.detach(), x.grad, params


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hw", [(33, 35), (9, 7), (1, 1)])
def test_module_efficient_equals_official_for_every_gradient(hw, dtype, monkeypatch):
    n = hw[0] * hw[1]
    monkeypatch.setattr(pam, "BLOCK_ELEMENTS", 2 * 150 * n)  # several blocks, the last one not full at 33x35
    x = torch.randn(2, 16, *hw, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    results = {}
    for path in ("official", "efficient"):
        module = randomize_(PositionAttention(16, pam_path=path), seed=4).to(dtype)
        results[path] = _module_grads(module, x)
    (y_o, dx_o, p_o), (y_e, dx_e, p_e) = results["official"], results["efficient"]
    assert set(p_o) == {"gamma", "query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
                        "value_conv.weight", "value_conv.bias"}
    _check(f"PAM {hw} output", y_e, y_o, dtype)
    _check(f"PAM {hw} d/dx", dx_e, dx_o, dtype, scope="grad")
    for name in sorted(set(p_o) - {"key_conv.bias"}):
        _check(f"PAM {hw} d/d{name}", p_e[name], p_o[name], dtype, scope="grad")
    # d/d key_conv.bias is 0 in exact arithmetic (one constant added to every key's energy leaves the
    # softmax unchanged): on both paths it is rounding noise, checked against 0 at the key weights' scale.
    tol = tolerance(str(dtype).replace("torch.", ""), "grad")
    bound = tol.atol + tol.rtol * p_o["key_conv.weight"].abs().max().item()
    assert max(p_o["key_conv.bias"].abs().max().item(), p_e["key_conv.bias"].abs().max().item()) <= bound


def test_efficient_module_matches_numpy_reference():
    pam_module = randomize_(PositionAttention(16, pam_path="efficient"), seed=7).eval()
    x = torch.randn(2, 16, 11, 13, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        y = pam_module(x)
    sd = state_numpy(pam_module)
    expected = ref.position_attention(to_numpy(x), *(sd[k] for k in (
        "query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
        "value_conv.weight", "value_conv.bias", "gamma")))
    _check("efficient PAM vs NumPy", y, expected, torch.float32)


def test_autocast_bfloat16_trains_in_float32_statistics():
    module = randomize_(PositionAttention(16, pam_path="efficient"), seed=9)
    x = torch.randn(1, 16, 12, 10, generator=torch.Generator().manual_seed(10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    y.float().pow(2).sum().backward()
    assert y.dtype == torch.float32 and all(torch.isfinite(p.grad).all() for p in module.parameters())
    sd = state_numpy(module)
    expected = ref.position_attention(to_numpy(x), *(sd[k] for k in (
        "query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
        "value_conv.weight", "value_conv.bias", "gamma")))
    _check("efficient PAM under bf16 autocast", y, expected, torch.bfloat16)


def test_auto_is_resolved_once_at_construction(monkeypatch):
    monkeypatch.setattr(pam, "ENV_PATH", "auto")
    assert pam.resolve_path("auto") == "efficient"
    module = PositionAttention(16)
    assert (module.pam_path, module.resolved_pam_path) == ("auto", "efficient")
    monkeypatch.setattr(pam, "ENV_PATH", "official")
    assert module.resolved_pam_path == "efficient"  # decided when built, not per call
    assert PositionAttention(16).resolved_pam_path == "official"
    assert PositionAttention(16, pam_path="efficient").resolved_pam_path == "efficient"  # explicit wins
    monkeypatch.setattr(pam, "ENV_PATH", "sometimes")
    with pytest.raises(ValueError, match=r"`DANET_PAM_PATH` must be one of 'auto', 'official', 'efficient', "
                                         r"got 'sometimes'"):
        PositionAttention(16)


@pytest.mark.parametrize("env, expected", [
    ({}, "auto"), ({"DANET_PAM_PATH": "official"}, "official"), ({"DANET_PAM_PATH": " Efficient "}, "efficient"),
    ({"DANET_FUSED_ATTN": "0"}, "official"), ({"DANET_FUSED_ATTN": "1"}, "auto"),
    ({"DANET_FUSED_ATTN": "0", "DANET_PAM_PATH": "efficient"}, "efficient"),
])
def test_environment_switch(env, expected, monkeypatch):
    for name in ("DANET_PAM_PATH", "DANET_FUSED_ATTN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert pam._env_path() == expected


def test_official_path_while_exporting(monkeypatch):
    module = randomize_(PositionAttention(16, pam_path="efficient"), seed=3)
    calls = []
    monkeypatch.setattr(torch_attention, "position_attention_efficient", lambda *t: calls.append(1))
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    x = torch.randn(1, 16, 4, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = module(x)
    assert not calls and y.shape == x.shape


def test_pam_path_reaches_every_pam():
    head = DANetHead(64, 3, pam_path="official")
    dual = DualAttention(32, pam_path="efficient")
    model = DANet(3, backbone="resnet50", pam_path="official")
    assert head.sa.resolved_pam_path == "official" and dual.sa.resolved_pam_path == "efficient"
    assert model.head.sa.pam_path == "official"
    assert "pam_path='official'" in repr(head.sa)


@pytest.mark.parametrize("make", [
    lambda: PositionAttention(16, pam_path="fast"), lambda: DualAttention(32, pam_path=True),
    lambda: DANetHead(64, 3, pam_path=None),
])
def test_bad_pam_path_is_refused(make):
    with pytest.raises(ValueError, match=r"`pam_path` must be one of 'auto', 'official', 'efficient', got "):
        make()


def test_block_rows_rule():
    assert pam.block_rows(1, 9216) == pam.BLOCK_ELEMENTS // 9216
    assert pam.block_rows(2, 9216) * 2 * 9216 <= pam.BLOCK_ELEMENTS
    assert pam.block_rows(1, 100) == 100  # never more rows than N
    assert pam.block_rows(64, pam.BLOCK_ELEMENTS) == 1  # at least one row


@pytest.mark.gpu
@pytest.mark.parametrize("head_v", [pam.CUDNN_HEAD_V, 64], ids=["cudnn-heads", "q-width-heads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_efficient_equals_official(dtype, head_v, monkeypatch):
    """Values and gradients on every CUDA route: cuDNN's wide heads, heads of q/k's width, float32's one head."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(pam, "CUDNN_HEAD_V", head_v)
    q, k, v = (t.cuda().requires_grad_(True) for t in _qkv(2, 64, 512, 33 * 35, dtype))
    weight = torch.randn(2, 512, 33 * 35, generator=torch.Generator().manual_seed(1), dtype=torch.float64).cuda()
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    expected = _value_and_grads(pam.position_attention_official, (q64, k64, v64), weight)
    got = _value_and_grads(pam.position_attention_efficient, (q, k, v), weight)
    _check(f"cuda efficient {dtype}", got[0], expected[0], dtype)
    for name, g, e in zip(("dq", "dk", "dv"), got[1:], expected[1:]):
        _check(f"cuda efficient {dtype} {name}", g, e, dtype, scope="grad")


@pytest.mark.gpu
def test_cuda_float32_inference_runs_split_k(monkeypatch):
    """float32 inference on CUDA: the split products (at N = 33 x 35, several blocks and runs) against float64."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    calls = []
    split_k = pam.position_attention_split_k
    monkeypatch.setattr(pam, "position_attention_split_k", lambda *a, **kw: calls.append(1) or split_k(
        *a, rows=256, splits=32))
    q, k, v = (t.cuda() for t in _qkv(2, 64, 512, 33 * 35, torch.float32))
    expected = _core_float64(q, k, v)
    with torch.no_grad():
        got = pam.position_attention_efficient(q, k, v)
    assert calls == [1]
    _check("cuda float32 inference", got, expected, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("train", [True, False], ids=["fwd+bwd", "inference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_efficient_path_never_builds_the_n_by_n_matrix(dtype, train):
    n = 181 * 181
    q, k, v = (t.cuda().requires_grad_(train) for t in _qkv(2, 64, 512, n, dtype))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    if train:
        y = pam.position_attention_efficient(q, k, v)
        (y.float() * y.float()).sum().backward()
    else:
        with torch.no_grad():
            y = pam.position_attention_efficient(q, k, v)
    torch.cuda.synchronize()
    attention_bytes = 2 * n * n * torch.finfo(dtype).bits // 8
    assert torch.cuda.max_memory_allocated() - start < attention_bytes // 4


def test_blocks_never_build_the_n_by_n_matrix(monkeypatch):
    """Every tensor the blocks path allocates under autograd is far below N x N elements."""
    n = 40 * 40
    monkeypatch.setattr(pam, "BLOCK_ELEMENTS", 64 * n)
    q, k, v = _qkv(1, 4, 8, n, torch.float32, requires_grad=True)
    largest = []

    class Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    largest.append(t.numel())
            return out

    with Watch():
        y = pam.position_attention_blocks(q, k, v)
        (y * y).sum().backward()
    assert max(largest) <= 64 * n < n * n // 4
    assert np.isfinite(to_numpy(q.grad)).all()


def test_blocks_second_derivatives_against_finite_differences():
    """``create_graph=True`` (gradient penalties, Hessian-vector products) through the blocks: their
    gradients are themselves differentiable, checked against finite differences of the gradients."""
    q, k, v = _qkv(2, 2, 3, 7, torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda *t: pam.position_attention_blocks(*t, rows=3), (q, k, v))


def test_module_gradient_penalty_equals_official(monkeypatch):
    """A WGAN-GP style penalty ``|d y / d x|^2`` backpropagated to the parameters, both paths, float64."""
    monkeypatch.setattr(pam, "BLOCK_ELEMENTS", 2 * 4 * 15)  # blocks of 4 queries, the last one of 3
    x = torch.randn(2, 16, 3, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    results = {}
    for path in ("official", "efficient"):
        module = randomize_(PositionAttention(16, pam_path=path), seed=4).double()
        xg = x.clone().requires_grad_(True)
        dx, = torch.autograd.grad(module(xg).pow(2).sum(), xg, create_graph=True)
        dx.pow(2).sum().backward()
        results[path] = {name: p.grad for name, p in module.named_parameters()} | {"x": xg.grad}
    for name in sorted(set(results["official"]) - {"key_conv.bias"}):
        _check(f"penalty d/d{name}", results["efficient"][name], results["official"][name], torch.float64,
               scope="grad")


def test_torch_func_transforms_equal_official(monkeypatch):
    """``torch.func`` (per-sample gradients with vmap + grad, jacrev, jvp) and forward-mode AD on the
    efficient path equal the official path's autograd, float64."""
    from torch.func import functional_call, grad, jacrev, jvp, vmap

    monkeypatch.setattr(pam, "BLOCK_ELEMENTS", 2 * 4 * 15)
    g = torch.Generator().manual_seed(6)
    x, tangent = (torch.randn(2, 16, 3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    official, efficient = (randomize_(PositionAttention(16, pam_path=p), seed=4).double()
                           for p in ("official", "efficient"))

    def loss(params, xi):
        return functional_call(efficient, params, (xi.unsqueeze(0),)).pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(dict(efficient.named_parameters()), x)
    for i in range(2):
        official.zero_grad()
        official(x[i:i + 1]).pow(2).sum().backward()
        for name, p in official.named_parameters():
            if name != "key_conv.bias":
                _check(f"vmap(grad) sample {i} d/d{name}", per_sample[name][i], p.grad, torch.float64, "grad")
    _check("vmap output", vmap(efficient)(x.unsqueeze(1)).squeeze(1), official(x), torch.float64)
    _check("jacrev", jacrev(efficient)(x[:1]), torch.autograd.functional.jacobian(official, x[:1]),
           torch.float64, "grad")
    _check("jvp", jvp(efficient, (x,), (tangent,))[1], jvp(official, (x,), (tangent,))[1], torch.float64, "grad")
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        dual = fwad.make_dual(x, tangent)
        _check("forward AD", fwad.unpack_dual(efficient(dual)).tangent, fwad.unpack_dual(official(dual)).tangent,
               torch.float64, "grad")
