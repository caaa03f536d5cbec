"""Lossless DANet weight conversion between PyTorch, Keras and existing checkpoints.

The neutral form is an ordered ``{torch state_dict name: numpy array}`` in
PyTorch layout; every format reads into it and writes out of it. Importing
this package imports neither torch nor Keras.
"""

from .api import FORMATS, detect_format, load, save
from .arch import ARCHS, ArchSpec, expected_shapes
from .errors import ConvertError, CorruptFileError, RefusedError, StrictLoadError, UnsafeFileError, check_strict
from .frameworks import from_keras, from_torch, spec_from_keras, to_keras, to_torch
from .infer import infer_arch
from .mapping import keras_table
from .neutral import Neutral

__all__ = [
    "load", "save", "to_torch", "to_keras", "from_torch", "from_keras", "infer_arch", "spec_from_keras",
    "ArchSpec", "ARCHS", "expected_shapes", "keras_table", "Neutral", "FORMATS", "detect_format",
    "ConvertError", "StrictLoadError", "CorruptFileError", "UnsafeFileError", "RefusedError", "check_strict",
]
