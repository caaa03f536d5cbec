"""PAM's attention core: the official path and the efficient path, side by side.

``out = V softmax(Q^T K)^T`` (no ``1/sqrt(d)``, as upstream's
``encoding/nn/da_att.py``) with ``N = H * W`` positions. Two paths compute
it; :class:`~danet_torch.PositionAttention` takes ``pam_path=``:

* ``"official"``: upstream's ``bmm`` + ``N x N`` softmax. The ``N x N``
  attention is 324 MiB per image in float32 at a 96 x 96 feature map.
* ``"efficient"``: never builds the ``N x N`` matrix.

  - Blocks (CPU; on CUDA float64 and what the kernels below refuse), in a
    :class:`torch.autograd.Function`: the
    forward pass runs over blocks of queries and keeps, per query row, only
    the log-sum-exp of its energies besides Q, K, V and the output; the
    backward pass runs over blocks of keys, recomputes each block's
    attention ``P`` from them and computes ``dV = P^T dO``,
    ``dS = P * (dO V^T - rowsum(dO * O))``, ``dQ = dS K``, ``dK = dS^T Q``
    (flash attention's backward). A block has
    ``B * rows * N <= BLOCK_ELEMENTS`` attention elements; the forward pass
    reuses one such buffer, the backward pass two (``P`` and ``dS``). On the
    CPU exp's argument stops at :data:`EXP_FLOOR` (a change below float64's
    rounding), so that no subnormal number reaches a product. In
    float16/bfloat16, energies, softmax statistics and the ``dQ`` sum are
    float32; the products with V and dO run in the input dtype. Under
    ``create_graph=True`` the backward is the official graph's instead, which
    autograd records, so that it can be differentiated again; under
    ``torch.func`` transforms and forward-mode AD the forward pass is too.
  - CUDA, float16/bfloat16/float32: ``scaled_dot_product_attention(scale=1.0)``
    and its own backward: in half precision V is split into heads that
    share q and k (:func:`position_attention_kernel`: cuDNN's kernel takes
    heads of 256 columns beside q/k's 64, flash kernels one head size);
    float32 runs the memory-efficient kernel in one head when differentiated.
  - CUDA, float32 inference: blocks of queries whose product with V is
    split along the keys (:func:`position_attention_split_k`). Unsplit, the
    blocks' long reductions (``P V`` over all ``N`` keys for a few hundred
    queries) leave most of the chip idle; split, they run cuBLAS' float32
    products as the official path does, in less time and memory than the
    memory-efficient kernel (docs/BENCHMARKS.md).

* ``"auto"`` (the default) is resolved once, when a layer is built
  (:func:`resolve_path`, as timm's ``use_fused_attn()``): ``"efficient"``,
  unless the environment variable ``DANET_PAM_PATH`` (read once, at import)
  says ``official`` or ``efficient``; ``DANET_FUSED_ATTN=0`` is still read
  as ``official``.

While exporting (ONNX, TorchScript, ``torch.export``; checked on every call)
the official path is used whatever the layer's path: a Python loop whose
block count depends on ``N`` does not belong in an exported graph.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._checks import check_positive_int

__all__ = [
    "PAM_PATHS",
    "BLOCK_ELEMENTS",
    "EXP_FLOOR",
    "SPLIT_K_ELEMENTS",
    "SPLIT_K",
    "SPLIT_K_MIN_RUN",
    "resolve_path",
    "check_path",
    "block_rows",
    "is_exporting",
    "position_attention",
    "position_attention_official",
    "position_attention_efficient",
    "position_attention_blocks",
    "position_attention_kernel",
    "position_attention_split_k",
]

PAM_PATHS = ("auto", "official", "efficient")
# Attention elements per block of queries or keys, B * rows * N (16 MiB in
# float32); danet_keras.pam uses the same rule and value.
BLOCK_ELEMENTS = 1 << 22
# On the CPU the blocks' exp(E - max) and exp(E - lse) take no argument below EXP_FLOOR: a term under
# exp(-50) = 2e-22 of the row's largest counts as exp(-50), which moves a row's sum by at most
# N * 2e-22 of itself (float64 rounds at 1.1e-16). Below about -87.3 float32's exp is subnormal or 0,
# and CPUs compute it, and multiply subnormal numbers, tens of times slower (docs/BENCHMARKS.md).
EXP_FLOOR = -50.0


def _env_path() -> str:
    value = os.environ.get("DANET_PAM_PATH", "").strip().lower()
    if not value and os.environ.get("DANET_FUSED_ATTN", "1").strip().lower() in ("0", "false", "no", "off"):
        return "official"
    return value or "auto"


# Read once, at import; "auto" layers resolve against it when built.
ENV_PATH = _env_path()


def check_path(value, name: str = "path") -> str:
    """Return ``value`` if it is one of :data:`PAM_PATHS`, else raise ``ValueError``."""
    if not isinstance(value, str) or value not in PAM_PATHS:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, PAM_PATHS))}, got {value!r}.")
    return value


def resolve_path(path: str = "auto") -> str:
    """``"official"`` or ``"efficient"``: ``path`` itself, or for ``"auto"`` the environment's choice."""
    if check_path(path) != "auto":
        return path
    if ENV_PATH not in PAM_PATHS:
        raise ValueError(f"The environment variable `DANET_PAM_PATH` must be one of "
                         f"{', '.join(map(repr, PAM_PATHS))}, got {ENV_PATH!r}.")
    return "efficient" if ENV_PATH == "auto" else ENV_PATH


