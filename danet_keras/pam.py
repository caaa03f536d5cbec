"""PAM's attention core on every Keras backend: the official path and the efficient path.

``out = softmax(Q K^T) V`` (no ``1/sqrt(d)``, as upstream's
``encoding/nn/da_att.py``) over ``N = H * W`` positions, on tokens
``(B, N, C)``. The vocabulary and rules are those of :mod:`danet_torch.pam`:

* ``"official"``: matmul + ``N x N`` softmax, as upstream.
* ``"efficient"``: never builds the ``N x N`` matrix.

  - Blocks (any backend, any device), with a custom gradient: the forward
    pass runs over blocks of queries and keeps, per query row, only the
    log-sum-exp of its energies besides Q, K, V and the output (on
    TensorFlow not even that, below); the backward pass runs over blocks
    of keys, recomputes each block's attention ``P`` from them and
    computes ``dV = P^T dO``,
    ``dS = P * (dO V^T - rowsum(dO * O))``, ``dQ = dS K``, ``dK = dS^T Q``
    (flash attention's backward). TensorFlow runs every elementwise
    operation as a pass of its own over the tile, so its backward pass runs
    blocks of queries instead, whose attention is recomputed with the
    forward pass's softmax, one pass (no log-sum-exp kept), and, with
    oneDNN's CPU kernels, in float32 its ``-rowsum(dO * O)`` is subtracted
    by oneDNN's fused product (:func:`_fuses`, :func:`_product_less`). A
    block has ``B * rows * N <= BLOCK_ELEMENTS`` attention elements (the
    same rule and value as ``danet_torch``; TensorFlow's backward blocks up
    to 4x larger, ``TF_BACKWARD_BLOCK_ELEMENTS``, in at least
    ``TF_BACKWARD_MIN_BLOCKS``: its CPU products ran faster on them where
    measured), the rows spread evenly over the blocks
    (the last block is padded with zero rows, which cost as much as real
    ones). In float16/bfloat16, energies, softmax statistics and the sums
    over blocks are float32; the products with V and dO run in the input
    dtype. TensorFlow and JAX: ``keras.ops`` under
    ``keras.ops.custom_gradient`` (one forward pass; the backward pass's
    two forms, :func:`_key_blocks_backward` and
    :func:`_query_blocks_backward`), the blocks in a ``scan`` (one block
    live at a time, XLA and TensorFlow graphs included). Keras' torch backend:
    ``danet_torch``'s blocks (:func:`danet_torch.pam.position_attention_blocks`,
    the same math in a ``torch.autograd.Function`` that reuses its buffers
    in place, as ``keras.ops`` cannot, and on the CPU keeps exp's argument
    above ``-50``) on ``(B, C, N)`` views of the tokens, no copy.
  - float16/bfloat16 on a GPU, torch backend:
    ``keras.ops.dot_product_attention(scale=1)`` with V split into heads of
    q/k's width that share q and k (flash/cuDNN kernels need one head size).
  - JAX on a GPU: a forward pass that is not differentiated runs, in
    float32, blocks of queries whose products are XLA's, each as three TF32
    products (``_pam_xla``: float32 to within rounding, faster than one
    float32 product on the CUDA cores; GPUs with TF32, compute capability
    8.0 on), and in float16/bfloat16 one Pallas kernel (``_pam_pallas``:
    the energies computed twice for 512 channels, not eight times; on the
    GPUs and widths its tiles were checked on: compute capability 9.x/10.x,
    ``C' <= 64``); differentiated, the blocks. Not
    ``keras.ops.dot_product_attention``: where Keras 3.15 does not find
    cuDNN usable (with JAX 0.11 it does not) it runs XLA's attention, which
    builds the ``N x N`` matrix of every head
    (its backward asks for 64 GiB at 181 x 181, B = 2, bfloat16); and
    ``jax.nn.dot_product_attention(implementation="cudnn")`` in heads did
    not compile its backward at 33 x 35 (docs/BENCHMARKS.md).

* ``"auto"`` is resolved once, when a layer is constructed
  (:func:`resolve_path`): ``"efficient"`` unless the environment variable
  ``DANET_PAM_PATH`` (read once, at import) says ``official`` or
  ``efficient``; ``DANET_FUSED_ATTN=0`` is still read as ``official``.

A TensorFlow graph traced with unknown spatial sizes (exports, or ``fit`` on
inputs of changing size) runs the official computation; an unknown batch
size alone keeps the blocks, sized in the graph.
"""

