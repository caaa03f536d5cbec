"""The architecture record travels with the weights, and a conversion is complete or refused (no Keras)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import weights_convert as wc  # noqa: E402
from weights_convert.cli import main  # noqa: E402
from weights_convert.testing import random_torch_model, to_mmseg_names  # noqa: E402

# Settings the weights cannot show: each must survive every format.
HIDDEN = wc.ArchSpec("danet", num_classes=3, backbone="resnet50", deep_stem=True, output_stride=16,
                     multi_grid=None, dropout=0.25, data_format="channels_first")
TORCH_FORMATS = (".pth", ".safetensors", ".npz")


@pytest.fixture(scope="module")
def hidden_weights():
    return wc.from_torch(random_torch_model(HIDDEN, seed=2))


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("ext", TORCH_FORMATS)
def test_record_travels_with_the_weights(tmp_path, hidden_weights, ext):
    wc.save(hidden_weights, tmp_path / f"w{ext}", HIDDEN)
    back = wc.load(tmp_path / f"w{ext}")
    assert back.arch == HIDDEN and back.stored_record
    assert not any("assumed" in n for n in back.notes)
    _same(hidden_weights, back.weights)


def test_pth_keeps_the_official_layout(tmp_path, hidden_weights):
    wc.save(hidden_weights, tmp_path / "w.pth", HIDDEN)
    raw = torch.load(tmp_path / "w.pth", weights_only=True)
    assert set(raw) == {"state_dict", "arch"}
    assert raw["arch"] == HIDDEN.to_dict()
    model = HIDDEN.build_torch()
    model.load_state_dict(raw["state_dict"], strict=True)  # the official `["state_dict"]` idiom still works


def test_mmseg_danet_keeps_contract_dilation_through_pth(tmp_path):
    """An mmseg DANet is our multi_grid=None; written to .pth and read back it must stay so."""
    spec = wc.ArchSpec("danet", num_classes=4, backbone="resnet50", deep_stem=True, multi_grid=None)
    original = random_torch_model(spec, seed=3)
    ckpt = to_mmseg_names(wc.from_torch(original), aux=False)
    ckpt["state_dict"] = {k: torch.from_numpy(np.array(v)) for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "mmseg.pth")
    assert main([str(tmp_path / "mmseg.pth"), str(tmp_path / "ours.pth"), "-q"]) == 0
    back = wc.load(tmp_path / "ours.pth")
    assert back.arch.multi_grid is None and back.arch.deep_stem
    x = torch.randn(1, 3, 41, 41, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(x)
        got = wc.to_torch(back.weights, back.arch)(x)
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def test_plain_state_dict_says_what_was_assumed(tmp_path, capsys, hidden_weights):
    torch.save({k: torch.from_numpy(v) for k, v in hidden_weights.items()}, tmp_path / "plain.pth")
    assert main([str(tmp_path / "plain.pth"), str(tmp_path / "out.npz")]) == 0
    err = capsys.readouterr().err
    assert "multi-grid (4, 8, 16) assumed" in err and "--multi-grid none" in err
    assert "output stride 8 assumed" in err and "(inferred)" in err
    # the options override the assumption, and the record written says so
    assert main([str(tmp_path / "plain.pth"), str(tmp_path / "out2.npz"), "--multi-grid", "none",
                 "--output-stride", "16", "--dropout", "0.25", "--data-format", "channels_first"]) == 0
    assert wc.load(tmp_path / "out2.npz").arch == HIDDEN


def test_options_override_a_stored_record_with_a_note(tmp_path, capsys, hidden_weights):
    wc.save(hidden_weights, tmp_path / "w.safetensors", HIDDEN)
    assert main([str(tmp_path / "w.safetensors"), str(tmp_path / "o.pth"), "--output-stride", "8"]) == 0
    assert "option output_stride=8 overrides the stored record's 16" in capsys.readouterr().err
    assert wc.load(tmp_path / "o.pth").arch == HIDDEN.replace(output_stride=8)


def test_dry_run_prints_the_record_and_the_mapping_and_writes_nothing(tmp_path, capsys, hidden_weights):
    wc.save(hidden_weights, tmp_path / "w.pth", HIDDEN)
    assert main([str(tmp_path / "w.pth"), str(tmp_path / "w.keras"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    record = json.loads(out.splitlines()[0].split(": ", 1)[1])
    assert wc.ArchSpec.from_dict(record) == HIDDEN
    assert "head.sa.query_conv.weight  ->  head.sa.query_conv.kernel" in out
    assert "nothing written" in out and not (tmp_path / "w.keras").exists()


def test_onnx_carries_the_record(tmp_path):
    pytest.importorskip("onnx")
    import onnx

    spec = wc.ArchSpec("head", in_channels=32, num_classes=3, reduction=4)
    wc.save(wc.from_torch(random_torch_model(spec)), tmp_path / "h.onnx", spec)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "h.onnx")).metadata_props}
    # the file's own layout: NCHW input, float32
    assert wc.ArchSpec.from_dict(json.loads(meta["danet_arch"])) == spec.replace(data_format="channels_first")


def test_records_of_the_earlier_form_still_read():
    old = {"arch": "danet", "channels": 2048, "num_classes": 3, "backbone": "resnet50", "deep_stem": False,
           "output_stride": 16, "multi_grid": None, "inter_channels": None, "out_channels": None, "reduction": 8,
           "dtype": "float32"}
    assert wc.ArchSpec.from_dict(old) == wc.ArchSpec("danet", num_classes=3, backbone="resnet50", output_stride=16,
                                                     multi_grid=None)


@pytest.mark.parametrize("record, match", [
    ({"kind": "pam", "in_channels": 16, "num_classes": 3}, "`num_classes` does not apply"),
    ({"kind": "danet", "num_classes": 3, "multi_grid": [4, 8]}, "`multi_grid` must give one dilation"),
    ({"kind": "danet", "num_classes": 3, "output_stride": 4}, "`output_stride` must be one of"),
    ({"kind": "head", "in_channels": 64}, "`num_classes` is required"),
    ({"kind": "pam", "in_channels": 16, "colour": "red"}, "unknown architecture record field"),
    ({"kind": "danet", "num_classes": 3, "multi_grid": "124"}, "`multi_grid` must be a sequence of ints"),
    ({"kind": "danet", "num_classes": 3, "deep_stem": "no"}, "`deep_stem` must be True or False, got 'no'"),
])
def test_bad_records_are_named(record, match):
    with pytest.raises(ValueError, match=match):
        wc.ArchSpec.from_dict(record)


def test_numpy_integers_are_accepted():
    spec = wc.ArchSpec("head", in_channels=np.int64(32), num_classes=np.int32(3))
    assert spec == wc.ArchSpec("head", in_channels=32, num_classes=3) and type(spec.in_channels) is int


@pytest.mark.parametrize("spec", [HIDDEN.replace(in_channels=1), wc.ArchSpec("head", in_channels=32, num_classes=3,
                                                                               reduction=4, dropout=0.2),
                                  wc.ArchSpec("dual_attention", in_channels=32, out_channels=8),
                                  wc.ArchSpec("pam", in_channels=16, reduction=2), wc.ArchSpec("cam", in_channels=16)],
                         ids=["danet", "head", "dual", "pam", "cam"])
def test_a_built_torch_model_gives_its_record_back(spec):
    assert wc.frameworks.spec_from_torch(spec.build_torch()) == spec.replace(data_format="channels_last")


def test_a_model_in_hand_is_saved_with_its_own_record(tmp_path):
    """From a trained danet_torch model, ``wc.spec_from_torch`` gives what the weights cannot show (output stride
    16, no multi-grid, dropout): inferred from the weights, the record would say 8, (4, 8, 16) and 0.1."""
    model = random_torch_model(HIDDEN, seed=4)
    weights = wc.from_torch(model)
    assert wc.infer_record(weights)[0].output_stride == 8  # what the weights alone give
    wc.save(weights, tmp_path / "m.safetensors", wc.spec_from_torch(model))
    back = wc.load(tmp_path / "m.safetensors")
    assert back.arch == HIDDEN.replace(data_format="channels_last") and back.stored_record
    _same(weights, back.weights)
