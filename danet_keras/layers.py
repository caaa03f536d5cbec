"""Keras 3 leaves with PyTorch semantics: convolution, BatchNorm, max pooling, resize.

These are what make the Keras DANet a numerical mirror of the PyTorch one:

* :class:`Conv2d`: ``keras.layers.Conv2D`` with torch's symmetric integer
  ``padding`` (Keras' ``"same"`` pads asymmetrically for stride 2), and
  stride together with dilation (which Keras' conv refuses).
* :class:`BatchNorm`: eps 1e-5, momentum 0.9 (torch's 0.1), the moving
  variance updated with the *unbiased* batch variance, and a
  ``num_batches_tracked`` counter, so torch checkpoints round-trip losslessly.
* :class:`MaxPool2d`: torch's ``MaxPool2d(k, stride, padding)`` (pads with
  ``-inf``).
* :func:`resize_bilinear_align_corners`: bilinear resize with
  ``align_corners=True`` (``F.interpolate``), which ``keras.ops.image.resize``
  does not offer; built from ``keras.ops`` so ``None`` sizes work.
* :func:`no_init_weights`: build layers whose every weight is assigned next
  (a checkpoint being loaded) without drawing random initial values.
"""

from __future__ import annotations

import contextlib
import contextvars

import keras
import numpy as np
from keras import ops

from ._checks import standardize_data_format

__all__ = ["Conv2d", "BatchNorm", "MaxPool2d", "resize_bilinear_align_corners", "no_init_weights", "sequential",
           "layout_axes", "with_channels", "keep_frozen"]

_NO_INIT = contextvars.ContextVar("danet_keras_no_init_weights", default=False)


@contextlib.contextmanager
def no_init_weights():
    """Within this context, :class:`Conv2d` layers are built with zero kernels and biases, not random ones.

    For a model whose every weight is assigned right after it is built, as
    ``weights_convert`` and :meth:`danet_keras.DANet.load_pretrained_backbone`
    do (as ``transformers``' ``no_init_weights`` when it loads a checkpoint).
    Conv2d kernels are the only random weights of ``danet_keras``; drawing
    them is wasted work there, and on JAX each new kernel shape compiles a
    random-number program (seconds for a DANet). The layers' initializers,
    and so their configs, are unchanged; layers built outside the context
    draw as usual.
    """
    token = _NO_INIT.set(True)
    try:
        yield
    finally:
        _NO_INIT.reset(token)


def _zeros(shape, dtype=None):
    """Zeros as a NumPy array (no program for the device to compile), bfloat16 through ``keras.ops``."""
    dtype = keras.backend.standardize_dtype(dtype)
    return ops.zeros(shape, dtype=dtype) if dtype == "bfloat16" else np.zeros(shape, dtype)


def layout_axes(data_format: str) -> tuple[int, int, int]:
    """``(h_axis, w_axis, channel_axis)`` of a 4-D tensor in ``data_format``."""
    return (2, 3, 1) if data_format == "channels_first" else (1, 2, 3)


def with_channels(shape, channels: int, data_format: str) -> tuple:
    """``shape`` with its channel axis set to ``channels``."""
    shape = list(shape)
    shape[layout_axes(data_format)[2]] = channels
    return tuple(shape)


def sequential(layers, name: str, dtype) -> keras.Sequential:
    """``keras.Sequential(layers)`` (torch's ``nn.Sequential``) whose own dtype policy is ``dtype`` too.

    ``keras.Sequential`` takes no ``dtype``; left at the global policy it
    would cast a mixed-precision input back to float32 at its boundary.
    """
    seq = keras.Sequential(layers, name=name)
    seq.dtype_policy = dtype
    return seq


def keep_frozen(layer) -> None:
    """Give the sublayers a frozen ``layer`` made in ``build`` its ``trainable=False``; call at the end of ``build``.

    Keras' ``trainable`` setter freezes the sublayers a layer has when it is
    set. Ours are made in ``build`` (their widths come from the input),
    after ``trainable=False`` reached the constructor, was set on the unbuilt
    layer or came back from a ``.keras`` config: left trainable, their
    variables would be trained by ``fit`` (and their BatchNorm statistics
    updated) while ``layer.trainable_weights`` is empty. Set through the
    property itself: on TensorFlow ``layer.trainable = False`` is skipped when
    the attribute is ``False`` already (its attribute tracking's short cut).
    """
    if not layer.trainable:
        keras.layers.Layer.trainable.fset(layer, False)


