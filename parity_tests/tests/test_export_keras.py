"""Keras export: SavedModel reloaded by TensorFlow alone, ONNX via tf2onnx, XLA/jit vs eager.

Weights are random torch weights converted with ``weights_convert``, so the
same weights also give the ONNX file exported from PyTorch: the two files
must agree. Export tests need the TensorFlow backend and skip elsewhere;
``jit_compile=True`` runs on TensorFlow (XLA) and JAX.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

import weights_convert as wc
from weights_convert.tolerances import compare, tolerance

pytestmark = pytest.mark.keras
tf_only = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                             reason="tf2onnx and the TensorFlow-only reload need the TensorFlow backend")
saved_model_backends = pytest.mark.skipif(keras.backend.backend() not in ("tensorflow", "jax"),
                                          reason="model.export(format='tf_saved_model') runs on TensorFlow and JAX")

SPECS = {
    "pam": wc.ArchSpec("pam", in_channels=32),
    "cam": wc.ArchSpec("cam", in_channels=32),
    "dual_attention": wc.ArchSpec("dual_attention", in_channels=32),
    "head": wc.ArchSpec("head", in_channels=64, num_classes=5),
}
SIZES = [(2, 12, 12), (1, 7, 9), (3, 17, 5)]


def _neutral(spec, seed=0):
    """Random non-default weights in the neutral form (positive variances, non-zero gammas)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in wc.expected_shapes(spec).items():
        if k.endswith("num_batches_tracked"):
            out[k] = np.array(7, dtype=np.int64)
        elif k.endswith("running_var"):
            out[k] = (0.5 + rng.random(shape)).astype("float32")
        elif k.endswith("gamma"):
            out[k] = (0.5 + rng.random(shape)).astype("float32")
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            out[k] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype("float32")
    return out


def _model(layer, spec):
    """A Functional model (NHWC, dynamic batch/H/W) around a converted layer, called once."""
    c = spec.in_channels
    inp = keras.Input((None, None, c), name="input")
    out = layer(inp, training=False) if spec.kind in ("head", "dual_attention") else layer(inp)
    model = keras.Model(inp, out)
    model(np.zeros((1, 8, 8, c), "float32"))
    return model


def _outs(y):
    return [keras.ops.convert_to_numpy(t) for t in (y if isinstance(y, (tuple, list)) else (y,))]


def _inputs(spec, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((b, h, w, spec.in_channels)).astype("float32") for b, h, w in SIZES]


def _check(what, got, expected, scope="layer"):
    worst = 0.0
    for i, (a, e) in enumerate(zip(got, expected)):
        result = compare(f"{what} output {i}", a, e, tolerance("float32", scope))
        assert result.passed, result.message()
        worst = max(worst, result.max_abs)
    return worst


@tf_only
@pytest.mark.parametrize("name", list(SPECS))
def test_keras_onnx_matches_keras_and_torch_onnx(name, tmp_path):
    import onnxruntime as ort

    from weights_convert.io_onnx import write_onnx

    spec, neutral = SPECS[name], _neutral(SPECS[name])
    layer = wc.to_keras(neutral, spec)
    paths = {fw: tmp_path / f"{name}_{fw}.onnx" for fw in ("keras", "torch")}
    assert write_onnx(neutral, spec, paths["keras"], framework="keras", data_format="channels_last") == "tf2onnx"
    keras_nchw = tmp_path / f"{name}_keras_nchw.onnx"
    write_onnx(neutral, spec, keras_nchw, framework="keras")  # NCHW: the torch file's interface
    write_onnx(neutral, spec, paths["torch"], framework="torch")
    sessions = {k: ort.InferenceSession(str(p)) for k, p in
                {"keras": paths["keras"], "keras_nchw": keras_nchw, "torch": paths["torch"]}.items()}
    worst = {"onnx(keras) vs keras": 0.0, "onnx(keras) vs onnx(torch)": 0.0}
    for x in _inputs(spec):
        eager = _outs(layer(x, training=False) if spec.kind != "pam" and spec.kind != "cam" else layer(x))
        nhwc = sessions["keras"].run(None, {"input": x})
        worst["onnx(keras) vs keras"] = max(worst["onnx(keras) vs keras"],
                                             _check(f"onnx(keras) {name} at {x.shape}", nhwc, eager))
        xc = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        from_torch = sessions["torch"].run(None, {"input": xc})
        from_keras = sessions["keras_nchw"].run(None, {"input": xc})
        worst["onnx(keras) vs onnx(torch)"] = max(
            worst["onnx(keras) vs onnx(torch)"],
            _check(f"onnx(torch) vs onnx(keras NCHW) {name} at {x.shape}", from_keras, from_torch),
            _check(f"onnx(torch) vs onnx(keras NHWC) {name} at {x.shape}",
                   [o.transpose(0, 3, 1, 2) for o in nhwc], from_torch))
    print(f"{name}: " + ", ".join(f"{k} max|diff| = {v:.3e}" for k, v in worst.items()))


