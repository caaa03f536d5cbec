"""danet-parity names the porting bugs people make: each is planted here, in test code, in the Keras side.

Each test plants one mistake of a DANet port to Keras (the ones the known
Keras ports made, or that a converter makes), runs ``danet-parity`` in this
process on the running Keras backend (the CLI with ``--in-process``; for
DANet-50, the library on one shared pair), and asserts that it exits 1 and
that the first divergence it reports is the planted module, with its Keras
path. The monkeypatches are undone after each test.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from keras import ops

import danet_keras as dk
import danet_keras.attention as dk_attention
import danet_keras.backbone as dk_backbone
import danet_keras.model as dk_model
import weights_convert.mapping as mapping
from parity_tests import cli, harness, trace
from parity_tests import report as rep

pytestmark = pytest.mark.keras


def _parity(tmp_path, *args):
    """``(exit code, report)`` of danet-parity in this process."""
    report = tmp_path / "report.json"
    code = cli.main(["--in-process", "--json", str(report), *args])
    return code, json.loads(report.read_text())


def _first(report, mode="forward", dtype="float64"):
    (result,) = report["results"]
    found = [d for d in result["divergences"] if d["mode"] == mode and d["dtype"] == dtype]
    assert found, f"no {mode} {dtype} divergence reported: {result['divergences']} {result['notes']}"
    return found[0]


def _assert_named(tmp_path, args, module, keras_path, mode="forward", dtypes=("float64", "float32")):
    code, report = _parity(tmp_path, *args)
    assert code == 1, report["totals"]
    for dtype in dtypes:
        first = _first(report, mode, dtype)
        assert (first["module"], first["keras_path"]) == (module, keras_path), first
        assert first["headroom"] > 1 and first["tolerance"]["atol"] > 0
        if mode == "forward":  # the planted module's input still agrees in the whole Keras run
            assert first["input_headroom"] <= 1, first
    return report


DUAL = ["--components", "dual_attention", "--no-gradients"]


def test_nothing_planted_nothing_reported(tmp_path):
    code, report = _parity(tmp_path, "--components", "dual_attention", "--trace")
    assert code == 0 and report["totals"]["failed"] == 0
    assert report["results"][0]["divergences"] == []


@pytest.mark.parametrize("field, value", [("epsilon", 1e-3), ("momentum", 0.99)])
def test_keras_batchnorm_defaults(tmp_path, monkeypatch, field, value):
    """Keras' BatchNormalization defaults (eps 1e-3, momentum 0.99) instead of torch's (1e-5, 0.1)."""
    init = dk.BatchNorm.__init__

    def planted(self, *args, **kwargs):
        init(self, *args, **{**kwargs, field: value})

    monkeypatch.setattr(dk.BatchNorm, "__init__", planted)
    if field == "epsilon":
        _assert_named(tmp_path, DUAL, "conv5a.1", "conv5a.layers[1]")
    else:  # training only: the outputs agree, the updated statistics do not
        report = _assert_named(tmp_path, ["--components", "dual_attention"], "conv5a.1", "conv5a.layers[1]",
                               mode="training", dtypes=("float64",))
        failing = {r["check"] for r in report["rows"] if not r["passed"]}
        assert failing == {"BatchNorm statistics"}, failing
        assert "running_mean" in _first(report, "training")["what"]


def test_pam_scaled_by_sqrt_d(tmp_path, monkeypatch):
    def scaled(q, k, v):
        energy = dk_attention._bmm(q, ops.transpose(k, (0, 2, 1))) / np.sqrt(q.shape[-1])
        return dk_attention._bmm(ops.softmax(energy, axis=-1), v)

    for path in ("position_attention_official", "position_attention_efficient"):
        monkeypatch.setattr(dk_attention, path, scaled)
    # the head's PAM has 2 query channels (DualAttention's default here has 1, where sqrt(d) = 1)
    _assert_named(tmp_path, ["--components", "head", "--no-gradients"], "sa", "sa")


def test_cam_without_the_max_subtraction(tmp_path, monkeypatch):
    def plain_softmax(self, inputs):
        xf = dk_attention._tokens(inputs, self.data_format)
        attention = ops.softmax(dk_attention._bmm(ops.transpose(xf, (0, 2, 1)), xf), axis=-1)
        out = dk_attention._untokens(dk_attention._bmm(xf, ops.transpose(attention, (0, 2, 1))), inputs,
                                     self.data_format)
        return ops.cast(self.gamma, out.dtype) * out + inputs

    monkeypatch.setattr(dk.ChannelAttention, "call", plain_softmax)
    _assert_named(tmp_path, DUAL, "sc", "sc")


def test_kernels_with_height_and_width_swapped(tmp_path, monkeypatch):
    """The converter transposes OIHW to WHIO instead of HWIO: every 3x3 kernel is mirrored."""
    monkeypatch.setitem(mapping.RULES, "conv_kernel", ((3, 2, 1, 0), None, "planted: H and W swapped"))
    _assert_named(tmp_path, DUAL, "conv5a.0", "conv5a.layers[0]")


def test_relu_dropped_after_batchnorm(tmp_path, monkeypatch):
    class NoReLU(keras.layers.Layer):
        def call(self, inputs):
            return inputs

    monkeypatch.setattr(keras.layers, "ReLU", NoReLU)
    _assert_named(tmp_path, DUAL, "conv5a.2", "conv5a.layers[2]")


def test_the_two_gammas_exchanged(tmp_path, monkeypatch):
    """The name table maps PAM's gamma to CAM's and back."""
    swap = {"sa.gamma": "sc.gamma", "sc.gamma": "sa.gamma"}
    keras_path = mapping.keras_path
    monkeypatch.setattr(mapping, "keras_path", lambda name, kind: keras_path(swap.get(name, name), kind))
    _assert_named(tmp_path, DUAL, "sa", "sa")


@pytest.fixture(scope="module")
def danet50():
    """One DANet-50 pair in float64 at 17x17 (building it costs more than running it); the two bugs below are
    planted at call time, so both run on it, through the library: the harness's rows and the trace."""
    spec, _ = harness.component_spec("danet50")
    with harness.exact_numerics():
        pair = harness.make_pair(spec, seed=0, dtype="float64")
    return spec, pair, harness.make_input(spec, (17, 17), batch=1, seed=0)


