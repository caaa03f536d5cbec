"""danet_keras.DANet and the backbone: shapes, the mirror rule against danet_torch, whole-model parity."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import danet_keras as dk  # noqa: E402
from danet_keras.backbone import layer_dilations  # noqa: E402
from parity_tests.harness import keras_inference  # noqa: E402
from parity_tests.tests.helpers import check, nchw, resolve, set_torch_weights  # noqa: E402

pytestmark = pytest.mark.keras


def _torch_state_dict(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _randomise_torch(model, torch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.0, generator=gen)
                m.num_batches_tracked.fill_(3)


def test_layer_dilations_are_the_official_rule():
    """Upstream's ``_make_layer`` (encoding's dilated ResNet): a stage of dilation 2 starts its blocks at 1, one
    of dilation 4 at 2; multi-grid gives layer4's blocks their own. Written out here, not computed by the code."""
    resnet50 = (3, 4, 6, 3)
    assert layer_dilations(resnet50, 8, None) == [(1, [1] * 3), (2, [1] * 4), (1, [1, 2, 2, 2, 2, 2]), (1, [2, 4, 4])]
    assert layer_dilations(resnet50, 8, (4, 8, 16))[3] == (1, [4, 8, 16])
    assert layer_dilations(resnet50, 16, None)[2:] == [(2, [1] * 6), (1, [1, 2, 2])]
    assert layer_dilations(resnet50, 32, None)[2:] == [(2, [1] * 6), (2, [1] * 3)]
    assert layer_dilations((3, 4, 23, 3), 8, None)[2] == (1, [1] + [2] * 22)


@pytest.mark.parametrize("kwargs", [dict(deep_stem=True, output_stride=32)])  # stride 2 + dilation 4
def test_backbone_variants_mirror_torch_keys(kwargs):
    torch = pytest.importorskip("torch")
    import danet_torch

    tm = danet_torch.DANet(3, backbone="resnet50", **kwargs)
    km = dk.DANet(3, backbone="resnet50", **kwargs)
    km.build((None, None, None, 3))
    sd = _torch_state_dict(tm)
    for key, value in sd.items():
        var, is_kernel = resolve(km, key)
        shape = value.transpose(2, 3, 1, 0).shape if is_kernel else value.shape
        assert tuple(var.shape) == shape, key
    n_keras = len([v for v in km.variables if "seed_generator" not in v.path])
    assert n_keras == len(sd), "every Keras variable maps to exactly one torch key"
    del torch


def test_danet50_matches_torch_and_shapes(rng):
    torch = pytest.importorskip("torch")
    import danet_torch

    tm = danet_torch.DANet(3, backbone="resnet50").eval()
    _randomise_torch(tm, torch)
    km = dk.DANet(3, backbone="resnet50")
    inp = keras.Input((None, None, 3))
    outs = km(inp)
    assert [tuple(o.shape) for o in outs] == [(None, None, None, 3)] * 3
    sd = _torch_state_dict(tm)
    set_torch_weights(km, sd)
    assert len([v for v in km.variables if "seed_generator" not in v.path]) == len(sd)
    x = rng.normal(0, 1, (1, 3, 33, 29)).astype("float32")
    with torch.no_grad():
        expected = [t.double().numpy() for t in tm(torch.from_numpy(x))]
    got = km(np.transpose(x, (0, 2, 3, 1)), training=False)
    for name, g, e in zip(("fused", "pam", "cam"), got, expected):
        assert tuple(g.shape) == (1, 33, 29, 3)
        check(f"DANet50.{name}", nchw(g), e, scope="model")
    config = km.get_config()
    assert config["backbone"] == "resnet50" and config["multi_grid"] == [4, 8, 16]
    assert type(dk.DANet.from_config(config)) is dk.DANet


def test_danet_bad_arguments():
    with pytest.raises(ValueError, match="`backbone`"):
        dk.DANet(3, backbone="resnet18")
    with pytest.raises(ValueError, match="`output_stride`"):
        dk.DANet(3, output_stride=4)
    with pytest.raises(ValueError, match="`multi_grid`"):
        dk.DANet(3, multi_grid=(1, 2))
    with pytest.raises(ValueError, match="`num_classes`"):
        dk.DANet(0)
    with pytest.raises(ValueError, match="`multi_grid` must be a sequence of ints >= 1 or None, got '124'"):
        dk.DANet(3, multi_grid="124")  # was read as (1, 2, 4)
    with pytest.raises(ValueError, match=r"`multi_grid` must be .* got \(4, 8.5, 16\)"):
        dk.DANet(3, multi_grid=(4, 8.5, 16))  # was read as (4, 8, 16)
    with pytest.raises(ValueError, match="`deep_stem` must be True or False, got 'no'"):
        dk.DANet(3, deep_stem="no")  # was a deep stem


def test_danet_channels_first_equals_channels_last(rng):
    torch = pytest.importorskip("torch")
    import danet_torch

    tm = danet_torch.DANet(3, backbone="resnet50", output_stride=16).eval()
    _randomise_torch(tm, torch)
    sd = _torch_state_dict(tm)
    models = {}
    for fmt in ("channels_last", "channels_first"):
        km = dk.DANet(3, backbone="resnet50", output_stride=16, data_format=fmt)
        km.build((None, 3, None, None) if fmt == "channels_first" else (None, None, None, 3))
        set_torch_weights(km, sd)
        models[fmt] = km
    x = rng.normal(0, 1, (1, 3, 31, 27)).astype("float32")
    last = keras_inference(models["channels_last"], np.transpose(x, (0, 2, 3, 1)))
    first = keras_inference(models["channels_first"], x)
    for name, a, b in zip(("fused", "pam", "cam"), first, last):
        assert tuple(a.shape) == (1, 3, 31, 27)
        check(f"DANet50 channels_first vs last .{name}", keras.ops.convert_to_numpy(a), nchw(b), scope="model")


def test_danet_model_reloads_from_keras_file(tmp_path, rng):
    km = dk.DANet(3, backbone="resnet50", output_stride=32, multi_grid=None)
    x = rng.normal(0, 1, (1, 35, 33, 3)).astype("float32")
    km(x)
    for v in km.variables:
        if v.path.endswith("gamma") and tuple(v.shape) == (1,):
            v.assign(np.array([0.5], "float32"))
    expected = [keras.ops.convert_to_numpy(t) for t in km(x, training=False)]
    km.save(tmp_path / "danet.keras")
    reloaded = keras.models.load_model(tmp_path / "danet.keras")
    got = [keras.ops.convert_to_numpy(t) for t in reloaded(x, training=False)]
    for e, g in zip(expected, got):
        assert np.array_equal(e, g)