@saved_model_backends
@pytest.mark.parametrize("name", list(SPECS))
def test_saved_model_reloaded_by_tensorflow_matches_keras(name, tmp_path):
    """Dynamic batch, height and width: on JAX through jax2tf's shape polymorphism."""
    import tensorflow as tf

    spec = SPECS[name]
    layer = wc.to_keras(_neutral(spec), spec)
    model = _model(layer, spec)
    model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "sm"))
    worst = 0.0
    for x in _inputs(spec):
        worst = max(worst, _check(f"SavedModel {name} at {x.shape}", _outs(reloaded.serve(x)), _outs(model(x))))
    print(f"{name}: SavedModel vs Keras max|diff| = {worst:.3e}")


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="model.export(format='onnx') of the torch backend")
@pytest.mark.parametrize("name", ["dual_attention", "head"])
def test_torch_backend_onnx_export_matches_keras(name, tmp_path):
    """Keras on the torch backend exports ONNX through torch.onnx; dynamic batch, height and width."""
    import onnxruntime as ort

    spec = SPECS[name]
    model = _model(wc.to_keras(_neutral(spec), spec), spec)
    model.export(str(tmp_path / "model.onnx"), format="onnx", verbose=False)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    feed = session.get_inputs()[0].name
    worst = 0.0
    for x in _inputs(spec):
        worst = max(worst, _check(f"onnx(keras torch backend) {name} at {x.shape}",
                                  session.run(None, {feed: x}), _outs(model(x))))
    print(f"{name}: ONNX (torch backend) vs Keras max|diff| = {worst:.3e}")


@tf_only
def test_saved_model_needs_no_keras_code(tmp_path):
    spec = SPECS["head"]
    neutral = _neutral(spec)
    model = _model(wc.to_keras(neutral, spec), spec)
    model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False)
    x = _inputs(spec)[2]
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys, numpy as np, tensorflow as tf
        m = tf.saved_model.load({str(tmp_path / 'sm')!r})
        outs = m.serve(np.load({str(tmp_path / 'x.npy')!r}))
        np.savez({str(tmp_path / 'y.npz')!r}, *[o.numpy() for o in outs])
        assert "danet_keras" not in sys.modules and "weights_convert" not in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(tmp_path / "y.npz") as z:
        got = [z[f"arr_{i}"] for i in range(3)]
    _check("SavedModel in a TensorFlow-only process", got, _outs(model(x)))


@tf_only
def test_docs_keras_export_example_runs_as_written(tmp_path):
    """docs/EXPORT.md's Keras example, run as written; its SavedModel's outputs against the Keras model's."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "EXPORT.md").read_text()
    example = doc.split("## Keras: `model.export()` on each backend", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    check = textwrap.dedent("""
        assert os.path.isfile("head.onnx")
        np.savez("y.npz", *[np.asarray(o) for o in (fused, pam, cam)], *[keras.ops.convert_to_numpy(o) for o in model(x)])
    """)
    proc = subprocess.run([sys.executable, "-c", "import os\n" + example + check], capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path), env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "y.npz") as z:
        got = [z[f"arr_{i}"] for i in range(6)]
    assert [g.shape for g in got] == [(1, 33, 33, 19)] * 6
    _check("docs/EXPORT.md: SavedModel vs Keras", got[:3], got[3:])


@pytest.mark.skipif(keras.backend.backend() not in ("tensorflow", "jax"),
                    reason="jit_compile=True means XLA on TensorFlow and JAX only")
@pytest.mark.parametrize("name", ["pam", "head"])
def test_jit_compile_matches_eager(name):
    spec = SPECS[name]
    layer = wc.to_keras(_neutral(spec), spec)
    model = _model(layer, spec)
    model.compile(jit_compile=True)
    x = _inputs(spec)[0]
    got = _outs(model.predict(x, verbose=0, batch_size=x.shape[0]))
    worst = _check(f"jit_compile {name} ({keras.backend.backend()})", got, _outs(model(x, training=False)))
    print(f"{name}: jit_compile vs eager max|diff| = {worst:.3e}")


@tf_only
@pytest.mark.slow  # ~100 s on 2 cores: outside `make test`; `python -m parity_tests.run_suite --slow` runs it
def test_danet50_keras_onnx_and_saved_model_match(tmp_path):
    """The whole DANet-50 (small, odd sizes): Keras -> ONNX and -> SavedModel, and against torch's ONNX."""
    import onnxruntime as ort
    import tensorflow as tf

    from weights_convert.io_onnx import write_onnx

    spec = wc.ArchSpec("danet", num_classes=3, backbone="resnet50")
    neutral = _neutral(spec)
    layer = wc.to_keras(neutral, spec)
    inp = keras.Input((None, None, 3), name="input")
    model = keras.Model(inp, layer(inp, training=False))
    model(np.zeros((1, 33, 33, 3), "float32"))
    model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "sm"))
    write_onnx(neutral, spec, tmp_path / "keras.onnx", framework="keras", data_format="channels_last")
    write_onnx(neutral, spec, tmp_path / "torch.onnx", framework="torch")
    keras_onnx = ort.InferenceSession(str(tmp_path / "keras.onnx"))
    torch_onnx = ort.InferenceSession(str(tmp_path / "torch.onnx"))
    rng = np.random.default_rng(3)
    worst = [0.0, 0.0, 0.0]
    for shape in ((1, 33, 33, 3), (2, 41, 29, 3)):
        x = rng.standard_normal(shape).astype("float32")
        eager = _outs(model(x))
        nhwc = keras_onnx.run(None, {"input": x})
        from_torch = torch_onnx.run(None, {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})
        worst = [max(w, d) for w, d in zip(worst, (
            _check(f"DANet-50 SavedModel at {shape}", _outs(reloaded.serve(x)), eager, scope="model"),
            _check(f"DANet-50 onnx(keras) at {shape}", nhwc, eager, scope="model"),
            _check(f"DANet-50 onnx(torch) vs onnx(keras) at {shape}", [o.transpose(0, 3, 1, 2) for o in nhwc],
                   from_torch, scope="model")))]
    print("DANet-50 max|diff|: SavedModel vs Keras {:.3e}, onnx(keras) vs Keras {:.3e}, "
          "onnx(torch) vs onnx(keras) {:.3e}".format(*worst))