from __future__ import annotations

import functools
import os
import warnings

import keras
from keras import ops

from ._checks import check_positive_int
from .layers import backend_result_type, row_max

__all__ = [
    "PAM_PATHS",
    "BLOCK_ELEMENTS",
    "TF_BACKWARD_BLOCK_ELEMENTS",
    "TF_BACKWARD_MIN_BLOCKS",
    "resolve_path",
    "check_path",
    "path_from_legacy",
    "block_rows",
    "bmm",
    "position_attention",
    "position_attention_official",
    "position_attention_efficient",
    "position_attention_blocks",
    "position_attention_kernel",
]

PAM_PATHS = ("auto", "official", "efficient")
# Attention elements per block of queries or keys, B * rows * N (16 MiB in
# float32); danet_torch.pam uses the same rule and value.
BLOCK_ELEMENTS = 1 << 22
# On TensorFlow, per block of queries of the backward pass (64 MiB in
# float32), in at least TF_BACKWARD_MIN_BLOCKS blocks: its oneDNN CPU
# products ran faster on larger tiles where measured, and at most a sixth of
# the queries per block keeps smaller maps in several blocks
# (docs/BENCHMARKS.md).
TF_BACKWARD_BLOCK_ELEMENTS = 1 << 24
TF_BACKWARD_MIN_BLOCKS = 6


def _env_path() -> str:
    value = os.environ.get("DANET_PAM_PATH", "").strip().lower()
    if not value and os.environ.get("DANET_FUSED_ATTN", "1").strip().lower() in ("0", "false", "no", "off"):
        return "official"
    return value or "auto"


# Read once, at import; "auto" layers resolve against it when constructed.
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


def path_from_legacy(path: str, kwargs: dict, name: str = "path") -> str:
    """Map an old config's ``fused`` (``True``/``False``/``None``) onto ``path``; pops it from ``kwargs``."""
    if "fused" not in kwargs:
        return path
    fused = kwargs.pop("fused")
    legacy = {None: "auto", True: "efficient", False: "official"}
    if fused not in legacy:
        raise ValueError(f"`fused` (the old name of `{name}`) must be None, True or False, got {fused!r}; "
                         f"pass `{name}` as one of {', '.join(map(repr, PAM_PATHS))}.")
    if path != "auto" and path != legacy[fused]:
        raise ValueError(f"Got both `{name}`={path!r} and the old `fused`={fused!r}; pass `{name}` only.")
    return legacy[fused]


