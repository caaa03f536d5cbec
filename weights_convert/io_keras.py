"""Keras ``.keras`` (config + weights) and ``.weights.h5`` (weights only).

``.keras`` is loaded with ``safe_mode=True`` (no lambdas / arbitrary code) and
its architecture comes from the saved config. A ``.weights.h5`` written here
carries the architecture record in its ``danet_arch`` attribute; one written
by ``save_weights`` alone is inferred from its dataset paths and shapes
(translated to torch names, then the one inference engine). Explicit options
override either, with a note.

On JAX, reading and writing run with 64-bit types enabled (scoped), so
float64 weights stay float64 on every backend. Layers (not only models) are
saved and loaded through Keras' weights-only saving library.
"""

from __future__ import annotations

import re

from .arch import ArchSpec, apply_overrides
from .errors import ConvertError, CorruptFileError, UnsafeFileError
from .frameworks import danet_layer_of, from_keras, keras_precision, spec_from_keras, to_keras
from .infer import infer_record
from .mapping import RULES, inverse_axes

__all__ = ["read_keras", "write_keras", "read_weights_h5", "write_weights_h5", "torch_names_of_h5", "H5_ATTR"]

H5_ATTR = "danet_arch"


def _saving_lib():
    """Keras' weights-only saving (what ``Model.save_weights`` calls), which also takes a bare layer."""
    from keras.src.saving import saving_lib

    return saving_lib


def _import_danet_keras():
    try:
        import danet_keras  # noqa: F401  (registers the serializable classes)
    except ImportError as e:
        raise ConvertError(f"Keras formats need `danet_keras` (and Keras): {e}") from e


def read_keras(path, allow_partial: bool = False):
    """``(weights, spec, notes)`` of a ``.keras`` file; its architecture is its saved config.

    A model that holds weights outside its danet_keras layer (a U-Net with
    ``DualAttention`` at the bottleneck) is refused, naming those layers,
    unless ``allow_partial``: then the danet_keras layer's weights are read
    and the note lists what was left out.
    """
    _import_danet_keras()
    import keras
    from danet_keras.layers import no_init_weights

    try:
        # float64 kept on JAX; the file assigns every weight, so none is drawn first
        with keras_precision(_keras_file_dtype(path)), no_init_weights():
            model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as e:  # zip, JSON, h5 or deserialisation errors
        raise _keras_load_error(path, e) from e
    layer, others = danet_layer_of(model)
    notes = []
    if others:
        names = ", ".join(f"{o.name!r} ({type(o).__name__}, {len(o.weights)} weights)" for o in others)
        if not allow_partial:
            raise ConvertError(f"{str(path)!r} is a {type(model).__name__} whose weights are not all in its "
                               f"{type(layer).__name__} {layer.name!r}: converting it would drop {names}. Refused; "
                               f"pass --allow-partial to convert the {type(layer).__name__} alone.")
        notes.append(f"converted the {type(layer).__name__} {layer.name!r} alone; left out {names}")
    spec = spec_from_keras(layer)
    return from_keras(layer, spec), spec, notes


def _keras_file_dtype(path) -> str:
    """``"float64"`` when the ``.keras`` config names a float64 dtype anywhere, else ``"float32"`` (JSON only)."""
    import zipfile

    try:
        with zipfile.ZipFile(str(path)) as z:
            return "float64" if b'"float64"' in z.read("config.json") else "float32"
    except (OSError, KeyError, zipfile.BadZipFile):
        return "float32"  # load_model reports the damage


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


def write_keras(weights, spec: ArchSpec, path, allow_partial: bool = False):
    """``spec``'s model holding ``weights`` as a ``.keras`` file; with ``allow_partial``, the variables that
    ``weights`` lacks keep their random initial values (a ``.keras`` file holds every variable)."""
    import keras

    _import_danet_keras()
    with keras_precision(spec.dtype):
        keras.saving.save_model(to_keras(weights, spec, allow_partial=allow_partial), str(path))


def _h5_datasets(path):
    import h5py

    rows, record, dtypes = [], None, []
    try:
        with h5py.File(str(path), "r") as f:
            record = f.attrs.get(H5_ATTR)

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    rows.append((name, tuple(obj.shape)))
                    dtypes.append(obj.dtype.name)

            f.visititems(visit)
    except OSError as e:
        raise CorruptFileError(f"{str(path)!r} is truncated or corrupt, or not an HDF5 file: {e}") from e
    if isinstance(record, bytes):
        record = record.decode()
    floats = [d for d in dtypes if d.startswith(("float", "bfloat"))]
    return rows, record, (max(set(floats), key=floats.count) if floats else "float32")


