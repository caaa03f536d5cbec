"""Dilated ResNet-50/101 as Keras 3 layers, the DANet backbone (paths mirror torch's keys, no ``fc``)."""

from __future__ import annotations

from typing import Sequence

import keras

from weights_convert.arch import check_flag, check_multi_grid, layer_dilations

from ._checks import check_floating_policy, check_inputs, check_positive_int, check_shape, standardize_data_format
from .layers import BatchNorm, Conv2d, MaxPool2d, keep_frozen, layout_axes, sequential, with_channels

__all__ = ["Bottleneck", "DilatedResNet", "resnet50", "resnet101", "layer_dilations", "DEPTHS"]

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


@keras.saving.register_keras_serializable(package="danet")
class Bottleneck(keras.layers.Layer):
    """ResNet bottleneck (expansion 4), stride and dilation on ``conv2`` (ResNet v1.5).

    Args:
        planes: Width of the 3x3 conv; the output has ``4 * planes`` channels.
        stride: Stride of ``conv2`` (and of ``downsample``).
        dilation: Dilation (and padding) of ``conv2``.
        downsample: Build ``downsample`` = ``Sequential(Conv2d 1x1 stride, BatchNorm)``.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.

    Shape:
        ``(B, H, W, C)`` -> ``(B, H', W', 4 * planes)``, ``H' = (H - 1) // stride + 1``.
    """

    expansion = 4

    def __init__(self, planes: int, stride: int = 1, dilation: int = 1, downsample: bool = False,
                 data_format=None, **kwargs):
        super().__init__(**kwargs)
        check_floating_policy(self)
        self.planes = check_positive_int("planes", planes)
        self.stride = check_positive_int("stride", stride)
        self.dilation = check_positive_int("dilation", dilation)
        self.has_downsample = bool(downsample)
        self.data_format = standardize_data_format(data_format)
        self.in_channels = None

    def build(self, input_shape):
        self.in_channels = check_shape("Bottleneck", input_shape, self.data_format)
        p, axis = self.planes, layout_axes(self.data_format)[2]
        kw = dict(data_format=self.data_format, dtype=self.dtype_policy, use_bias=False)
        bn = dict(axis=axis, dtype=self.dtype_policy)
        self.conv1 = Conv2d(p, 1, name="conv1", **kw)
        self.bn1 = BatchNorm(name="bn1", **bn)
        self.conv2 = Conv2d(p, 3, strides=self.stride, padding=self.dilation, dilation_rate=self.dilation,
                            name="conv2", **kw)
        self.bn2 = BatchNorm(name="bn2", **bn)
        self.conv3 = Conv2d(4 * p, 1, name="conv3", **kw)
        self.bn3 = BatchNorm(name="bn3", **bn)
        self.relu = keras.layers.ReLU(dtype=self.dtype_policy, name="relu")
        self.downsample = None
        if self.has_downsample:
            self.downsample = sequential([Conv2d(4 * p, 1, strides=self.stride, name="0", **kw),
                                          BatchNorm(name="1", **bn)], "downsample", self.dtype_policy)
            self.downsample.build(input_shape)
        shape = input_shape
        for conv, norm in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            norm.build(shape)
        keep_frozen(self)

    def call(self, inputs, training=None):
        check_inputs("Bottleneck", inputs, self.data_format, self.in_channels)
        identity = inputs if self.downsample is None else self.downsample(inputs, training=training)
        out = self.relu(self.bn1(self.conv1(inputs), training=training))
        out = self.relu(self.bn2(self.conv2(out), training=training))
        out = self.bn3(self.conv3(out), training=training)
        return self.relu(out + identity)

    def compute_output_shape(self, input_shape):
        shape = list(with_channels(input_shape, 4 * self.planes, self.data_format))
        for ax in layout_axes(self.data_format)[:2]:
            if shape[ax] is not None:
                shape[ax] = (shape[ax] - 1) // self.stride + 1
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update(planes=self.planes, stride=self.stride, dilation=self.dilation,
                      downsample=self.has_downsample, data_format=self.data_format)
        return config


