"""weights_convert.backbone: ImageNet ResNet weights (torchvision/timm keys) read strictly into ``pretrained.*``."""

from __future__ import annotations

import numpy as np
import pytest

from parity_tests.tests.helpers import RESNET_STAGES, imagenet_resnet_state_dict
from weights_convert.backbone import (BackboneLoadError, adapt_input_conv, imagenet_resnet_shapes,
                                      read_imagenet_backbone)
from weights_convert.errors import ConvertError


@pytest.fixture(scope="module")
def resnet50():
    return imagenet_resnet_state_dict(np.random.default_rng(0), depth=50)


def _save(sd, path):
    """Write ``sd`` (NumPy) in the format of ``path``'s extension."""
    if path.suffix == ".npz":
        with open(path, "wb") as f:
            np.savez(f, **sd)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.require(v, requirements="C") for k, v in sd.items()}, str(path))
    else:
        torch = pytest.importorskip("torch")
        torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, path)
    return path


@pytest.mark.parametrize("depth", [50, 101])
def test_layout_is_torchvisions_without_fc(depth):
    """The expected keys are the published layout (the helpers' independent builder), fc left out."""
    sd = imagenet_resnet_state_dict(np.random.default_rng(1), depth=depth, dtype="float16")
    expected = {k: v.shape for k, v in sd.items() if not k.startswith("fc.")}
    assert dict(imagenet_resnet_shapes(depth)) == expected
    assert len(expected) == {50: 318, 101: 624}[depth]  # torchvision: 320 and 626 with fc


def test_every_tensor_is_read_unchanged_and_fc_is_reported(resnet50):
    neutral, notes = read_imagenet_backbone(resnet50, depth=50)
    assert list(neutral) == [f"pretrained.{k}" for k in imagenet_resnet_shapes(50)]
    for key, value in neutral.items():
        original = resnet50[key[len("pretrained."):]]
        assert value.dtype == original.dtype and np.array_equal(value, original), key
    assert any("fc.weight (1000, 2048)" in n and "fc.bias (1000,)" in n for n in notes), notes


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_reads_every_format_with_wrappers(resnet50, tmp_path, suffix):
    sd = {f"module.{k}": v for k, v in resnet50.items()} if suffix == ".pth" else resnet50
    path = tmp_path / f"resnet50{suffix}"
    if suffix == ".pth":
        torch = pytest.importorskip("torch")
        torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 90}, path)
    else:
        _save(sd, path)
    neutral, notes = read_imagenet_backbone(path, depth=50)
    assert np.array_equal(neutral["pretrained.layer4.2.bn3.running_var"], resnet50["layer4.2.bn3.running_var"])
    assert len(neutral) == 318
    if suffix == ".pth":
        assert any("`model` entry" in n and "epoch" in n for n in notes), notes
        assert any("`module.` prefix" in n for n in notes), notes


