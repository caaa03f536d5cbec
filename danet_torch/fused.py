"""PAM's attention core, official and fused, side by side.

The official PAM builds the ``N x N`` energy (``N = H * W``): 4 GiB per
image in float32 for a 128 x 256 feature map. The fused paths compute the
same function, ``out = V softmax(Q^T K)^T`` with no scaling, without keeping
that matrix:

* CUDA: ``scaled_dot_product_attention(q, k, v, scale=1.0)`` on contiguous
  tensors (float32 takes the memory-efficient kernel, whose value width may
  differ from q/k's); in half precision V is split into heads of q/k's width
  that share q and k, which the flash/cuDNN kernels accept.
* Elsewhere (CPU): softmax over blocks of queries, each block
  ``(B, block, N)``; under autograd each block is checkpointed so the
  backward pass recomputes it instead of storing it.

``DANET_FUSED_ATTN=0`` turns the fused paths off globally (like timm's
``TIMM_FUSED_ATTN``). The official path is always used while exporting
(ONNX, TorchScript, ``torch.export``), where an opaque loop or kernel choice
does not belong in the graph.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "position_attention_core",
    "position_attention_official",
    "position_attention_blocked",
    "position_attention_sdpa",
    "resolve_fused",
    "is_exporting",
]

# Query rows per block on the blocked path: each block holds (B, block, N)
# energies. Chosen so a block of 96x96 features (N = 9216) is ~36 MiB in fp32.
BLOCK_ELEMENTS = 1 << 23
# Below this many positions the N x N matrix is small and the official path wins.
MIN_FUSED_POSITIONS = 1024


def _env_allows_fused() -> bool:
    return os.environ.get("DANET_FUSED_ATTN", "1").lower() not in ("0", "false", "no", "off")


def is_exporting() -> bool:
    """True while tracing for ONNX, TorchScript or ``torch.export``."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    if torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_exporting") and compiler.is_exporting())


def resolve_fused(fused: bool | None, q: torch.Tensor, v: torch.Tensor) -> bool:
    """Decide the path for one call: ``fused`` as asked, never while exporting."""
    if is_exporting() or (fused is None and not _env_allows_fused()):
        return False
    if fused is None:
        return q.shape[-1] >= MIN_FUSED_POSITIONS
    return fused


def position_attention_official(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The official computation: ``(B, C', N), (B, C', N), (B, C, N) -> (B, C, N)``."""
    energy = torch.bmm(q.transpose(1, 2), k)  # (B, N, N), no 1/sqrt(d)
    attention = torch.softmax(energy, dim=-1)
    return torch.bmm(v, attention.transpose(1, 2))


def _block(q_blk: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # q_blk (B, n, C'), k (B, C', N), v (B, C, N) -> (B, C, n)
    attention = torch.softmax(torch.bmm(q_blk, k), dim=-1)
    return torch.bmm(v, attention.transpose(1, 2))


def position_attention_blocked(q, k, v, block: int | None = None) -> torch.Tensor:
    """Same as the official path, over blocks of queries (O(block * N) memory)."""
    b, _, n = q.shape
    if block is None:
        block = max(1, min(n, BLOCK_ELEMENTS // max(1, b * n)))
    qt = q.transpose(1, 2)
    use_checkpoint = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for start in range(0, n, block):
        q_blk = qt[:, start:start + block]
        if use_checkpoint:
            outs.append(checkpoint(_block, q_blk, k, v, use_reentrant=False))
        else:
            outs.append(_block(q_blk, k, v))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def position_attention_sdpa(q, k, v) -> torch.Tensor:
    """``scaled_dot_product_attention`` with ``scale=1.0`` (the official PAM has none)."""
    b, ck, n = q.shape
    c = v.shape[1]
    qt = q.transpose(1, 2)  # (B, N, C')
    kt = k.transpose(1, 2)
    vt = v.transpose(1, 2)  # (B, N, C)
    if q.dtype in (torch.float16, torch.bfloat16) and c % ck == 0 and ck in (32, 64, 128, 256):
        heads = c // ck  # V split into heads of q/k's width that share q and k
        qh = qt.unsqueeze(1).expand(b, heads, n, ck).contiguous()
        kh = kt.unsqueeze(1).expand(b, heads, n, ck).contiguous()
        vh = vt.reshape(b, n, heads, ck).transpose(1, 2).contiguous()
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=1.0)  # (B, heads, N, ck)
        return out.transpose(1, 2).reshape(b, n, c).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        qt.unsqueeze(1).contiguous(), kt.unsqueeze(1).contiguous(), vt.unsqueeze(1).contiguous(), scale=1.0)
    return out.squeeze(1).transpose(1, 2)


def position_attention_core(q, k, v, fused: bool = False) -> torch.Tensor:
    """Dispatch to the official or a fused path; all give the same function."""
    if not fused:
        return position_attention_official(q, k, v)
    if q.is_cuda and q.dtype != torch.float64:
        return position_attention_sdpa(q, k, v)
    return position_attention_blocked(q, k, v)


