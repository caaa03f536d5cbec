"""The neutral form: an ordered ``{torch state_dict name: numpy array}`` in PyTorch layout.

Every reader produces it and every writer consumes it; dtypes are kept as
they are (``num_batches_tracked`` stays int64, bfloat16 uses ``ml_dtypes``).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

__all__ = ["contiguous", "tensor_to_numpy", "numpy_to_tensor", "numpy_dtype", "float_dtype", "common_float_dtype",
           "summary"]

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def tensor_to_numpy(t) -> np.ndarray:
    """A torch tensor as a NumPy array of the same dtype (bfloat16 through ``ml_dtypes``)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.contiguous().numpy().copy()


def numpy_to_tensor(a: np.ndarray):
    import torch

    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(contiguous(a).view(np.int16)).view(torch.bfloat16).clone()
    return torch.from_numpy(contiguous(a).copy())


def numpy_dtype(dtype) -> np.dtype:
    """The NumPy dtype of a torch/Keras/NumPy dtype or its name (bfloat16 through ``ml_dtypes``)."""
    name = getattr(dtype, "name", str(dtype)).replace("torch.", "")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def contiguous(a: np.ndarray) -> np.ndarray:
    """C-contiguous without changing the shape (``np.ascontiguousarray`` turns 0-d into 1-d)."""
    return a if a.flags.c_contiguous else a.copy(order="C")


def common_float_dtype(names: Iterable[str]) -> str:
    """The narrowest floating dtype that holds every value of the floating dtypes ``names`` exactly
    (float16 and bfloat16 together: float32), ``"float32"`` if there is none."""
    found = {n for n in names if n in FLOAT_DTYPES}
    if "float64" in found:
        return "float64"
    if "float32" in found or len(found) > 1:
        return "float32"
    return found.pop() if found else "float32"


def float_dtype(neutral: Mapping[str, np.ndarray]) -> str:
    """The floating dtype of the weights: the one holding every floating tensor's values exactly
    (``num_batches_tracked``, a counter, aside), ``"float32"`` if none."""
    return common_float_dtype(np.asarray(v).dtype.name for k, v in neutral.items()
                              if not k.endswith("num_batches_tracked"))


def summary(neutral: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
    """``(tensors, parameters, bytes)``."""
    arrays = [np.asarray(v) for v in neutral.values()]
    return len(arrays), int(sum(a.size for a in arrays)), int(sum(a.nbytes for a in arrays))
