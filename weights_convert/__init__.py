"""Lossless DANet weight conversion between PyTorch, Keras and existing checkpoints.

The neutral form is an ordered ``{torch state_dict name: numpy array}`` in
PyTorch layout; every format reads into it and writes out of it, with the
architecture record (:class:`ArchSpec`) beside it. Importing this package
imports neither torch nor Keras.
"""

from .api import FORMATS, Checkpoint, conform, detect_format, load, save
from .arch import ARCHS, KINDS, ArchSpec, Kind, apply_overrides, expected_shapes
from .errors import ConvertError, CorruptFileError, RefusedError, StrictLoadError, UnsafeFileError, check_strict
from .frameworks import from_keras, from_torch, spec_from_keras, spec_from_torch, to_keras, to_torch
from .infer import infer_arch, infer_record
from .mapping import keras_table
from .tolerances import Comparison, Tolerance, compare, tolerance

__all__ = [
    "load", "save", "conform", "Checkpoint", "to_torch", "to_keras", "from_torch", "from_keras", "infer_arch",
    "infer_record", "spec_from_torch", "spec_from_keras", "ArchSpec", "Kind", "KINDS", "ARCHS", "apply_overrides",
    "expected_shapes", "keras_table", "FORMATS", "detect_format", "ConvertError", "StrictLoadError", "CorruptFileError",
    "UnsafeFileError", "RefusedError", "check_strict", "compare", "tolerance", "Tolerance", "Comparison",
]
