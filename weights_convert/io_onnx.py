"""``.onnx`` output: build the model of a spec, load the neutral weights, export it (write-only format).

* ``framework="torch"`` (default): ``danet_torch`` module, exported by
  :func:`danet_torch.export.export_onnx` (``torch.export``-based exporter,
  legacy exporter as fallback).
* ``framework="keras"``: ``danet_keras`` layer wrapped in a Functional model,
  exported by Keras (``model.export(format="onnx")``, tf2onnx) on the
  TensorFlow backend.

Either way the file has one input ``"input"`` with dynamic batch, height and
width, NCHW by default (``data_format="channels_first"``; the Keras model is
built channels-first for it), and outputs ``"fused", "pam", "cam"``
(DANetHead, DANet) or ``"output"``: the same interface whichever framework
wrote it. The file is written atomically (temporary file in the target
folder, renamed into place).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from .arch import ArchSpec
from .errors import ConvertError

__all__ = ["write_onnx", "verify_onnx", "FRAMEWORKS", "example_size"]

FRAMEWORKS = ("torch", "keras")
DATA_FORMATS = ("channels_first", "channels_last")


def example_size(spec: ArchSpec) -> int:
    """Spatial size traced at export (any size runs afterwards)."""
    return 65 if spec.arch == "danet" else 12


def _channels(spec: ArchSpec) -> int:
    return spec.input_channels or 8


def _output_names(spec: ArchSpec) -> list[str]:
    return ["fused", "pam", "cam"] if spec.arch in ("head", "danet") else ["output"]


def write_onnx(neutral, spec: ArchSpec, path, framework: str = "torch", data_format: str = "channels_first",
               opset: int | None = None) -> str:
    """Write the model of ``spec`` holding ``neutral`` as ONNX at ``path``; return the exporter used.

    Args:
        neutral: Weights in the neutral form (torch names and layout), already
            checked against ``spec`` (:func:`weights_convert.api.conform`).
        spec: The architecture; ``spec.dtype`` must be float32 for Keras.
        path: Destination ``.onnx`` file (replaced atomically; refusing an
            existing one is the caller's job, see ``check_destination``).
        framework: ``"torch"`` or ``"keras"`` (TensorFlow backend only).
        data_format: Layout of the file's input and outputs; ``"channels_last"``
            is only available with ``framework="keras"``.
        opset: ONNX opset (default: the exporter's).

    Returns:
        ``"dynamo"``/``"legacy"`` (torch exporters) or ``"tf2onnx"`` (Keras).

    Raises:
        ConvertError: unsupported framework/layout/backend, or the export failed.
    """
    if framework not in FRAMEWORKS:
        raise ConvertError(f"`framework` must be one of {list(FRAMEWORKS)}, got {framework!r}.")
    if data_format not in DATA_FORMATS:
        raise ConvertError(f"`data_format` must be one of {list(DATA_FORMATS)}, got {data_format!r}.")
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ConvertError(f"ONNX output needs a path ending in .onnx, got {str(path)!r}.")
    if framework == "torch":
        if data_format != "channels_first":
            raise ConvertError("`data_format='channels_last'` ONNX export needs framework='keras'; PyTorch "
                               "modules are NCHW.")
        return _write_torch(neutral, spec, path, opset)
    return _write_keras(neutral, spec, path, data_format, opset)


def _write_torch(neutral, spec, path, opset):
    import torch

    from danet_torch.export import export_onnx

    from .frameworks import to_torch

    model = to_torch(neutral, spec)
    size = example_size(spec)
    dtype = getattr(torch, spec.dtype)
    if dtype != torch.float32:  # ONNX consumers expect float32; keep the weights' values
        model = model.float()
    x = torch.zeros(2, _channels(spec), size, size)
    try:
        return export_onnx(model, path, x, dynamic=True, opset=opset)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConvertError(f"ONNX export of {spec.describe()} failed: {e}") from e


def _write_keras(neutral, spec, path, data_format, opset):
    import keras
    import numpy as np

    if keras.backend.backend() != "tensorflow":
        raise ConvertError(f"Keras ONNX export needs the TensorFlow backend (KERAS_BACKEND=tensorflow); the "
                           f"backend is {keras.backend.backend()!r}. Use framework='torch' instead.")
    if spec.dtype != "float32":
        spec = spec.replace(dtype="float32")  # Keras' ONNX export requires a float32 policy
    from .frameworks import build_keras, to_keras
    from .io_keras import _import_danet_keras

    _import_danet_keras()
    layer = to_keras(neutral, spec, layer=build_keras(spec, data_format=data_format))
    c = _channels(spec)
    shape = (c, None, None) if data_format == "channels_first" else (None, None, c)
    inp = keras.Input(shape=shape, name="input")
    out = layer(inp, training=False) if spec.arch in ("head", "dual_attention", "danet") else layer(inp)
    model = keras.Model(inp, out)
    size = example_size(spec)
    model(np.zeros((1,) + tuple(size if s is None else s for s in shape), dtype="float32"))  # marks it called
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}.onnx"
    try:
        model.export(str(tmp), format="onnx", verbose=False, opset_version=opset)
        _rename_outputs(tmp, _output_names(spec))
        os.replace(tmp, path)
    except ConvertError:
        raise
    except Exception as e:
        raise ConvertError(f"Keras ONNX export of {spec.describe()} failed: {type(e).__name__}: {e}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return "tf2onnx"


def _rename_outputs(path, names):
    """Rename the graph outputs (tf2onnx calls them ``Identity:0``, ...) to ``names``, in place."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    if len(graph.output) != len(names):
        raise ConvertError(f"The exported graph has {len(graph.output)} outputs, expected {len(names)} ({names}).")
    mapping = {o.name: n for o, n in zip(graph.output, names)}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for i, name in enumerate(node.output):
            if name in mapping:
                node.output[i] = mapping[name]
    for o in graph.output:
        o.name = mapping[o.name]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def verify_onnx(neutral, spec: ArchSpec, path, seed: int = 0, size: int | None = None) -> list:
    """``[Comparison]``: onnxruntime on the ``.onnx`` at ``path`` against the torch model of ``neutral``.

    One seeded float32 NCHW input (``size`` default 33 for DANet, 8 otherwise:
    not the size traced at export, so the dynamic axes are exercised too),
    tolerance ``tolerance("float32", "model" if DANet else "layer")`` from
    ``weights_convert.tolerances``. The torch model runs in float32 whatever
    ``spec.dtype`` (the ONNX file is float32). Only NCHW files (the default).

    Raises:
        ConvertError: onnxruntime is missing, or the file does not run.
    """
    import numpy as np

    from .tolerances import compare, tolerance

    from .verify import _input, run_model

    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ConvertError(f"--verify of an .onnx DST needs onnxruntime (pip install onnxruntime): {e}") from e
    x = _input(spec, seed, size).astype(np.float32)
    expected = run_model(neutral, spec.replace(dtype="float32"), "torch", x)
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        got = sess.run(names, {"input": x})
    except Exception as e:  # onnxruntime raises its own exception types
        raise ConvertError(f"onnxruntime could not run {str(path)!r}: {type(e).__name__}: {e}") from e
    if len(got) != len(expected):
        raise ConvertError(f"{str(path)!r} gives {len(got)} outputs, the torch model {len(expected)}.")
    tol = tolerance("float32", "model" if spec.arch == "danet" else "layer")
    return [compare(f"{n} (torch -> onnxruntime)", g, e, tol) for n, g, e in zip(names, got, expected)]