def block_rows(batch, n, elements=None):
    """Rows (queries or keys) per block: ``batch * rows * n <= elements``, at least 1, at most ``n``.

    ``elements`` defaults to :data:`BLOCK_ELEMENTS`. Python ints give an int;
    scalar tensors (a TensorFlow graph with unknown sizes) give a scalar
    tensor.
    """
    elements = BLOCK_ELEMENTS if elements is None else elements
    if isinstance(batch, int) and isinstance(n, int):
        return max(1, min(n, elements // max(1, batch * n)))
    return ops.maximum(1, ops.minimum(n, elements // ops.maximum(1, batch * n)))


def _tf_backward_rows(batch, n):
    """Queries per block of TensorFlow's backward pass: ``B * rows * N`` at
    most :data:`TF_BACKWARD_BLOCK_ELEMENTS` and ``rows`` at most ``N /``
    :data:`TF_BACKWARD_MIN_BLOCKS`, but never fewer than :func:`block_rows`;
    spread evenly. At B = 1: 1536 (6 blocks) at ``N = 9216``, 1024 (4, the
    forward pass's rule) at ``N = 4096``, 1024 (16) at ``N = 16384``.
    """
    sixth = (n + TF_BACKWARD_MIN_BLOCKS - 1) // TF_BACKWARD_MIN_BLOCKS
    most, least = block_rows(batch, n, TF_BACKWARD_BLOCK_ELEMENTS), block_rows(batch, n)
    if isinstance(most, int) and isinstance(n, int):
        return _even_rows(max(least, min(most, sixth)), n)
    return _even_rows(ops.maximum(least, ops.minimum(most, sixth)), n)


def _even_rows(rows, n):
    """At most ``rows`` rows per block over as few blocks as ``rows`` allows, spread evenly.

    ``_split`` pads the last block with zero rows, and padded rows cost as
    much as real ones: ``N = 9216`` in blocks of 455 rows makes 21 blocks
    that hold 9555 rows (3.7% more work), in blocks of 439 rows 9219.
    """
    n = max(1, n) if isinstance(n, int) else ops.maximum(1, n)  # N = 0 keeps one row
    blocks = _count(n, rows)
    return (n + blocks - 1) // blocks


def _count(n, rows):
    """Blocks of ``rows`` that hold ``n`` rows, one at least: an empty map (N = 0) runs one block of padding,
    so that the blocks' outputs keep their rank (eager TensorFlow stacks zero blocks as a rank-1 tensor)."""
    blocks = (n + rows - 1) // rows
    return max(1, blocks) if isinstance(blocks, int) else ops.maximum(1, blocks)


def softmax(x, axis=-1):
    """``keras.ops.softmax`` without its warning for an axis of size 1: a 1x1 feature map (one position)
    or a one-channel CAM is a valid input, whose attention is 1."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are using a softmax over axis", category=UserWarning)
        return ops.softmax(x, axis=axis)


def bmm(a, b):
    """Batched ``a @ b``. float64 goes through ``einsum``: Keras 3.15's torch
    backend computes ``ops.matmul`` of float64 inputs in float32
    (``BIT64_TO_BIT32_DTYPE`` in its type promotion)."""
    if keras.backend.standardize_dtype(a.dtype) == "float64":
        return ops.einsum("bij,bjk->bik", a, b)
    return ops.matmul(a, b)


def position_attention_official(q, k, v):
    """Official PAM core: ``(B, N, C'), (B, N, C'), (B, N, C) -> (B, N, C)``, no scaling.

    The energy and softmax run in float32 (float64 stays), as the blocks' and
    CAM's do: unscaled energies of hundreds, rounded to bfloat16 (float16),
    move the attention's weights by tens of percent, and a half-precision
    model would disagree with its export (which takes this path). ``P V``
    and the result have ``v``'s dtype.
    """
    stat = backend_result_type(q.dtype)
    energy = bmm(ops.cast(q, stat), ops.transpose(ops.cast(k, stat), (0, 2, 1)))  # (B, N, N)
    attention = ops.cast(softmax(energy, axis=-1), v.dtype)
    return bmm(attention, v)


def _sizes(x):
    """``(B, N)`` of ``(B, N, C)``: ints where static, scalar tensors where not (TensorFlow graphs)."""
    shape = ops.shape(x)
    return tuple(x.shape[i] if isinstance(x.shape[i], int) else shape[i] for i in (0, 1))


def _split(x, blocks, rows):
    """``(B, N, C)`` -> ``(blocks, B, rows, C)``, zero rows appended up to ``blocks * rows``."""
    b, n = _sizes(x)
    pad = blocks * rows - n
    if not isinstance(pad, int) or pad:
        x = ops.concatenate([x, ops.zeros((b, pad, x.shape[-1]), x.dtype)], axis=1)
    return ops.transpose(ops.reshape(x, (b, blocks, rows, x.shape[-1])), (1, 0, 2, 3))


def _merge(x, n):
    """``(blocks, B, rows, C)`` -> ``(B, N, C)``, the appended rows dropped."""
    shape = ops.shape(x)
    x = ops.reshape(ops.transpose(x, (1, 0, 2, 3)), (shape[1], shape[0] * shape[2], x.shape[-1]))
    if isinstance(n, int) and x.shape[1] == n:
        return x
    x = x[:, :n]
    if isinstance(n, int) and x.shape[1] is None:  # a TensorFlow graph counts the blocks in a tensor: N is known
        x = ops.reshape(x, (shape[1], n, x.shape[-1]))  # (a loop that carries dQ needs N = 1 known as 1)
    return x


def _scan(step, carry, xs, ys_dtypes):
    """``keras.ops.scan(step, carry, xs)`` over the leading axis of the tensors in ``xs`` (a tuple).

    ``step(carry, x) -> (carry, ys)``, one block at a time. On TensorFlow a
    ``tf.while_loop`` with ``parallel_iterations=1`` (a graph would otherwise
    run up to 10 iterations at once, each with its own attention tiles) and a
    ``TensorArray`` per output (Keras 3.15's TensorFlow ``scan`` gives its
    outputs the carry's shapes and dtypes).
    """
    if keras.backend.backend() != "tensorflow":
        return ops.scan(step, carry, xs)
    import tensorflow as tf

    n = tf.shape(xs[0])[0]
    arrays = tuple(tf.TensorArray(dtype, size=n) for dtype in ys_dtypes)

    def body(i, carry, arrays):
        carry, ys = step(carry, tuple(x[i] for x in xs))
        return i + 1, carry, tuple(a.write(i, y) for a, y in zip(arrays, ys))

    _, carry, arrays = tf.while_loop(lambda i, *_: i < n, body, (0, carry, arrays), parallel_iterations=1)
    return carry, tuple(a.stack() for a in arrays)


def _keeps_lse() -> bool:
    """Whether the backward pass runs blocks of keys from the forward pass's log-sum-exp (everywhere but TensorFlow).

    TensorFlow's backward pass runs blocks of queries instead
    (:func:`_query_blocks_backward`), which recompute each block's
    attention with the softmax the forward pass used and need no
    statistics: there the forward pass is inference's, nothing more.
    """
    return keras.backend.backend() != "tensorflow"


def _blocks_forward(q, k, v, rows):
    """``(out (B, N, C), lse (B, N, 1) or None)``, one block of ``rows`` queries at a time.

    ``lse`` where the backward pass runs blocks of keys (:func:`_keeps_lse`).
    """
    b, n = _sizes(q)
    stat, dtype = backend_result_type(q.dtype), v.dtype
    ks = ops.cast(k, stat)
    keep = _keeps_lse()

    def step(carry, x):
        energy = ops.einsum("brc,bnc->brn", x[0], ks)  # (B, rows, N), float32 (float64 stays)
        p = softmax(energy, axis=-1)
        out = ops.cast(ops.einsum("brn,bnc->brc", ops.cast(p, dtype), v), dtype)
        if not keep:
            return carry, (out,)
        # log-sum-exp = max(E) + log(sum(exp(E - max))) = max(E) - log(max(P)): two reductions, no tile.
        return carry, (out, row_max(energy) - ops.log(row_max(p)))

    blocks = _count(n, rows)
    _, ys = _scan(step, ops.zeros((), stat), (_split(ops.cast(q, stat), blocks, rows),),
                  (dtype, stat) if keep else (dtype,))
    return _merge(ys[0], n), _merge(ys[1], n) if keep else None


def _fuses(dtype) -> bool:
    """Whether the blocks' backward pass subtracts ``rowsum(dO * O)`` inside its product (:func:`_product_less`).

    TensorFlow with its oneDNN CPU kernels (x86 builds, unless
    ``TF_ENABLE_ONEDNN_OPTS=0``), no GPU, float32 inputs: oneDNN's fused
    product takes float32 (not float64), and elsewhere the scaled form would
    cost a pass more than a subtraction.
    """
    if keras.backend.backend() != "tensorflow" or keras.backend.standardize_dtype(dtype) != "float32":
        return False
    import tensorflow as tf

    try:
        from tensorflow.python.util import _pywrap_util_port  # no public query for oneDNN's kernels

        onednn = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # pragma: no cover - other TensorFlow builds
        onednn = False
    return onednn and not tf.config.list_logical_devices("GPU")


def _product_less(a, b_half, c):
    """``a (2 b_half)^T - c`` as one TensorFlow product: ``(B, M, C), (B, L, C), (B, M, 1) -> (B, M, L)``.

    Grappler replaces ``BatchMatMulV2 -> Mul by a scalar -> AddV2`` on
    rank-4 tensors by oneDNN's ``_MklFusedBatchMatMulV2``, which scales and
    adds as it writes the product: the subtraction takes no pass of its own
    over the tile. The scalar is 2 against a halved ``b`` because Grappler
    removes a multiplication by 1 before it looks for that pattern; halving
    and doubling are exact in binary floating point (below ``2^-125``, where
    halving would round, TensorFlow's CPU kernels flush to zero anyway).
    """
    import tensorflow as tf

    product = tf.matmul(a[:, None], b_half[:, None], adjoint_b=True)  # (B, 1, M, L)
    return (product * tf.constant(2.0, product.dtype) + (-c)[:, None])[:, 0]


def _dout_and_delta(out, dout, dtype):
    """``dO`` in the inputs' ``dtype`` and ``rowsum(dO * O)`` ``(B, N, 1)`` in float32 (float64 stays)."""
    stat = backend_result_type(dtype)
    dout = ops.cast(dout, dtype)
    return dout, ops.sum(ops.cast(dout, stat) * ops.cast(out, stat), axis=-1, keepdims=True)


def _blocks_backward(q, k, v, out, lse, dout, rows):
    """``(dq, dk, dv)`` recomputed block by block: of ``rows`` queries on TensorFlow, of ``rows`` keys elsewhere."""
    if _keeps_lse():
        return _key_blocks_backward(q, k, v, out, lse, dout, rows)
    return _query_blocks_backward(q, k, v, out, dout, rows)


def _centred(k):
    """``K - mean K`` over the positions, in K's dtype: the keys ``dQ = dS K`` takes.

    Each row of ``dS`` sums to 0 (``P``'s rows sum to 1 and
    ``rowsum(dO * O)`` is their mean of ``dO V^T``), so the mean changes
    nothing but rounding. Without it, the rounding that leaves a row's sum
    off 0 (``O`` and ``dS`` in half precision) is multiplied by the keys'
    mean: keys near 2 with a spread of 0.07 put a bfloat16 query-conv
    gradient 31% off (normwise) where the official path is within its
    tolerance.
    """
    ks = ops.cast(k, backend_result_type(k.dtype))
    return ops.cast(ks - ops.mean(ks, axis=1, keepdims=True), k.dtype)


def _key_blocks_backward(q, k, v, out, lse, dout, rows):
    """``(dq, dk, dv)`` recomputed from ``(q, k, v, out, lse)``, one block of ``rows`` keys at a time.

    Blocks of keys make ``dV_j = P_j^T dO`` and ``dK_j = dS_j^T Q`` sums over
    all ``N`` queries (one large product each) and leave only the narrow
    ``dQ`` (``C'`` columns) to accumulate. ``P_j = exp(min(Q K_j^T - lse,
    0))``: the ``min`` keeps it at most 1 on the keys appended to fill the
    last block (zero rows of K and V, whose ``dK``/``dV`` rows are dropped
    and whose ``dS K`` is 0), where ``Q K_j^T - lse = -lse`` alone could
    overflow; on real keys it changes nothing but rounding. XLA fuses the
    subtraction, the ``min`` and ``exp`` into one pass. ``dQ`` takes the
    keys less their mean (:func:`_centred`), whose appended rows are 0 too.
    """
    b, n = _sizes(q)
    stat, dtype = backend_result_type(q.dtype), q.dtype
    dout, delta = _dout_and_delta(out, dout, dtype)
    qs = ops.cast(q, stat)
    blocks = _count(n, rows)
    xs = tuple(_split(t, blocks, rows) for t in (k, v, _centred(k)))  # (blocks, B, rows, C'), (..., C), (..., C')

    def step(dq, x):
        kb, vb, kc = x
        energy = ops.einsum("bnc,bjc->bnj", qs, ops.cast(kb, stat))  # (B, N, rows): Q K_j^T
        p = ops.exp(ops.minimum(energy - lse, 0.0))  # P_j
        dv = ops.einsum("bnj,bnc->bjc", ops.cast(p, dtype), dout)  # P^T dO
        dp = ops.cast(ops.einsum("bnc,bjc->bnj", dout, vb), stat) - delta
        ds = ops.cast(p * dp, dtype)  # P (dO V^T - delta)
        dk = ops.einsum("bnj,bnc->bjc", ds, q)  # dS^T Q
        return dq + ops.cast(ops.einsum("bnj,bjc->bnc", ds, kc), stat), (dk, dv)  # dQ += dS (K - mean K)

    dq, (dk, dv) = _scan(step, ops.zeros((b, n, q.shape[-1]), stat), xs, (k.dtype, v.dtype))
    return ops.cast(dq, q.dtype), _merge(dk, n), _merge(dv, n)


def _after(x, *tensors):
    """``x``, in a TensorFlow graph not before ``tensors`` are computed (elsewhere ``x`` as it is).

    TensorFlow's executor runs the operations that are ready in any order,
    on several threads: which tiles are alive together, and so the peak
    memory, changed from call to call until the order was fixed.
    """
    if keras.backend.backend() != "tensorflow":
        return x
    import tensorflow as tf

    with tf.control_dependencies(tensors):
        return tf.identity(x)


def _query_blocks_backward(q, k, v, out, dout, rows):
    """``(dq, dk, dv)`` recomputed from ``(q, k, v, out)``, one block of ``rows`` queries at a time (TensorFlow).

    Each block's attention ``P_i = softmax(Q_i K^T)`` is recomputed with the
    forward pass's own operation: a full row of keys needs no log-sum-exp,
    and TensorFlow's softmax (oneDNN's on the CPU) is one pass where
    ``exp(E - lse)`` costs two of TensorFlow's, which runs every
    elementwise operation as a pass of its own over the tile.
    ``dQ_i = dS_i (K - mean K)`` (:func:`_centred`) is the block's own; ``dV += P_i^T dO_i`` and
    ``dK += dS_i^T Q_i`` accumulate over the blocks. The queries appended to
    fill the last block (zero rows of Q and dO, ``rowsum(dO * O)`` 0) get
    ``dS = 0``: nothing reaches ``dK`` or ``dV``.

    ``dO_i V^T - rowsum(dO_i * O_i)``: where :func:`_fuses`, one product
    that subtracts as it writes (:func:`_product_less`, V halved).
    """
    n = _sizes(q)[1]
    stat, dtype = backend_result_type(q.dtype), q.dtype
    dout, delta = _dout_and_delta(out, dout, dtype)
    ks, kc = ops.cast(k, stat), _centred(k)
    fuse = _fuses(dtype)
    vs = v * 0.5 if fuse else v  # halved for _product_less
    blocks = _count(n, rows)
    xs = tuple(_split(t, blocks, rows) for t in (q, dout, delta))  # (blocks, B, rows, ...)

    def step(carry, x):
        dk, dv = carry
        qb, dob, db = x
        p = softmax(ops.einsum("brc,bnc->brn", ops.cast(qb, stat), ks), axis=-1)  # P_i (B, rows, N)
        dv = dv + ops.cast(ops.einsum("brn,brc->bnc", ops.cast(p, dtype), dob), stat)  # dV += P_i^T dO_i
        dob = _after(dob, dv)  # dP_i's tile once P_i^T dO_i is done: dS_i then overwrites P_i or dP_i
        if fuse:
            dp = _product_less(dob, vs, db)  # dO_i V^T - delta_i
        else:
            dp = ops.cast(ops.einsum("brc,bnc->brn", dob, vs), stat) - db
        ds = ops.cast(p * dp, dtype)  # dS_i = P_i (dO_i V^T - delta_i)
        dk = dk + ops.cast(ops.einsum("brn,brc->bnc", ds, qb), stat)  # dK += dS_i^T Q_i
        return (dk, dv), (ops.einsum("brn,bnc->brc", ds, kc),)  # dQ_i = dS_i (K - mean K)

    zeros = tuple(ops.zeros_like(t, dtype=stat) for t in (k, v))
    (dk, dv), (dq,) = _scan(step, zeros, xs, (q.dtype,))
    return _merge(dq, n), ops.cast(dk, k.dtype), ops.cast(dv, v.dtype)


def position_attention_blocks(q, k, v, rows=None, backward_rows=None):
    """The official function over blocks of ``rows`` queries; the backward pass over blocks of ``backward_rows``.

    Args:
        q, k: ``(B, N, C')``. v: ``(B, N, C)``.
        rows: Queries per block of the forward pass (default:
            :func:`block_rows` rows at most, spread evenly over the blocks,
            so that the last block is (nearly) full).
        backward_rows: Keys per block of the backward pass, queries on
            TensorFlow (default: ``rows`` where it is given, else the same
            rule; on TensorFlow :func:`_tf_backward_rows`). Keras' torch
            backend uses ``rows`` for both.

    Returns:
        ``(B, N, C)``.
    """
    b, n = _sizes(q)
    rows, backward_rows = (None if r is None else check_positive_int(name, r)
                           for name, r in (("rows", rows), ("backward_rows", backward_rows)))
    if isinstance(n, int):
        rows, backward_rows = (None if r is None else min(r, max(1, n)) for r in (rows, backward_rows))
    if backward_rows is None:
        if rows is not None:
            backward_rows = rows
        else:
            tensorflow = keras.backend.backend() == "tensorflow"
            backward_rows = _tf_backward_rows(b, n) if tensorflow else _even_rows(block_rows(b, n), n)
    if rows is None:
        rows = _even_rows(block_rows(b, n), n)
    if keras.backend.backend() == "torch":
        # Through keras.ops every step of every block would allocate a fresh (B, rows, N) tile and every dV/dK
        # sum a fresh (B, N, C) tensor (torch runs them eagerly, with no in-place form); glibc's heap, holding
        # those tiles between the blocks' small outputs, then grows resident memory far beyond one block.
        from danet_torch.pam import position_attention_blocks as blocks_channels_first

        q, k, v = (ops.convert_to_tensor(t).transpose(1, 2) for t in (q, k, v))
        return blocks_channels_first(q, k, v, rows).transpose(1, 2)
    if keras.backend.backend() == "jax" and isinstance(n, int):
        return _jax_blocks_jit()(q, k, v, rows, backward_rows)
    return _attend_blocks(q, k, v, rows, backward_rows)


@functools.cache
def _jax_blocks_jit():
    """:func:`_attend_blocks` under one ``jax.jit`` (the rows static), made once.

    Called eagerly, JAX would compile each operation of the blocks (the
    split, the scan, the merge) on its own for every new shape; compiled
    whole it is one compilation per shape. Inside a traced function (``fit``,
    ``predict``, ``jax.grad``) the ``jit`` is inlined and changes nothing.
    """
    import jax

    return jax.jit(_attend_blocks, static_argnums=(3, 4))


def _attend_blocks(q, k, v, rows, backward_rows):
    """The blocks' forward under ``keras.ops.custom_gradient``, the backward from the saved statistics."""

    @ops.custom_gradient
    def attend(q, k, v):
        out, lse = _blocks_forward(q, k, v, rows)
        saved = ops.stop_gradient(out)  # torch backend: no reference cycle through the output

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return _blocks_backward(q, k, v, saved, lse, upstream, backward_rows)

        return out, grad

    return attend(q, k, v)


def position_attention_kernel(q, k, v):
    """The same function with ``keras.ops.dot_product_attention(scale=1)``.

    V ``(B, N, C)`` is split into ``C // C'`` heads of width ``C'`` that all
    use the same q and k; requires ``C % C' == 0``.
    """
    cq, c = q.shape[-1], v.shape[-1]
    heads = c // cq
    shape = ops.shape(v)
    vh = ops.reshape(v, (shape[0], shape[1], heads, cq))
    qh = ops.repeat(ops.expand_dims(q, 2), heads, axis=2)
    kh = ops.repeat(ops.expand_dims(k, 2), heads, axis=2)
    out = ops.dot_product_attention(qh, kh, vh, scale=1.0)
    return ops.reshape(out, shape)


def _gpu_available() -> bool:
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            return jax.devices()[0].platform == "gpu"
        if backend == "torch":
            import torch

            return torch.cuda.is_available()
    except Exception:  # pragma: no cover - device query failures mean "no GPU"
        return False
    return False


def position_attention_efficient(q, k, v):
    """The efficient path: on a GPU the kernels, else blocks.

    JAX on a GPU: XLA's float32 blocks (``_pam_xla.available``) or the
    Pallas kernel (``_pam_pallas.available``) give the value of a pass that
    is not differentiated and the blocks give gradients; elsewhere the
    blocks do both. Keras' torch
    backend on a GPU in half precision: ``keras.ops.dot_product_attention``
    in heads.

    A TensorFlow graph traced with unknown spatial sizes (``N`` is ``None``:
    exports such as SavedModel and ONNX, or ``fit`` on inputs of changing
    size) runs the official computation, as ``danet_torch`` does while
    exporting: the graph then holds plain matmuls and a softmax that run at
    any size. An unknown batch size alone keeps the blocks.
    """
    if _gpu_available():
        if keras.backend.backend() == "jax":
            from . import _pam_pallas, _pam_xla

            if _pam_xla.available(q, v):  # float32: XLA's blocks' value, the blocks' gradients
                return _pam_xla.position_attention(q, k, v, position_attention_blocks)
            if _pam_pallas.available(q, v):  # the kernel's value, the blocks' gradients
                return _pam_pallas.position_attention(q, k, v, position_attention_blocks)
        elif keras.backend.standardize_dtype(q.dtype) in ("float16", "bfloat16") and v.shape[-1] % q.shape[-1] == 0:
            return position_attention_kernel(q, k, v)
    if not isinstance(q.shape[1], int):
        return position_attention_official(q, k, v)
    return position_attention_blocks(q, k, v)


def position_attention(q, k, v, path: str = "efficient"):
    """``(B, N, C'), (B, N, C'), (B, N, C) -> (B, N, C)`` on ``path`` (``"auto"`` is resolved here)."""
    if resolve_path(path) == "official":
        return position_attention_official(q, k, v)
    return position_attention_efficient(q, k, v)
