"""PyTorch ``.pth`` / ``.pt``: read with ``weights_only=True`` (no pickled code runs), write a state_dict."""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict

from .errors import CorruptFileError, UnsafeFileError
from .neutral import numpy_to_tensor, tensor_to_numpy

__all__ = ["read_pth", "write_pth"]


def read_pth(path):
    """The file's top-level object, tensors turned into NumPy arrays (nested dicts kept)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text or "weights_only" in text or "Unsupported global" in text:
            first = text.strip().splitlines()[0] if text.strip() else ""
            raise UnsafeFileError(
                f"Refused {str(path)!r}: its pickle would import or run code that `torch.load(weights_only=True)` "
                f"does not allow (unsafe pickle: {first[:200]}). Nothing was executed. Re-save the checkpoint "
                f"as a plain state_dict of tensors, or as .safetensors.") from e
        raise CorruptFileError(f"{str(path)!r} is not a readable PyTorch file (corrupt pickle: {e}).") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as e:
        raise CorruptFileError(f"{str(path)!r} is truncated or corrupt, or not a PyTorch file: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return _to_numpy(obj)


def _to_numpy(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return tensor_to_numpy(obj)
    if isinstance(obj, dict):
        return OrderedDict((k, _to_numpy(v)) for k, v in obj.items())
    return obj


def write_pth(neutral, path):
    """``torch.save`` a plain state_dict (an ordered dict of tensors) to ``path``."""
    import torch

    state = OrderedDict((k, numpy_to_tensor(v)) for k, v in neutral.items())
    torch.save(state, path)
