"""The neutral form: an ordered ``{torch state_dict name: numpy array}`` in PyTorch layout.

Every reader produces it and every writer consumes it; dtypes are kept as
they are (``num_batches_tracked`` stays int64, bfloat16 uses ``ml_dtypes``).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["contiguous", "tensor_to_numpy", "numpy_to_tensor", "numpy_dtype", "float_dtype", "summary"]


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


def float_dtype(neutral: Mapping[str, np.ndarray]) -> str:
    """The floating dtype of the weights (the most common one), ``"float32"`` if none."""
    counts: dict = {}
    for v in neutral.values():
        name = np.asarray(v).dtype.name
        if name in ("float16", "bfloat16", "float32", "float64"):
            counts[name] = counts.get(name, 0) + 1
    return max(counts, key=counts.get) if counts else "float32"


def summary(neutral: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
    """``(tensors, parameters, bytes)``."""
    arrays = [np.asarray(v) for v in neutral.values()]
    return len(arrays), int(sum(a.size for a in arrays)), int(sum(a.nbytes for a in arrays))
