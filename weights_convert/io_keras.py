"""Keras ``.keras`` (config + weights) and ``.weights.h5`` (weights only).

``.keras`` is loaded with ``safe_mode=True`` (no lambdas / arbitrary code) and
its architecture comes from the saved config. ``.weights.h5`` holds no
architecture: it is inferred from the dataset paths and shapes (the Keras
layers are named after the torch attributes), or read from the ``danet_arch``
attribute this converter writes; explicit options override either.
"""

from __future__ import annotations

import re

from .arch import ArchSpec
from .errors import ConvertError, CorruptFileError, UnsafeFileError
from .frameworks import from_keras, spec_from_keras, to_keras

__all__ = ["read_keras", "write_keras", "read_weights_h5", "write_weights_h5", "infer_h5"]

H5_ATTR = "danet_arch"


def _import_danet_keras():
    try:
        import danet_keras  # noqa: F401  (registers the serializable classes)
    except ImportError as e:
        raise ConvertError(f"Keras formats need `danet_keras` (and Keras): {e}") from e


def read_keras(path):
    """``(neutral, spec)`` of a ``.keras`` file."""
    _import_danet_keras()
    import keras

    try:
        layer = keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as e:  # zip, JSON, h5 or deserialisation errors
        raise _keras_load_error(path, e) from e
    spec = spec_from_keras(layer)
    return from_keras(_unwrap(layer), spec), spec


def _error_text(e: BaseException) -> str:
    """The messages of ``e`` and of the exceptions it was raised from (Keras wraps nested failures)."""
    texts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__
    return "\n".join(texts)


def _keras_load_error(path, e: BaseException) -> ConvertError:
    """The converter's error for a ``.keras`` that ``load_model(safe_mode=True)`` did not load.

    * Refused by safe mode (a ``Lambda`` layer, or anything else Keras only
      deserialises with ``safe_mode=False``): :class:`UnsafeFileError`.
    * An unknown / unregistered class: :class:`CorruptFileError` naming the class.
    * Anything else (zip, JSON, HDF5 errors): :class:`CorruptFileError` with
      the first line of the error.

    The first two keep Keras' full error text.
    """
    text = _error_text(e)
    if "safe_mode" in text or "enable_unsafe_deserialization" in text:
        why = ("it holds a Lambda layer, whose function is serialised Python bytecode: loading it would run "
               "arbitrary Python code" if "Lambda" in text else
               "Keras only deserialises its content with safe_mode=False, which could run arbitrary Python code")
        return UnsafeFileError(f"Refused {str(path)!r}: refused under safe_mode: {why}. Nothing was executed; "
                               f"danet_keras files never need safe_mode=False.\nKeras said: {text}")
    unknown = re.findall(r"Could not locate (?:class|function) '([^']+)'", text)
    if unknown:
        names = ", ".join(sorted(set(unknown), key=unknown.index))
        return CorruptFileError(f"{str(path)!r} is not a danet_keras .keras file: it names the unknown class "
                                f"{names} (neither a Keras built-in nor a registered danet_keras class); only "
                                f"those are deserialised.\nKeras said: {text}")
    first = str(e).splitlines()[0] if str(e) else ""
    return CorruptFileError(f"{str(path)!r} is truncated or corrupt, or not a danet_keras .keras file: "
                            f"{type(e).__name__}: {first}")


def _unwrap(layer):
    from .frameworks import KERAS_CLASSES

    if type(layer).__name__ in KERAS_CLASSES:
        return layer
    return next(sub for sub in layer.layers if type(sub).__name__ in KERAS_CLASSES)


def write_keras(neutral, spec: ArchSpec, path):
    import keras

    _import_danet_keras()
    layer = to_keras(neutral, spec)
    keras.saving.save_model(layer, str(path))


def _h5_datasets(path):
    import h5py

    rows, meta = [], None
    try:
        with h5py.File(str(path), "r") as f:
            meta = f.attrs.get(H5_ATTR)
            f.visititems(lambda name, obj: rows.append((name, tuple(obj.shape)))
                         if isinstance(obj, h5py.Dataset) else None)
    except OSError as e:
        raise CorruptFileError(f"{str(path)!r} is truncated or corrupt, or not an HDF5 file: {e}") from e
    if isinstance(meta, bytes):
        meta = meta.decode()
    return rows, meta


