"""``--verify``: run the source and the converted model on one seeded input and compare outputs."""

from __future__ import annotations

import numpy as np

from .arch import ArchSpec
from .errors import ConvertError

__all__ = ["run_model", "verify"]

KERAS_FORMATS = ("keras", "keras_weights")


def _input(spec: ArchSpec, seed: int, size: int | None):
    rng = np.random.default_rng(seed)
    channels = spec.input_channels or 8
    size = size or (33 if spec.arch == "danet" else 8)
    return rng.standard_normal((1, channels, size, size))


def run_model(neutral, spec: ArchSpec, framework: str, x_nchw: np.ndarray) -> list:
    """Outputs (NCHW NumPy arrays) of the ``framework`` model holding ``neutral`` on ``x_nchw``."""
    if framework == "torch":
        import torch

        from .frameworks import to_torch
        from .neutral import numpy_to_tensor, tensor_to_numpy

        model = to_torch(neutral, spec)
        with torch.no_grad():
            out = model(numpy_to_tensor(x_nchw.astype(spec.dtype if spec.dtype != "bfloat16" else "float32"))
                        .to(getattr(torch, spec.dtype)))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [tensor_to_numpy(o.float()) for o in outs]
    import keras

    from .frameworks import to_keras

    layer = to_keras(neutral, spec)
    fmt = getattr(layer, "data_format", "channels_last")
    x = x_nchw if fmt == "channels_first" else np.transpose(x_nchw, (0, 2, 3, 1))
    out = layer(keras.ops.convert_to_tensor(x.astype(spec.dtype)), training=False)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    arrays = [np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(o, "float32"))) for o in outs]
    return arrays if fmt == "channels_first" else [np.transpose(a, (0, 3, 1, 2)) for a in arrays]


def verify(src_neutral, src_spec, src_framework, dst_neutral, dst_spec, dst_framework, seed: int = 0,
           size: int | None = None):
    """``[Comparison]`` of every output of the two models (tolerances from ``weights_convert.tolerances``)."""
    from .tolerances import compare, tolerance

    x = _input(src_spec, seed, size)
    a = run_model(src_neutral, src_spec, src_framework, x)
    b = run_model(dst_neutral, dst_spec, dst_framework, x)
    if len(a) != len(b):
        raise ConvertError(f"the models give {len(a)} and {len(b)} outputs")
    names = ["fused", "pam", "cam"] if len(a) == 3 else [f"output{i}" for i in range(len(a))]
    scope = "model" if src_spec.arch == "danet" else "layer"
    tol = tolerance(src_spec.dtype, scope)
    return [compare(f"{n} ({src_framework} -> {dst_framework})", bb, aa, tol) for n, aa, bb in zip(names, a, b)]
