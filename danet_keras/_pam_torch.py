"""The efficient PAM's blocks on Keras' torch backend: a ``torch.autograd.Function``.

Imported only when Keras runs on torch (:func:`danet_keras.pam.position_attention_blocks`
dispatches here). The math is that of the ``keras.ops`` implementation in
:mod:`danet_keras.pam` (and of ``danet_torch.pam``, on ``(B, N, C)`` tokens):
torch runs ``keras.ops`` one eager op at a time with no in-place form, so
every step of every block allocates a fresh ``(B, rows, N)`` tile and every
``dV``/``dK`` sum a fresh ``(B, N, C)`` tensor; glibc's heap, holding those
tiles between the blocks' small outputs, then grows resident memory far
beyond one block (``benchmarks/pam_benchmark.py``). Here one energy buffer
(forward) and two (backward) are reused, and the sums accumulate in place.
"""

from __future__ import annotations

import torch

__all__ = ["position_attention_blocks_torch"]

# On the CPU exp's argument is floored as in danet_torch.pam (the same value and rule): below about -87.3
# float32's exp is subnormal or 0, which CPUs compute (and multiply) tens of times slower; a term under
# exp(-50) = 2e-22 of the row's largest moves nothing float64 can show.
EXP_FLOOR = -50.0


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _add_bmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b``, accumulated in ``acc``'s dtype."""
    if acc.dtype == a.dtype:
        acc.baddbmm_(a, b)
    else:
        acc.add_(torch.bmm(a, b))


def _exp_floor(*factors: torch.Tensor) -> float | None:
    """:data:`EXP_FLOOR` on the CPU, unless a tensor that the attention multiplies holds an inf or NaN
    (there a floored term, unlike a zero one, gives inf for NaN); ``None`` (no floor) otherwise."""
    if factors[0].device.type == "cpu" and all(bool(torch.isfinite(t).all()) for t in factors):
        return EXP_FLOOR
    return None


def _floored(x: torch.Tensor, floor: float | None) -> torch.Tensor:
    return x if floor is None else x.clamp_min_(floor)


def _forward(q, k, v, rows: int):
    """``(out (B, N, C), lse (B, N, 1))``: q, k ``(B, N, C')``, v ``(B, N, C)``, blocks of ``rows`` queries."""
    b, n, _ = q.shape
    stat = _stat_dtype(q.dtype)
    qs, kts = q.to(stat), k.to(stat).transpose(1, 2)  # (B, N, C'), (B, C', N)
    out = v.new_empty(b, n, v.shape[-1])
    lse = torch.empty(b, n, 1, dtype=stat, device=q.device)
    buffer = torch.empty(b * rows * n, dtype=stat, device=q.device)
    floor = _exp_floor(v)
    for start in range(0, n, rows):
        r = min(rows, n - start)
        e = torch.bmm(qs[:, start:start + r], kts, out=buffer[: b * r * n].view(b, r, n))  # (B, r, N)
        top = e.amax(dim=-1, keepdim=True)
        p = _floored(e.sub_(top), floor).exp_()  # unnormalised probabilities, in place
        total = p.sum(dim=-1, keepdim=True)
        blk = out[:, start:start + r]
        if blk.dtype == stat:  # normalise (r, C) after the product, not (r, N) before it
            torch.bmm(p, v, out=blk).div_(total)
        else:
            blk.copy_(torch.bmm(p.to(v.dtype), v).to(stat).div_(total))
        lse[:, start:start + r] = top + total.log()
    return out, lse


def _backward(q, k, v, out, lse, dout, rows: int):
    """``(dq, dk, dv)``, one block of ``rows`` keys at a time (as :mod:`danet_keras.pam`)."""
    b, n, ck = q.shape
    stat, dtype = _stat_dtype(q.dtype), q.dtype
    dout = dout.to(dtype)
    neg_delta = -(dout.to(stat) * out.to(stat)).sum(dim=-1, keepdim=True)  # -rowsum(dO * O), (B, N, 1)
    qs, kts = q.to(stat), k.to(stat).transpose(1, 2)  # (B, N, C'), (B, C', N)
    vt = v.transpose(1, 2)  # (B, C, N)
    dq = torch.zeros(b, n, ck, dtype=stat, device=q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    buffers = [torch.empty(b * n * rows, dtype=stat, device=q.device) for _ in range(2)]  # P, dS
    floor = _exp_floor(v, dout)
    for start in range(0, n, rows):
        r = min(rows, n - start)
        p = torch.baddbmm(-lse, qs, kts[:, :, start:start + r], out=buffers[0][: b * n * r].view(b, n, r))
        p = _floored(p, floor).exp_()
        torch.bmm(p.to(dtype).transpose(1, 2), dout, out=dv[:, start:start + r])  # dV_j = P_j^T dO
        vb = vt[:, :, start:start + r]  # (B, C, r)
        if dtype == stat:  # dS_j = P_j * (dO V_j^T - delta), in place
            ds = torch.baddbmm(neg_delta, dout, vb, out=buffers[1][: b * n * r].view(b, n, r)).mul_(p)
        else:
            ds = torch.bmm(dout, vb).to(stat).add_(neg_delta).mul_(p).to(dtype)
        torch.bmm(ds.transpose(1, 2), q, out=dk[:, start:start + r])  # dK_j = dS_j^T Q
        _add_bmm(dq, ds, k[:, start:start + r])  # dQ += dS_j K_j
    return dq.to(q.dtype), dk, dv


class _Blocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rows):
        with torch.autocast(device_type=q.device.type, enabled=False):
            out, lse = _forward(q, k, v, rows)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.autocast(device_type=q.device.type, enabled=False):
            return (*_backward(q, k, v, out, lse, dout, ctx.rows), None)


def position_attention_blocks_torch(q, k, v, rows: int):
    """Blocks of ``rows`` queries: ``(B, N, C'), (B, N, C'), (B, N, C) -> (B, N, C)``."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return _Blocks.apply(q.to(dtype), k.to(dtype), v.to(dtype), int(rows))
