"""Keras ``.keras`` (config + weights) and ``.weights.h5`` (weights only).

``.keras`` is loaded with ``safe_mode=True`` (no lambdas / arbitrary code) and
its architecture comes from the saved config. A ``.weights.h5`` written here
carries the architecture record in its ``danet_arch`` attribute; one written
by ``save_weights`` alone is inferred from its dataset paths and shapes
(translated to torch names, then the one inference engine). Explicit options
override either, with a note. The danet_keras layer's datasets are found by
their paths: at the file's root (the layer's own ``save_weights``) or under
its group in a Keras model holding it (``layers/dual_attention/...``).

On JAX, reading and writing run with 64-bit types enabled (scoped), so
float64 weights stay float64 on every backend. Layers (not only models) are
saved and loaded through Keras' weights-only saving library.
"""

from __future__ import annotations

import re

from .arch import ArchSpec, apply_overrides
from .errors import ConvertError, CorruptFileError, UnsafeFileError, one_line
from .frameworks import danet_layer_of, from_keras, keras_precision, spec_from_keras, to_keras
from .infer import infer_record
from .mapping import RULES, inverse_axes
from .neutral import common_float_dtype

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

    from .io_arrays import check_zip

    check_zip(path, "Keras .keras")  # load_model says "File not found" for a file that is no zip
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
      the error on one line.

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
    return CorruptFileError(f"{str(path)!r} is truncated or corrupt, or not a danet_keras .keras file: "
                            f"{one_line(e)}")


def write_keras(weights, spec: ArchSpec, path, allow_partial: bool = False, allow_cast: bool = False) -> list:
    """``spec``'s model holding ``weights`` as a ``.keras`` file; with ``allow_partial``, the variables that
    ``weights`` lacks keep their random initial values (a ``.keras`` file holds every variable). A tensor the
    file cannot hold as it is is refused unless ``allow_cast`` (:func:`to_keras`). Returns the notes (casts)."""
    import keras

    _import_danet_keras()
    notes: list = []
    with keras_precision(spec.dtype):
        layer = to_keras(weights, spec, allow_partial=allow_partial, allow_cast=allow_cast, notes=notes)
        keras.saving.save_model(layer, str(path))
    return notes


def _h5_datasets(path):
    """``(rows, dtypes, record)``: ``[(dataset path, shape)]``, ``{dataset path: dtype name}``, the stored record."""
    import h5py

    rows, dtypes, record = [], {}, None
    try:
        with h5py.File(str(path), "r") as f:
            record = f.attrs.get(H5_ATTR)

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    rows.append((name, tuple(obj.shape)))
                    dtypes[name] = obj.dtype.name

            f.visititems(visit)
    except OSError as e:
        raise CorruptFileError(f"{str(path)!r} is truncated or corrupt, or not an HDF5 file: {e}") from e
    if isinstance(record, bytes):
        record = record.decode()
    return rows, dtypes, record


# A danet_keras .weights.h5 names datasets by Keras' saving layout (a Sequential's items by class:
# ``conv5a/layers/conv2d/vars/0``), relative to the layer's own group: the file's root for the layer's (or
# DANet's) own save_weights, ``layers/<name>/`` (or an attribute's name) for a model holding the layer.
_BACKBONE = r"(?:layers/dilated_res_net|pretrained)/"
# The datasets that mark the group of a danet_keras layer: DANet's stem, conv5a (DANetHead, DualAttention),
# PositionAttention's query conv; a ChannelAttention is a group holding its `gamma` alone.
_LAYER_ROOT = re.compile(rf"^(.*/)?(?:{_BACKBONE}conv1/|conv5a/layers/conv2d/vars/0$|query_conv/vars/0$)")
_LAYOUTS = ("the layer's (or DANet's) own save_weights: datasets at the root (`conv5a/layers/conv2d/vars/0`, "
           "`query_conv/vars/0`, `layers/dilated_res_net/...`); or a Keras model's save_weights holding exactly "
           "one danet_keras layer: the same under the layer's group (`layers/dual_attention/...`)")
# The datasets the inference reads, relative to the layer's group, translated into torch names; shapes go
# from Keras' layout to torch's with the mapping's own rule. A DANet's head is under ``head/``.
_H5_NAMES = (
    (re.compile(r"^(conv5[ac12])/layers/conv2d/vars/0$"), "{p}{0}.0.weight", "conv_kernel"),
    (re.compile(r"^(conv[678])/layers/conv2d/vars/0$"), "{p}{0}.1.weight", "conv_kernel"),
    (re.compile(r"^sa/query_conv/vars/0$"), "{p}sa.query_conv.weight", "conv_kernel"),
    (re.compile(r"^query_conv/vars/0$"), "query_conv.weight", "conv_kernel"),
    (re.compile(rf"^{_BACKBONE}conv1/layers/conv2d/vars/0$"), "pretrained.conv1.0.weight", "conv_kernel"),
    (re.compile(rf"^{_BACKBONE}conv1/vars/0$"), "pretrained.conv1.weight", "conv_kernel"),
    (re.compile(rf"^{_BACKBONE}layer3/layers/bottleneck(?:_(\d+))?/conv1/vars/0$"),
     "pretrained.layer3.{block}.conv1.weight", "conv_kernel"),
)


def torch_names_of_h5(rows) -> dict:
    """``{torch name: torch shape}`` for the datasets (paths relative to the layer's group) that inference reads."""
    danet = any(re.match(_BACKBONE, p) for p, _ in rows)
    out = {}
    for path, shape in rows:
        prefix = ""
        if danet and path.startswith("head/"):
            path, prefix = path[len("head/"):], "head."
        for pattern, template, rule in _H5_NAMES:
            m = pattern.match(path)
            if m:
                groups = m.groups()
                block = int(groups[0]) if "block" in template and groups[0] else 0
                name = template.format(*groups, p=prefix, block=block)
                out[name] = tuple(shape[a] for a in inverse_axes(RULES[rule][0]))
                break
    if not out and rows == [("vars/0", (1,))]:
        out["gamma"] = (1,)
    return out