@keras.saving.register_keras_serializable(package="danet")
class DilatedResNet(keras.layers.Layer):
    """Dilated ResNet (Bottleneck), the official ``encoding`` backbone without ``fc``.

    Args:
        depth: 50 or 101.
        output_stride: 8 (DANet), 16 or 32.
        deep_stem: Three 3x3 convs (64, 64, 128) as ``conv1`` (a 7-item
            Sequential) instead of one 7x7 conv.
        multi_grid: Dilations of the layer4 blocks, or ``None``.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        in_channels: Input channels (3: RGB; 1 for MRI, 4 for RGB + another band, ...).

    Shape:
        ``(B, H, W, in_channels)`` -> ``(c1, c2, c3, c4)`` with 256, 512, 1024, 2048 channels.
    """

    def __init__(self, depth: int = 101, output_stride: int = 8, deep_stem: bool = False,
                 multi_grid: Sequence[int] | None = None, data_format=None, in_channels: int = 3, **kwargs):
        super().__init__(**kwargs)
        check_floating_policy(self)
        if depth not in DEPTHS:
            raise ValueError(f"`depth` must be one of {sorted(DEPTHS)}, got {depth!r}.")
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.depth, self.output_stride = depth, output_stride
        self.deep_stem, self.multi_grid = check_flag("deep_stem", deep_stem), check_multi_grid(multi_grid)
        stages = layer_dilations(DEPTHS[depth], output_stride, self.multi_grid)
        self._stages = tuple((s, tuple(d)) for s, d in stages)
        self.data_format = standardize_data_format(data_format)

    def build(self, input_shape):
        check_shape("DilatedResNet", input_shape, self.data_format, self.in_channels)
        df, dt, axis = self.data_format, self.dtype_policy, layout_axes(self.data_format)[2]

        def conv(filters, k, name, stride=1, pad=0):
            return Conv2d(filters, k, strides=stride, padding=pad, use_bias=False, data_format=df, dtype=dt,
                          name=name)

        def bn(name):
            return BatchNorm(axis=axis, dtype=dt, name=name)

        def relu(name):
            return keras.layers.ReLU(dtype=dt, name=name)

        if self.deep_stem:
            self.conv1 = sequential([conv(64, 3, "0", 2, 1), bn("1"), relu("2"), conv(64, 3, "3", 1, 1),
                                     bn("4"), relu("5"), conv(128, 3, "6", 1, 1)], "conv1", dt)
            inplanes = 128
        else:
            self.conv1 = conv(64, 7, "conv1", 2, 3)
            inplanes = 64
        self.bn1 = bn("bn1")
        self.relu = relu("relu")
        self.maxpool = MaxPool2d(3, 2, 1, data_format=df, dtype=dt, name="maxpool")
        self.conv1.build(input_shape)
        shape = self.conv1.compute_output_shape(input_shape)
        self.bn1.build(shape)
        shape = self.maxpool.compute_output_shape(shape)
        for i, (planes, (stride, dilations)) in enumerate(zip((64, 128, 256, 512), self._stages), start=1):
            blocks = []
            for j, d in enumerate(dilations):
                first = j == 0
                blocks.append(Bottleneck(planes, stride if first else 1, d,
                                         downsample=first and (stride != 1 or inplanes != planes * 4),
                                         data_format=df, dtype=dt, name=str(j)))
                inplanes = planes * 4
            layer = sequential(blocks, f"layer{i}", dt)
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
            setattr(self, f"layer{i}", layer)
        keep_frozen(self)

    def call(self, inputs, training=None):
        check_inputs("DilatedResNet", inputs, self.data_format, self.in_channels)
        x = self.conv1(inputs, training=training) if self.deep_stem else self.conv1(inputs)
        x = self.maxpool(self.relu(self.bn1(x, training=training)))
        c1 = self.layer1(x, training=training)
        c2 = self.layer2(c1, training=training)
        c3 = self.layer3(c2, training=training)
        c4 = self.layer4(c3, training=training)
        return c1, c2, c3, c4

    def compute_output_shape(self, input_shape):
        h_ax, w_ax, _ = layout_axes(self.data_format)
        strides = [2 * 2, 2 * 2 * 2]  # stem conv + maxpool, then layer2
        strides.append(strides[-1] * self._stages[2][0])
        strides.append(strides[-1] * self._stages[3][0])
        out = []
        for channels, stride in zip((256, 512, 1024, 2048), strides):
            shape = list(with_channels(input_shape, channels, self.data_format))
            for ax in (h_ax, w_ax):
                if shape[ax] is not None:
                    size = shape[ax]
                    s = 1
                    while s < stride:  # each stride-2 stage: (L - 1) // 2 + 1 (torch's padding keeps this)
                        size, s = (size - 1) // 2 + 1, s * 2
                    shape[ax] = size
            out.append(tuple(shape))
        return tuple(out)

    def get_config(self):
        config = super().get_config()
        config.update(depth=self.depth, output_stride=self.output_stride, deep_stem=self.deep_stem,
                      multi_grid=None if self.multi_grid is None else list(self.multi_grid),
                      data_format=self.data_format, in_channels=self.in_channels)
        return config


def resnet50(**kwargs) -> DilatedResNet:
    return DilatedResNet(depth=50, **kwargs)


def resnet101(**kwargs) -> DilatedResNet:
    return DilatedResNet(depth=101, **kwargs)