def block_rows(batch: int, n: int) -> int:
    """Rows (queries or keys) per block: ``batch * rows * n <= BLOCK_ELEMENTS``, at least 1, at most ``n``."""
    return max(1, min(n, BLOCK_ELEMENTS // max(1, batch * n)))


def is_exporting() -> bool:
    """True while tracing for ONNX, TorchScript or ``torch.export``."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    if torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_exporting") and compiler.is_exporting())


def position_attention_official(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The official computation: ``(B, C', N), (B, C', N), (B, C, N) -> (B, C, N)``.

    Half-precision ``q`` and ``k`` (or ``torch.autocast``) give their energy
    and softmax in float32, as the efficient path and CAM do: unscaled
    energies of hundreds, rounded to bfloat16 (float16), move the attention's
    weights by tens of percent. ``P V`` is computed in ``v``'s dtype.
    """
    if torch.is_autocast_enabled(q.device.type):  # it would run the energy's product in half precision again
        with torch.autocast(device_type=q.device.type, enabled=False):
            return position_attention_official(q, k, v)
    stat = _stat_dtype(q.dtype)
    energy = torch.bmm(q.transpose(1, 2).to(stat), k.to(stat))  # (B, N, N), no 1/sqrt(d)
    attention = torch.softmax(energy, dim=-1)
    return torch.bmm(v, attention.transpose(1, 2).to(v.dtype))


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _add_bmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b``, accumulated in ``acc``'s dtype."""
    if acc.dtype == a.dtype:
        acc.baddbmm_(a, b)
    else:
        acc.add_(torch.bmm(a, b))


def _exp_floor(*factors: torch.Tensor) -> float | None:
    """The least argument the blocks give exp: :data:`EXP_FLOOR` on the CPU, unless a tensor that the
    attention multiplies holds an inf or NaN (there a floored term, unlike a zero one, gives inf for NaN);
    ``None`` (no floor) otherwise. GPUs multiply subnormal numbers at full speed."""
    if factors[0].device.type == "cpu" and all(bool(torch.isfinite(t).all()) for t in factors):
        return EXP_FLOOR
    return None


def _floored(x: torch.Tensor, floor: float | None) -> torch.Tensor:
    return x if floor is None else x.clamp_min_(floor)


def _blocks_forward(q, k, v, rows: int):
    """``(out (B, C, N), lse (B, N, 1))``; energies in float32 (float64 stays), one buffer reused."""
    b, _, n = q.shape
    stat = _stat_dtype(q.dtype)
    qt, ks, vt = q.transpose(1, 2).to(stat), k.to(stat), v.transpose(1, 2)  # (B, N, C'), (B, C', N), (B, N, C)
    out = v.new_empty(b, n, v.shape[1])
    lse = torch.empty(b, n, 1, dtype=stat, device=q.device)
    buffer = torch.empty(b * rows * n, dtype=stat, device=q.device)
    floor = _exp_floor(v)
    for start in range(0, n, rows):
        r = min(rows, n - start)
        e = torch.bmm(qt[:, start:start + r], ks, out=buffer[: b * r * n].view(b, r, n))  # (B, r, N)
        top = e.amax(dim=-1, keepdim=True)
        p = _floored(e.sub_(top), floor).exp_()  # unnormalised probabilities, in place
        total = p.sum(dim=-1, keepdim=True)
        blk = out[:, start:start + r]
        if blk.dtype == stat:  # normalise (r, C) after the product, not (r, N) before it
            torch.bmm(p, vt, out=blk).div_(total)
        else:
            blk.copy_(torch.bmm(p.to(v.dtype), vt).to(stat).div_(total))
        lse[:, start:start + r] = top + total.log()
    return out.transpose(1, 2), lse


def _blocks_backward(q, k, v, out, lse, dout, rows: int):
    """``(dq, dk, dv)`` from the saved ``(q, k, v, out, lse)``, one block of ``rows`` keys at a time.

    Blocks of keys make ``dV_j = P_j^T dO`` and ``dK_j = dS_j^T Q`` products
    over all ``N`` queries, written once, and leave only the narrow ``dQ``
    (``C'`` columns) to accumulate. ``Q^T K_j - lse`` and
    ``dO V_j^T - rowsum(dO * O)`` are each one ``baddbmm``.

    ``dQ = dS (K - mean K)``: each row of ``dS`` sums to 0 (``P``'s rows sum
    to 1 and ``rowsum(dO * O)`` is their mean of ``dO V^T``), so the keys'
    mean over the positions changes nothing but rounding. Without it, the
    rounding that leaves a row's sum off 0 (``O`` and ``dS`` in half
    precision) is multiplied by that mean: keys near 2 with a spread of 0.07
    gave a bfloat16 query-conv weight gradient 108% off (normwise) where the
    official path is within its tolerance.
    """
    b, ck, n = q.shape
    stat, dtype = _stat_dtype(q.dtype), q.dtype
    dot = dout.transpose(1, 2).to(dtype)  # (B, N, C)
    neg_delta = -(dot.to(stat) * out.transpose(1, 2).to(stat)).sum(dim=-1, keepdim=True)  # -rowsum(dO * O)
    qt, ks = q.transpose(1, 2), k.to(stat)  # (B, N, C'), (B, C', N)
    kt = (ks - ks.mean(dim=-1, keepdim=True)).transpose(1, 2).to(dtype)  # (B, N, C'): K - mean K, for dQ
    qs = qt.to(stat)
    dq = torch.zeros(b, n, ck, dtype=stat, device=q.device)
    dk, dv = k.new_empty(b, n, ck), v.new_empty(b, n, v.shape[1])
    buffers = [torch.empty(b * n * rows, dtype=stat, device=q.device) for _ in range(2)]  # P, dS
    floor = _exp_floor(v, dot)
    for start in range(0, n, rows):
        r = min(rows, n - start)
        p = torch.baddbmm(-lse, qs, ks[:, :, start:start + r], out=buffers[0][: b * n * r].view(b, n, r))
        p = _floored(p, floor).exp_()
        pm = p.to(dtype)  # P_j (B, N, r)
        torch.bmm(pm.transpose(1, 2), dot, out=dv[:, start:start + r])  # dV_j = P_j^T dO
        vb = v[:, :, start:start + r]  # (B, C, r)
        if dtype == stat:  # dS_j = P_j * (dO V_j^T - delta), in place
            ds = torch.baddbmm(neg_delta, dot, vb, out=buffers[1][: b * n * r].view(b, n, r)).mul_(p)
        else:
            ds = torch.bmm(dot, vb).to(stat).add_(neg_delta).mul_(p).to(dtype)
        torch.bmm(ds.transpose(1, 2), qt, out=dk[:, start:start + r])  # dK_j = dS_j^T Q
        _add_bmm(dq, ds, kt[:, start:start + r])  # dQ += dS_j K_j
    return dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2), dv.transpose(1, 2)


def _official_vjp(q, k, v, dout, needs_grad):
    """``(dq, dk, dv)`` of the official graph, differentiable: the blocks' backward under ``create_graph=True``.

    The blocks' backward writes into preallocated buffers (``out=``, in
    place), which autograd cannot record; a second derivative (a gradient
    penalty, a Hessian-vector product) needs a recorded one, and the
    official graph is the same function. It holds the ``N x N`` attention.
    """
    inputs = [t for t, needed in zip((q, k, v), needs_grad) if needed]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(position_attention_official(q, k, v), inputs, dout, create_graph=True))
    return tuple(next(grads) if needed else None for needed in needs_grad)


