"""float32 PAM inference with cuBLAS' TF32 tensor-core products, three per product: a candidate.

``danet_torch.pam.position_attention_split_k`` runs the official path's
float32 products (the CUDA cores) over blocks of queries with the keys split
into runs. Here each product with V runs as three TF32 products on the
tensor cores, ``P V ~ P_hi V_hi + P_hi V_lo + P_lo V_hi``, where ``x_hi`` is
``x`` cut to TF32's 10 mantissa bits and ``x_lo = x - x_hi`` (exact in
float32): float32 to within rounding, as the Pallas and Triton kernels'
``tf32x3``, but through cuBLAS. The energies stay a float32 product.

``parts`` says where the high parts come from:

* ``"explicit"``: ``P_hi`` and ``V_hi`` are computed (the low 13 bits
  cleared) and passed; one image's ``V_hi`` and ``V_lo`` are held.
* ``"truncate"`` / ``"nearest"``: ``P`` and ``V`` are passed as they are,
  and ``x_lo`` is ``x`` less ``x`` truncated / rounded to TF32; exact only if
  the tensor cores read float32 operands that way (what this checks).

Images run one at a time. ``pam_gpu_kernels.py`` times it (TF32 is switched
on around these products only). Measured and not adopted: on one H200 at
181 x 181, B = 2, C = 512 it took 87.9 ms at best against 66.6 ms for
``position_attention_split_k`` and 55.8 ms for the official path, and
``"truncate"``/``"nearest"`` were off by 5.9e-3 and 1.2e-3 (cuBLAS does not
read float32 operands of a TF32 product either way): docs/BENCHMARKS.md.
On JAX the same three products through XLA are faster than the official
path (``danet_keras._pam_xla``).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["position_attention_forward", "tf32_high"]

# Clears float32's 13 lowest mantissa bits (0xFFFFE000 as an int32): what TF32 keeps of a float32.
TF32_MASK = -8192


def tf32_high(x: torch.Tensor, rounding: str = "truncate", out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` cut (``"truncate"``) or rounded half away from zero (``"nearest"``) to TF32, as float32."""
    bits = x.view(torch.int32)
    if rounding == "nearest":
        bits = bits + 0x1000
    return torch.bitwise_and(bits, TF32_MASK, out=None if out is None else out.view(torch.int32)).view(torch.float32)


@contextlib.contextmanager
def _tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def position_attention_forward(q, k, v, rows: int = 256, splits: int = 32, parts: str = "explicit"):
    """``(B, C', N), (B, C', N), (B, C, N) -> (B, C, N)`` float32, under ``no_grad``."""
    if parts not in ("explicit", "truncate", "nearest"):
        raise ValueError(f"`parts` must be 'explicit', 'truncate' or 'nearest', got {parts!r}.")
    b, _, n = q.shape
    c = v.shape[1]
    rows, splits = min(rows, n), max(1, min(splits, n))
    run = n // splits
    split = run * splits
    out = v.new_empty(b, n, c)
    energies, other = q.new_empty(rows * n), q.new_empty(rows * n)
    partial = v.new_empty(splits * rows * c)

    def runs_p(x):  # (r, N) -> (splits, r, run)
        return x[:, :split].unflatten(1, (splits, run)).transpose(0, 1)

    def runs_v(x):  # (N, C) -> (splits, run, C)
        return x[:split].unflatten(0, (splits, run))

    for i in range(b):
        vt, qt = v[i].t(), q[i].t()  # (N, C), (N, C'): views
        if parts == "explicit":
            v_hi = tf32_high(vt)
            v_lo = vt - v_hi
        else:
            v_hi, v_lo = vt, vt - tf32_high(vt, parts)
        for start in range(0, n, rows):
            r = min(rows, n - start)
            e = torch.mm(qt[start:start + r], k[i], out=energies[: r * n].view(r, n))
            p = torch._softmax(e, -1, False, out=e)
            high = tf32_high(p, "truncate" if parts == "explicit" else parts, out=other[: r * n].view(r, n))
            if parts == "explicit":
                p_hi, p_lo = high, p.sub_(high)
            else:
                p_hi, p_lo = p, torch.sub(p, high, out=high)
            blk = out[i, start:start + r]
            part = partial[: splits * r * c].view(splits, r, c)
            with _tf32():
                torch.bmm(runs_p(p_hi), runs_v(v_hi), out=part)
                part.baddbmm_(runs_p(p_hi), runs_v(v_lo))
                part.baddbmm_(runs_p(p_lo), runs_v(v_hi))
                torch.sum(part, 0, out=blk)
                if split < n:
                    blk.addmm_(p_hi[:, split:], v_hi[split:])
                    blk.addmm_(p_hi[:, split:], v_lo[split:])
                    blk.addmm_(p_lo[:, split:], v_hi[split:])
    return out.transpose(1, 2)