def _danet50_parity(danet50):
    """``(exit code, divergences)`` by danet-parity's rules: float64 outputs, then the trace."""
    spec, pair, x = danet50
    with harness.exact_numerics():
        rows = harness.forward_rows("danet50", spec, *pair, x, "float64")
        found, _ = trace.forward_divergences(*pair, x, "float64", spec.info.scope)
    return rep.exit_code({"rows": [r.as_dict() for r in rows], "errors": [], "weights": None}), found


def test_danet50_unchanged_agrees(danet50):
    assert _danet50_parity(danet50) == (0, [])


def test_resize_without_align_corners(danet50, monkeypatch):
    """keras.ops.image.resize's bilinear is align_corners=False (half-pixel); DANet upsamples with True."""
    def half_pixel(x, size, data_format=None):
        return ops.image.resize(x, (int(size[0]), int(size[1])), interpolation="bilinear", data_format=data_format)

    monkeypatch.setattr(dk_model, "resize_bilinear_align_corners", half_pixel)
    code, found = _danet50_parity(danet50)
    assert code == 1 and (found[0]["module"], found[0]["keras_path"], found[0]["class"]) == ("", "", "DANet"), found


def test_backbone_block_without_its_last_relu(danet50, monkeypatch):
    def no_final_relu(self, inputs, training=None):
        identity = inputs if self.downsample is None else self.downsample(inputs, training=training)
        out = self.relu(self.bn1(self.conv1(inputs), training=training))
        out = self.relu(self.bn2(self.conv2(out), training=training))
        return self.bn3(self.conv3(out), training=training) + identity

    monkeypatch.setattr(dk_backbone.Bottleneck, "call", no_final_relu)
    code, found = _danet50_parity(danet50)
    assert code == 1 and (found[0]["module"], found[0]["keras_path"]) == ("pretrained.layer1.0",
                                                                          "pretrained.layer1.layers[0]"), found
    assert found[0]["input_headroom"] <= 1 < found[0]["headroom"]
