"""The checkpoints people actually have: each converts with the right option, or gets a message saying which.

Every refusal exits 2 and writes nothing.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import weights_convert as wc  # noqa: E402
from weights_convert.cli import main  # noqa: E402
from weights_convert.testing import SMALL_SPECS, random_torch_model  # noqa: E402

SPEC = SMALL_SPECS["head"]


@pytest.fixture(scope="module")
def state():
    return random_torch_model(SPEC, seed=4).state_dict()


def _convert(tmp_path, src, *options):
    dst = tmp_path / "out.safetensors"
    code = main([str(src), str(dst), "-q", *options])
    return code, dst


def _nothing_written(tmp_path):
    return not any(p.name.startswith(("out.", ".out.")) for p in tmp_path.iterdir())


def _same(state, dst):
    back = wc.load(dst).weights
    assert list(back) == list(state)
    assert all(np.array_equal(back[k], state[k].numpy()) for k in state)


@pytest.mark.parametrize("nest", ["model", "ema", "state_dict_ema"])
def test_nested_weights_need_key_and_the_error_says_so(tmp_path, capsys, state, nest):
    torch.save({nest: state, "optimizer": {"lr": 0.01}, "epoch": 3}, tmp_path / "ckpt.pth")
    code, _ = _convert(tmp_path, tmp_path / "ckpt.pth")
    assert code == 2 and f"pass `--key {nest}`" in capsys.readouterr().err and _nothing_written(tmp_path)
    code, dst = _convert(tmp_path, tmp_path / "ckpt.pth", "--key", nest)
    assert code == 0
    _same(state, dst)


def test_a_prefix_common_to_all_keys_is_named(tmp_path, capsys, state):
    torch.save(OrderedDict((f"model.{k}", v) for k, v in state.items()), tmp_path / "p.pth")
    code, _ = _convert(tmp_path, tmp_path / "p.pth")
    assert code == 2 and "pass `--strip-prefix model.`" in capsys.readouterr().err and _nothing_written(tmp_path)
    code, dst = _convert(tmp_path, tmp_path / "p.pth", "--strip-prefix", "model.")
    assert code == 0
    _same(state, dst)


def test_a_wrong_strip_prefix_is_named(tmp_path, capsys, state):
    torch.save(state, tmp_path / "s.pth")
    code, _ = _convert(tmp_path, tmp_path / "s.pth", "--strip-prefix", "model.")
    assert code == 2 and "do not start with it" in capsys.readouterr().err


def test_a_danet_module_inside_a_users_model_is_named_and_converts_alone(tmp_path, capsys):
    """A U-Net's state_dict with a DualAttention at ``bottleneck.1.``: the error names the prefix and the option;
    `--strip-prefix bottleneck.1. --allow-partial` converts that module alone and lists what it left out (as a
    ``.keras`` U-Net does with `--allow-partial`)."""
    dual = random_torch_model(SMALL_SPECS["dual_attention"], seed=5).state_dict()
    unet = OrderedDict([("enc.weight", torch.ones(64, 3, 3, 3)), ("bottleneck.0.weight", torch.ones(64, 64, 1, 1))])
    unet.update((f"bottleneck.1.{k}", v) for k, v in dual.items())
    unet["dec.weight"] = torch.ones(2, 64, 1, 1)
    torch.save(unet, tmp_path / "unet.pth")
    code, _ = _convert(tmp_path, tmp_path / "unet.pth")
    err = capsys.readouterr().err
    assert code == 2 and _nothing_written(tmp_path)
    assert ("a DualAttention under `bottleneck.1.` (32 tensors) beside 3 other key(s) (enc.weight, "
            "bottleneck.0.weight, dec.weight)" in err and "pass `--strip-prefix bottleneck.1. --allow-partial`" in err)
    code, _ = _convert(tmp_path, tmp_path / "unet.pth", "--strip-prefix", "bottleneck.1.")
    assert code == 2 and "pass --allow-partial to keep only the keys under it" in capsys.readouterr().err
    dst = tmp_path / "out.safetensors"
    assert main([str(tmp_path / "unet.pth"), str(dst), "--strip-prefix", "bottleneck.1.", "--allow-partial"]) == 0
    assert "left out 3 key(s) outside `bottleneck.1.` (enc.weight, " in capsys.readouterr().err
    _same(dual, dst)
    assert wc.load(dst).arch == SMALL_SPECS["dual_attention"]


def test_a_pickled_module_is_refused_with_what_to_save_instead(tmp_path, capsys):
    torch.save(SPEC.build_torch(), tmp_path / "module.pth")
    code, _ = _convert(tmp_path, tmp_path / "module.pth")
    err = capsys.readouterr().err
    assert code == 2 and "pickled nn.Module" in err and "model.state_dict()" in err
    assert "weights_only=False" not in err and "\x1b" not in err and _nothing_written(tmp_path)


def _imagenet_resnet50():
    """torchvision/timm ResNet-50 names and shapes: the official backbone's without `pretrained.`, plus `fc`."""
    rows = [(k[len("pretrained."):], s) for k, s in wc.expected_shapes(wc.ArchSpec("danet", num_classes=2,
                                                                                   backbone="resnet50")).items()
            if k.startswith("pretrained.")]
    rows += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return OrderedDict((k, torch.zeros(s, dtype=torch.int64 if k.endswith("tracked") else torch.float32))
                       for k, s in rows)


def test_an_imagenet_resnet_is_named_a_backbone(tmp_path, capsys):
    torch.save(_imagenet_resnet50(), tmp_path / "resnet50.pth")
    code, _ = _convert(tmp_path, tmp_path / "resnet50.pth")
    err = capsys.readouterr().err
    assert code == 2 and "ImageNet ResNet-50" in err and "pretrained_backbone" in err and _nothing_written(tmp_path)


def test_empty_files_and_folders_are_refused(tmp_path, capsys):
    (tmp_path / "empty.pth").write_bytes(b"")
    code, _ = _convert(tmp_path, tmp_path / "empty.pth")
    assert code == 2 and "is empty (0 bytes)" in capsys.readouterr().err
    (tmp_path / "folder.pth").mkdir()
    code, _ = _convert(tmp_path, tmp_path / "folder.pth")
    assert code == 2 and "is a folder" in capsys.readouterr().err
    assert _nothing_written(tmp_path)


def test_a_text_file_named_pth_is_refused_as_corrupt(tmp_path, capsys):
    src = tmp_path / "notes.pth"
    src.write_text("epoch 6, not a checkpoint\n" * 4)
    code, _ = _convert(tmp_path, src)
    err = capsys.readouterr().err
    assert code == 2 and f"{str(src)!r} is not a PyTorch file (neither a zip archive nor a pickle)" in err, err
    assert "unexpected" not in err and _nothing_written(tmp_path)


def test_key_and_prefix_do_not_apply_to_keras_files(tmp_path, capsys):
    (tmp_path / "m.keras").write_bytes(b"PK")
    code, _ = _convert(tmp_path, tmp_path / "m.keras", "--key", "model")
    assert code == 2 and "apply to .pth/.safetensors/.npz" in capsys.readouterr().err
