"""``--verify``: run the source and the converted model on one seeded input and compare outputs."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np

from .arch import ArchSpec
from .errors import ConvertError
from .tolerances import compare, tolerance

__all__ = ["example_input", "run_model", "verify", "measured"]


def example_input(spec: ArchSpec, seed: int = 0, size: int | None = None) -> np.ndarray:
    """A seeded float64 NCHW input for ``spec``: batch 1, the kind's example size (or ``size`` x ``size``)."""
    h, w = (size, size) if size else spec.info.example_size
    return np.random.default_rng(seed).standard_normal((1, spec.example_channels, h, w))


def run_model(weights, spec: ArchSpec, framework: str, x_nchw: np.ndarray) -> list:
    """Outputs (NCHW NumPy arrays, float32 or float64) of the ``framework`` model holding ``weights``."""
    if framework == "torch":
        import torch

        from .frameworks import to_torch
        from .neutral import numpy_to_tensor, tensor_to_numpy

        model = to_torch(weights, spec)
        with torch.no_grad():
            out = model(numpy_to_tensor(x_nchw).to(getattr(torch, spec.dtype)))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [tensor_to_numpy(o if o.dtype == torch.float64 else o.float()) for o in outs]
    import keras

    from .frameworks import keras_precision, to_keras

    with keras_precision(spec.dtype):
        layer = to_keras(weights, spec)
        first = spec.data_format == "channels_first"
        x = x_nchw if first else np.transpose(x_nchw, (0, 2, 3, 1))
        kwargs = {"training": False} if "training" in inspect.signature(layer.call).parameters else {}
        out = layer(keras.ops.convert_to_tensor(x.astype(spec.dtype)), **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        keep = "float64" if spec.dtype == "float64" else "float32"
        arrays = [np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(o, keep))) for o in outs]
    return arrays if first else [np.transpose(a, (0, 3, 1, 2)) for a in arrays]


def measured(c):
    """``c``, failed if it measured no element: an output that is NaN or inf everywhere in both models (weights
    holding NaN, an overflow) has equal masks and no difference, which says nothing of the conversion."""
    return dataclasses.replace(c, passed=False) if c.passed and c.size and c.nonfinite == c.size else c


def verify(src_weights, src_spec, src_framework, dst_weights, dst_spec, dst_framework, seed: int = 0,
           size: int | None = None):
    """``[Comparison]`` of every output of the two models (tolerances from :mod:`weights_convert.tolerances`)."""
    x = example_input(src_spec, seed, size)
    a = run_model(src_weights, src_spec, src_framework, x)
    b = run_model(dst_weights, dst_spec, dst_framework, x)
    if len(a) != len(b):
        raise ConvertError(f"the models give {len(a)} and {len(b)} outputs")
    tol = tolerance(src_spec.dtype, src_spec.info.scope)
    return [measured(compare(f"{n} ({src_framework} -> {dst_framework})", bb, aa, tol))
            for n, aa, bb in zip(src_spec.outputs, a, b)]
