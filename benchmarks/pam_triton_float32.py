"""A float32 PAM forward pass as one Triton kernel: a candidate that was measured and not adopted.

``out = V softmax(Q^T K)^T`` with no ``1/sqrt(d)``: q and k are ``C'`` wide
(64 for 512 channels), v is ``C`` wide (512). The kernel streams blocks of
keys past a block of queries as flash attention does (online softmax,
float32 statistics and accumulator) and splits only the ``C`` columns of V
over programs, ``BLOCK_C`` at a time, so the energies are recomputed
``C // BLOCK_C`` times. It reads q, k, v in torch's ``(B, C, N)`` layout
through their strides and writes a contiguous ``(B, C, N)`` output: nothing
is copied, and nothing but the output is allocated.

Products are float32 to within rounding: each runs on the tensor cores as
three TF32 products (``input_precision="tf32x3"``: ``a b ~ a_hi b_hi +
a_hi b_lo + a_lo b_hi``), as ``danet_keras._pam_pallas`` does in float32 on
JAX; one TF32 product's 10-bit mantissa is outside the parity tolerances.

On one H100 at 181 x 181, B = 2, C = 512 it takes 167 ms (124 ms with k
stored ``(B, N, C')``) with 128 MiB, against 58.5 ms for the official
``bmm`` + softmax and 83 ms (288 MiB) for the memory-efficient kernel
(``danet_torch``'s float32 inference runs split cuBLAS products instead:
67 against 55 ms on an H200, docs/BENCHMARKS.md). ``pam_gpu_kernels.py``
times it.
"""

from __future__ import annotations

import torch

try:  # Triton comes with torch's CUDA wheels; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["position_attention_forward", "TILES"]

# Queries per program, keys per step, V columns per program, warps, pipeline stages
# (the fastest of those tried at 181 x 181, B = 2, C = 512 on one H100).
TILES = (128, 64, 128, 8, 3)

if triton is not None:

    @triton.jit
    def _step(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, n, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr):
        """One block of keys from ``start``: the online softmax's update of ``(acc, m_i, l_i)``."""
        cols = start + tl.arange(0, BLOCK_N)
        if MASKED:
            kt = tl.load(k_ptrs, mask=cols[None, :] < n, other=0.0)
            vt = tl.load(v_ptrs, mask=cols[:, None] < n, other=0.0)
        else:
            kt = tl.load(k_ptrs)
            vt = tl.load(v_ptrs)
        s = tl.dot(q, kt, input_precision=PRECISION) * 1.4426950408889634  # energies, in log2 units
        if MASKED:
            s = tl.where(cols[None, :] < n, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision=PRECISION)
        return acc, m_new, l_i * alpha + tl.sum(p, axis=1)

    @triton.jit
    def _forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, n, full,
                        sq_b, sq_d, sq_n, sk_b, sk_d, sk_n, sv_b, sv_c, sv_n, so_b, so_c, so_n,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                        PRECISION: tl.constexpr):
        pid_m, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        dims = tl.arange(0, D)
        keys = tl.arange(0, BLOCK_N)
        batch = pid_b.to(tl.int64)
        q = tl.load(q_ptr + batch * sq_b + dims[None, :] * sq_d + rows[:, None] * sq_n,
                    mask=rows[:, None] < n, other=0.0)  # (BLOCK_M, D)
        k_ptrs = k_ptr + batch * sk_b + dims[:, None] * sk_d + keys[None, :] * sk_n  # (D, BLOCK_N)
        v_ptrs = v_ptr + batch * sv_b + chans[None, :] * sv_c + keys[:, None] * sv_n  # (BLOCK_N, BLOCK_C)
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(0, full, BLOCK_N):  # full = N rounded down to whole blocks
            acc, m_i, l_i = _step(acc, m_i, l_i, q, k_ptrs + start * sk_n, v_ptrs + start * sv_n, start, n,
                                  False, BLOCK_N, PRECISION)
        if full < n:  # the last block of keys, not full
            acc, m_i, l_i = _step(acc, m_i, l_i, q, k_ptrs + full * sk_n, v_ptrs + full * sv_n, full, n,
                                  True, BLOCK_N, PRECISION)
        out = acc / l_i[:, None]
        tl.store(o_ptr + batch * so_b + chans[None, :] * so_c + rows[:, None] * so_n, out,
                 mask=rows[:, None] < n)


def position_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles=None,
                               precision: str = "tf32x3") -> torch.Tensor:
    """``(B, C, N)`` (contiguous) from q, k ``(B, C', N)`` and v ``(B, C, N)``, any strides.

    Args:
        tiles: ``(BLOCK_M, BLOCK_N, BLOCK_C, num_warps, num_stages)``; default :data:`TILES`.
        precision: Triton's ``input_precision`` for the products: ``"tf32x3"`` (float32 to within
            rounding), ``"ieee"`` (float32 on the CUDA cores) or ``"tf32"`` (benchmarks only).
    """
    if triton is None:
        raise RuntimeError("pam_triton_float32.py needs Triton, which this installation of torch lacks.")
    block_m, block_n, block_c, num_warps, num_stages = tiles or TILES
    b, ck, n = q.shape
    c = v.shape[1]
    block_c = min(block_c, c)
    out = torch.empty(b, c, n, dtype=v.dtype, device=v.device)
    grid = (triton.cdiv(n, block_m), c // block_c, b)
    _forward_kernel[grid](q, k, v, out, n, n - n % block_n, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                          D=ck, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, PRECISION=precision,
                          num_warps=num_warps, num_stages=num_stages)
    return out
