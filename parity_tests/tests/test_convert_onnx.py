"""``danet-convert SRC DST.onnx``: ONNX output (write-only), ``--verify`` through onnxruntime, refusals."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import weights_convert as wc  # noqa: E402
from weights_convert.tolerances import compare, tolerance  # noqa: E402
from weights_convert.arch import ArchSpec  # noqa: E402
from weights_convert.cli import main  # noqa: E402
from weights_convert.testing import random_torch_model  # noqa: E402

SPEC = ArchSpec("head", in_channels=64, num_classes=5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random DANetHead(64, 5) as .pth, converted once to .onnx with ``--verify``: (folder, model, rc, out)."""
    folder = tmp_path_factory.mktemp("onnx")
    model = random_torch_model(SPEC)
    torch.save(model.state_dict(), folder / "head.pth")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([str(folder / "head.pth"), str(folder / "head.onnx"), "--verify", "-q"])
    return folder, model, rc, buf.getvalue()


def test_pth_to_onnx_runs_in_onnxruntime(exported):
    folder, model, rc, _ = exported
    assert rc == 0
    dst = folder / "head.onnx"
    assert dst.is_file()
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]  # no temporary file left
    size = 10
    assert size != SPEC.info.export_size  # a size not used at export: the axes really are dynamic
    x = np.random.default_rng(1).standard_normal((2, 64, size, size)).astype(np.float32)
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    names = [o.name for o in sess.get_outputs()]
    assert names == ["fused", "pam", "cam"]
    got = sess.run(names, {"input": x})
    with torch.no_grad():
        want = model(torch.from_numpy(x))
    tol = tolerance("float32", "layer")
    for n, g, w in zip(names, got, want):
        c = compare(n, g, w.numpy(), tol)
        assert c.passed, c.message()


def test_verify_passes_and_prints_each_output(exported):
    _, _, rc, out = exported
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("verify ")]
    assert len(lines) == 3 and all("PASS" in ln and "torch -> onnxruntime" in ln for ln in lines), out
    assert "max|diff|=" in out and "max rel=" in out


def test_existing_onnx_dst_is_refused_without_force(exported, capsys):
    folder, *_ = exported
    dst = folder / "head.onnx"
    before = dst.read_bytes()
    assert main([str(folder / "head.pth"), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err and "Traceback" not in err
    assert dst.read_bytes() == before


def test_onnx_src_is_refused(exported, tmp_path, capsys):
    folder, *_ = exported
    dst = tmp_path / "back.pth"
    assert main([str(folder / "head.onnx"), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "ONNX is an export format" in err and "cannot read weights back" in err
    assert ".pth" in err.split("accepted SRC formats:")[1] and "Traceback" not in err
    assert not dst.exists()
    with pytest.raises(wc.ConvertError, match="ONNX is an export format"):
        wc.load(folder / "head.onnx")
    with pytest.raises(wc.ConvertError, match="ONNX is an export format"):
        wc.api.read_raw(folder / "head.onnx")


def test_onnx_from_needs_an_onnx_dst(exported, tmp_path, capsys):
    folder, *_ = exported
    with pytest.raises(SystemExit) as info:
        main([str(folder / "head.pth"), str(tmp_path / "w.npz"), "--onnx-from", "torch"])
    assert info.value.code == 2
    assert "--onnx-from only applies to an .onnx DST" in capsys.readouterr().err


def test_allow_partial_cannot_write_onnx(exported, tmp_path, capsys):
    folder, model, *_ = exported
    partial = {k: v for k, v in wc.from_torch(model).items() if k != "conv6.1.bias"}
    wc.save(partial, tmp_path / "partial.npz", SPEC, allow_partial=True)
    assert main([str(tmp_path / "partial.npz"), str(tmp_path / "p.onnx"), "--allow-partial"]) == 2
    err = capsys.readouterr().err
    assert "An ONNX file is a complete model: 1 weight(s)" in err and "(conv6.1.bias)" in err
    assert [p.name for p in tmp_path.iterdir()] == ["partial.npz"]  # nothing else written, no temporary left


def test_float64_weights_are_not_rounded_into_onnx_without_allow_cast(exported, tmp_path, capsys):
    """ONNX holds a float32 model: float64 weights would be rounded, which is refused unless --allow-cast (as
    for Keras files); half-precision weights are widened exactly, with a note. Both were exported silently."""
    _, model, *_ = exported
    weights64 = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in wc.from_torch(model).items()}
    wc.save(weights64, tmp_path / "head64.npz", SPEC.replace(dtype="float64"))
    assert main([str(tmp_path / "head64.npz"), str(tmp_path / "head64.onnx")]) == 2
    err = capsys.readouterr().err
    assert "float64 weights of DANetHead" in err and "rounded to float32" in err and "--allow-cast" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head64.npz"]
    assert main([str(tmp_path / "head64.npz"), str(tmp_path / "head64.onnx"), "--allow-cast"]) == 0
    assert "note: exported as float32 (float64 -> float32, values rounded)" in capsys.readouterr().err
    weights16 = {k: v.astype(np.float16) if v.dtype.kind == "f" else v for k, v in weights64.items()}
    wc.save(weights16, tmp_path / "head16.npz", SPEC.replace(dtype="float16"))
    assert main([str(tmp_path / "head16.npz"), str(tmp_path / "head16.onnx")]) == 0
    assert "note: exported as float32 (float16 -> float32, values kept)" in capsys.readouterr().err
    sess = ort.InferenceSession(str(tmp_path / "head16.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((1, 64, 9, 11)).astype(np.float32)
    model16 = wc.to_torch(weights16, SPEC.replace(dtype="float32")).eval()  # the float16 values, widened
    with torch.no_grad():
        want = model16(torch.from_numpy(x))
    for name, got, w in zip(("fused", "pam", "cam"), sess.run(None, {"input": x}), want):
        c = compare(name, got, w.numpy(), tolerance("float32", "layer"))
        assert c.passed, c.message()
