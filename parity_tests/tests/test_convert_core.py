"""weights_convert without Keras: names, inference, formats, importers, strict checks, the CLI's refusals."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import weights_convert as wc  # noqa: E402
from weights_convert.arch import ArchSpec, expected_shapes  # noqa: E402
from weights_convert.cli import main  # noqa: E402
from weights_convert.testing import SMALL_SPECS, random_torch_model, to_mmseg_names  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DANET_SPECS = {
    "danet50_deep": ArchSpec("danet", num_classes=5, backbone="resnet50", deep_stem=True),
    "danet101": ArchSpec("danet", num_classes=19),
}


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), k


def _no_dst(tmp_path, name):
    return not any(p.name == name or p.name.startswith(f".{name}.tmp") for p in tmp_path.iterdir())


@pytest.mark.parametrize("name", sorted({**SMALL_SPECS, **DANET_SPECS}))
def test_expected_shapes_are_torch_state_dict(name):
    spec = {**SMALL_SPECS, **DANET_SPECS}[name]
    sd = spec.build_torch().state_dict()
    shapes = expected_shapes(spec)
    assert list(shapes) == list(sd)
    assert all(tuple(sd[k].shape) == shapes[k] for k in sd)


@pytest.mark.parametrize("name", sorted({**SMALL_SPECS, **DANET_SPECS}))
def test_build_without_initialization_is_zeros_and_random_models_set_every_tensor(name):
    """``build_torch(initialize=False)``: the same tensors (names, shapes, dtypes, on the CPU), zeros, eval mode;
    ``random_torch_model`` builds that way, so ``randomize_`` must set every tensor."""
    spec = {**SMALL_SPECS, **DANET_SPECS}[name]
    drawn, zeros = spec.build_torch(), spec.build_torch(initialize=False)
    assert not zeros.training
    layout = lambda sd: [(k, v.shape, v.dtype, v.device.type) for k, v in sd.items()]  # noqa: E731
    assert layout(zeros.state_dict()) == layout(drawn.state_dict())
    assert not any(v.any() for v in zeros.state_dict().values())
    assert [k for k, v in random_torch_model(spec).state_dict().items() if not v.any()] == []


def test_allow_partial_keeps_the_initial_values_of_what_it_left_out():
    spec = SMALL_SPECS["head"]
    neutral = wc.from_torch(random_torch_model(spec))
    del neutral["conv5a.0.weight"]
    model = wc.to_torch(neutral, spec, allow_partial=True)
    assert model.state_dict()["conv5a.0.weight"].any()


@pytest.mark.parametrize("name", sorted({**SMALL_SPECS, **DANET_SPECS}))
def test_infer_arch(name):
    spec = {**SMALL_SPECS, **DANET_SPECS}[name]
    neutral = {k: np.zeros(s, np.float32) for k, s in expected_shapes(spec).items()}
    got = wc.infer_arch(neutral, **({"in_channels": spec.in_channels} if spec.kind == "cam" else {}))
    assert got == spec


@pytest.mark.parametrize("kind", ["head", "dual_attention"])
def test_infer_names_the_input_convs_that_disagree(kind):
    """conv5a and conv5c both read the input: where their input channels differ, neither is blamed by default."""
    spec = SMALL_SPECS[kind]
    neutral = {k: np.zeros(s, np.float32) for k, s in expected_shapes(spec).items()}
    shape = neutral["conv5a.0.weight"].shape
    neutral["conv5a.0.weight"] = np.zeros((shape[0], shape[1] // 2, *shape[2:]), np.float32)
    with pytest.raises(wc.ConvertError, match=rf"the input convs disagree: conv5a.0.weight takes {shape[1] // 2} "
                                              rf"input channels, conv5c.0.weight {shape[1]}; pass --in-channels"):
        wc.infer_arch(neutral)
    assert wc.infer_arch(neutral, in_channels=shape[1]).in_channels == shape[1]  # told: the strict check names conv5a


def test_infer_overrides():
    neutral = {k: np.zeros(s, np.float32) for k, s in expected_shapes(DANET_SPECS["danet101"]).items()}
    got = wc.infer_arch(neutral, output_stride=16, multi_grid=None)
    assert (got.output_stride, got.multi_grid, got.backbone, got.num_classes) == (16, None, "resnet101", 19)


def test_a_backbone_depth_danet_does_not_have_is_named():
    """A ResNet-152 DANet (layer3: 36 blocks) was read as a ResNet-101 with 13 unexpected blocks; it is named, and
    `--backbone` is still taken (with allow_partial: the blocks that fit)."""
    neutral = {k: np.zeros(s, np.float32) for k, s in expected_shapes(DANET_SPECS["danet101"]).items()}
    for b in range(23, 36):
        neutral.update({k.replace("layer3.22.", f"layer3.{b}."): v for k, v in neutral.items()
                        if k.startswith("pretrained.layer3.22.")})
    with pytest.raises(wc.ConvertError, match=r"layer3 has 36 blocks; DANet's backbones have 6 \(resnet50\) or 23 "
                                              r"\(resnet101\)"):
        wc.infer_arch(neutral)
    assert wc.infer_arch(neutral, backbone="resnet101").backbone == "resnet101"


def test_an_option_gives_a_required_field_the_weights_do_not_show(tmp_path, capsys):
    """DualAttention weights have no classifier to show ``num_classes``: `--arch head --num-classes 5` (the
    error's own advice) must be taken, and `--allow-partial` then starts a DANetHead from them."""
    head = SMALL_SPECS["head"]
    neutral = {k: np.zeros(s, np.float32) for k, s in expected_shapes(head).items() if not k.startswith("conv8.")}
    assert wc.infer_arch(neutral, num_classes=5) == head
    dual = wc.from_torch(random_torch_model(SMALL_SPECS["dual_attention"]))
    torch.save({k: torch.from_numpy(v) for k, v in dual.items()}, tmp_path / "dual.pth")
    assert main([str(tmp_path / "dual.pth"), str(tmp_path / "head.pth"), "--arch", "head", "--num-classes", "5",
                 "--allow-partial", "-q"]) == 0, capsys.readouterr().err
    back = wc.load(tmp_path / "head.pth", allow_partial=True)
    assert back.arch == ArchSpec("head", in_channels=64, num_classes=5)
    assert all(np.array_equal(back.weights[k], dual[k]) for k in back.weights if not k.startswith("conv8."))


@pytest.mark.parametrize("ext", [".pth", ".pt", ".safetensors", ".npz"])
@pytest.mark.parametrize("name", sorted(SMALL_SPECS))
def test_torch_formats_round_trip_bit_exact(tmp_path, ext, name):
    spec = SMALL_SPECS[name]
    model = random_torch_model(spec)
    neutral = wc.from_torch(model)
    wc.save(neutral, tmp_path / f"w{ext}", arch=spec)
    back, spec2 = wc.load(tmp_path / f"w{ext}")
    _same(neutral, back)
    assert spec2 == spec
    _same(neutral, wc.from_torch(wc.to_torch(back, spec2)))


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_dtype_preserved(tmp_path, dtype):
    spec = ArchSpec("head", in_channels=32, num_classes=3, dtype=dtype)
    neutral = wc.from_torch(random_torch_model(spec))
    assert neutral["conv5a.0.weight"].dtype.name == dtype
    for ext in (".pth", ".safetensors") + ((".npz",) if dtype != "bfloat16" else ()):
        wc.save(neutral, tmp_path / f"w{ext}", spec)
        back, spec2 = wc.load(tmp_path / f"w{ext}")
        _same(neutral, back)
        assert spec2.dtype == dtype and back["conv5a.1.num_batches_tracked"].dtype == np.int64


def test_official_checkpoint_converts_and_verifies(tmp_path, capsys):
    spec = SMALL_SPECS["head"]
    sd = random_torch_model(spec).state_dict()
    torch.save({"epoch": 240, "state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_pred": 0.8},
               tmp_path / "official.pth.tar.pth")
    assert main([str(tmp_path / "official.pth.tar.pth"), str(tmp_path / "out.safetensors"), "--verify"]) == 0
    err = capsys.readouterr()
    assert "module." in err.err and "epoch" in err.err and "PASS" in err.out
    back, _ = wc.load(tmp_path / "out.safetensors")
    _same(wc.from_torch(random_torch_model(spec)), back)


def test_verify_of_outputs_that_are_nan_everywhere_is_no_pass(tmp_path, capsys):
    """A diverged checkpoint (a NaN CAM gamma) gives NaN in every element of both models: equal NaN masks and no
    difference left to measure is not a verification, and a NaN in a few elements is counted aloud."""
    spec = SMALL_SPECS["head"]
    model = random_torch_model(spec)
    with torch.no_grad():
        model.sc.gamma.fill_(float("nan"))
    torch.save(model.state_dict(), tmp_path / "nan.pth")
    assert main([str(tmp_path / "nan.pth"), str(tmp_path / "out.safetensors"), "--verify", "-q"]) == 1
    out, err = capsys.readouterr()
    x = torch.randn(1, 64, 9, 11, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused, pam, cam = model(x)
    assert torch.isnan(fused).all() and torch.isnan(cam).all() and not torch.isnan(pam).any()  # what to report
    assert f"verify fused (torch -> torch): FAIL ({fused.numel()} of {fused.numel()} elements NaN or inf" in out
    assert "verify pam (torch -> torch): PASS" in out
    assert "every element of fused, cam is NaN or inf in both models" in err and (tmp_path / "out.safetensors").exists()


def test_mmseg_head_only_when_backbone_differs(tmp_path, capsys):
    spec = DANET_SPECS["danet50_deep"]
    neutral = wc.from_torch(random_torch_model(spec))
    ckpt = to_mmseg_names(neutral, stem_channels=64)
    ckpt["state_dict"] = {k: torch.from_numpy(np.array(v)) for k, v in ckpt["state_dict"].items()
                          if not k.startswith("backbone.layer") or k.startswith("backbone.layer1.0.")}
    torch.save(ckpt, tmp_path / "mmseg.pth")
    assert main([str(tmp_path / "mmseg.pth"), str(tmp_path / "head.npz")]) == 2
    err = capsys.readouterr().err
    assert "does not match DANet's deep-stem ResNet" in err and "--allow-partial" in err
    assert _no_dst(tmp_path, "head.npz")
    assert main([str(tmp_path / "mmseg.pth"), str(tmp_path / "head.npz"), "--verify", "--allow-partial"]) == 0
    out = capsys.readouterr()
    assert "imported the head alone" in out.err and "auxiliary head" in out.err and "skipped" in out.err
    back, got = wc.load(tmp_path / "head.npz")
    assert got.kind == "head" and got.in_channels == 2048 and got.num_classes == 5
    head = {k[len("head."):]: v for k, v in neutral.items() if k.startswith("head.")}
    for k, v in head.items():
        assert np.array_equal(back[k], v), k
    assert back["sa.gamma"].shape == (1,)


def test_mmseg_full_model_when_backbone_matches():
    from weights_convert.importers import import_checkpoint

    spec = DANET_SPECS["danet50_deep"]
    neutral = wc.from_torch(random_torch_model(spec))
    ckpt = to_mmseg_names(neutral)
    assert ckpt["state_dict"]["decode_head.pam.gamma.scale"].shape == ()
    got, hints, notes = import_checkpoint(ckpt)
    spec2, assumed = wc.infer_record(got, hints)
    assert spec2.kind == "danet" and spec2.deep_stem and spec2.backbone == "resnet50" and spec2.multi_grid is None
    assert not any("multi-grid" in n for n in assumed)  # mmseg's contract dilation is known, not assumed
    _same(neutral, wc.conform(got, spec2)[0])
    assert any("auxiliary head (4 tensors" in n for n in notes)
    assert any("ResNetV1c backbone onto the deep-stem" in n for n in notes)
    model = wc.to_torch(wc.conform(got, spec2)[0], spec2)
    with torch.no_grad():
        y = model(torch.randn(1, 3, 33, 33))
    assert y[0].shape == (1, 5, 33, 33)


# -- failures: exit code, message, no DST ---------------------------------------------------------
@pytest.fixture
def head_pth(tmp_path):
    sd = random_torch_model(SMALL_SPECS["head"]).state_dict()
    torch.save(sd, tmp_path / "src.pth")
    return tmp_path / "src.pth", sd


def test_missing_key(tmp_path, head_pth, capsys):
    src, sd = head_pth
    del sd["conv6.1.bias"]
    torch.save(sd, src)
    assert main([str(src), str(tmp_path / "dst.npz")]) == 2
    err = capsys.readouterr().err
    assert "1 missing" in err and "conv6.1.bias  expected (5,)" in err
    assert _no_dst(tmp_path, "dst.npz")


def test_unexpected_and_mismatched(tmp_path, head_pth, capsys):
    src, sd = head_pth
    sd["conv5a.0.weight"] = torch.zeros(16, 64, 1, 1)
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, src)
    assert main([str(src), str(tmp_path / "dst.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "extra.weight  found (2,)" in err
    assert "conv5a.0.weight  expected (16, 64, 3, 3), found (16, 64, 1, 1)" in err
    assert _no_dst(tmp_path, "dst.safetensors")


def test_allow_partial_says_what_it_left_out(tmp_path, head_pth, capsys):
    src, sd = head_pth
    sd["extra.weight"] = torch.zeros(2)
    del sd["conv6.1.bias"]
    torch.save(sd, src)
    assert main([str(src), str(tmp_path / "dst.npz"), "--allow-partial"]) == 0
    err = capsys.readouterr().err
    assert err.count("left out") == 1 and "1 missing (conv6.1.bias), 1 unexpected (extra.weight)" in err, err
    assert sorted(np.load(tmp_path / "dst.npz").files) == sorted([k for k in sd if k != "extra.weight"] +
                                                                  ["__danet_arch__"])


def test_wrong_class_count_option(tmp_path, head_pth, capsys):
    src, _ = head_pth
    assert main([str(src), str(tmp_path / "dst.pth"), "--num-classes", "7"]) == 2
    assert "conv8.1.weight  expected (7, 16, 1, 1), found (5, 16, 1, 1)" in capsys.readouterr().err
    assert _no_dst(tmp_path, "dst.pth")


@pytest.mark.parametrize("ext", [".pth", ".safetensors", ".npz"])
def test_corrupt_or_truncated_source(tmp_path, head_pth, capsys, ext):
    src, sd = head_pth
    good = tmp_path / f"good{ext}"
    wc.save(wc.from_torch(random_torch_model(SMALL_SPECS["head"])), good, SMALL_SPECS["head"])
    data = good.read_bytes()
    bad = tmp_path / f"bad{ext}"
    bad.write_bytes(data[: len(data) // 2])
    assert main([str(bad), str(tmp_path / "dst.pth")]) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err or "corrupt" in err
    assert bad.read_bytes() == data[: len(data) // 2]
    assert _no_dst(tmp_path, "dst.pth")


def test_existing_dst_refused_without_force(tmp_path, head_pth, capsys):
    src, _ = head_pth
    dst = tmp_path / "dst.npz"
    dst.write_bytes(b"keep me")
    assert main([str(src), str(dst)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert dst.read_bytes() == b"keep me"
    assert main([str(src), str(dst), "--force"]) == 0
    assert dst.read_bytes() != b"keep me"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def _not_loaded(monkeypatch):
    """Make reading SRC fail the test: a refusal of DST must come before it."""
    from weights_convert import api

    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("SRC was read before DST was refused"))


def test_dst_in_a_file_is_refused_up_front(tmp_path, head_pth, capsys, monkeypatch):
    src, _ = head_pth
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    dst = tmp_path / "notes.txt" / "dst.npz"
    _not_loaded(monkeypatch)
    assert main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert f"The folder of DST {str(dst)!r} is a file" in err and "unexpected" not in err, err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into any folder")
def test_dst_in_a_folder_that_is_not_writable_is_refused_up_front(tmp_path, head_pth, capsys, monkeypatch):
    src, _ = head_pth
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    _not_loaded(monkeypatch)
    try:
        assert main([str(src), str(folder / "dst.npz")]) == 2
    finally:
        folder.chmod(0o755)
    err = capsys.readouterr().err
    assert f"The folder of DST {str(folder / 'dst.npz')!r} is not writable" in err and "unexpected" not in err, err
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_while_writing_leaves_no_temporary_file(signame, tmp_path):
    """SIGTERM (``kill``) or SIGHUP (a closed terminal) while DST is being written: the temporary file is
    removed, DST not written, exit 2."""
    spec = SMALL_SPECS["pam"]
    wc.save(wc.from_torch(random_torch_model(spec)), tmp_path / "src.npz", spec)
    (tmp_path / "out").mkdir()
    child = (  # the writer signals its own process once the temporary file exists
        "import os, signal, sys, time\n"
        "from weights_convert import cli, io_arrays\n"
        "write = io_arrays.write_safetensors\n"
        "def signalled(*args):\n"
        "    write(*args)\n"
        f"    os.kill(os.getpid(), signal.{signame})\n"
        "    time.sleep(60)\n"
        "io_arrays.write_safetensors = signalled\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    dst = tmp_path / "out" / "k.safetensors"
    out = subprocess.run([sys.executable, "-c", child, str(tmp_path / "src.npz"), str(dst)], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 2 and f"terminated ({signame}); DST not written" in out.stderr, out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_interrupt_during_verify_says_dst_was_written(tmp_path, head_pth, capsys, monkeypatch):
    from weights_convert import cli

    def interrupted(*args):
        raise KeyboardInterrupt

    src, sd = head_pth
    monkeypatch.setattr(cli, "_verify", interrupted)
    assert main([str(src), str(tmp_path / "dst.npz"), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "DST not written" not in err and "verification interrupted" in err and "dst.npz' written" in err, err
    _same({k: v.numpy() for k, v in sd.items()}, wc.load(tmp_path / "dst.npz").weights)


def test_a_crash_during_verify_says_dst_was_written(tmp_path, head_pth, capsys, monkeypatch):
    """A crash while verifying said only "unexpected EOFError: ...": the DST was in place, and the next run
    (the same command) was refused because it existed."""
    from weights_convert import cli

    def crashed(*args):
        raise EOFError("marshal data too short")

    src, sd = head_pth
    monkeypatch.setattr(cli, "_verify", crashed)
    assert main([str(src), str(tmp_path / "dst.npz"), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "unexpected EOFError: marshal data too short" in err, err
    assert f"DST {str(tmp_path / 'dst.npz')!r} written, verification did not finish" in err, err
    _same({k: v.numpy() for k, v in sd.items()}, wc.load(tmp_path / "dst.npz").weights)


def test_same_file_refused(head_pth, capsys):
    src, _ = head_pth
    before = src.read_bytes()
    assert main([str(src), str(src), "--force"]) == 2
    assert "SRC is never modified" in capsys.readouterr().err and src.read_bytes() == before


def test_unsupported_extension(tmp_path, head_pth, capsys):
    src, _ = head_pth
    assert main([str(src), str(tmp_path / "dst.bin")]) == 2
    assert "accepted: .pth, .pt" in capsys.readouterr().err


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_runs_code_is_refused(tmp_path, capsys, writer):
    marker = tmp_path / "PWNED"
    obj = {"state_dict": {"gamma": _Evil(str(marker))}}
    if writer == "torch.save":
        torch.save(obj, tmp_path / "evil.pth")
    else:
        with open(tmp_path / "evil.pth", "wb") as f:
            pickle.dump(obj, f, protocol=2)
    assert main([str(tmp_path / "evil.pth"), str(tmp_path / "dst.npz")]) == 2
    err = capsys.readouterr().err
    assert "would import or run code" in err and "Nothing was executed" in err
    assert "weights_only=False" not in err and "\x1b" not in err  # our own words: no hint to load unsafely
    assert not marker.exists()
    assert _no_dst(tmp_path, "dst.npz")


def test_import_imports_no_framework():
    code = "import sys, weights_convert; print('torch' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_weight_map_doc_is_generated():
    from weights_convert.mapping import keras_table, markdown

    doc = ROOT / "docs" / "WEIGHT_MAP.md"
    assert doc.read_text() == markdown(), "regenerate: python -m weights_convert.mapping --markdown > docs/WEIGHT_MAP.md"
    rows = {r.torch_name: r for r in keras_table(SMALL_SPECS["head"])}
    assert rows["conv5a.0.weight"].keras_path == "conv5a.layers[0].kernel"
    assert rows["conv5a.0.weight"].keras_shape == (3, 3, 64, 16)
    assert rows["conv5a.1.running_var"].keras_path == "conv5a.layers[1].moving_variance"
    assert rows["sa.gamma"].keras_path == "sa.gamma" and rows["conv6.1.bias"].keras_path == "conv6.layers[1].bias"
