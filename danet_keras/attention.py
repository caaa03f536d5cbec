"""Position and channel attention (DANet, Fu et al., CVPR 2019) as Keras 3 layers.

The official code (``encoding/nn/da_att.py``) is reproduced exactly: bias on
PAM's projections, ``C // 8`` query/key channels, no ``1/sqrt(d)``, gammas
initialised to zero, and CAM's ``max(E) - E`` before the softmax.

PAM's attention core, on the official or the efficient path (``pam_path=``), is
in :mod:`danet_keras.pam`.
"""

from __future__ import annotations

import keras
from keras import ops

from ._checks import (channels_error, check_floating_policy, check_inputs, check_positive_int, check_shape,
                      standardize_data_format)
from .layers import Conv2d, backend_result_type, keep_frozen, row_max
from .pam import bmm as _bmm
from .pam import softmax as _softmax
from .pam import check_path, path_from_legacy, position_attention_efficient, position_attention_official, resolve_path

__all__ = [
    "PositionAttention",
    "ChannelAttention",
    "PAM_Module",
    "CAM_Module",
]


def _tokens(x, data_format):
    """``(B, H, W, C)`` or ``(B, C, H, W)`` -> ``(B, N, C)``."""
    if data_format == "channels_first":
        x = ops.transpose(x, (0, 2, 3, 1))
    h, w = x.shape[1], x.shape[2]
    # Static N stays static; JAX's symbolic sizes (exports) give a symbolic product, which JAX can check
    # (a -1 there asks it to prove a division it cannot); unknown sizes (TensorFlow graphs) give -1.
    n = h * w if h is not None and w is not None else -1
    return ops.reshape(x, (ops.shape(x)[0], n, x.shape[-1]))


def _pointwise(conv, tokens):
    """A 1 x 1 convolution on ``(B, N, C)`` tokens, as the product it is: ``tokens @ kernel + bias``.

    Keras' torch backend runs a channels-last convolution between copies to
    and from channels-first, and keeps its channels-first copy of the input
    for the backward pass; on tokens the product needs neither.
    """
    kernel = ops.reshape(conv.kernel, conv.kernel.shape[2:])  # (1, 1, C, O) -> (C, O)
    y = ops.einsum("bnc,co->bno", tokens, ops.cast(kernel, tokens.dtype))  # einsum: float64 stays float64
    return y + ops.cast(conv.bias, y.dtype)


def _untokens(t, like, data_format):
    """``(B, N, C)`` -> the layout and shape of ``like``."""
    if data_format == "channels_first":
        s = ops.shape(like)
        return ops.transpose(ops.reshape(t, (s[0], s[2], s[3], s[1])), (0, 3, 1, 2))
    return ops.reshape(t, ops.shape(like))


class _Attention(keras.layers.Layer):
    def __init__(self, data_format=None, **kwargs):
        super().__init__(**kwargs)
        check_floating_policy(self)
        self.data_format = standardize_data_format(data_format)
        self.in_channels = None

    def _check(self, shape):
        return check_shape(type(self).__name__, shape, self.data_format, self.in_channels)

    def _add_gamma(self):
        self.gamma = self.add_weight(name="gamma", shape=(1,), initializer="zeros", trainable=True)

    def _residual(self, out, inputs):
        """``gamma * out + inputs`` in float32 (float64 stays), returned in the compute dtype.

        Under mixed precision gamma's gradient, a sum over every element of
        ``out``, is then taken in float32: JAX sums the gradient of a
        bfloat16 product with respect to a broadcast scalar in bfloat16
        (off by 92% at 2 x 37 x 53 x 16).
        """
        dtype = backend_result_type(inputs.dtype)
        y = ops.cast(self.gamma, dtype) * ops.cast(out, dtype) + ops.cast(inputs, dtype)
        return ops.cast(y, self.compute_dtype)

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
    ``y = gamma * out + x`` with ``gamma`` ``(1,)`` initialised to zero
    (in float32 under mixed precision, so that gamma's gradient is summed in
    float32; the result in the compute dtype).

    Args:
        reduction: Query/key channels are ``C // reduction`` (8 upstream).
        pam_path: ``"auto"`` (default), ``"official"`` or ``"efficient"``.
            ``"official"`` is upstream's matmul + ``N x N`` softmax;
            ``"efficient"`` computes the same function, forward and
            backward, without the ``N x N`` matrix (see
            :mod:`danet_keras.pam`); ``"auto"`` is resolved once, here, to
            one of them (``"efficient"`` unless ``DANET_PAM_PATH`` says
            otherwise) and kept in ``resolved_pam_path``. Configs saved with
            the old ``fused=None/True/False`` load as ``"auto"``,
            ``"efficient"``, ``"official"``.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        **kwargs: Layer arguments (``name``, ``dtype``, ...).

    Shape:
        ``(B, H, W, C)`` -> ``(B, H, W, C)``; ``C // reduction >= 1``.
    """

    def __init__(self, reduction: int = 8, pam_path: str = "auto", data_format=None, **kwargs):
        pam_path = path_from_legacy(pam_path, kwargs, "pam_path")
        super().__init__(data_format=data_format, **kwargs)
        self.reduction = check_positive_int("reduction", reduction)
        self.pam_path = check_path(pam_path, "pam_path")
        self.resolved_pam_path = resolve_path(pam_path)

    def build(self, input_shape):
        c = self._check(input_shape)
        if c // self.reduction < 1:
            raise channels_error("PositionAttention", input_shape, self.data_format,
                                 f"too few for `reduction`={self.reduction} (query/key channels C // reduction "
                                 f"would be 0): use >= {self.reduction} channels or a smaller `reduction`.")
        self.in_channels = c
        conv = dict(kernel_size=1, data_format=self.data_format, dtype=self.dtype_policy)
        self.query_conv = Conv2d(c // self.reduction, name="query_conv", **conv)
        self.key_conv = Conv2d(c // self.reduction, name="key_conv", **conv)
        self.value_conv = Conv2d(c, name="value_conv", **conv)
        for layer in (self.query_conv, self.key_conv, self.value_conv):
            layer.build(input_shape)
        self._add_gamma()
        keep_frozen(self)

    def call(self, inputs):
        check_inputs(type(self).__name__, inputs, self.data_format, self.in_channels)
        x = _tokens(inputs, self.data_format)
        q, k, v = (_pointwise(conv, x) for conv in (self.query_conv, self.key_conv, self.value_conv))
        if self.resolved_pam_path == "official":
            out = position_attention_official(q, k, v)
        else:
            out = position_attention_efficient(q, k, v)
        return self._residual(_untokens(out, inputs, self.data_format), inputs)

    def get_config(self):
        config = super().get_config()
        config.update(reduction=self.reduction, pam_path=self.pam_path)
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
        check_inputs(type(self).__name__, inputs, self.data_format, self.in_channels)
        dtype = backend_result_type(inputs.dtype)
        x = ops.cast(inputs, dtype)
        xf = _tokens(x, self.data_format)  # (B, N, C)
        energy = _bmm(ops.transpose(xf, (0, 2, 1)), xf)  # (B, C, C)
        energy_new = row_max(energy) - energy
        attention = _softmax(energy_new, axis=-1)
        return self._residual(_untokens(_bmm(xf, ops.transpose(attention, (0, 2, 1))), x, self.data_format), x)

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