# A danet_keras .weights.h5 names datasets by Keras' saving layout (a Sequential's items by class:
# ``conv5a/layers/conv2d/vars/0``). These rules translate the datasets the inference reads into
# torch names; shapes go from Keras' layout to torch's with the mapping's own rule.
_H5_NAMES = (
    (re.compile(r"(?:^|/)(conv5[ac12])/layers/conv2d/vars/0$"), "{p}{0}.0.weight", "conv_kernel"),
    (re.compile(r"(?:^|/)(conv[678])/layers/conv2d/vars/0$"), "{p}{0}.1.weight", "conv_kernel"),
    (re.compile(r"(?:^|/)sa/query_conv/vars/0$"), "{p}sa.query_conv.weight", "conv_kernel"),
    (re.compile(r"^query_conv/vars/0$"), "query_conv.weight", "conv_kernel"),
    (re.compile(r"(?:dilated_res_net|pretrained)/conv1/layers/conv2d/vars/0$"), "pretrained.conv1.0.weight",
     "conv_kernel"),
    (re.compile(r"(?:dilated_res_net|pretrained)/conv1/vars/0$"), "pretrained.conv1.weight", "conv_kernel"),
    (re.compile(r"(?:dilated_res_net|pretrained)/layer3/layers/bottleneck(?:_(\d+))?/conv1/vars/0$"),
     "pretrained.layer3.{block}.conv1.weight", "conv_kernel"),
)


def torch_names_of_h5(rows) -> dict:
    """``{torch name: torch shape}`` for the datasets of a danet_keras ``.weights.h5`` that inference reads."""
    danet = any(re.search(r"(?:^|/)(?:dilated_res_net|pretrained)/", p) for p, _ in rows)
    out = {}
    for path, shape in rows:
        for pattern, template, rule in _H5_NAMES:
            m = pattern.search(path)
            if m:
                groups = m.groups()
                block = int(groups[0]) if "block" in template and groups[0] else 0
                name = template.format(*groups, p="head." if danet else "", block=block)
                out[name] = tuple(shape[a] for a in inverse_axes(RULES[rule][0]))
                break
    if not out and len(rows) == 1 and rows[0][1] == (1,):
        out["gamma"] = (1,)
    return out


def read_weights_h5(path, overrides: dict | None = None):
    """``(weights, spec, notes, stored)`` of a ``.weights.h5``: build the stored (or inferred) architecture, load,
    read back; ``stored`` says whether the record came from the file."""
    _import_danet_keras()
    import json

    rows, record, dtype = _h5_datasets(path)
    if record:
        try:
            spec = ArchSpec.from_dict(json.loads(record))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{str(path)!r} has a corrupt `{H5_ATTR}` attribute: {e}") from e
        spec, notes = apply_overrides(spec, overrides or {}, "the stored record")
    else:
        spec, notes = infer_record(torch_names_of_h5(rows), hints={"dtype": dtype}, overrides=overrides)
    with keras_precision(spec.dtype):
        layer = spec.build_keras(initialize=False)  # every weight is loaded from the file below
        if len(layer.weights) != len(rows):
            raise ConvertError(f"{str(path)!r} holds {len(rows)} arrays but {spec.describe()} has "
                               f"{len(layer.weights)} Keras weights; pass --arch/--num-classes/--backbone/... "
                               f"to pick the architecture.")
        try:
            _saving_lib().load_weights_only(layer, str(path))
        except Exception as e:
            raise ConvertError(f"{str(path)!r} does not load into {spec.describe()}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from e
        return from_keras(layer, spec), spec, notes, bool(record)


def write_weights_h5(weights, spec: ArchSpec, path, allow_partial: bool = False):
    """As :func:`write_keras`, the weights alone, the record in the ``danet_arch`` attribute."""
    import json

    import h5py

    _import_danet_keras()
    with keras_precision(spec.dtype):
        _saving_lib().save_weights_only(to_keras(weights, spec, allow_partial=allow_partial), str(path))
    with h5py.File(str(path), "a") as f:
        f.attrs[H5_ATTR] = json.dumps(spec.to_dict(), sort_keys=True)
