"""Argument and input-shape checks shared by the Keras layers: clear ``ValueError``s."""

from __future__ import annotations

import numbers

__all__ = ["channels_error", "check_floating_policy", "check_inputs", "check_positive_int", "check_shape",
           "standardize_data_format"]


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as a Python int (NumPy integers accepted); ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def check_floating_policy(layer) -> None:
    """Refuse a layer whose dtype policy computes or stores in anything but floating point (``ValueError``).

    Called by each layer's constructor: an ``int32`` policy would otherwise
    fail in its first weight's initializer, with a different message on each
    backend that names no argument.
    """
    policy = layer.dtype_policy
    if not all("float" in dtype for dtype in (policy.compute_dtype, policy.variable_dtype)):
        raise ValueError(f"{type(layer).__name__}: `dtype` must be a floating-point dtype policy (e.g. 'float32', "
                         f"'float64', 'mixed_float16', 'mixed_bfloat16'), got {policy.name!r}.")


def check_shape(layer: str, shape, data_format: str, channels: int | None = None) -> int:
    """Check a 4-D input shape; return its channel count (raise ``ValueError`` otherwise)."""
    shape = tuple(shape)
    layout = "(B, C, H, W)" if data_format == "channels_first" else "(B, H, W, C)"
    if len(shape) != 4:
        raise ValueError(f"{layer}: `inputs` must be 4-D {layout} ({data_format}), got shape {shape}.")
    c = shape[1] if data_format == "channels_first" else shape[3]
    if c is None:
        raise ValueError(f"{layer}: the channel dimension of `inputs` must be known, got shape {shape}.")
    if channels is not None and c != channels:
        raise ValueError(f"{layer}: `inputs` has {c} channels (shape {shape}), but the layer was built "
                         f"for {channels} channels; pass inputs with {channels} channels.")
    return int(c)


def channels_error(layer: str, shape, data_format: str, problem: str) -> ValueError:
    """A ``ValueError`` about the channel count of ``inputs`` that shows what the layer read: the shape and the
    axis ``data_format`` takes as channels (an NHWC tensor given to a channels_first layer shows here)."""
    shape = tuple(shape)
    layout = "(B, C, H, W)" if data_format == "channels_first" else "(B, H, W, C)"
    c = shape[1] if data_format == "channels_first" else shape[3]
    return ValueError(f"{layer}: `inputs` of shape {shape} has {c} channels (data_format={data_format!r} reads it "
                      f"as {layout}); {problem}")


def check_inputs(layer: str, inputs, data_format: str, channels: int | None = None) -> int:
    """:func:`check_shape` for a tensor, which must also be floating point (``TypeError`` otherwise)."""
    import keras

    dtype = keras.backend.standardize_dtype(inputs.dtype)
    if "float" not in dtype:
        raise TypeError(f"{layer}: `inputs` must be a floating-point tensor, got dtype {dtype}; "
                        f"cast it first, e.g. `keras.ops.cast(inputs, \"float32\")`.")
    return check_shape(layer, inputs.shape, data_format, channels)


def standardize_data_format(data_format) -> str:
    """``None`` -> Keras' configured image data format; else check the value."""
    import keras

    if data_format is None:
        return keras.config.image_data_format()
    value = str(data_format).lower()
    if value not in ("channels_last", "channels_first"):
        raise ValueError(f"`data_format` must be 'channels_last' or 'channels_first', got {data_format!r}.")
    return value

