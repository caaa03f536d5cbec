"""PAM's float32 attention on a JAX GPU: XLA's products, each as three TF32 products on the tensor cores.

A float32 product to within rounding costs three TF32 products
(``a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi``, ``x_hi`` cut to TF32's 10
mantissa bits, ``x_lo = x - x_hi``): XLA's dot algorithm
``TF32_TF32_F32_X3``. On a Hopper GPU three of those take less time than one
product on the CUDA cores, which is what the official path's float32
products run on with TF32 off (``jax_default_matmul_precision="highest"``,
as parity runs ask).

* :func:`position_attention_forward`: the attention over blocks of queries
  (``lax.map``, one block live at a time), each the official computation
  (energies, softmax, product with V); its product with V optionally split
  along the keys into runs whose partial sums are added, as
  ``danet_torch.pam.position_attention_split_k`` does.
* :func:`position_attention`: that forward pass's value, and the gradients of
  the function it is given (``danet_keras.pam`` gives it the blocks).

:func:`available` says where: float32 inputs with a static ``N`` on a GPU
with TF32 (compute capability 8.0 or later).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .pam import _even_rows

__all__ = ["ELEMENTS", "SPLITS", "available", "precision", "position_attention", "position_attention_forward",
           "value_with_gradients"]

# Energies per block, B * rows * N (256 MiB in float32), and runs of keys per product with V: the fastest
# of those tried at 181 x 181, B = 2, C = 512 on an H200 (1024 queries per block, 8 runs: 53 ms against the
# official path's 61 ms, 1.3 GiB above the inputs against its 16 GiB: the output, a padded copy of V and
# about four of a block's tiles). Blocks of 256 queries took 66 ms and 464 MiB (docs/BENCHMARKS.md).
ELEMENTS, SPLITS = 1 << 26, 8


@functools.cache
def tf32_supported() -> bool:
    """True on a GPU with TF32 tensor cores (compute capability 8.0 or later)."""
    try:
        device = jax.devices()[0]
    except RuntimeError:  # pragma: no cover - no usable backend
        return False
    major = str(getattr(device, "compute_capability", "0")).split(".")[0]
    return device.platform == "gpu" and major.isdigit() and int(major) >= 8


def precision(dtype):
    """``TF32_TF32_F32_X3`` for float32 operands where :func:`tf32_supported`, else ``None`` (the default)."""
    if jnp.dtype(dtype) == jnp.float32 and tf32_supported():
        return lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return None


def available(q, v) -> bool:
    """True for float32 q and v with a static ``N`` where :func:`tf32_supported`."""
    return (jnp.dtype(q.dtype) == jnp.float32 and jnp.dtype(v.dtype) == jnp.float32
            and isinstance(q.shape[1], int) and tf32_supported())


def _default_rows(b: int, n: int) -> int:
    """Rows per block, ``b * rows * n <= ELEMENTS``, spread evenly over the blocks (the blocks' rule)."""
    return _even_rows(max(1, min(n, ELEMENTS // max(1, b * n))), n)


@functools.partial(jax.jit, static_argnames=("rows", "splits", "algorithm"))
def position_attention_forward(q, k, v, rows=None, splits=None, algorithm=None):
    """``(B, N, C)`` from q, k ``(B, N, C')`` and v ``(B, N, C)``, float32, with :func:`precision`'s products.

    Args:
        rows: Queries per block (default: ``B * rows * N <= ELEMENTS``, spread evenly; the last block is
            padded with zero rows).
        splits: Runs of keys per product with V (default :data:`SPLITS`); the keys are padded with zero
            rows of P and V up to ``splits`` equal runs.
        algorithm: The name of a ``jax.lax.DotAlgorithmPreset`` for the products, in place of
            :func:`precision`'s (benchmarks).
    """
    b, n, ck = q.shape
    c = v.shape[-1]
    rows = _default_rows(b, n) if rows is None else max(1, min(int(rows), n))
    splits = SPLITS if splits is None else max(1, min(int(splits), n))
    prec = precision(q.dtype) if algorithm is None else getattr(lax.DotAlgorithmPreset, algorithm)
    blocks = -(-n // rows)
    qb = jnp.pad(q, ((0, 0), (0, blocks * rows - n), (0, 0))).reshape(b, blocks, rows, ck).swapaxes(0, 1)
    run = -(-n // splits)
    vs = jnp.pad(v, ((0, 0), (0, splits * run - n), (0, 0))).reshape(b, splits, run, c)

    def step(x):
        p = jax.nn.softmax(jnp.einsum("brc,bnc->brn", x, k, precision=prec), axis=-1)  # (B, rows, N)
        if splits == 1:
            return jnp.einsum("brn,bnc->brc", p, v, precision=prec)
        p = jnp.pad(p, ((0, 0), (0, 0), (0, splits * run - n))).reshape(b, rows, splits, run)
        return jnp.einsum("brsn,bsnc->bsrc", p, vs, precision=prec).sum(axis=1)

    out = lax.map(step, qb)  # (blocks, B, rows, C)
    return out.swapaxes(0, 1).reshape(b, blocks * rows, c)[:, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def value_with_gradients(q, k, v, forward, differentiable):
    """``forward(q, k, v)`` called plainly; differentiated, ``differentiable(q, k, v)`` and its backward pass.

    ``forward`` and ``differentiable`` compute the same function: a forward-only kernel and one that
    autodiff (or its own custom gradient) can differentiate.
    """
    return forward(q, k, v)


def _forward(q, k, v, forward, differentiable):
    return jax.vjp(differentiable, q, k, v)  # (output, its backward: a pytree of arrays)


def _backward(forward, differentiable, backward, upstream):
    return backward(upstream)


value_with_gradients.defvjp(_forward, _backward)


def _blocks_forward(q, k, v):
    return position_attention_forward(q, k, v)  # the module's name, looked up at each call


def position_attention(q, k, v, differentiable):
    """``(B, N, C)``: :func:`position_attention_forward`'s value; gradients are ``differentiable(q, k, v)``'s."""
    return value_with_gradients(q, k, v, _blocks_forward, differentiable)