def _owners(rows) -> list:
    """``["group (n arrays)"]``: the Keras objects (the groups above ``vars/``) holding ``rows``, in file order."""
    counts: dict = {}
    for path, _ in rows:
        owner = path.rpartition("/vars/")[0] if "/vars/" in path else path.rpartition("/")[0] or "(root)"
        counts[owner] = counts.get(owner, 0) + 1
    return [f"{o} ({n} array{'s' if n > 1 else ''})" for o, n in counts.items()]


def _layer_group(path, rows, allow_partial: bool):
    """``(group, rows inside it relative to it, notes)``: the group holding the one danet_keras layer's weights.

    ``group`` is ``""`` (the file's root) or ends in ``/``. Datasets outside it are refused, naming their
    owners, unless ``allow_partial`` (then a note names them).
    """
    groups = {m.group(1) or "" for p, _ in rows if (m := _LAYER_ROOT.match(p))}
    groups |= {p[:-len("vars/0")] for p, s in rows if (p == "vars/0" or p.endswith("/vars/0")) and s == (1,)
               and sum(q.startswith(p[:-len("vars/0")]) for q, _ in rows) == 1}  # ChannelAttention
    outer = sorted(g for g in groups if not any(o != g and g.startswith(o) for o in groups))
    if len(outer) != 1:
        found = (f"{len(outer)} danet_keras layers' weights (under {', '.join(f'`{g}`' for g in outer)})"
                 if outer else f"no danet_keras layer's weights ({len(rows)} arrays, held by "
                                f"{', '.join(_owners(rows)[:5]) or 'nothing'})")
        raise ConvertError(f"{str(path)!r} holds {found}; converting needs exactly one. Accepted layouts: "
                           f"{_LAYOUTS}.")
    group = outer[0]
    inside = [(p[len(group):], s) for p, s in rows if p.startswith(group)]
    outside = [(p, s) for p, s in rows if not p.startswith(group)]
    notes = []
    if outside:
        names = ", ".join(_owners(outside)[:10]) + (" ..." if len(_owners(outside)) > 10 else "")
        if not allow_partial:
            raise ConvertError(f"{str(path)!r} holds weights outside its danet_keras layer (`{group}`): "
                               f"converting it would drop {names}. Refused; pass --allow-partial to convert the "
                               f"danet_keras layer alone.")
        notes.append(f"converted the danet_keras layer under `{group}` alone; left out {names}")
    return group, inside, notes


def _load_group(layer, path, group: str):
    """Keras' ``load_weights_only`` (what ``Model.load_weights`` runs) into ``layer`` from the file's ``group``."""
    saving_lib = _saving_lib()
    store = saving_lib.H5IOStore(str(path), mode="r")
    errors: dict = {}
    try:
        saving_lib._load_state(layer, weights_store=store, assets_store=None, inner_path=group.rstrip("/"),
                               visited_saveables=set(), failed_saveables=set(), error_msgs=errors)
    finally:
        store.close()
    if errors:
        saving_lib._raise_loading_failure(errors)


def read_weights_h5(path, overrides: dict | None = None, allow_partial: bool = False):
    """``(weights, spec, notes, stored)`` of a ``.weights.h5``: find the danet_keras layer's group, build the
    stored (or inferred) architecture, load, read back; ``stored`` says whether the record came from the file."""
    _import_danet_keras()
    import json

    rows, dtypes, record = _h5_datasets(path)
    group, inside, notes = _layer_group(path, rows, allow_partial)
    if record:
        try:
            spec = ArchSpec.from_dict(json.loads(record))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{str(path)!r} has a corrupt `{H5_ATTR}` attribute: {e}") from e
        spec, changed = apply_overrides(spec, overrides or {}, "the stored record")
    else:
        dtype = common_float_dtype(dtypes[group + p] for p, _ in inside)
        spec, changed = infer_record(torch_names_of_h5(inside), hints={"dtype": dtype}, overrides=overrides)
    with keras_precision(spec.dtype):
        layer = spec.build_keras(initialize=False)  # every weight is loaded from the file below
        if len(layer.weights) != len(inside):
            where = f" under `{group}`" if group else ""
            raise ConvertError(f"{str(path)!r} holds {len(inside)} arrays{where} but {spec.describe()} has "
                               f"{len(layer.weights)} Keras weights; pass --arch/--num-classes/--backbone/... "
                               f"to pick the architecture.")
        try:
            _load_group(layer, path, group)
        except Exception as e:
            raise ConvertError(f"{str(path)!r} does not load into {spec.describe()}: {one_line(e)}") from e
        return from_keras(layer, spec), spec, notes + changed, bool(record)


def write_weights_h5(weights, spec: ArchSpec, path, allow_partial: bool = False, allow_cast: bool = False) -> list:
    """As :func:`write_keras`, the weights alone, the record in the ``danet_arch`` attribute."""
    import json

    import h5py

    _import_danet_keras()
    notes: list = []
    with keras_precision(spec.dtype):
        layer = to_keras(weights, spec, allow_partial=allow_partial, allow_cast=allow_cast, notes=notes)
        _saving_lib().save_weights_only(layer, str(path))
    with h5py.File(str(path), "a") as f:
        f.attrs[H5_ATTR] = json.dumps(spec.to_dict(), sort_keys=True)
    return notes