@pytest.mark.parametrize("in_channels", [1, 2, 4, 6])
def test_conv1_adapted_by_timms_rule(resnet50, in_channels):
    """timm's adapt_input_conv: 1 -> sum over RGB; c -> RGB tiled ceil(c/3) times, first c, times 3/c."""
    neutral, notes = read_imagenet_backbone(resnet50, depth=50, in_channels=in_channels)
    w = resnet50["conv1.weight"].astype(np.float32)
    if in_channels == 1:
        expected = w[:, 0:1] + w[:, 1:2] + w[:, 2:3]
    else:
        expected = np.concatenate([w, w, w], axis=1)[:, :in_channels] * np.float32(3 / in_channels)
    got = neutral["pretrained.conv1.weight"]
    assert got.shape == (64, in_channels, 7, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    assert any(f"from 3 to {in_channels} input channel" in n for n in notes), notes


def test_adapted_conv_keeps_the_response_to_repeated_or_grey_inputs():
    """Independent property: grey input x1 through the summed filter == RGB (x1, x1, x1) through the
    original; (x, x) through the 6-channel filter == x through the original."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 3, 3, 3))
    x = rng.normal(size=(3, 3, 3))
    grey = rng.normal(size=(1, 3, 3))
    resp = np.einsum("oihw,ihw->o", w, x)
    np.testing.assert_allclose(np.einsum("oihw,ihw->o", adapt_input_conv(w, 1), grey),
                               np.einsum("oihw,ihw->o", w, np.repeat(grey, 3, axis=0)), rtol=1e-12)
    np.testing.assert_allclose(np.einsum("oihw,ihw->o", adapt_input_conv(w, 6), np.concatenate([x, x])),
                               resp, rtol=1e-12)
    assert adapt_input_conv(w, 3) is w or np.array_equal(adapt_input_conv(w, 3), w)


def test_missing_counters_are_filled_with_zero():
    sd = imagenet_resnet_state_dict(np.random.default_rng(2), depth=50, num_batches_tracked=False)
    neutral, notes = read_imagenet_backbone(sd, depth=50)
    assert neutral["pretrained.bn1.num_batches_tracked"] == 0
    assert neutral["pretrained.bn1.num_batches_tracked"].dtype == np.int64
    assert any("num_batches_tracked" in n for n in notes), notes


def test_wrong_depth_is_named(resnet50):
    with pytest.raises(ConvertError, match=r"holds ResNet-50, but the model's backbone is ResNet-101"):
        read_imagenet_backbone(resnet50, depth=101)
    odd = {k: v for k, v in resnet50.items() if not k.startswith("layer3.5.")}
    with pytest.raises(ConvertError, match=r"\(3, 4, 5, 3\) blocks per stage"):
        read_imagenet_backbone(odd, depth=50)


def test_deep_stem_mismatch_is_named(resnet50):
    timm_d = imagenet_resnet_state_dict(np.random.default_rng(4), depth=50, deep_stem=True, stem_widths=(32, 32, 64))
    with pytest.raises(ConvertError, match=r"deep-stem ResNet .*widths \(32, 32, 64\).*7x7 stem"):
        read_imagenet_backbone(timm_d, depth=50)
    with pytest.raises(ConvertError, match=r"deep stem is \(32, 32, 64\) wide, the official deep stem is "
                                           r"\(64, 64, 128\)"):
        read_imagenet_backbone(timm_d, depth=50, deep_stem=True)
    with pytest.raises(ConvertError, match=r"7x7-stem ResNet \(`conv1.weight` \(64, 3, 7, 7\)\).*deep stem"):
        read_imagenet_backbone(resnet50, depth=50, deep_stem=True)


def test_official_deep_stem_is_read():
    sd = imagenet_resnet_state_dict(np.random.default_rng(5), depth=50, deep_stem=True)
    neutral, _ = read_imagenet_backbone(sd, depth=50, deep_stem=True, in_channels=1)
    assert neutral["pretrained.conv1.0.weight"].shape == (64, 1, 3, 3)
    assert np.array_equal(neutral["pretrained.conv1.6.weight"], sd["conv1.6.weight"])


def test_missing_unexpected_and_mismatched_keys_are_listed(resnet50):
    sd = dict(resnet50)
    del sd["layer2.1.conv2.weight"]
    sd["layer2.1.bn9.weight"] = np.ones(128, np.float32)
    sd["layer4.0.conv3.weight"] = np.zeros((2048, 512, 3, 3), np.float32)
    with pytest.raises(BackboneLoadError) as info:
        read_imagenet_backbone(sd, depth=50)
    err = info.value
    assert err.missing == [("layer2.1.conv2.weight", (128, 128, 3, 3))]
    assert err.unexpected == [("layer2.1.bn9.weight", (128,))]
    assert err.mismatched == [("layer4.0.conv3.weight", (2048, 512, 1, 1), (2048, 512, 3, 3))]
    text = str(err)
    assert "1 missing, 1 unexpected, 1 shape-mismatched" in text and "torchvision/timm" in text
    assert "--allow-partial" not in text


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(ConvertError, match="does not exist"):
        read_imagenet_backbone(tmp_path / "nope.pth")
    with pytest.raises(ConvertError, match="no ResNet stage keys"):
        read_imagenet_backbone({"encoder.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(TypeError, match="`source`"):
        read_imagenet_backbone(42)
    with pytest.raises(ValueError, match="`depth`"):
        read_imagenet_backbone({}, depth=34)
    with pytest.raises(ValueError, match="`in_channels`"):
        read_imagenet_backbone({}, in_channels=0)
    assert set(RESNET_STAGES) == {50, 101}
