"""danet_torch.fused: every fused path equals the official PAM, values and gradients."""

from __future__ import annotations

import pytest
import torch

from danet_torch import PositionAttention, fused
from weights_convert.testing import randomize_
from parity_tests.tests.helpers import to_numpy
from weights_convert.tolerances import compare, tolerance


def _qkv(b, ck, c, n, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, ch, n, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
            for ch in (ck, ck, c)]


def _check(name, got, expected, dtype, scope="layer"):
    result = compare(name, to_numpy(got), to_numpy(expected), tolerance(str(dtype).replace("torch.", ""), scope))
    assert result.passed, result.message()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, block", [(63, 7), (63, 64), (45 * 45, 100)])
def test_blocked_equals_official_forward(n, block, dtype):
    q, k, v = _qkv(2, 4, 12, n, dtype)
    _check(f"blocked n={n} block={block}", fused.position_attention_blocked(q, k, v, block=block),
           fused.position_attention_official(q, k, v), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_equals_official_gradients(dtype):
    q, k, v = _qkv(2, 4, 12, 7 * 9, dtype, requires_grad=True)
    weight = torch.randn(2, 12, 63, generator=torch.Generator().manual_seed(1), dtype=dtype)
    grads = []
    for path in (fused.position_attention_official, lambda *t: fused.position_attention_blocked(*t, block=10)):
        for t in (q, k, v):
            t.grad = None
        (path(q, k, v) * weight).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    for name, got, expected in zip("qkv", grads[1], grads[0]):
        _check(f"d loss / d {name}", got, expected, dtype, scope="grad")


def test_blocked_half_precision_matches_official():
    q, k, v = _qkv(1, 8, 16, 99, torch.bfloat16)
    expected = fused.position_attention_official(q.double(), k.double(), v.double())
    _check("blocked bf16", fused.position_attention_blocked(q, k, v, block=16), expected, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_path_equals_official(dtype):
    # Runs on CPU too; on CUDA this path picks the memory-efficient / flash kernels.
    q, k, v = _qkv(2, 32, 64, 7 * 9, dtype)
    expected = fused.position_attention_official(q.double(), k.double(), v.double())
    _check(f"sdpa {dtype}", fused.position_attention_sdpa(q, k, v), expected, dtype)


@pytest.mark.parametrize("hw", [(33, 35), (1, 1)])
def test_module_paths_agree_with_gradients(hw, monkeypatch):
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", 2 * 200 * hw[0] * hw[1])  # several blocks
    results = []
    for use_fused in (False, True):
        pam = randomize_(PositionAttention(16, fused=use_fused), seed=4).double()
        x = torch.randn(2, 16, *hw, generator=torch.Generator().manual_seed(5), dtype=torch.float64,
                        requires_grad=True)
        y = pam(x)
        y.pow(2).sum().backward()
        results.append((y, x.grad, pam.gamma.grad, pam.query_conv.weight.grad))
    for name, got, expected in zip(("output", "d/dx", "d/dgamma", "d/dWq"), results[1], results[0]):
        _check(f"PAM fused vs official {name}", got, expected, torch.float64, scope="grad")


def test_official_path_while_exporting_or_switched_off(monkeypatch):
    q = torch.zeros(1, 2, 4096)
    assert fused.resolve_fused(None, q, q) is True
    assert fused.resolve_fused(None, q[..., :100], q[..., :100]) is False  # small N: official is cheaper
    assert fused.resolve_fused(False, q, q) is False
    monkeypatch.setenv("DANET_FUSED_ATTN", "0")
    assert fused.resolve_fused(None, q, q) is False
    assert fused.resolve_fused(True, q, q) is True  # an explicit choice wins over the environment
    monkeypatch.delenv("DANET_FUSED_ATTN")
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert fused.resolve_fused(True, q, q) is False


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_fused_equals_official(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    q, k, v = (t.cuda() for t in _qkv(2, 64, 512, 33 * 35, dtype))
    expected = fused.position_attention_official(q.double(), k.double(), v.double())
    _check(f"cuda sdpa {dtype}", fused.position_attention_core(q, k, v, fused=True), expected, dtype)
