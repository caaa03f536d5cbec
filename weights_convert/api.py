"""``load`` / ``save``: any supported file <-> the neutral form, strict, with atomic writes."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from .arch import ArchSpec, expected_shapes
from .atomic import atomic_target, check_destination
from .errors import ConvertError
from .importers import import_checkpoint
from .infer import infer_arch

__all__ = ["FORMATS", "WRITE_ONLY", "detect_format", "check_readable", "load", "save", "read_raw"]

# format -> extensions
FORMATS = {
    "torch": (".pth", ".pt"),
    "safetensors": (".safetensors",),
    "npz": (".npz",),
    "keras_weights": (".weights.h5",),
    "keras": (".keras",),
    "onnx": (".onnx",),
}
WRITE_ONLY = ("onnx",)  # formats written but never read back


def detect_format(path) -> str:
    name = str(path).lower()
    for fmt, exts in FORMATS.items():
        if name.endswith(exts):
            return fmt
    accepted = ", ".join(e for exts in FORMATS.values() for e in exts)
    raise ConvertError(f"Unsupported file extension for {str(path)!r}; accepted: {accepted}.")


def check_readable(path) -> str:
    """The format of ``path`` as a SRC; raises :class:`ConvertError` for a write-only format (``.onnx``)."""
    fmt = detect_format(path)
    if fmt in WRITE_ONLY:
        accepted = ", ".join(e for f, exts in FORMATS.items() if f not in WRITE_ONLY for e in exts)
        raise ConvertError(f"{str(path)!r}: ONNX is an export format: danet-convert writes .onnx but cannot read "
                           f"weights back from it; accepted SRC formats: {accepted}.")
    return fmt


def read_raw(path):
    """``(top-level object or mapping of arrays, stored ArchSpec dict or None)`` of a non-Keras file."""
    fmt = check_readable(path)
    if fmt == "torch":
        from .io_torch import read_pth

        return read_pth(path), None
    if fmt == "safetensors":
        from .io_arrays import read_safetensors

        return read_safetensors(path)
    if fmt == "npz":
        from .io_arrays import read_npz

        return read_npz(path)
    raise ConvertError(f"{str(path)!r} is a Keras file; use load().")


def _clean_overrides(overrides):
    return {k: v for k, v in overrides.items() if v is not None or k == "multi_grid"}


def load(path, allow_partial: bool = False, **arch_overrides):
    """Read ``path`` into ``(neutral, ArchSpec)``, checked strictly against the architecture.

    Args:
        path: ``.pth``/``.pt`` (state_dict, official checkpoint dict, mmseg checkpoint),
            ``.safetensors``, ``.npz``, ``.weights.h5`` or ``.keras`` (``.onnx`` is
            write-only and refused).
        allow_partial: Keep only the keys that fit instead of raising; what was
            left out is listed in ``spec.notes``.
        **arch_overrides: :class:`ArchSpec` fields that win over the inferred
            ones (``arch``, ``num_classes``, ``backbone``, ``deep_stem``,
            ``output_stride``, ``multi_grid``, ``channels``, ...).

    Returns:
        ``(neutral, spec)``: ``neutral`` in the architecture's state_dict order.

    Raises:
        CorruptFileError, UnsafeFileError, StrictLoadError, ConvertError.
    """
    path = Path(path)
    fmt = check_readable(path)
    if not path.is_file():
        raise ConvertError(f"SRC {str(path)!r} does not exist or is not a file.")
    overrides = _clean_overrides(arch_overrides)
    notes: list = []
    if fmt == "keras":
        from .io_keras import read_keras

        neutral, spec = read_keras(path)
        if overrides:
            spec = spec.replace(**overrides)
    elif fmt == "keras_weights":
        from .io_keras import read_weights_h5

        neutral, spec = read_weights_h5(path, overrides)
    else:
        obj, stored = read_raw(path)
        neutral, hints = import_checkpoint(obj, notes)
        spec = infer_arch(neutral, **{**hints, **(stored or {}), **overrides})
    spec.notes = notes + list(spec.notes)
    return conform(neutral, spec, allow_partial), spec


def conform(neutral, spec: ArchSpec, allow_partial: bool = False):
    """``neutral`` checked against ``spec`` and put in its state_dict order (strict unless partial)."""
    from .errors import check_strict

    expected = expected_shapes(spec)
    missing, unexpected, mismatched = check_strict(expected, neutral, context=spec.describe(),
                                                   allow_partial=allow_partial)
    if missing or unexpected or mismatched:
        spec.notes.append(
            f"partial load: left out {len(missing)} missing ({', '.join(k for k, _ in missing[:5])}), "
            f"{len(unexpected)} unexpected ({', '.join(k for k, _ in unexpected[:5])}), "
            f"{len(mismatched)} shape-mismatched ({', '.join(k for k, *_ in mismatched[:5])}) key(s)")
    bad = {k for k, *_ in mismatched}
    return OrderedDict((k, neutral[k]) for k in expected if k in neutral and k not in bad)


def save(neutral, path, arch: ArchSpec | None = None, force: bool = False, allow_partial: bool = False,
         src=None, onnx_framework: str = "torch") -> Path:
    """Write ``neutral`` to ``path`` (format by extension), atomically.

    The file is written to ``.NAME.tmp-XXXX<ext>`` in the target folder and
    renamed into place; an existing ``path`` is refused unless ``force``.
    Keras formats build the ``danet_keras`` model of ``arch`` (inferred if ``None``).
    ``.onnx`` exports the model of ``arch`` holding ``neutral``, built and exported
    by ``onnx_framework`` (``"torch"``, or ``"keras"`` on the TensorFlow backend);
    see :func:`weights_convert.io_onnx.write_onnx`. ONNX is write-only.
    """
    spec = arch if arch is not None else infer_arch(neutral)
    fmt = detect_format(path)
    if fmt == "onnx":
        from .io_onnx import FRAMEWORKS

        if onnx_framework not in FRAMEWORKS:
            raise ConvertError(f"`onnx_framework` must be one of {list(FRAMEWORKS)}, got {onnx_framework!r}.")
    dst = check_destination(src, path, force)
    neutral = conform(neutral, spec, allow_partial)
    if fmt == "onnx":
        missing = [k for k in expected_shapes(spec) if k not in neutral]
        if missing:
            raise ConvertError(f"An ONNX file is a complete model: {len(missing)} weight(s) of {spec.describe()} "
                               f"are missing ({', '.join(missing[:5])}); --allow-partial cannot write .onnx.")
    meta = spec.to_json()
    suffix = next(e for e in FORMATS[fmt] if str(dst).lower().endswith(e))
    with atomic_target(dst, suffix) as tmp:
        if fmt == "torch":
            from .io_torch import write_pth

            write_pth(neutral, tmp)
        elif fmt == "safetensors":
            from .io_arrays import write_safetensors

            write_safetensors(neutral, tmp, meta)
        elif fmt == "npz":
            from .io_arrays import write_npz

            write_npz(neutral, tmp, meta)
        elif fmt == "keras_weights":
            from .io_keras import write_weights_h5

            write_weights_h5(neutral, spec, tmp)
        elif fmt == "keras":
            from .io_keras import write_keras

            write_keras(neutral, spec, tmp)
        else:
            from .io_onnx import write_onnx

            write_onnx(neutral, spec, tmp, framework=onnx_framework)
    return dst
