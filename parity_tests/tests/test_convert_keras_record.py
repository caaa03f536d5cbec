"""Keras formats keep the record, the dtype and every weight, on every backend; partial models are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.keras
torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
pytest.importorskip("danet_keras")

import weights_convert as wc  # noqa: E402
from weights_convert.cli import main  # noqa: E402
from weights_convert.testing import random_torch_model  # noqa: E402

HEAD = wc.ArchSpec("head", in_channels=32, num_classes=3, reduction=4, dropout=0.3, data_format="channels_first")
DANET = wc.ArchSpec("danet", num_classes=3, backbone="resnet50", output_stride=16, multi_grid=None, dropout=0.2)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("spec, ext", [(HEAD, ".keras"), (HEAD, ".weights.h5"), (DANET, ".weights.h5")],
                         ids=["head-keras", "head-h5", "danet50-h5"])
def test_record_travels_through_keras_formats(tmp_path, spec, ext):
    weights = wc.from_torch(random_torch_model(spec, seed=1))
    wc.save(weights, tmp_path / f"w{ext}", spec)
    back = wc.load(tmp_path / f"w{ext}")
    assert back.arch == spec
    _same(weights, back.weights)


@pytest.mark.parametrize("ext", [".keras", ".weights.h5"])
def test_float64_stays_float64_and_bit_exact(tmp_path, ext):
    spec = HEAD.replace(dtype="float64", data_format="channels_last")  # TensorFlow's CPU convs are NHWC only
    weights = wc.from_torch(random_torch_model(spec, seed=2))
    assert weights["conv5a.0.weight"].dtype == np.float64
    wc.save(weights, tmp_path / f"w{ext}", spec)
    back = wc.load(tmp_path / f"w{ext}")
    assert back.arch.dtype == "float64"
    _same(weights, back.weights)
    assert main([str(tmp_path / f"w{ext}"), str(tmp_path / "back.pth"), "--verify", "-q"]) == 0
    _same(weights, wc.load(tmp_path / "back.pth").weights)


@pytest.fixture(scope="module")
def unet_file(tmp_path_factory):
    """The U-Net example (DualAttention at the bottleneck) saved as .keras."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        from unet_dual_attention import build_unet
    finally:
        sys.path.remove(str(EXAMPLES))
    path = tmp_path_factory.mktemp("unet") / "unet.keras"
    model = build_unet(channels=1, num_classes=3, width=32)
    model.save(path)
    return path, model


def test_a_model_holding_more_than_the_danet_layer_is_refused(tmp_path, capsys, unet_file):
    path, _ = unet_file
    assert main([str(path), str(tmp_path / "block.pth")]) == 2
    err = capsys.readouterr().err
    assert "'enc1_conv0' (Conv2D" in err and "'logits'" in err and "--allow-partial" in err
    assert not (tmp_path / "block.pth").exists()


def test_allow_partial_converts_the_block_and_lists_what_it_left(tmp_path, capsys, unet_file):
    path, model = unet_file
    assert main([str(path), str(tmp_path / "block.pth"), "--allow-partial"]) == 0
    err = capsys.readouterr().err
    assert "left out" in err and "'dec1_conv0'" in err
    back = wc.load(tmp_path / "block.pth")
    assert back.arch.kind == "dual_attention" and back.arch.in_channels == 128
    block = model.get_layer("bottleneck_attention")
    _same(wc.from_keras(block), back.weights)


def test_stored_record_is_json_in_the_h5_attribute(tmp_path):
    import h5py

    wc.save(wc.from_torch(random_torch_model(HEAD)), tmp_path / "w.weights.h5", HEAD)
    with h5py.File(tmp_path / "w.weights.h5") as f:
        assert json.loads(f.attrs["danet_arch"]) == HEAD.to_dict()
