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

# Energies per block on the blocked path: (B, block, N) elements, 16 MiB in
# float32 (455 query rows at 96x96). Measured on 2 CPU cores at 96x96:
# blocks of 512-2048 rows run at the same speed; smaller blocks use less memory.
BLOCK_ELEMENTS = 1 << 22
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


def _block(q_blk: torch.Tensor, k: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
    # q_blk (B, n, C'), k (B, C', N), vt (B, N, C) -> (B, n, C); differentiable.
    return torch.bmm(torch.softmax(torch.bmm(q_blk, k), dim=-1), vt)


def position_attention_blocked(q, k, v, block: int | None = None) -> torch.Tensor:
    """Same as the official path, over blocks of queries: O(block * N) memory.

    Without autograd, one energy buffer is reused for every block and, in
    float32/float64, the softmax runs in place on it. With autograd, each
    block is checkpointed: the backward pass recomputes its ``(B, block, N)``
    attention rather than keeping all of them.
    """
    b, _, n = q.shape
    c = v.shape[1]
    if block is None:
        block = max(64, BLOCK_ELEMENTS // max(1, b * n))
    block = min(block, n)
    qt, vt = q.transpose(1, 2), v.transpose(1, 2)  # (B, N, C'), (B, N, C)
    out = v.new_empty(b, n, c)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        blocks = [checkpoint(_block, qt[:, s:s + block], k, vt, use_reentrant=False) for s in range(0, n, block)]
        return torch.cat(blocks, dim=1).transpose(1, 2)
    buffer = q.new_empty(b * block * n)
    in_place = q.dtype in (torch.float32, torch.float64)
    for start in range(0, n, block):
        rows = min(block, n - start)
        energy = buffer[: b * rows * n].view(b, rows, n)
        torch.bmm(qt[:, start:start + rows], k, out=energy)
        if in_place:  # softmax without a second (B, rows, N) tensor
            energy.sub_(energy.amax(dim=-1, keepdim=True)).exp_()
            attention = energy.div_(energy.sum(dim=-1, keepdim=True))
        else:  # half precision: torch's softmax accumulates in float32
            attention = torch.softmax(energy, dim=-1)
        out[:, start:start + rows] = torch.bmm(attention, vt)
    return out.transpose(1, 2)


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


