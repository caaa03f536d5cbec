"""Position and channel attention (DANet, Fu et al., CVPR 2019) as Keras 3 layers.

The official code (``encoding/nn/da_att.py``) is reproduced exactly: bias on
PAM's projections, ``C // 8`` query/key channels, no ``1/sqrt(d)``, gammas
initialised to zero, and CAM's ``max(E) - E`` before the softmax.

PAM has two paths computing the same function (``fused`` mirrors
``danet_torch``): the official one builds the ``N x N`` energy
(``N = H * W``); the efficient one never holds it:

* blocks of query rows, each ``(B, rows, N)`` (any backend, static ``N``);
* in float16/bfloat16 on a GPU (JAX, torch backends),
  ``keras.ops.dot_product_attention`` with V split into heads of q/k's width
  that share q and k (flash/cuDNN kernels need one head size).

The efficient path needs a static ``H * W`` at trace time (always so on JAX
and torch); with ``None`` spatial sizes in a TensorFlow graph it falls back
to the official path. ``DANET_FUSED_ATTN=0`` turns automatic selection off.
"""

from __future__ import annotations

import keras
from keras import ops

from ._checks import check_fused, check_positive_int, check_shape, env_allows_fused, standardize_data_format
from .layers import Conv2d, backend_result_type

__all__ = [
    "PositionAttention",
    "ChannelAttention",
    "PAM_Module",
    "CAM_Module",
    "position_attention_plain",
    "position_attention_blocked",
    "position_attention_split_heads",
]

# Energies per block on the blocked path: (rows, N) with rows * N <= this.
BLOCK_ELEMENTS = 1 << 23
# Below this many positions the N x N matrix is small and the official path wins.
MIN_FUSED_POSITIONS = 1024


def _bmm(a, b):
    """Batched ``a @ b``. float64 goes through ``einsum``: Keras 3.15's torch
    backend computes ``ops.matmul`` of float64 inputs in float32
    (``BIT64_TO_BIT32_DTYPE`` in its type promotion)."""
    if keras.backend.standardize_dtype(a.dtype) == "float64":
        return ops.einsum("bij,bjk->bik", a, b)
    return ops.matmul(a, b)


def _softmax(energy):
    """Softmax over the last axis in float32 (float64 stays), result in ``energy``'s dtype."""
    dtype = backend_result_type(energy.dtype)
    return ops.cast(ops.softmax(ops.cast(energy, dtype), axis=-1), energy.dtype)


def position_attention_plain(q, k, v):
    """Official PAM core: ``(B, N, C'), (B, N, C'), (B, N, C) -> (B, N, C)``, no scaling."""
    attention = _softmax(_bmm(q, ops.transpose(k, (0, 2, 1))))  # (B, N, N)
    return _bmm(attention, v)


def position_attention_blocked(q, k, v, block_rows: int):
    """The same function over blocks of ``block_rows`` queries (static ``N``)."""
    n = q.shape[1]
    kt = ops.transpose(k, (0, 2, 1))
    outs = [_bmm(_softmax(_bmm(q[:, i:i + block_rows], kt)), v) for i in range(0, n, block_rows)]
    return outs[0] if len(outs) == 1 else ops.concatenate(outs, axis=1)


def position_attention_split_heads(q, k, v):
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


def _tokens(x, data_format):
    """``(B, H, W, C)`` or ``(B, C, H, W)`` -> ``(B, N, C)``."""
    if data_format == "channels_first":
        x = ops.transpose(x, (0, 2, 3, 1))
    shape = ops.shape(x)
    return ops.reshape(x, (shape[0], -1, x.shape[-1]))


def _untokens(t, like, data_format):
    """``(B, N, C)`` -> the layout and shape of ``like``."""
    if data_format == "channels_first":
        s = ops.shape(like)
        return ops.transpose(ops.reshape(t, (s[0], s[2], s[3], s[1])), (0, 3, 1, 2))
    return ops.reshape(t, ops.shape(like))


class _Attention(keras.layers.Layer):
    def __init__(self, data_format=None, **kwargs):
        super().__init__(**kwargs)
        self.data_format = standardize_data_format(data_format)
        self.in_channels = None

    def _check(self, shape):
        return check_shape(type(self).__name__, shape, self.data_format, self.in_channels)

    def _add_gamma(self):
        self.gamma = self.add_weight(name="gamma", shape=(1,), initializer="zeros", trainable=True)

    def compute_output_shape(self, input_shape):
        self._check(input_shape)
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(data_format=self.data_format)
        return config