def _transformed(*tensors) -> bool:
    """True under ``torch.func`` transforms (vmap, grad, jacrev, jvp) or with forward-mode AD tangents.

    The blocks' :class:`torch.autograd.Function` implements neither (its
    backward writes into buffers, which vmap cannot batch and which have no
    forward-mode derivative); the official graph, the same function, is
    built from operators that have all three.
    """
    active = getattr(torch._C, "_are_functorch_transforms_active", None)  # what Function.apply itself asks
    if active is not None and active():
        return True
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


class _PositionAttentionBlocks(torch.autograd.Function):
    """Blocks of queries; saves ``q, k, v, out`` and the per-row log-sum-exp only.

    Its backward runs in blocks of keys; under ``create_graph=True`` it is the
    official graph's (:func:`_official_vjp`), so that it can be differentiated again.
    """

    @staticmethod
    def forward(ctx, q, k, v, rows):
        with torch.autocast(device_type=q.device.type, enabled=False):
            out, lse = _blocks_forward(q, k, v, rows)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradients will be differentiated
            return (*_official_vjp(q, k, v, dout, ctx.needs_input_grad[:3]), None)
        with torch.autocast(device_type=q.device.type, enabled=False):
            dq, dk, dv = _blocks_backward(q, k, v, out, lse, dout, ctx.rows)
        return dq, dk, dv, None


