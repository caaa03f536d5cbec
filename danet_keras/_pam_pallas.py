"""PAM's forward pass as one Pallas kernel (JAX on a GPU; float16, bfloat16, float32).

``out = softmax(Q K^T) V`` with no ``1/sqrt(d)``: q and k are ``C'`` wide (64
for 512 channels) and v is ``C`` wide (512), a shape flash-attention kernels
do not take (they need one head size, so V would be split into ``C // C'``
heads that recompute the same energies and exponentials each). This kernel
streams blocks of keys past a block of queries as flash attention does
(online softmax, float32 statistics and accumulator) and splits only the
``C`` columns of V over programs, a tile of them at a time: the energies are
recomputed ``C`` / tile times (two for 512 channels), not ``C // C'``
times. It reads q, k and v where they are (no padded copies: the last,
partial blocks of queries and keys are read through masks) and allocates
only the output. float32 products run on the tensor cores as three TF32
products each (``lax.DotAlgorithmPreset.TF32_TF32_F32_X3``), float32 to
within rounding; ``danet_keras.pam`` runs float32 through ``_pam_xla``
instead, XLA's own products in the same form, which took 53 ms where this
kernel took 122 ms (181 x 181, B = 2, C = 512, one H200; docs/BENCHMARKS.md).

:func:`position_attention` is a ``jax.custom_vjp``
(``_pam_xla.value_with_gradients``): called plainly (``predict``, a jitted
forward) it runs this kernel; differentiated (``fit``, ``jax.grad``) it runs
the function it is given and that function's own backward pass
(``danet_keras.pam`` gives it the blocks).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._pam_xla import value_with_gradients

try:  # JAX deprecates Pallas' Triton backend for Mosaic GPU; a JAX without it runs the blocks
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - JAX versions this project does not pin
    plgpu = None

__all__ = ["available", "position_attention", "position_attention_forward", "TILES"]

# Tile sizes: queries per program, keys per step, V columns per program, warps, pipeline stages
# (the fastest of those tried at 181 x 181, B = 2, C = 512 on an H100; docs/BENCHMARKS.md). float32
# tiles take twice the shared memory of half-precision ones.
TILES = {"half": (128, 128, 256, 8, 2), "float32": (128, 32, 256, 8, 2)}
# Where the tiles were compiled and checked: q/k at most 64 wide (C <= 512), GPUs of compute capability
# 9.x and 10.x (227 KiB of shared memory per block; an A100 has 163, most others 99). Elsewhere the tiles
# may not fit, and a kernel that does not compile inside a traced `predict` cannot fall back.
MAX_QK_WIDTH = 64
COMPUTE_CAPABILITIES = ("9", "10")


def tiles_for(dtype) -> tuple:
    """The default tiles for ``dtype``: :data:`TILES`' ``"float32"`` or ``"half"`` entry."""
    return TILES["float32" if jnp.dtype(dtype) == jnp.float32 else "half"]


@functools.cache
def device_supported() -> bool:
    """True on a GPU of a compute capability in :data:`COMPUTE_CAPABILITIES`, with Pallas' Triton backend."""
    try:
        device = jax.devices()[0]
        major = str(getattr(device, "compute_capability", "")).split(".")[0]
    except RuntimeError:  # pragma: no cover - no usable backend
        return False
    return plgpu is not None and device.platform == "gpu" and major in COMPUTE_CAPABILITIES


def _is_tile(x: int) -> bool:
    return 16 <= x <= 256 and x & (x - 1) == 0


def available(q, v) -> bool:
    """True where the kernel takes the inputs: float16, bfloat16 or float32, a static ``N``, ``C'`` a power
    of two from 16 to :data:`MAX_QK_WIDTH`, ``C`` a multiple of the tile's V columns or a power of two below
    it, on a device :func:`device_supported` accepts."""
    ck, c = q.shape[-1], v.shape[-1]
    block_v = min(tiles_for(q.dtype)[2], c)
    return (jnp.dtype(q.dtype) in (jnp.float16, jnp.bfloat16, jnp.float32) and isinstance(q.shape[1], int)
            and _is_tile(ck) and ck <= MAX_QK_WIDTH and _is_tile(block_v) and c % block_v == 0
            and device_supported())


def _precision(dtype, interpret):
    """float32 products to within rounding on the GPU's tensor cores (three TF32 products each); half
    precision and the interpreter take the default."""
    if jnp.dtype(dtype) == jnp.float32 and not interpret:
        return lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return None


def _below(rows, n):
    """``(rows.size, 1)``: which of the slice ``rows`` lie below ``n``."""
    return (rows.start + jnp.arange(rows.size) < n)[:, None]


def _load(ref, rows, n, masked):
    """``ref[rows]``; rows at or past ``n`` read as zeros where ``masked`` (the last, partial block)."""
    if not masked:
        return ref[rows, :]
    return plgpu.load(ref.at[rows, :], mask=_below(rows, n), other=0.0)