def _pad_spatial(x, pad: int, data_format: str, value=0.0):
    if pad == 0:
        return x
    h, w, _ = layout_axes(data_format)
    widths = [[0, 0]] * 4
    widths[h] = widths[w] = [pad, pad]
    return ops.pad(x, widths, constant_values=value)


def _as_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (tuple, list)) and len(set(value)) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum} (same for height and width), got {value!r}.")
    return value


@keras.saving.register_keras_serializable(package="danet")
class Conv2d(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` with PyTorch's integer ``padding``.

    The input is zero-padded by ``padding`` on both sides of H and W, then a
    ``"valid"`` convolution runs, exactly as ``torch.nn.Conv2d``. Stride and
    dilation may both exceed 1 (a stride-1 dilated conv, then subsampling).

    Args:
        filters: Output channels.
        kernel_size: Square kernel size.
        strides: Stride (int).
        padding: Symmetric zero padding (int), torch's ``padding``.
        dilation_rate: Dilation (int).
        **kwargs: Passed to ``keras.layers.Conv2D`` (``use_bias``, ``name``, ...).

    Variables:
        ``kernel`` ``(kH, kW, I, O)`` (torch's weight transposed (2, 3, 1, 0)), ``bias`` ``(O,)``.
    """

    def __init__(self, filters, kernel_size, strides=1, padding=0, dilation_rate=1, **kwargs):
        self.torch_padding = _as_int("padding", padding, 0)
        self.torch_strides = _as_int("strides", strides, 1)
        dilation = _as_int("dilation_rate", dilation_rate, 1)
        # Keras refuses stride > 1 with dilation > 1: convolve at stride 1 and subsample.
        self._subsample = self.torch_strides if (self.torch_strides > 1 and dilation > 1) else 1
        super().__init__(filters, kernel_size, strides=self.torch_strides // self._subsample,
                         padding="valid", dilation_rate=dilation, **kwargs)

    def build(self, input_shape):
        if not _NO_INIT.get():
            return super().build(input_shape)
        initializers = self.kernel_initializer, self.bias_initializer
        self.kernel_initializer = self.bias_initializer = _zeros  # see no_init_weights
        try:
            return super().build(input_shape)
        finally:
            self.kernel_initializer, self.bias_initializer = initializers

    def call(self, inputs):
        if keras.backend.backend() == "tensorflow" and inputs.shape[0] == 0:
            # TensorFlow's convolution returns its input for an empty batch; the other backends need no help.
            return ops.zeros(self.compute_output_shape(inputs.shape), self.compute_dtype)
        x = _pad_spatial(inputs, self.torch_padding, self.data_format)
        y = super().call(x)
        if self._subsample > 1:
            s = self._subsample
            y = y[:, :, ::s, ::s] if self.data_format == "channels_first" else y[:, ::s, ::s, :]
        return y

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        h, w, _ = layout_axes(self.data_format)
        for ax in (h, w):
            if shape[ax] is not None:
                shape[ax] += 2 * self.torch_padding
        shape = list(super().compute_output_shape(tuple(shape)))
        if self._subsample > 1:
            for ax in (h, w):
                if shape[ax] is not None:
                    shape[ax] = (shape[ax] - 1) // self._subsample + 1
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update(strides=self.torch_strides, padding=self.torch_padding)
        return config


@keras.saving.register_keras_serializable(package="danet")
class BatchNorm(keras.layers.BatchNormalization):
    """``BatchNormalization`` with ``torch.nn.BatchNorm2d`` semantics.

    Normalises with the biased batch variance while training, updates
    ``moving_variance`` with the unbiased one (``n / (n - 1)``), uses eps 1e-5
    and momentum 0.9 (Keras' convention; torch's 0.1), and counts training
    calls in ``num_batches_tracked`` (int32 scalar, not trainable).

    Under ``tf.distribute`` (``MirroredStrategy``, ...) each replica normalises
    with the statistics of its own part of the batch unless ``synchronized``:
    then the batch mean and variance are taken over all replicas (an
    all-reduce of the sums of ``x`` and of ``(x - mean)^2`` and of the pixel
    count), as ``torch.nn.SyncBatchNorm``, so a step on N replicas equals one
    device on the whole batch. On JAX, ``keras.distribution.DataParallel``
    runs one program over the global batch: the statistics are global
    already and ``synchronized`` changes nothing; likewise on one device.

    Args:
        axis: Channel axis (default ``-1``; ``1`` for channels_first).
        momentum: Keras momentum (``1 - torch momentum``).
        epsilon: Added to the variance.
        synchronized: Global batch statistics across ``tf.distribute`` replicas.
        **kwargs: Passed to ``keras.layers.BatchNormalization``.

    Shape:
        Any; normalised along ``axis``.
    """

    def __init__(self, axis=-1, momentum=0.9, epsilon=1e-5, synchronized: bool = False, **kwargs):
        if kwargs.get("renorm"):
            raise ValueError("`renorm` is not supported by danet_keras.layers.BatchNorm.")
        if synchronized not in (True, False):
            raise ValueError(f"`synchronized` must be True or False, got {synchronized!r}.")
        super().__init__(axis=axis, momentum=momentum, epsilon=epsilon, **kwargs)
        self.synchronized = bool(synchronized)  # Keras' own flag refuses non-TF backends; ours is a no-op there

    def build(self, input_shape):
        super().build(input_shape)
        self.num_batches_tracked = self.add_weight(
            shape=(), name="num_batches_tracked", initializer="zeros", dtype="int32",
            trainable=False, autocast=False)

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            raise ValueError("danet_keras.layers.BatchNorm does not support `mask`.")
        dtype = backend_result_type(inputs.dtype)
        x = ops.cast(inputs, dtype)
        gamma = ops.cast(self.gamma, dtype) if self.scale else None
        beta = ops.cast(self.beta, dtype) if self.center else None
        if training and self.trainable:
            replicas = _replica_context() if self.synchronized else None
            if replicas is not None:
                mean, variance, n = _synchronized_moments(x, self._reduction_axes, replicas)
            else:
                mean, variance = ops.moments(x, axes=self._reduction_axes)
                shape = ops.shape(x)
                n = 1
                for ax in self._reduction_axes:
                    n = n * shape[ax]
                n = ops.cast(n, dtype)
            unbiased = variance * n / ops.maximum(n - 1.0, 1.0)
            m = self.momentum
            self.moving_mean.assign(ops.cast(self.moving_mean, dtype) * m + mean * (1.0 - m))
            self.moving_variance.assign(ops.cast(self.moving_variance, dtype) * m + unbiased * (1.0 - m))
            self.num_batches_tracked.assign_add(ops.ones((), dtype="int32"))
        else:
            mean = ops.cast(self.moving_mean, dtype)
            variance = ops.cast(self.moving_variance, dtype)
        y = ops.batch_normalization(x, mean, variance, axis=self.axis, offset=beta, scale=gamma,
                                    epsilon=self.epsilon)
        return ops.cast(y, self.compute_dtype)


def _replica_context():
    """The ``tf.distribute`` replica context when running on several replicas (TensorFlow backend), else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    return ctx if ctx is not None and ctx.num_replicas_in_sync > 1 else None


def _synchronized_moments(x, axes, replicas):
    """``(mean, biased variance, count)`` over every replica's ``x`` (two all-reduces, differentiable)."""
    import tensorflow as tf

    total = tf.reduce_sum(x, axis=axes, keepdims=True)
    count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
    total, count = replicas.all_reduce(tf.distribute.ReduceOp.SUM, [total, count])
    mean = total / count
    squares = tf.reduce_sum(tf.square(x - mean), axis=axes, keepdims=True)
    variance = replicas.all_reduce(tf.distribute.ReduceOp.SUM, squares) / count
    return tf.squeeze(mean, axes), tf.squeeze(variance, axes), count


def row_max(x):
    """``max`` over the last axis, kept, on every backend and device, also for an empty batch.

    Keras 3.15 refuses the max of a tensor with a zero-size axis unless given
    ``initial``, and its torch backend builds that ``initial`` on the CPU,
    which fails beside a CUDA tensor; torch's own ``amax`` takes both.
    """
    if keras.backend.backend() == "torch":
        import torch

        return torch.amax(x, dim=-1, keepdim=True)
    return ops.max(x, axis=-1, keepdims=True, initial=float("-inf"))


def backend_result_type(dtype):
    """float64 stays float64; everything else is computed in float32."""
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


@keras.saving.register_keras_serializable(package="danet")
class MaxPool2d(keras.layers.Layer):
    """``torch.nn.MaxPool2d(kernel_size, stride, padding)`` (pads with ``-inf``, floor mode).

    Shape:
        ``(B, H, W, C)`` -> ``(B, (H + 2p - k) // s + 1, (W + 2p - k) // s + 1, C)``.
    """

    def __init__(self, kernel_size=3, strides=2, padding=1, data_format=None, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = _as_int("kernel_size", kernel_size, 1)
        self.strides = _as_int("strides", strides, 1)
        self.padding = _as_int("padding", padding, 0)
        self.data_format = standardize_data_format(data_format)
        self._pool = keras.layers.MaxPooling2D(self.kernel_size, self.strides, padding="valid",
                                               data_format=self.data_format, dtype=self.dtype_policy,
                                               name="pool")

    def call(self, inputs):
        return self._pool(_pad_spatial(inputs, self.padding, self.data_format, float("-inf")))

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for ax in layout_axes(self.data_format)[:2]:
            if shape[ax] is not None:
                shape[ax] = (shape[ax] + 2 * self.padding - self.kernel_size) // self.strides + 1
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update(kernel_size=self.kernel_size, strides=self.strides, padding=self.padding,
                      data_format=self.data_format)
        return config


def _lerp_axis(x, out_size, axis: int):
    """Resize one axis of ``x`` to ``out_size`` with align-corners linear interpolation."""
    in_size = ops.shape(x)[axis]
    ft = backend_result_type(x.dtype)
    in_f = ops.cast(in_size, ft)
    out_f = ops.cast(out_size, ft)
    scale = ops.where(out_f > 1.0, (in_f - 1.0) / ops.maximum(out_f - 1.0, 1.0), 0.0)
    pos = ops.cast(ops.arange(out_size), ft) * scale
    lo = ops.clip(ops.floor(pos), 0.0, ops.maximum(in_f - 1.0, 0.0))
    frac = pos - lo
    lo_i = ops.cast(lo, "int32")
    hi_i = ops.minimum(lo_i + 1, ops.cast(in_size, "int32") - 1)
    shape = [1, 1, 1, 1]
    shape[axis] = -1
    frac = ops.cast(ops.reshape(frac, shape), x.dtype)
    x_lo = ops.take(x, lo_i, axis=axis)
    x_hi = ops.take(x, hi_i, axis=axis)
    return x_lo + (x_hi - x_lo) * frac


def resize_bilinear_align_corners(x, size, data_format: str | None = None):
    """Bilinear resize with ``align_corners=True`` (``F.interpolate`` semantics).

    Args:
        x: ``(B, H, W, C)`` (or ``(B, C, H, W)`` for channels_first).
        size: ``(out_h, out_w)``; ints or scalar tensors (dynamic sizes work).
        data_format: ``"channels_last"`` (default from Keras' config) or ``"channels_first"``.

    Returns:
        ``(B, out_h, out_w, C)`` in ``x``'s dtype. Output pixel ``i`` samples
        input position ``i * (H - 1) / (out_h - 1)``, so corners map to corners.
    """
    data_format = standardize_data_format(data_format)
    h_ax, w_ax, _ = layout_axes(data_format)
    x = _lerp_axis(x, size[0], h_ax)
    return _lerp_axis(x, size[1], w_ax)
