"""The DANet head as Keras 3 layers: the dual-attention trunk and the three classifiers."""

from __future__ import annotations

import numbers

import keras

from ._checks import (channels_error, check_floating_policy, check_inputs, check_positive_int, check_shape,
                      standardize_data_format)
from .attention import ChannelAttention, PositionAttention
from .layers import BatchNorm, Conv2d, keep_frozen, layout_axes, sequential, with_channels
from .pam import check_path, path_from_legacy

__all__ = ["DualAttention", "DANetHead", "conv_bn_relu"]


def conv_bn_relu(filters: int, name: str, data_format: str, dtype) -> keras.Sequential:
    """``Sequential(Conv2d 3x3 pad 1 no bias, BatchNorm, ReLU)``, items named ``0``, ``1``, ``2``."""
    axis = layout_axes(data_format)[2]
    return sequential([
        Conv2d(filters, 3, padding=1, use_bias=False, data_format=data_format, dtype=dtype, name="0"),
        BatchNorm(axis=axis, dtype=dtype, name="1"),
        keras.layers.ReLU(dtype=dtype, name="2"),
    ], name, dtype)


@keras.saving.register_keras_serializable(package="danet")
class DualAttention(keras.layers.Layer):
    """DANet's attention trunk, a drop-in block (for example in a U-Net).

    ``conv5a -> PAM (sa) -> conv51`` plus ``conv5c -> CAM (sc) -> conv52``.
    With ``out_channels=None`` the output has the input's channels.

    Args:
        out_channels: Output channels (default: the input's ``C``).
        inter_channels: Channels inside the attention (default ``C // 4``, as
            the official head).
        reduction: PAM's query/key reduction (8).
        pam_path: PAM's path, ``"auto"``, ``"official"`` or ``"efficient"``
            (see :class:`~danet_keras.PositionAttention`).
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        **kwargs: Layer arguments (``name``, ``dtype``, ...).

    Shape:
        ``(B, H, W, C)`` -> ``(B, H, W, out_channels)``.
    """

    def __init__(self, out_channels: int | None = None, inter_channels: int | None = None, reduction: int = 8,
                 pam_path: str = "auto", data_format=None, **kwargs):
        pam_path = path_from_legacy(pam_path, kwargs, "pam_path")
        super().__init__(**kwargs)
        check_floating_policy(self)
        self.out_channels = None if out_channels is None else check_positive_int("out_channels", out_channels)
        self.inter_channels = (None if inter_channels is None
                               else check_positive_int("inter_channels", inter_channels))
        self.reduction = check_positive_int("reduction", reduction)
        if self.inter_channels is not None and self.inter_channels // self.reduction < 1:
            raise ValueError(f"`inter_channels`={self.inter_channels} is too few for `reduction`={self.reduction}; "
                             f"pass `inter_channels` >= {self.reduction} or `reduction` <= {self.inter_channels} "
                             f"(PAM's query/key channels are inter_channels // reduction).")
        self.pam_path = check_path(pam_path, "pam_path")
        self.data_format = standardize_data_format(data_format)
        self.in_channels = None

    def _check(self, shape):
        return check_shape(type(self).__name__, shape, self.data_format, self.in_channels)

    def _sizes(self, input_shape) -> tuple[int, int]:
        """``(inter, out)`` channels for ``input_shape`` (checked)."""
        c = self._check(input_shape)
        if self.inter_channels is not None:  # checked against `reduction` when constructed
            return self.inter_channels, (c if self.out_channels is None else self.out_channels)
        inter, r = c // 4, self.reduction
        if inter // r < 1:
            raise channels_error(type(self).__name__, input_shape, self.data_format,
                                 f"the default `inter_channels` = C // 4 = {inter} is too few for `reduction`={r}: "
                                 f"use inputs with >= {4 * r} channels, or pass `inter_channels` >= {r} or a "
                                 f"smaller `reduction`.")
        return inter, (c if self.out_channels is None else self.out_channels)

    def build(self, input_shape):
        c = self._check(input_shape)
        inter, out = self._sizes(input_shape)
        self.in_channels = c
        kw = dict(data_format=self.data_format, dtype=self.dtype_policy)
        self.conv5a = conv_bn_relu(inter, "conv5a", **kw)
        self.conv5c = conv_bn_relu(inter, "conv5c", **kw)
        self.sa = PositionAttention(self.reduction, pam_path=self.pam_path, name="sa", **kw)
        self.sc = ChannelAttention(name="sc", **kw)
        self.conv51 = conv_bn_relu(out, "conv51", **kw)
        self.conv52 = conv_bn_relu(out, "conv52", **kw)
        inter_shape = with_channels(input_shape, inter, self.data_format)
        for layer, shape in ((self.conv5a, input_shape), (self.conv5c, input_shape), (self.sa, inter_shape),
                             (self.sc, inter_shape), (self.conv51, inter_shape), (self.conv52, inter_shape)):
            layer.build(shape)
        keep_frozen(self)

    def branches(self, inputs, training=None):
        """``(sa_conv, sc_conv)``: the position and channel branches before the sum."""
        check_inputs(type(self).__name__, inputs, self.data_format, self.in_channels)
        sa_conv = self.conv51(self.sa(self.conv5a(inputs, training=training)), training=training)
        sc_conv = self.conv52(self.sc(self.conv5c(inputs, training=training)), training=training)
        return sa_conv, sc_conv

    forward_branches = branches  # the danet_torch name

    def call(self, inputs, training=None):
        sa_conv, sc_conv = self.branches(inputs, training=training)
        return sa_conv + sc_conv

    def compute_output_shape(self, input_shape):
        return with_channels(input_shape, self._sizes(input_shape)[1], self.data_format)

    def get_config(self):
        config = super().get_config()
        config.update(out_channels=self.out_channels, inter_channels=self.inter_channels,
                      reduction=self.reduction, pam_path=self.pam_path, data_format=self.data_format)
        return config