@keras.saving.register_keras_serializable(package="danet")
class PositionAttention(_Attention):
    """Position attention module (PAM), the official ``PAM_Module``.

    ``energy = Q K^T`` over all ``N = H * W`` positions (no ``1/sqrt(d)``),
    ``attention = softmax(energy, -1)``, ``out = attention V``,
    ``y = gamma * out + x`` with ``gamma`` ``(1,)`` initialised to zero.

    Args:
        reduction: Query/key channels are ``C // reduction`` (8 upstream).
        fused: ``None`` (automatic: efficient for ``N >= 1024`` when ``N`` is
            static), ``True`` (efficient whenever ``N`` is static) or
            ``False`` (the official matmul + softmax path).
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        **kwargs: Layer arguments (``name``, ``dtype``, ...).

    Shape:
        ``(B, H, W, C)`` -> ``(B, H, W, C)``; ``C // reduction >= 1``.
    """

    def __init__(self, reduction: int = 8, fused: bool | None = None, data_format=None, **kwargs):
        super().__init__(data_format=data_format, **kwargs)
        self.reduction = check_positive_int("reduction", reduction)
        self.fused = check_fused(fused)

    def build(self, input_shape):
        c = self._check(input_shape)
        if c // self.reduction < 1:
            raise ValueError(
                f"PositionAttention: `inputs` has {c} channels, too few for `reduction`={self.reduction} "
                f"(query/key channels C // reduction would be 0); use >= {self.reduction} channels.")
        self.in_channels = c
        conv = dict(kernel_size=1, data_format=self.data_format, dtype=self.dtype_policy)
        self.query_conv = Conv2d(c // self.reduction, name="query_conv", **conv)
        self.key_conv = Conv2d(c // self.reduction, name="key_conv", **conv)
        self.value_conv = Conv2d(c, name="value_conv", **conv)
        for layer in (self.query_conv, self.key_conv, self.value_conv):
            layer.build(input_shape)
        self._add_gamma()

    def select_path(self, q, v) -> str:
        n = q.shape[1]
        if self.fused is False or not isinstance(n, int):
            return "plain"
        if self.fused is None and (n < MIN_FUSED_POSITIONS or not env_allows_fused()):
            return "plain"
        half = keras.backend.standardize_dtype(q.dtype) in ("float16", "bfloat16")
        if half and v.shape[-1] % q.shape[-1] == 0 and _gpu_available():
            return "split_heads"
        return "blocked"

    def call(self, inputs):
        self._check(inputs.shape)
        q = _tokens(self.query_conv(inputs), self.data_format)
        k = _tokens(self.key_conv(inputs), self.data_format)
        v = _tokens(self.value_conv(inputs), self.data_format)
        path = self.select_path(q, v)
        if path == "split_heads":
            out = position_attention_split_heads(q, k, v)
        elif path == "blocked":
            out = position_attention_blocked(q, k, v, max(1, BLOCK_ELEMENTS // q.shape[1]))
        else:
            out = position_attention_plain(q, k, v)
        out = _untokens(out, inputs, self.data_format)
        return ops.cast(self.gamma, out.dtype) * out + inputs

    def get_config(self):
        config = super().get_config()
        config.update(reduction=self.reduction, fused=self.fused)
        return config

    def attention_rows(self, x, points):
        """PAM's softmax rows for the query ``points`` only, never the ``N x N`` matrix.

        Args:
            x: This layer's input, ``(B, H, W, C)`` (``(B, C, H, W)`` for channels_first).
            points: ``(row, col)`` integer pairs on x's ``H x W`` grid.

        Returns:
            ``(B, P, H, W)`` in either data format: how much every position
            contributes to each query. Path-independent (see
            :mod:`danet_keras.attention_maps`).
        """
        from .attention_maps import position_attention_rows

        return position_attention_rows(self, x, points)


@keras.saving.register_keras_serializable(package="danet")
class ChannelAttention(_Attention):
    """Channel attention module (CAM), the official ``CAM_Module``.

    ``energy = X^T X`` (``C x C``, ``X`` is ``N x C``),
    ``energy_new = max(energy, -1) - energy``,
    ``attention = softmax(energy_new, -1)``, ``y = gamma * (X attention^T) + x``.

    Softmax is shift-invariant, so ``softmax(max(E) - E) == softmax(-E)``:
    the module gives *more* weight to *less* similar channels. This is what the
    official code and the released weights do (upstream issues 9, 15, 48, 106);
    it is kept on purpose, not "fixed".

    The energy, a sum of ``N`` products that passes float16's 65504 easily, is
    computed in float32 under mixed precision; the result is cast to the
    compute dtype.

    Args:
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        **kwargs: Layer arguments.

    Shape:
        ``(B, H, W, C)`` -> ``(B, H, W, C)``.
    """

    def build(self, input_shape):
        self.in_channels = self._check(input_shape)
        self._add_gamma()

    def call(self, inputs):
        self._check(inputs.shape)
        dtype = backend_result_type(inputs.dtype)
        x = ops.cast(inputs, dtype)
        xf = _tokens(x, self.data_format)  # (B, N, C)
        energy = _bmm(ops.transpose(xf, (0, 2, 1)), xf)  # (B, C, C)
        energy_new = ops.max(energy, axis=-1, keepdims=True) - energy
        attention = ops.softmax(energy_new, axis=-1)
        out = _untokens(_bmm(xf, ops.transpose(attention, (0, 2, 1))), x, self.data_format)
        y = ops.cast(self.gamma, dtype) * out + x
        return ops.cast(y, self.compute_dtype)

    def attention_matrix(self, x):
        """CAM's attention ``softmax(max(E) - E)``: ``(B, C, C)`` for ``x`` in the layer's data format.

        Less similar channels get more weight (the official max-subtraction);
        see :mod:`danet_keras.attention_maps`.
        """
        from .attention_maps import channel_attention_matrix

        return channel_attention_matrix(self, x)


# Official names, so code ported from upstream keeps working.
PAM_Module = PositionAttention
CAM_Module = ChannelAttention
