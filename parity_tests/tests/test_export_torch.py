"""danet_torch.export: ONNX (dynamic batch/height/width) and compiled execution agree with eager PyTorch.

onnxruntime runs each exported file at the export size and at sizes not seen
at export (odd ones included); ``torch.compile`` (inductor) and
``torch.export`` of ``DANetHead`` are compared with eager. Every check uses
the tolerance table.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import danet_torch as dt
from danet_torch import export as dexport
from weights_convert.testing import randomize_
from parity_tests.tests.helpers import to_numpy
from weights_convert.tolerances import compare, tolerance

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

EXPORT_SIZE = (12, 12)
OTHER_SIZES = [(1, 7, 9), (3, 17, 5)]  # (batch, H, W), neither seen at export


def _component(name):
    if name == "pam":
        return dt.PositionAttention(32)
    if name == "cam":
        return dt.ChannelAttention(32)
    if name == "dual_attention":
        return dt.DualAttention(32)
    return dt.DANetHead(64, 5)


def _channels(module):
    return module.in_channels


def _eager(module, x):
    with torch.no_grad():
        out = module(x)
    return [to_numpy(o) for o in (out if isinstance(out, tuple) else (out,))]


def _check_onnx(path, module, sizes, scope="layer", channels=None):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == dexport.output_names(module)
    assert [i.name for i in session.get_inputs()] == [dexport.INPUT_NAME]
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for b, h, w in sizes:
        x = torch.randn(b, channels or _channels(module), h, w, generator=g)
        got = session.run(None, {dexport.INPUT_NAME: x.numpy()})
        for name, a, e in zip(names, got, _eager(module, x)):
            result = compare(f"onnxruntime {type(module).__name__}.{name} at {(b, h, w)}", a, e,
                             tolerance("float32", scope))
            assert result.passed, result.message()
            worst = max(worst, result.max_abs)
    return worst


@pytest.mark.parametrize("name", ["pam", "cam", "dual_attention", "head"])
def test_onnx_components_match_torch_at_new_sizes(name, tmp_path):
    module = randomize_(_component(name), seed=3).eval()
    path = tmp_path / f"{name}.onnx"
    used = dexport.export_onnx(module, path, torch.randn(2, _channels(module), *EXPORT_SIZE))
    assert used == "dynamo"
    worst = _check_onnx(path, module, [(2, *EXPORT_SIZE)] + OTHER_SIZES)
    print(f"{name}: onnxruntime vs torch max|diff| = {worst:.3e}")


def test_onnx_danet50_matches_torch_at_new_size(tmp_path):
    module = randomize_(dt.DANet(3, backbone="resnet50"), seed=4).eval()
    path = tmp_path / "danet50.onnx"
    assert dexport.export_onnx(module, path, torch.randn(1, 3, 65, 65)) == "dynamo"
    worst = _check_onnx(path, module, [(1, 65, 65), (1, 49, 71)], scope="model", channels=3)
    print(f"DANet-50: onnxruntime vs torch max|diff| = {worst:.3e}")


def test_legacy_exporter_is_the_fallback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated torch.export failure")

    monkeypatch.setattr(dexport, "_export_dynamo", broken)
    module = randomize_(dt.PositionAttention(32), seed=5).eval()
    path = tmp_path / "pam_legacy.onnx"
    with pytest.warns(RuntimeWarning, match="falling back to the legacy exporter"):
        used = dexport.export_onnx(module, path, torch.randn(1, 32, 12, 12))
    assert used == "legacy"
    _check_onnx(path, module, OTHER_SIZES)


def test_failed_export_leaves_no_file(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(dexport, "_export_dynamo", broken)
    monkeypatch.setattr(dexport, "_export_legacy", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="ONNX export of ChannelAttention failed. dynamo: .*simulated"):
            dexport.export_onnx(dt.ChannelAttention(8), tmp_path / "cam.onnx", torch.randn(2, 8, 4, 4))
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """``export_onnx`` writes a temporary file beside ``path`` and renames it: a write that fails half-way (a
    full disk) leaves the file that was there as it was."""
    import onnx

    path = tmp_path / "cam.onnx"
    path.write_bytes(b"the previous export")

    def half_written(model, target, *args, **kwargs):
        with open(target, "wb") as fh:
            fh.write(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(onnx, "save", half_written)
    with pytest.raises(OSError, match="No space left"):
        dexport.export_onnx(dt.ChannelAttention(8), path, torch.randn(2, 8, 4, 4))
    assert path.read_bytes() == b"the previous export" and [p.name for p in tmp_path.iterdir()] == ["cam.onnx"]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(path="x.pt"), ValueError, "must end in .onnx"),
    (dict(example_input=np.zeros((2, 8, 4, 4))), TypeError, "`example_input`"),
    (dict(example_input=torch.zeros(2, 8, 4)), ValueError, "4-D"),
    (dict(example_input=torch.zeros(2, 8, 1, 4)), ValueError, "height and width >= 2"),
    (dict(exporter="tracing"), ValueError, "`exporter`"),
])
def test_export_arguments_are_checked(kwargs, error, match, tmp_path):
    args = dict(module=dt.ChannelAttention(8), path=tmp_path / "c.onnx", example_input=torch.zeros(2, 8, 4, 4))
    args.update(kwargs)
    if not str(args["path"]).startswith(str(tmp_path)):
        args["path"] = tmp_path / args["path"]
    with pytest.raises(error, match=match):
        dexport.export_onnx(**args)


def test_export_traces_the_official_pam_path():
    # is_exporting(): a PAM on the efficient path still exports the official bmm + softmax,
    # not the Python loop over blocks whose block count would fix N.
    module = randomize_(dt.PositionAttention(32, pam_path="efficient"), seed=6).eval()
    dim = torch.export.Dim.DYNAMIC
    program = torch.export.export(module, (torch.randn(2, 32, 40, 40),), dynamic_shapes=({0: dim, 2: dim, 3: dim},))
    bmm = [n for n in program.graph.nodes if n.op == "call_function" and "bmm" in str(n.target)]
    assert len(bmm) == 2
    x = torch.randn(1, 32, 37, 41)
    result = compare("torch.export PAM at 37x41", to_numpy(program.module()(x)), _eager(module, x)[0],
                     tolerance("float32", "layer"))
    assert result.passed, result.message()


def test_torch_export_and_compile_of_head_match_eager():
    module = randomize_(dt.DANetHead(64, 5), seed=7).eval()
    dim = torch.export.Dim.DYNAMIC
    program = torch.export.export(module, (torch.randn(2, 64, 12, 12),), dynamic_shapes=({0: dim, 2: dim, 3: dim},))
    compiled = torch.compile(module, backend="inductor", dynamic=False)  # CPU: C++/OpenMP codegen
    g = torch.Generator().manual_seed(8)
    for shape in [(2, 64, 12, 12), (1, 64, 9, 13)]:
        x = torch.randn(*shape, generator=g)
        expected = _eager(module, x)
        with torch.no_grad():
            got = {"torch.export": program.module()(x)}
            if shape[0] == 2:  # one compilation only: inductor on 2 CPU cores takes ~30 s
                got["torch.compile(inductor)"] = compiled(x)
        for how, outs in got.items():
            for name, a, e in zip(("fused", "pam", "cam"), outs, expected):
                result = compare(f"{how} DANetHead.{name} at {shape}", to_numpy(a), e, tolerance("float32", "layer"))
                assert result.passed, result.message()
