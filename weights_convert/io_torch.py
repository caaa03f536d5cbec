"""PyTorch ``.pth`` / ``.pt``: read with ``weights_only=True`` (no pickled code runs); write weights + record.

Written files are ``{"state_dict": {name: tensor}, "arch": {record}}``: the
official training script's layout (``torch.load(path)["state_dict"]`` keeps
working) with the architecture record beside it, plain types only, so
``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict

from .errors import CorruptFileError, UnsafeFileError
from .neutral import numpy_to_tensor, tensor_to_numpy

__all__ = ["read_pth", "write_pth", "RECORD_KEY"]

RECORD_KEY = "arch"
_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def _globals_in(path) -> list:
    """The classes/functions the pickle would import, read from its opcodes without running it."""
    import torch

    try:
        return [_PRINTABLE.sub("?", g) for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))]
    except Exception:  # noqa: BLE001 - a legacy or damaged file: no list, the refusal stands
        return []


def _refusal(path, found: list) -> UnsafeFileError:
    modules = [g for g in found if g.startswith("torch.nn.modules.") or g.startswith("danet_torch.")]
    if modules:
        return UnsafeFileError(
            f"Refused {str(path)!r}: it holds a pickled nn.Module (torch.save(model); classes "
            f"{', '.join(modules[:3])}), which loads only by running the pickle's code. Nothing was executed. "
            f"Save the weights instead: torch.save(model.state_dict(), PATH), then convert that file.")
    named = f" (it imports {', '.join(found[:5])})" if found else ""
    return UnsafeFileError(
        f"Refused {str(path)!r}: its pickle would import or run code beyond tensors and plain containers{named}. "
        f"Nothing was executed. Ask for the weights as a state_dict of tensors, or as .safetensors.")


def read_pth(path):
    """The file's top-level object, tensors turned into NumPy arrays (nested dicts kept)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "Weights only load failed" in str(e):
            raise _refusal(path, _globals_in(path)) from None
        raise CorruptFileError(f"{str(path)!r} is not a readable PyTorch file (corrupt pickle).") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as e:
        first = _PRINTABLE.sub("", str(e).splitlines()[0]) if str(e) else ""
        raise CorruptFileError(f"{str(path)!r} is truncated or corrupt, or not a PyTorch file: "
                               f"{type(e).__name__}: {first}") from None
    return _to_numpy(obj)


def _to_numpy(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return tensor_to_numpy(obj)
    if isinstance(obj, dict):
        return OrderedDict((k, _to_numpy(v)) for k, v in obj.items())
    return obj


def write_pth(weights, path, record: dict | None = None):
    """``torch.save`` ``{"state_dict": weights as tensors, "arch": record}`` to ``path``."""
    import torch

    state = OrderedDict((k, numpy_to_tensor(v)) for k, v in weights.items())
    torch.save({"state_dict": state, RECORD_KEY: record} if record is not None else state, path)
