"""Save as ``.keras``, reload in a fresh process (same backend), and ``model.export()`` on TensorFlow."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import danet_keras as dk  # noqa: E402
from weights_convert.tolerances import compare, tolerance  # noqa: E402

pytestmark = pytest.mark.keras

RELOAD = textwrap.dedent("""
    import sys
    import numpy as np
    import keras
    import danet_keras  # registers the layers
    model = keras.models.load_model(sys.argv[1])
    outs = model.predict(np.load(sys.argv[2]), verbose=0)
    np.savez(sys.argv[3], *(outs if isinstance(outs, (list, tuple)) else [outs]))
    weights = {v.path: keras.ops.convert_to_numpy(v) for v in model.variables if "seed_generator" not in v.path}
    np.savez(sys.argv[4], **weights)
""")


def _model():
    inp = keras.Input((None, None, 32))
    x = dk.DualAttention(name="dual")(inp)
    x = keras.layers.Conv2D(32, 1, name="mix")(x)
    fused, pam, cam = dk.DANetHead(4, name="head")(x)
    sa = dk.PositionAttention(pam_path="efficient", name="pam_alone")(x)
    return keras.Model(inp, [fused, pam, cam, dk.ChannelAttention(name="cam_alone")(sa)])


def _randomise(model, rng):
    for v in model.variables:
        if "seed_generator" in v.path:  # dropout RNG state, named by a global counter
            continue
        if v.path.endswith("num_batches_tracked"):
            v.assign(np.array(7, "int32"))
        elif v.path.endswith("moving_variance"):
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype(v.dtype))
        else:
            v.assign(rng.normal(0, 0.2, v.shape).astype(v.dtype))


def test_keras_file_reloads_in_fresh_process(tmp_path, rng):
    """Every variable comes back bit for bit, under its path, in a fresh process; the outputs agree within the
    float32 tolerance (a fresh process may pick other CPU kernels or thread splits, so rounding may differ)."""
    model = _model()
    _randomise(model, rng)
    x = rng.normal(0, 0.5, (2, 9, 7, 32)).astype("float32")
    expected = model.predict(x, verbose=0)
    path = tmp_path / "dual.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(path), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npz"), str(tmp_path / "w.npz")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = np.load(tmp_path / "w.npz")
    saved = {v.path: keras.ops.convert_to_numpy(v) for v in model.variables if "seed_generator" not in v.path}
    assert sorted(reloaded.files) == sorted(saved)  # paths, gammas and BatchNorm counters included
    for name, value in saved.items():
        np.testing.assert_array_equal(reloaded[name], value, err_msg=f"variable {name} differs after reload")
    got = np.load(tmp_path / "y.npz")
    assert len(got.files) == len(expected)
    for i, want in enumerate(expected):
        result = compare(f"reloaded output {i}", got[f"arr_{i}"], want, tolerance("float32"))
        assert result.passed, result.message()


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="SavedModel export needs the TF backend")
def test_export_saved_model(tmp_path, rng):
    import tensorflow as tf

    model = _model()
    _randomise(model, rng)
    x = rng.normal(0, 0.5, (1, 11, 6, 32)).astype("float32")
    expected = model.predict(x, verbose=0)
    model.export(str(tmp_path / "saved"), verbose=False)
    artifact = tf.saved_model.load(str(tmp_path / "saved"))  # keep a reference: it owns the variables
    served = artifact.serve(tf.constant(x))
    served = served if isinstance(served, (list, tuple)) else [served]
    for i, (got, want) in enumerate(zip(served, expected)):
        result = compare(f"export output {i}", got.numpy(), want, tolerance("float32"))
        assert result.passed, result.message()