def _kernel(q_ref, k_ref, v_ref, o_ref, *, n, block_q, block_k, precision):
    """One block of ``block_q`` queries against all ``n`` keys, ``block_k`` at a time, for ``o_ref``'s columns.

    The refs hold all ``N`` rows (padded only where ``N`` is below one tile): the last block of queries
    and of keys is read through a mask, and only the rows below ``n`` are written.
    """
    rows = pl.ds(pl.program_id(0) * block_q, block_q)
    q = _load(q_ref, rows, n, n % block_q != 0)

    def step(carry, start, masked):
        acc, m, total = carry
        keys = pl.ds(start, block_k)
        k, v = _load(k_ref, keys, n, masked), _load(v_ref, keys, n, masked)
        s = jnp.dot(q, k.T, precision=precision, preferred_element_type=jnp.float32) * math.log2(math.e)
        if masked:
            s = jnp.where(_below(keys, n).T, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp2(s - m_new[:, None])
        alpha = jnp.exp2(m - m_new)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, precision=precision,
                                             preferred_element_type=jnp.float32)
        return acc, m_new, total * alpha + jnp.sum(p, axis=-1)

    carry = (jnp.zeros((block_q, o_ref.shape[-1]), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    full = n // block_k
    carry = lax.fori_loop(0, full, lambda i, c: step(c, i * block_k, False), carry)
    if n % block_k:  # the last block of keys, not full: a loop of one step makes its start dynamic, as a
        # static slice past the ref's end fails Pallas' bounds check
        carry = lax.fori_loop(full, full + 1, lambda i, c: step(c, i * block_k, True), carry)
    acc, _, total = carry
    out = (acc / total[:, None]).astype(o_ref.dtype)
    if n % block_q:
        plgpu.store(o_ref.at[rows, :], out, mask=_below(rows, n))
    else:
        o_ref[rows, :] = out


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "block_v", "num_warps", "num_stages",
                                             "interpret"))
def position_attention_forward(q, k, v, block_q=None, block_k=None, block_v=None, num_warps=None,
                               num_stages=None, interpret=False):
    """``(B, N, C)`` from q, k ``(B, N, C')`` and v ``(B, N, C)``, with no copy of them and no padding
    (unless ``N`` is below one tile).

    Tile arguments left ``None`` take :func:`tiles_for` ``(q.dtype)``'s. Raises ``ValueError`` for
    tiles the kernel cannot use.
    """
    given = (block_q, block_k, block_v, num_warps, num_stages)
    block_q, block_k, block_v, num_warps, num_stages = (
        d if g is None else g for g, d in zip(given, tiles_for(q.dtype)))
    b, n, ck = q.shape
    c = v.shape[-1]
    block_v = min(block_v, c)
    for name, value in (("block_q", block_q), ("block_k", block_k), ("block_v", block_v), ("q's width", ck)):
        if not _is_tile(value):
            raise ValueError(f"`{name}` must be a power of two from 16 to 256, got {value}.")
    if c % block_v:
        raise ValueError(f"`block_v` must divide v's {c} columns (or be at least {c}), got {block_v}.")
    rows = max(n, block_q, block_k)  # fewer positions than one tile: padded (a few rows), as a slice needs
    if rows > n:
        q, k, v = (jnp.pad(t, ((0, 0), (0, rows - n), (0, 0))) for t in (q, k, v))
    params = {}
    if not interpret:
        params["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out = pl.pallas_call(
        functools.partial(_kernel, n=n, block_q=block_q, block_k=block_k,
                          precision=_precision(q.dtype, interpret)),
        grid=(-(-n // block_q), b, c // block_v),
        in_specs=[pl.BlockSpec((None, rows, ck), lambda i, j, h: (j, 0, 0)),
                  pl.BlockSpec((None, rows, ck), lambda i, j, h: (j, 0, 0)),
                  pl.BlockSpec((None, rows, block_v), lambda i, j, h: (j, 0, h))],
        out_specs=pl.BlockSpec((None, rows, block_v), lambda i, j, h: (j, 0, h)),
        out_shape=jax.ShapeDtypeStruct((b, rows, c), v.dtype),
        interpret=interpret,
        name="pam_forward",
        **params,
    )(q, k, v)
    return out if rows == n else out[:, :n]


def _kernel_forward(q, k, v):
    return position_attention_forward(q, k, v)  # the module's name, looked up at each call


def _interpreted_forward(q, k, v):
    return position_attention_forward(q, k, v, block_q=16, block_k=16, block_v=min(32, v.shape[-1]),
                                      interpret=True)


def position_attention(q, k, v, differentiable, interpret=False):
    """``(B, N, C)``: this kernel's output; gradients are ``differentiable(q, k, v)``'s
    (``_pam_xla.value_with_gradients``).

    ``interpret=True`` runs the kernel in Pallas' interpreter (any device; tests).
    """
    forward = _interpreted_forward if interpret else _kernel_forward
    return value_with_gradients(q, k, v, forward, differentiable)