def position_attention_blocks(q, k, v, rows: int | None = None) -> torch.Tensor:
    """The official function over blocks of ``rows`` queries (keys in the backward pass).

    Under ``torch.func`` transforms and forward-mode AD, the official
    computation (:func:`_transformed`): it holds the ``N x N`` attention.

    Args:
        q, k: ``(B, C', N)``. v: ``(B, C, N)``.
        rows: Rows per block (default :func:`block_rows`).

    Returns:
        ``(B, C, N)``, a view of a ``(B, N, C)`` tensor.
    """
    if _transformed(q, k, v):
        return position_attention_official(q, k, v)
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if rows is None:
        rows = block_rows(q.shape[0], q.shape[-1])
    return _PositionAttentionBlocks.apply(q, k, v, max(1, min(int(rows), q.shape[-1])))


# float32 inference on CUDA (position_attention_split_k): energies per block, B * rows * N (64 MiB in
# float32: 256 rows at 181 x 181, B = 2), the most runs the keys of a block's product with V are split
# into, and the fewest keys per run (a shorter run fills no matrix tile: docs/BENCHMARKS.md's sweep).
SPLIT_K_ELEMENTS, SPLIT_K, SPLIT_K_MIN_RUN = 1 << 24, 32, 128


def _differentiated(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _split_k_check(q, k, v) -> None:
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[0] != q.shape[0] or v.shape[2] != q.shape[2]:
        raise ValueError("position_attention_split_k takes q, k (B, C', N) and v (B, C, N) of one B and N, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}.")
    if _differentiated(q, k, v):
        raise RuntimeError("position_attention_split_k computes no gradients: call it under torch.no_grad() or "
                           "torch.inference_mode() (an input requires grad).")


def position_attention_split_k(q, k, v, rows: int | None = None, splits: int | None = None) -> torch.Tensor:
    """The official function over blocks of ``rows`` queries, for inference (no autograd).

    Each block is the official computation on ``rows`` queries: energies
    ``(B, rows, N)``, their softmax in place, and the product with V. That
    product, ``rows`` outputs summed over ``N`` keys, is too narrow to fill a
    GPU (a few output tiles, each with all ``N`` keys to sum), so the keys
    are cut into ``splits`` runs, one batched product with a tile per run,
    and the runs' partial sums are added. The values are read in place
    (strided views, one image at a time: the image and run strides do not
    merge into one batch stride without a copy of V). Same products and
    softmax as the official path, summed in another order; memory: the
    output, one block's energies and ``splits`` partial outputs.

    Args:
        q, k: ``(B, C', N)``. v: ``(B, C, N)``; one floating dtype.
        rows: Queries per block (default: ``B * rows * N <= SPLIT_K_ELEMENTS``).
        splits: Runs of keys per product (default: :data:`SPLIT_K`, fewer
            where runs would be shorter than :data:`SPLIT_K_MIN_RUN` keys).
            Both are capped at ``N``.

    Returns:
        ``(B, C, N)``, a view of a ``(B, N, C)`` tensor.
    """
    _split_k_check(q, k, v)
    b, _, n = q.shape
    c = v.shape[1]
    rows = (max(1, SPLIT_K_ELEMENTS // max(1, b * n)) if rows is None else check_positive_int("rows", rows))
    splits = (max(1, min(SPLIT_K, n // SPLIT_K_MIN_RUN)) if splits is None else check_positive_int("splits", splits))
    rows, splits = min(rows, max(1, n)), min(splits, max(1, n))
    run = n // splits  # keys per run; the last n - splits * run keys go in one more product
    split = run * splits
    qt, vt = q.transpose(1, 2), v.transpose(1, 2)  # (B, N, C'), (B, N, C): views
    out = v.new_empty(b, n, c)
    energies = q.new_empty(b * rows * n)
    partial = v.new_empty(splits * rows * c) if splits > 1 else None
    for start in range(0, n, rows):
        r = min(rows, n - start)
        e = torch.bmm(qt[:, start:start + r], k, out=energies[: b * r * n].view(b, r, n))
        p = torch._softmax(e, -1, False, out=e)  # in place (the public softmax has no ``out``)
        blk = out[:, start:start + r]
        if partial is None:
            torch.bmm(p, vt, out=blk)
            continue
        for i in range(b):
            runs_p = p[i, :, :split].unflatten(1, (splits, run)).transpose(0, 1)  # (splits, r, run)
            runs_v = vt[i, :split].unflatten(0, (splits, run))  # (splits, run, C)
            torch.sum(torch.bmm(runs_p, runs_v, out=partial[: splits * r * c].view(splits, r, c)), 0, out=blk[i])
            if split < n:
                blk[i].addmm_(p[i, :, split:], vt[i, split:])
    return out.transpose(1, 2)


# V columns per head on cuDNN's attention kernel, which takes v wider than q/k: at
# C = 512, C' = 64 two heads recompute the energies twice, not eight times.
CUDNN_HEAD_V = 256


def _sdpa_heads(q, k, v, head_v: int) -> torch.Tensor:
    """``(B, N, C)`` from q, k ``(B, C', N)`` and v ``(B, C, N)``: V in heads of ``head_v`` that share q and k."""
    b, ck, n = q.shape
    heads = v.shape[1] // head_v
    qh = q.transpose(1, 2).unsqueeze(1).expand(b, heads, n, ck).contiguous()
    kh = k.transpose(1, 2).unsqueeze(1).expand(b, heads, n, ck).contiguous()
    vh = v.transpose(1, 2).reshape(b, n, heads, head_v).transpose(1, 2).contiguous()
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=1.0)  # (B, heads, N, head_v)
    return out.transpose(1, 2).reshape(b, n, heads * head_v)


def _try_sdpa(backend, q, k, v, head_v: int):
    """:func:`_sdpa_heads` on ``backend`` alone, or ``None`` where that kernel refuses the inputs."""
    try:
        with sdpa_kernel([backend]):
            return _sdpa_heads(q, k, v, head_v)
    except RuntimeError:  # no such kernel for this GPU, dtype, shape or version
        return None


def position_attention_kernel(q, k, v) -> torch.Tensor:
    """``scaled_dot_product_attention`` with ``scale=1.0`` (the official PAM has none).

    float16/bfloat16 with ``C % C' == 0``: V split into heads that share q
    and k, of :data:`CUDNN_HEAD_V` columns on cuDNN's kernel where it takes
    them, else of q/k's width, which every fused kernel takes (at 181 x 181,
    B = 2, C = 512: 6.6 against 10.5 ms, docs/BENCHMARKS.md). Otherwise one
    head. Returns ``(B, C, N)``.
    """
    c, ck = v.shape[1], q.shape[1]
    if q.dtype in (torch.float16, torch.bfloat16) and c % ck == 0 and ck in (32, 64, 128, 256):
        out = None
        if q.is_cuda and c % CUDNN_HEAD_V == 0 and CUDNN_HEAD_V > ck:
            out = _try_sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, CUDNN_HEAD_V)
        if out is None:
            out = _sdpa_heads(q, k, v, ck)
    else:
        out = _sdpa_heads(q, k, v, c)
    return out.transpose(1, 2)


def position_attention_efficient(q, k, v) -> torch.Tensor:
    """The efficient path: on CUDA the attention kernels, else blocks.

    float32 on CUDA: inference in blocks with split products
    (:func:`position_attention_split_k`), training through the
    memory-efficient kernel and its backward.
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return position_attention_kernel(q, k, v)
    if q.is_cuda and q.dtype == torch.float32:
        if k.dtype == v.dtype == q.dtype and not _differentiated(q, k, v):
            return position_attention_split_k(q, k, v)
        out = _try_sdpa(SDPBackend.EFFICIENT_ATTENTION, q, k, v, v.shape[1])
        if out is not None:
            return out.transpose(1, 2)
    return position_attention_blocks(q, k, v)


def position_attention(q, k, v, path: str = "efficient") -> torch.Tensor:
    """``(B, C', N), (B, C', N), (B, C, N) -> (B, C, N)`` on ``path`` (``"auto"`` is resolved here)."""
    if resolve_path(path) == "official" or is_exporting():
        return position_attention_official(q, k, v)
    return position_attention_efficient(q, k, v)
