"""``.safetensors`` and ``.npz``: plain name -> array files; the architecture record rides along as metadata."""

from __future__ import annotations

import json
import zipfile
from collections import OrderedDict

import numpy as np

from .errors import ConvertError, CorruptFileError

__all__ = ["read_safetensors", "write_safetensors", "read_npz", "write_npz", "check_zip", "METADATA_KEY"]

METADATA_KEY = "danet_arch"
NPZ_METADATA = "__danet_arch__"
ZIP_STARTS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip's directory


def check_zip(path, what: str) -> None:
    """Refuse ``path`` unless it is a zip archive, the container of ``what`` (``"NumPy .npz"``, ...)."""
    with open(path, "rb") as f:
        start = f.read(4)
    if start not in ZIP_STARTS:
        raise CorruptFileError(f"{str(path)!r} is not a {what} archive (not a zip file).")
    if not zipfile.is_zipfile(path):
        raise CorruptFileError(f"{str(path)!r} is truncated or corrupt: a zip file whose directory is missing or "
                               f"damaged (not a complete {what} archive).")


def read_safetensors(path):
    """``(OrderedDict name -> array, metadata dict or None)``; arrays in file order."""
    from safetensors import safe_open

    try:
        tensors = OrderedDict()
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own SafetensorError / OSError
        if "bfloat16" in str(e) or "BF16" in str(e):
            return _read_safetensors_torch(path)
        raise CorruptFileError(f"{str(path)!r} is truncated or corrupt, or not a safetensors file: {e}") from e
    return tensors, _meta(meta.get(METADATA_KEY))


def _read_safetensors_torch(path):
    from safetensors import safe_open

    from .neutral import tensor_to_numpy

    tensors = OrderedDict()
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            tensors[k] = tensor_to_numpy(f.get_tensor(k))
    return tensors, _meta(meta.get(METADATA_KEY))


def _meta(text):
    """The stored record, or ``None`` when there is none; a damaged one is an error, never ignored."""
    if not text:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"the architecture record `{METADATA_KEY}` is not JSON ({e}).") from e
    if not isinstance(record, dict):
        raise CorruptFileError(f"the architecture record `{METADATA_KEY}` is not a JSON object: {text[:80]!r}.")
    return record


def write_safetensors(neutral, path, record: dict | None = None):
    meta = {METADATA_KEY: json.dumps(record, sort_keys=True)} if record else None
    if any(np.asarray(v).dtype.name == "bfloat16" for v in neutral.values()):
        from safetensors.torch import save_file as save_torch

        from .neutral import numpy_to_tensor

        save_torch({k: numpy_to_tensor(v) for k, v in neutral.items()}, str(path), metadata=meta)
        return
    from safetensors.numpy import save_file

    from .neutral import contiguous

    save_file({k: contiguous(np.asarray(v)) for k, v in neutral.items()}, str(path), metadata=meta)


def read_npz(path):
    check_zip(path, "NumPy .npz")  # np.load reads anything else as a pickle, which it refuses
    try:
        with np.load(path, allow_pickle=False) as z:
            tensors = OrderedDict((k, z[k]) for k in z.files)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise CorruptFileError(f"{str(path)!r} holds pickled object arrays; refused (allow_pickle=False).") \
                from e
        raise CorruptFileError(f"{str(path)!r} is truncated or corrupt, or not an .npz file: {e}") from e
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise CorruptFileError(f"{str(path)!r} is truncated or corrupt, or not an .npz file: "
                               f"{type(e).__name__}: {e}") from e
    meta = tensors.pop(NPZ_METADATA, None)
    return tensors, _meta(str(meta[()]) if meta is not None else None)


def write_npz(neutral, path, record: dict | None = None):
    arrays = OrderedDict((k, np.asarray(v)) for k, v in neutral.items())
    if any(a.dtype.name == "bfloat16" for a in arrays.values()):
        raise ConvertError("`.npz` cannot hold bfloat16 portably; write .safetensors or .pth instead.")
    if record:
        arrays[NPZ_METADATA] = np.array(json.dumps(record, sort_keys=True))
    with open(path, "wb") as f:  # a file object: numpy would append ".npz" to a path
        np.savez(f, **arrays)
