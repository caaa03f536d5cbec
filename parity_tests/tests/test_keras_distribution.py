"""danet_keras under Keras' distribution engines: one training step on 2 devices equals one device.

Each case runs in a fresh subprocess (device counts are fixed when the backend starts):
JAX with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` and
``keras.distribution.DataParallel``; TensorFlow with two logical CPUs and
``tf.distribute.MirroredStrategy``. One ``model.fit`` step (SGD, learning rate
1, no momentum: the weight change is minus the gradient) on a batch of 4,
split 2 + 2, is compared with one device on the whole batch: weight changes
with the ``grad`` tolerance, BatchNorm moving statistics with the ``layer``
one; float32 for a stack of the layers, float64 for the whole DANet (whose
float32 gradients differ by more than the float32 tolerance with the order
of summation alone, see ``weights_convert/tolerances.py``). Under MirroredStrategy the statistics are per replica
unless ``sync_batchnorm``; the test shows both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from parity_tests.tests.helpers import check  # noqa: E402

pytestmark = pytest.mark.keras
BACKEND = keras.backend.backend()

COMMON = """
import numpy as np, keras
import danet_keras as dk
from danet_keras.losses import SegmentationCrossEntropy

def build(kind):
    keras.utils.set_random_seed(0)
    if kind == "danet":
        m = dk.DANet(3, backbone="resnet50", output_stride=16, multi_grid=None, dropout=0.0, dtype="float64")
        m.build((None, None, None, 3))
        return m
    inp = keras.Input((16, 16, 3))
    x = dk.Conv2d(64, 3, padding=1, use_bias=False, name="conv")(inp)
    x = dk.BatchNorm(name="bn")(x)
    x = dk.Bottleneck(16, name="block")(x)
    outs = dk.DANetHead(3, dropout=0.0, name="head")(x)
    return keras.Model(inp, list(outs))

def step(model, x, y, weights):
    for v, w in zip(model.weights, weights):
        v.assign(w)
    ce = SegmentationCrossEntropy(ignore_index=255)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=[ce, ce, ce])
    model.fit(x, (y, y, y), batch_size=4, epochs=1, shuffle=False, verbose=0)
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}

def data(kind):
    rng = np.random.default_rng(0)
    size = 32 if kind == "danet" else 16
    x = rng.normal(size=(4, size, size, 3)).astype("float64" if kind == "danet" else "float32")
    x[:2] += 1.5  # the two halves differ: per-replica statistics would show
    y = rng.integers(0, 3, (4, size, size)).astype("int32")
    return x, y
"""

JAX = """
import jax
assert len(jax.devices()) == 2, jax.devices()
x, y = data(KIND)
one = build(KIND)
w0 = [keras.ops.convert_to_numpy(v) for v in one.weights]
results = {"one": step(one, x, y, w0)}
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
results["two"] = step(build(KIND), x, y, w0)
"""

TF = """
import tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
from danet_keras.distribution import sync_batchnorm
x, y = data(KIND)
one = build(KIND)
w0 = [keras.ops.convert_to_numpy(v) for v in one.weights]
results = {"one": step(one, x, y, w0)}
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
with strategy.scope():
    two = build(KIND)
    assert sync_batchnorm(two) > 0
    results["two"] = step(two, x, y, w0)
    results["per_replica"] = step(build(KIND), x, y, w0)