def infer_h5(rows) -> dict:
    """ArchSpec fields from ``[(dataset path, shape)]`` of a danet_keras ``.weights.h5``."""
    def seg(name):
        return [r for r in rows if f"/{name}/" in f"/{r[0]}"]

    def kernel(name):
        return next((s for p, s in seg(name) if len(s) == 4), None)

    d: dict = {}
    if seg("pretrained"):
        d["arch"] = "danet"
        blocks = {m.group(1) for p, _ in rows if (m := re.search(r"layer3/layers/([^/]+)/", p))}
        d["backbone"] = "resnet101" if len(blocks) > 6 else "resnet50"
        d["deep_stem"] = any(re.search(r"pretrained/conv1/layers/", p) for p, _ in rows)
    elif seg("conv6") or seg("conv8"):
        d["arch"] = "head"
    elif seg("conv5a"):
        d["arch"] = "dual_attention"
    elif seg("query_conv"):
        d["arch"] = "pam"
    elif len(rows) == 1 and rows[0][1] == (1,):
        d["arch"] = "cam"
    else:
        raise ConvertError("Cannot infer the architecture of this .weights.h5 (no danet_keras layer names in it: "
                           f"{[p for p, _ in rows[:3]]}); pass --arch and its options.")
    if (k := kernel("conv8")) is not None:
        d["num_classes"] = k[3]
    if d["arch"] in ("head", "dual_attention") and (k := kernel("conv5a")) is not None:
        d["channels"] = k[2]
        if d["arch"] == "dual_attention":
            d["inter_channels"] = k[3]
            if (k51 := kernel("conv51")) is not None:
                d["out_channels"] = k51[3]
    if (q := kernel("query_conv")) is not None:
        if d["arch"] == "pam":
            d["channels"] = q[2]
        d["reduction"] = max(1, q[2] // max(1, q[3]))
    return d


def read_weights_h5(path, overrides: dict | None = None):
    """``(neutral, spec)`` of a ``.weights.h5``: build the inferred architecture, load, read back."""
    _import_danet_keras()
    import json

    rows, meta = _h5_datasets(path)
    try:
        fields = json.loads(meta) if meta else infer_h5(rows)
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{str(path)!r} has a corrupt `danet_arch` attribute (not JSON: {e}).") from e
    fields.update({k: v for k, v in (overrides or {}).items() if v is not None or k == "multi_grid"})
    dtype = _h5_dtype(path)
    fields.setdefault("dtype", dtype)
    try:
        spec = ArchSpec.from_dict(fields)
    except ValueError as e:
        raise ConvertError(f"{e} (from the .weights.h5: {fields}); pass it as an option.") from e
    from .frameworks import build_keras

    layer = build_keras(spec)
    n_vars = len(layer.weights)
    if n_vars != len(rows):
        raise ConvertError(f"{str(path)!r} holds {len(rows)} arrays but {spec.describe()} has {n_vars} Keras "
                           f"weights; pass --arch/--num-classes/--backbone/... to pick the architecture.")
    try:
        _load_weights(layer, path)
    except Exception as e:
        raise ConvertError(f"{str(path)!r} does not load into {spec.describe()}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return from_keras(layer, spec), spec


def _h5_dtype(path):
    import h5py

    with h5py.File(str(path), "r") as f:
        found = []
        f.visititems(lambda n, o: found.append(o.dtype.name) if isinstance(o, h5py.Dataset) else None)
    floats = [d for d in found if d.startswith(("float", "bfloat"))]
    return max(set(floats), key=floats.count) if floats else "float32"


def _load_weights(layer, path):
    if hasattr(layer, "load_weights"):
        layer.load_weights(str(path))
    else:
        from keras.src.saving import saving_lib

        saving_lib.load_weights_only(layer, str(path))


def write_weights_h5(neutral, spec: ArchSpec, path):
    import h5py

    _import_danet_keras()
    layer = to_keras(neutral, spec)
    if hasattr(layer, "save_weights"):
        layer.save_weights(str(path))
    else:
        from keras.src.saving import saving_lib

        saving_lib.save_weights_only(layer, str(path))
    with h5py.File(str(path), "a") as f:
        f.attrs[H5_ATTR] = spec.to_json()
