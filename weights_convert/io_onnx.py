"""``.onnx`` output: build the model of a record, load the weights, export it (write-only format).

* ``framework="torch"`` (default): the ``danet_torch`` module, exported in
  memory by :func:`danet_torch.export.to_onnx` (``torch.export``-based
  exporter, legacy exporter as fallback).
* ``framework="keras"``: the ``danet_keras`` layer wrapped in a Functional
  model, exported by Keras (``model.export(format="onnx")``, tf2onnx) on the
  TensorFlow backend.

Either way the file has one input ``"input"`` with dynamic batch, height and
width, NCHW by default, outputs named by the record's kind (``"fused",
"pam", "cam"`` or ``"output"``), and the architecture record in its
metadata (``danet_arch``). The caller (:func:`weights_convert.save`) gives
the temporary path of the one atomic writer; nothing here renames files.
"""

from __future__ import annotations

import json

from .arch import ArchSpec
from .errors import ConvertError

__all__ = ["write_onnx", "verify_onnx", "FRAMEWORKS", "METADATA_KEY"]

FRAMEWORKS = ("torch", "keras")
DATA_FORMATS = ("channels_first", "channels_last")
METADATA_KEY = "danet_arch"


def write_onnx(weights, spec: ArchSpec, path, framework: str = "torch", data_format: str = "channels_first",
               opset: int | None = None) -> str:
    """Write the model of ``spec`` holding ``weights`` as ONNX at ``path``; return the exporter used.

    Args:
        weights: Weights in the neutral form, already checked against ``spec``.
        spec: The architecture (float16/bfloat16/float64 weights are exported as float32).
        path: The file to write (the atomic writer's temporary path).
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
    if framework == "torch" and data_format != "channels_first":
        raise ConvertError("`data_format='channels_last'` ONNX export needs framework='keras'; PyTorch "
                           "modules are NCHW.")
    spec = spec.replace(dtype="float32", data_format=data_format)  # ONNX consumers expect float32
    try:
        model, used = (_torch_model if framework == "torch" else _keras_model)(weights, spec, path, opset)
    except ConvertError:
        raise
    except Exception as e:  # the exporters raise many types
        raise ConvertError(f"ONNX export of {spec.describe()} failed: {type(e).__name__}: {e}") from e
    import onnx

    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(spec.to_dict(), sort_keys=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return used


def _torch_model(weights, spec, path, opset):
    import numpy as np
    import torch

    from danet_torch.export import to_onnx

    from .frameworks import to_torch

    model = to_torch({k: np.asarray(v, np.int64 if np.asarray(v).dtype.kind == "i" else np.float32)
                      for k, v in weights.items()}, spec)
    size = spec.info.export_size
    return to_onnx(model, torch.zeros(2, spec.example_channels, size, size), dynamic=True, opset=opset)


def _keras_model(weights, spec, path, opset):
    import keras
    import numpy as np
    import onnx

    if keras.backend.backend() != "tensorflow":
        raise ConvertError(f"Keras ONNX export needs the TensorFlow backend (KERAS_BACKEND=tensorflow); the "
                           f"backend is {keras.backend.backend()!r}. Use framework='torch' instead.")
    from .frameworks import to_keras

    layer = to_keras(weights, spec)
    c = spec.example_channels
    shape = (c, None, None) if spec.data_format == "channels_first" else (None, None, c)
    inp = keras.Input(shape=shape, name="input")
    model = keras.Model(inp, _call(layer, inp))
    size = spec.info.export_size
    model(np.zeros((1,) + tuple(size if s is None else s for s in shape), dtype="float32"))  # marks it called
    model.export(str(path), format="onnx", verbose=False, opset_version=opset)
    proto = onnx.load(str(path))
    _rename_outputs(proto, list(spec.outputs))
    return proto, "tf2onnx"


def _call(layer, x):
    """Inference call; layers with BatchNorm or dropout take ``training``."""
    import inspect

    return layer(x, training=False) if "training" in inspect.signature(layer.call).parameters else layer(x)


def _rename_outputs(model, names):
    """Rename the graph outputs (tf2onnx calls them ``Identity:0``, ...) to ``names``, in place."""
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


def verify_onnx(weights, spec: ArchSpec, path, seed: int = 0, size: int | None = None) -> list:
    """``[Comparison]``: onnxruntime on the ``.onnx`` at ``path`` against the float32 torch model of ``weights``.

    One seeded NCHW input (:func:`weights_convert.verify.example_input`: not
    the size traced at export, so the dynamic axes are exercised too),
    tolerance ``tolerance("float32", kind's scope)``.

    Raises:
        ConvertError: onnxruntime is missing, or the file does not run.
    """
    import numpy as np

    from .tolerances import compare, tolerance
    from .verify import example_input, measured, run_model

    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ConvertError(f"--verify of an .onnx DST needs onnxruntime (pip install onnxruntime): {e}") from e
    spec32 = spec.replace(dtype="float32")
    x = example_input(spec32, seed, size).astype(np.float32)
    expected = run_model(weights, spec32, "torch", x)
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        got = sess.run(names, {"input": x})
    except Exception as e:  # onnxruntime raises its own exception types
        raise ConvertError(f"onnxruntime could not run {str(path)!r}: {type(e).__name__}: {e}") from e
    if len(got) != len(expected):
        raise ConvertError(f"{str(path)!r} gives {len(got)} outputs, the torch model {len(expected)}.")
    tol = tolerance("float32", spec.info.scope)
    return [measured(compare(f"{n} (torch -> onnxruntime)", g, e, tol)) for n, g, e in zip(names, got, expected)]