"""


def _run(script, kind, tmp_path, env):
    out = tmp_path / "result.npz"
    code = f"KIND = {kind!r}\n" + COMMON + script + textwrap.dedent(f"""
        flat = {{f"{{k}}|{{p}}": v for k, r in results.items() for p, v in r.items()}}
        flat.update({{f"w0|{{v.path}}": w for v, w in zip(one.weights, w0)}})
        np.savez({str(out)!r}, **flat)
        """)
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out) as z:
        flat = {k: z[k] for k in z.files}
    runs = {}
    for key, value in flat.items():
        run, path = key.split("|", 1)
        runs.setdefault(run, {})[path] = value
    return runs


def _compare(runs, two="two", dtype="float32", grad_dtype=None):
    one, other, w0 = runs["one"], runs[two], runs["w0"]
    assert len(one) == len(other) == len(w0) > 0
    moving = 0
    for (path, a), b, w in zip(one.items(), other.values(), w0.values()):
        if path.endswith(("moving_mean", "moving_variance")):
            moving += 1
            check(f"{two} {path}", b, a, dtype=dtype, scope="layer")
        elif path.endswith("num_batches_tracked") or "seed_generator" in path:
            assert np.array_equal(a, b), path
        else:  # trainable: the change is minus the gradient
            check(f"{two} step of {path}", b - w, a - w, dtype=grad_dtype or dtype, scope="grad")
    return moving


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution.DataParallel is the JAX backend's engine")
def test_jax_data_parallel_step_equals_one_device(tmp_path):
    runs = _run(JAX, "layers", tmp_path, {"KERAS_BACKEND": "jax",
                                          "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert _compare(runs) == 2 * 8  # (mean, variance) of 8 BatchNorms: 1 + 3 in the block + 4 in the head


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute.MirroredStrategy is TensorFlow's engine")
def test_tf_mirrored_step_equals_one_device_with_sync_batchnorm(tmp_path):
    runs = _run(TF, "layers", tmp_path, {"KERAS_BACKEND": "tensorflow"})
    assert _compare(runs) == 2 * 8
    per = runs["per_replica"]["bn/moving_mean"]
    assert not np.allclose(per, runs["one"]["bn/moving_mean"], atol=1e-3), "per-replica statistics differ"


@pytest.mark.slow(reason="DANet-50 compiled twice or three times in a subprocess: minutes on 2 cores")
@pytest.mark.parametrize("engine", ["jax", "tensorflow"])
def test_danet_under_distribution_equals_one_device(tmp_path, engine):
    if BACKEND != engine:
        pytest.skip(f"runs with KERAS_BACKEND={engine}")
    env = {"KERAS_BACKEND": engine}
    if engine == "jax":
        env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_ENABLE_X64="1")
    runs = _run(JAX if engine == "jax" else TF, "danet", tmp_path, env)
    # TensorFlow meets the float64 gradient tolerance (1e-9 of the tensor's largest value). JAX's partitioned
    # float64 program differs from one device by up to 5.8e-9 of it (measured: 170 of 185 tensors between 1e-9
    # and 6e-9), numerical noise of a different summation order in a deep BatchNorm network; per-device
    # statistics or a missing gradient all-reduce would differ by 1e-2 or more, so the float32 bound (1e-4) still
    # separates right from wrong by two orders.
    assert _compare(runs, dtype="float64", grad_dtype="float32" if engine == "jax" else "float64") == 2 * 57


def test_synchronized_flag_round_trips_and_is_plain_batchnorm_on_one_device(rng):
    import danet_keras as dk
    from danet_keras.distribution import sync_batchnorm

    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    plain, synced = dk.BatchNorm(), dk.BatchNorm(synchronized=True)
    assert synced.get_config()["synchronized"] is True
    assert dk.BatchNorm.from_config(synced.get_config()).synchronized is True
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(plain(x, training=True)),
                                  keras.ops.convert_to_numpy(synced(x, training=True)))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(plain.moving_variance),
                                  keras.ops.convert_to_numpy(synced.moving_variance))
    with pytest.raises(ValueError, match="`synchronized`"):
        dk.BatchNorm(synchronized="yes")
    model = dk.DANet(3, backbone="resnet50")
    with pytest.raises(ValueError, match="not built"):
        sync_batchnorm(model)
    model.build((None, None, None, 3))
    assert sync_batchnorm(model) == 57 and sync_batchnorm(model, False) == 57
