"""``load`` / ``save``: any supported file <-> the neutral form and its architecture record, strictly.

Reading prefers the record stored in the file; options override it with a
note; without a record the architecture is inferred and every assumption is
said. Writing stores the record beside the weights, in every format, and
goes through the one atomic writer (:mod:`weights_convert.atomic`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from .arch import ArchSpec, apply_overrides, expected_shapes
from .atomic import atomic_target, check_destination
from .errors import ConvertError, CorruptFileError, check_strict
from .importers import import_checkpoint
from .infer import infer_record

__all__ = ["FORMATS", "WRITE_ONLY", "KERAS_FORMATS", "Checkpoint", "detect_format", "check_readable", "load",
           "save", "conform", "read_raw"]

# format -> extensions
FORMATS = {
    "torch": (".pth", ".pt"),
    "safetensors": (".safetensors",),
    "npz": (".npz",),
    "keras_weights": (".weights.h5",),
    "keras": (".keras",),
    "onnx": (".onnx",),
}
PARTIAL_NOTE = "partial: "  # the start of the note saying what allow_partial left out
WRITE_ONLY = ("onnx",)  # formats written but never read back
KERAS_FORMATS = ("keras", "keras_weights")


@dataclass(frozen=True)
class Checkpoint:
    """What :func:`load` read.

    Attributes:
        weights: The neutral form: ``{torch state_dict name: ndarray}`` in the record's order.
        arch: The architecture record.
        notes: What was done or assumed on the way (renames, assumptions, overrides, what was left out).
        stored_record: Whether ``arch`` came from a record stored in the file (else inferred).
    """

    weights: "OrderedDict"
    arch: ArchSpec
    notes: tuple = field(default=())
    stored_record: bool = False

    def __iter__(self):  # ``weights, arch = load(path)``
        return iter((self.weights, self.arch))


def detect_format(path) -> str:
    name = str(path).lower()
    for fmt, exts in FORMATS.items():
        if name.endswith(exts):
            return fmt
    accepted = ", ".join(e for exts in FORMATS.values() for e in exts)
    raise ConvertError(f"Unsupported file extension for {str(path)!r}; accepted: {accepted}.")


def check_readable(path) -> str:
    """The format of ``path`` as a SRC; raises :class:`ConvertError` for a write-only format or a non-file."""
    fmt = detect_format(path)
    if fmt in WRITE_ONLY:
        accepted = ", ".join(e for f, exts in FORMATS.items() if f not in WRITE_ONLY for e in exts)
        raise ConvertError(f"{str(path)!r}: ONNX is an export format: danet-convert writes .onnx but cannot read "
                           f"weights back from it; accepted SRC formats: {accepted}.")
    path = Path(path)
    if path.is_dir():
        raise ConvertError(f"SRC {str(path)!r} is a folder; give a weights file.")
    if not path.is_file():
        raise ConvertError(f"SRC {str(path)!r} does not exist.")
    if path.stat().st_size == 0:
        raise CorruptFileError(f"SRC {str(path)!r} is empty (0 bytes): not a weights file.")
    return fmt


def read_raw(path):
    """``(top-level object or mapping of arrays, stored record dict or None)`` of a non-Keras file."""
    fmt = check_readable(path)
    if fmt == "torch":
        from .io_torch import RECORD_KEY, read_pth

        obj = read_pth(path)
        stored = obj.get(RECORD_KEY) if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) else None
        return obj, stored if isinstance(stored, dict) else None
    if fmt == "safetensors":
        from .io_arrays import read_safetensors

        return read_safetensors(path)
    if fmt == "npz":
        from .io_arrays import read_npz

        return read_npz(path)
    raise ConvertError(f"{str(path)!r} is a Keras file; use load().")


def _record(stored, path) -> ArchSpec:
    try:
        return ArchSpec.from_dict(stored)
    except (TypeError, ValueError) as e:
        raise CorruptFileError(f"{str(path)!r} holds an unreadable architecture record ({e}): {stored!r}") from e


def load(path, *, key: str | None = None, strip_prefix: str | None = None, allow_partial: bool = False,
         **overrides) -> Checkpoint:
    """Read ``path`` into a :class:`Checkpoint`, checked strictly against its architecture.

    Args:
        path: ``.pth``/``.pt`` (ours, a state_dict, the official checkpoint dict, mmseg's),
            ``.safetensors``, ``.npz``, ``.weights.h5`` or ``.keras`` (``.onnx`` is write-only).
        key: The checkpoint entry holding the weights (``model``, ``ema``, ...); default ``state_dict``.
        strip_prefix: A prefix every key carries (``model.``); ``module.`` is removed by default. With
            ``allow_partial``, the keys outside it are left out (a module inside a user's model).
        allow_partial: Keep what fits instead of raising; what was left out is in ``notes``.
        **overrides: Record fields (``kind``, ``num_classes``, ``multi_grid``, ...) that win over the
            stored or inferred record, each change said in ``notes``. ``None`` is a value
            (``multi_grid=None``: no multi-grid).

    Returns:
        ``Checkpoint(weights, arch, notes, stored_record)``; ``weights, arch = load(path)`` also works.

    Raises:
        CorruptFileError, UnsafeFileError, StrictLoadError, ConvertError.
    """
    fmt = check_readable(path)
    notes: list = []
    if fmt in KERAS_FORMATS and (key is not None or strip_prefix is not None):
        raise ConvertError(f"`--key`/`--strip-prefix` apply to .pth/.safetensors/.npz, not to {str(path)!r}.")
    if fmt == "keras":
        from .io_keras import read_keras

        weights, spec, notes = read_keras(path, allow_partial)
        spec, changed = _override(spec, overrides, "the .keras config")
        notes += changed
        stored = True
    elif fmt == "keras_weights":
        from .io_keras import read_weights_h5

        weights, spec, notes, stored = read_weights_h5(path, overrides, allow_partial)
    else:
        obj, record = read_raw(path)
        weights, hints, notes = import_checkpoint(obj, key, strip_prefix, allow_partial)
        if record is not None:
            spec, changed = _override(_record(record, path), overrides, "the stored record")
        else:
            spec, changed = infer_record(weights, hints, overrides)
        notes += changed
        stored = record is not None
    weights, left_out = conform(weights, spec, allow_partial)
    return Checkpoint(weights, spec, tuple(notes + left_out), stored)


def _override(spec, overrides, source):
    try:
        return apply_overrides(spec, overrides, source)
    except ValueError as e:
        raise ConvertError(str(e)) from e


def conform(weights, spec: ArchSpec, allow_partial: bool = False):
    """``(weights in spec's state_dict order, notes)``: strict unless ``allow_partial``, which drops what does not fit."""
    expected = expected_shapes(spec)
    missing, unexpected, mismatched = check_strict(expected, weights, context=spec.describe(),
                                                   allow_partial=allow_partial)
    notes = []
    if missing or unexpected or mismatched:
        notes.append(
            f"{PARTIAL_NOTE}left out {len(missing)} missing ({', '.join(k for k, _ in missing[:5])}), "
            f"{len(unexpected)} unexpected ({', '.join(k for k, _ in unexpected[:5])}), "
            f"{len(mismatched)} shape-mismatched ({', '.join(k for k, *_ in mismatched[:5])}) key(s)")
    bad = {k for k, *_ in mismatched}
    return OrderedDict((k, weights[k]) for k in expected if k in weights and k not in bad), notes


def save(weights, path, arch: ArchSpec, *, force: bool = False, allow_partial: bool = False,
         allow_cast: bool = False, src=None, onnx_framework: str = "torch") -> list:
    """Write ``weights`` and the record ``arch`` to ``path`` (format by extension), atomically.

    The file is written to ``.NAME.tmp-XXXX<ext>`` in the target folder and
    renamed into place; an existing ``path`` is refused unless ``force``, and
    ``src`` (the file read) is never overwritten. Keras formats build the
    ``danet_keras`` model of ``arch`` (a Keras file holds every variable:
    with ``allow_partial``, those ``weights`` lack keep their random initial
    values, and a note says so). A Keras file holds ``arch.dtype`` weights and int32 counters: a tensor it
    would not give back as it is (another dtype, another value) is refused, naming each, unless
    ``allow_cast`` (then a note names the casts); ``.onnx`` exports the model of ``arch``
    holding ``weights``, built by ``onnx_framework`` (``"torch"``, or
    ``"keras"`` on the TensorFlow backend), in float32: half-precision weights
    are widened (a note), float64 ones refused unless ``allow_cast``. ONNX is write-only.

    Returns:
        Notes: what ``allow_partial`` left out, what ``allow_cast`` cast (empty when neither).
    """
    if not isinstance(arch, ArchSpec):
        raise TypeError(f"`arch` must be an ArchSpec (see weights_convert.load / infer_arch), got "
                        f"{type(arch).__name__}.")
    fmt = detect_format(path)
    if fmt == "onnx":
        from .io_onnx import FRAMEWORKS

        if onnx_framework not in FRAMEWORKS:
            raise ConvertError(f"`onnx_framework` must be one of {list(FRAMEWORKS)}, got {onnx_framework!r}.")
    dst = check_destination(src, path, force)
    weights, notes = conform(weights, arch, allow_partial)
    missing = [k for k in expected_shapes(arch) if k not in weights]
    if fmt == "onnx" and missing:
        raise ConvertError(f"An ONNX file is a complete model: {len(missing)} weight(s) of {arch.describe()} "
                           f"are missing ({', '.join(missing[:5])}); --allow-partial cannot write .onnx.")
    if fmt == "onnx" and arch.dtype != "float32":  # the exporters build a float32 model
        rounded = arch.dtype == "float64"
        if rounded and not allow_cast:
            raise ConvertError(f"An ONNX file holds a float32 model: the float64 weights of {arch.describe()} "
                               f"would be rounded to float32. Refused; pass --allow-cast to export them rounded "
                               f"(.pth, .safetensors, .npz and Keras files keep float64).")
        notes.append(f"exported as float32 ({arch.dtype} -> float32, values {'rounded' if rounded else 'kept'})")
    if fmt in ("keras", "keras_weights") and missing:
        notes.append(f"a Keras file holds every variable: the {len(missing)} left out ({', '.join(missing[:5])}) "
                     f"keep their random initial values in {Path(str(dst)).name}")
    record = arch.to_dict()
    suffix = next(e for e in FORMATS[fmt] if str(dst).lower().endswith(e))
    with atomic_target(dst, suffix) as tmp:
        if fmt == "torch":
            from .io_torch import write_pth

            write_pth(weights, tmp, record)
        elif fmt == "safetensors":
            from .io_arrays import write_safetensors

            write_safetensors(weights, tmp, record)
        elif fmt == "npz":
            from .io_arrays import write_npz

            write_npz(weights, tmp, record)
        elif fmt == "keras_weights":
            from .io_keras import write_weights_h5

            notes += write_weights_h5(weights, arch, tmp, allow_partial, allow_cast)
        elif fmt == "keras":
            from .io_keras import write_keras

            notes += write_keras(weights, arch, tmp, allow_partial, allow_cast)
        else:
            from .io_onnx import write_onnx

            write_onnx(weights, arch, tmp, framework=onnx_framework)
    return notes