@keras.saving.register_keras_serializable(package="danet")
class DANetHead(DualAttention):
    """The official ``DANetHead``: variable paths read like upstream's state_dict keys.

    ``inter = C // 4`` (512 for ResNet's 2048); the trunk maps ``C -> inter``,
    then ``conv6``/``conv7``/``conv8`` = ``Sequential(SpatialDropout2D,
    Conv2d 1x1 with bias)``.

    Args:
        num_classes: Classes of the three classifiers.
        reduction: PAM's query/key reduction (8).
        dropout: ``SpatialDropout2D`` rate before each classifier (0.1).
        pam_path: PAM's path, ``"auto"``, ``"official"`` or ``"efficient"``
            (see :class:`~danet_keras.PositionAttention`).
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.

    Returns:
        ``(fused, pam, cam)`` logits, each ``(B, H, W, num_classes)``:
        ``conv8(sa_conv + sc_conv)``, ``conv6(sa_conv)``, ``conv7(sc_conv)``.
    """

    def __init__(self, num_classes: int, reduction: int = 8, dropout: float = 0.1, pam_path: str = "auto",
                 data_format=None, **kwargs):
        for name in ("inter_channels", "out_channels"):  # DualAttention's, fixed here: refused, not dropped
            value = kwargs.pop(name, None)
            if value is not None:
                raise TypeError(f"DANetHead takes no `{name}` (got {value!r}): its widths are the official head's, "
                                f"C // 4 (512 for ResNet's 2048); use DualAttention (and a classifier of your own) "
                                f"for other widths.")
        super().__init__(reduction=reduction, pam_path=pam_path, data_format=data_format, **kwargs)
        self.num_classes = check_positive_int("num_classes", num_classes)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be a number in [0, 1), got {dropout!r}.")
        self.dropout = float(dropout)

    def _sizes(self, input_shape) -> tuple[int, int]:
        inter = self._check(input_shape) // 4
        if inter // self.reduction < 1:
            raise channels_error("DANetHead", input_shape, self.data_format,
                                 f"too few for `reduction`={self.reduction}: inter = C // 4 = {inter} < reduction; "
                                 f"use >= {4 * self.reduction} channels or a smaller `reduction`.")
        return inter, inter

    def build(self, input_shape):
        super().build(input_shape)
        inter = self.in_channels // 4
        for name in ("conv6", "conv7", "conv8"):
            seq = sequential([
                keras.layers.SpatialDropout2D(self.dropout, data_format=self.data_format, dtype=self.dtype_policy, name="0"),
                Conv2d(self.num_classes, 1, data_format=self.data_format, dtype=self.dtype_policy, name="1"),
            ], name, self.dtype_policy)
            seq.build(with_channels(input_shape, inter, self.data_format))
            setattr(self, name, seq)
        keep_frozen(self)

    def call(self, inputs, training=None):
        sa_conv, sc_conv = self.branches(inputs, training=training)
        return (self.conv8(sa_conv + sc_conv, training=training), self.conv6(sa_conv, training=training),
                self.conv7(sc_conv, training=training))

    def compute_output_shape(self, input_shape):
        self._check(input_shape)
        shape = with_channels(input_shape, self.num_classes, self.data_format)
        return shape, shape, shape

    def get_config(self):
        config = super().get_config()
        for key in ("out_channels", "inter_channels"):
            config.pop(key)
        config.update(num_classes=self.num_classes, dropout=self.dropout)
        return config

    def attention_maps(self, features, points, size=None, training=False):
        """PAM rows of the query ``points``, CAM's matrix and the segmentation.

        Args:
            features: ``(B, h, w, C)`` backbone features (the layer's data format), concrete.
            points: ``(row, col)`` pixel pairs in the ``size`` frame.
            size: ``(H, W)`` of the image the features come from (default ``(h, w)``).
            training: Passed to the layers.

        Returns:
            :class:`~danet_keras.attention_maps.AttentionMaps`.
        """
        from .attention_maps import head_attention_maps

        return head_attention_maps(self, features, points, size=size, training=training)
