"""PyTorch ``.pth`` / ``.pt``: read with ``weights_only=True`` (no pickled code runs); write weights + record.

Written files are ``{"state_dict": {name: tensor}, "arch": {record}}``: the
official training script's layout (``torch.load(path)["state_dict"]`` keeps
working) with the architecture record beside it, plain types only, so
``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections import OrderedDict

from .errors import CorruptFileError, UnsafeFileError, one_line
from .neutral import numpy_to_tensor, tensor_to_numpy

__all__ = ["load_pth", "read_pth", "write_pth", "RECORD_KEY"]

RECORD_KEY = "arch"
_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def _globals_in(path) -> list:
    """The classes/functions the pickle would import, read from its opcodes without running it.

    torch's archives (a zip with ``data.pkl``) through torch's own reader; a
    plain pickle (``pickle.dump``) or torch's legacy format (several pickles
    in a row, then the tensors' bytes) by walking the pickles' opcodes until
    one does not decode. A damaged file gives no list; the refusal stands.
    """
    import torch

    try:
        if zipfile.is_zipfile(path):
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        else:  # pickle.dump, or torch's legacy format: pickles in a row (magic number, ..., the object)
            found = []
            with open(path, "rb") as fh:
                while fh.peek(1) and len(found) < 1000:
                    try:
                        found += _pickle_globals(fh)
                    except Exception:  # noqa: BLE001 - the tensors' bytes after the pickles, or damage
                        break
            found = _beyond_allowed(found)
    except Exception:  # noqa: BLE001 - a damaged file: no list
        return []
    return [_PRINTABLE.sub("?", g) for g in dict.fromkeys(found)]


def _beyond_allowed(found: list) -> list:
    """``found`` less what ``torch.load(weights_only=True)`` allows (tensors' rebuild functions, storages,
    ``OrderedDict``, ...), as torch's own reader of archives reports. torch keeps that list in a private module:
    where it is missing, everything found is named."""
    try:
        from torch import _weights_only_unpickler as allowed

        safe = set(allowed._get_allowed_globals()) | set(allowed._get_user_allowed_globals())
    except Exception:  # noqa: BLE001 - another torch: name everything
        return found
    return [g for g in found if g not in safe]


def _pickle_globals(stream) -> list:
    """``module.name`` of every ``GLOBAL``/``INST``/``STACK_GLOBAL`` in the pickle on ``stream`` (:mod:`pickletools`,
    which only decodes). ``STACK_GLOBAL`` takes the last two strings pushed; memoised ones are looked up."""
    import pickletools

    found, strings, memo = [], [], {}
    top = None  # the string the previous opcode pushed, if it pushed one
    for op, arg, _ in pickletools.genops(stream):
        pushed = None
        if op.name in ("GLOBAL", "INST"):  # INST (protocol 0): import a class and call it
            found.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        elif "UNICODE" in op.name and isinstance(arg, str):
            pushed = arg
        elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            memo[len(memo) if op.name == "MEMOIZE" else arg] = top
            pushed = top  # the stack is unchanged
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed = memo.get(arg)
        if pushed is not None and op.name not in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            strings.append(pushed)
        top = pushed
    return found


def _is_zip_or_pickle(path) -> bool:
    """Whether the file is a zip archive (torch's format) or starts a pickle (torch's legacy format, ``pickle.dump``).

    torch's weights-only reader refuses any opcode it does not know, so a
    text file or an image fails there as a pickle it would not run: that is
    no pickle at all. A pickle of protocol 2 or later (every ``torch.save``)
    starts with ``PROTO``; an older one must decode up to its ``STOP``.
    """
    import pickletools

    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as fh:
        if fh.read(1) == b"\x80":
            return True
        fh.seek(0)
        try:
            for _ in pickletools.genops(fh):
                pass
        except Exception:  # noqa: BLE001 - an opcode that is none, an argument that does not parse, the end
            return False
    return True


def _not_torch(label: str) -> CorruptFileError:
    return CorruptFileError(f"{label} is not a PyTorch file (neither a zip archive nor a pickle).")


def _refusal(label: str, found: list) -> UnsafeFileError:
    modules = [g for g in found if g.startswith("torch.nn.modules.") or g.startswith("danet_torch.")]
    if modules:
        return UnsafeFileError(
            f"Refused {label}: it holds a pickled nn.Module (torch.save(model); classes "
            f"{', '.join(modules[:3])}), which loads only by running the pickle's code. Nothing was executed. "
            f"Save the weights instead: torch.save(model.state_dict(), PATH), then convert that file.")
    named = f" (it imports {', '.join(found[:5])})" if found else ""
    return UnsafeFileError(
        f"Refused {label}: its pickle would import or run code beyond tensors and plain containers{named}. "
        f"Nothing was executed. Ask for the weights as a state_dict of tensors, or as .safetensors.")


def load_pth(path, label: str | None = None):
    """The file's top-level object as ``torch.load(weights_only=True)`` returns it (tensors on the CPU).

    The one reader of ``.pth`` files: a pickle that would run code is refused
    (nothing runs), a damaged file is an error; neither hints at loading
    unsafely. ``label`` names the file in those errors (default: its path).

    Raises:
        UnsafeFileError: the pickle would import or run code beyond tensors and plain containers.
        CorruptFileError: truncated, corrupt, or not a PyTorch file.
    """
    import torch

    label = label or repr(str(path))
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4 in the checkpoint": the errors below say it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "Weights only load failed" in str(e):
            found = _globals_in(path)
            if not found and not _is_zip_or_pickle(path):
                raise _not_torch(label) from None
            raise _refusal(label, found) from None
        raise CorruptFileError(f"{label} is not a readable PyTorch file (corrupt pickle).") from None
    except Exception as e:  # noqa: BLE001 - on bytes that are no checkpoint the unpickler fails in many ways
        if not _is_zip_or_pickle(path):
            raise _not_torch(label) from None
        raise CorruptFileError(f"{label} is truncated or corrupt, or not a PyTorch file: "
                               f"{_PRINTABLE.sub('', one_line(e))}") from None


def read_pth(path):
    """The file's top-level object (:func:`load_pth`), tensors turned into NumPy arrays (nested dicts kept)."""
    return _to_numpy(load_pth(path))


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
