"""PAM's forward pass as one Pallas kernel (JAX on a GPU, float16/bfloat16).

``out = softmax(Q K^T) V`` with no ``1/sqrt(d)``: q and k are ``C'`` wide (64
for 512 channels) and v is ``C`` wide (512), a shape flash-attention kernels
do not take (they need one head size, so V would be split into ``C // C'``
heads that recompute the same energies and exponentials each). This kernel
streams blocks of keys past a block of queries as flash attention does
(online softmax, float32 statistics and accumulator) and splits only the
``C`` columns of V over programs, ``BLOCK_V`` at a time: the energies are
recomputed ``C // BLOCK_V`` times (two for 512 channels), not ``C // C'``
times.

:func:`position_attention` is a ``jax.custom_vjp``: called plainly (``predict``,
a jitted forward) it runs this kernel; differentiated (``fit``, ``jax.grad``)
it runs the function it is given and that function's own backward pass
(``keras.ops.dot_product_attention`` in heads, whose cuDNN backward is fused).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["available", "position_attention", "position_attention_forward"]

# Tile sizes: queries per program, keys per step, V columns per program, warps, pipeline stages
# (the fastest of those tried at 181 x 181, B = 2, C = 512 on one H200: 6.9 ms; docs/BENCHMARKS.md).
BLOCK_Q, BLOCK_K, BLOCK_V, NUM_WARPS, NUM_STAGES = 128, 128, 256, 8, 2


def available(q, v) -> bool:
    """True where the kernel takes the inputs: half precision, a static ``N``, ``C'`` a power of two in
    [16, 256], ``C`` a multiple of ``BLOCK_V`` or below it (the caller checks for a GPU)."""
    ck, c = q.shape[-1], v.shape[-1]
    return (jnp.dtype(q.dtype) in (jnp.float16, jnp.bfloat16) and isinstance(q.shape[1], int)
            and 16 <= ck <= 256 and ck & (ck - 1) == 0 and c % min(BLOCK_V, c) == 0)


def _kernel(q_ref, k_ref, v_ref, o_ref, *, n, block_k):
    q = q_ref[...]
    block_q = q.shape[0]

    def body(i, carry):
        acc, m, total = carry
        keys = pl.dslice(i * block_k, block_k)
        s = jnp.dot(q, k_ref[keys, :].T, preferred_element_type=jnp.float32) * math.log2(math.e)
        cols = i * block_k + jnp.arange(block_k)
        s = jnp.where(cols[None, :] < n, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp2(s - m_new[:, None])
        alpha = jnp.exp2(m - m_new)
        v = v_ref[keys, :]
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, total * alpha + jnp.sum(p, axis=-1)

    init = (jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, _, total = lax.fori_loop(0, k_ref.shape[0] // block_k, body, init)
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "block_v", "num_warps", "num_stages",
                                             "interpret"))
def position_attention_forward(q, k, v, block_q=BLOCK_Q, block_k=BLOCK_K, block_v=BLOCK_V, num_warps=NUM_WARPS,
                               num_stages=NUM_STAGES, interpret=False):
    """``(B, N, C)`` from q, k ``(B, N, C')`` and v ``(B, N, C)``; ``N`` is padded to whole tiles inside."""
    b, n, ck = q.shape
    c = v.shape[-1]
    block_v = min(block_v, c)
    step = max(block_q, block_k)
    padded = -(-n // step) * step
    if padded != n:
        q, k, v = (jnp.pad(t, ((0, 0), (0, padded - n), (0, 0))) for t in (q, k, v))
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out = pl.pallas_call(
        functools.partial(_kernel, n=n, block_k=block_k),
        grid=(padded // block_q, b, c // block_v),
        in_specs=[pl.BlockSpec((None, block_q, ck), lambda i, j, h: (j, i, 0)),
                  pl.BlockSpec((None, padded, ck), lambda i, j, h: (j, 0, 0)),
                  pl.BlockSpec((None, padded, block_v), lambda i, j, h: (j, 0, h))],
        out_specs=pl.BlockSpec((None, block_q, block_v), lambda i, j, h: (j, i, h)),
        out_shape=jax.ShapeDtypeStruct((b, padded, c), v.dtype),
        interpret=interpret,
        name="pam_forward",
        **params,
    )(q, k, v)
    return out[:, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def position_attention(q, k, v, differentiable, interpret=False):
    """``(B, N, C)``: this kernel's output; gradients are ``differentiable(q, k, v)``'s.

    ``interpret=True`` runs the kernel in Pallas' interpreter (any device; tests).
    """
    if interpret:
        return position_attention_forward(q, k, v, block_q=16, block_k=16, block_v=min(32, v.shape[-1]),
                                          interpret=True)
    return position_attention_forward(q, k, v)


def _forward(q, k, v, differentiable, interpret):
    return jax.vjp(differentiable, q, k, v)  # (output, its backward: a pytree of arrays)


def _backward(differentiable, interpret, backward, upstream):
    return backward(upstream)


position_attention.defvjp(_forward, _backward)
