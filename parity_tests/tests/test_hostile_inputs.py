"""Hostile files are refused: a code-running pickle in a ``.pth``, a ``.keras`` with a lambda or unknown class.

The pickle test writes a checkpoint whose unpickling would create a marker
file; loading it through ``weights_convert.load`` and ``danet-convert`` must
refuse it with a clear message, exit 2, write no DST and leave no marker.
"""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

import weights_convert as wc
from parity_tests.tests.helpers import PickleMarker, hostile_pth
from weights_convert import cli


@pytest.fixture
def evil_pth(tmp_path):
    marker = tmp_path / "PWNED"
    path = hostile_pth(tmp_path / "evil.pth", marker)
    assert not marker.exists()
    return path, marker


def test_pickle_with_code_is_refused_by_load(evil_pth):
    path, marker = evil_pth
    with pytest.raises(wc.UnsafeFileError, match="Nothing was executed") as info:
        wc.load(path)
    assert "would import or run code" in str(info.value) and "weights_only=False" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("writer", ["pickle-2", "pickle-4", "torch-legacy"])
def test_a_plain_pickle_with_code_is_refused_naming_its_imports(writer, tmp_path):
    """A ``pickle.dump`` file named .pth, or torch's legacy format (several pickles in a row, no zip archive):
    the refusal names what it imports, read from its opcodes as for torch's archives, and torch's own warnings
    about the file stay out of the output."""
    import pickle
    import warnings

    path, marker = tmp_path / "plain.pth", tmp_path / "marker"
    payload = {"weight": torch.ones(2), "payload": PickleMarker(marker)}
    if writer == "torch-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as fh:
            pickle.dump({"weight": [1.0, 2.0], "payload": PickleMarker(marker)}, fh, protocol=int(writer[-1]))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(wc.UnsafeFileError) as info:
        warnings.simplefilter("always")
        wc.load(path)
    assert "(it imports io.open)" in str(info.value) and "Nothing was executed" in str(info.value), str(info.value)
    assert not [w for w in caught if "pickle" in str(w.message).lower()], [str(w.message) for w in caught]
    assert not marker.exists()


def test_a_protocol_0_inst_pickle_is_refused_naming_its_import(tmp_path):
    """``INST`` (protocol 0, written by hand: Python 3 no longer emits it) imports and calls in one opcode."""
    path = tmp_path / "inst.pth"
    path.write_bytes(b"(S'true'\nios\nsystem\n.")
    with pytest.raises(wc.UnsafeFileError) as info:
        wc.load(path)
    assert "(it imports os.system)" in str(info.value) and "Nothing was executed" in str(info.value), str(info.value)


def test_a_pickled_module_in_torchs_legacy_format_is_named_so(tmp_path):
    import danet_torch as dt

    path = tmp_path / "module.pth"
    torch.save(dt.ChannelAttention(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(wc.UnsafeFileError, match=r"holds a pickled nn.Module .*danet_torch.attention.ChannelAttention"
                                                 r".* torch.save\(model.state_dict\(\), PATH\)"):
        wc.load(path)


def test_pickle_with_code_is_refused_by_cli(evil_pth, tmp_path, capsys):
    path, marker = evil_pth
    dst = tmp_path / "out.safetensors"
    assert cli.main([str(path), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "danet-convert: error: Refused" in err and "Traceback" not in err
    assert not marker.exists() and not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pth"]  # no DST, no temporary file


def test_the_pickle_really_runs_code_when_loaded_unsafely(evil_pth):
    # Proves the fixture is hostile: the refusal above is what kept the marker away.
    path, marker = evil_pth
    torch.load(path, weights_only=False)
    assert marker.exists()


# -- .keras under safe mode ---------------------------------------------------------------------


def _keras():
    import keras as k

    return k


@pytest.mark.keras
def test_keras_lambda_is_refused(tmp_path):
    k = _keras()
    inp = k.Input((4, 4, 8))
    model = k.Model(inp, k.layers.Lambda(lambda t: t * 2.0)(inp))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(ValueError, match="(?i)lambda"):
        k.saving.load_model(path, safe_mode=True)
    with pytest.raises(wc.UnsafeFileError, match="refused under safe_mode") as info:
        wc.load(path)
    msg = str(info.value)
    assert "Lambda layer" in msg and "arbitrary Python code" in msg and "Nothing was executed" in msg
    assert "Requested the deserialization of a `Lambda` layer" in msg  # Keras' own text is kept


@pytest.mark.keras
def test_keras_lambda_is_refused_by_cli(tmp_path, capsys):
    k = _keras()
    inp = k.Input((4, 4, 8))
    path = tmp_path / "lambda.keras"
    k.Model(inp, k.layers.Lambda(lambda t: t * 2.0)(inp)).save(path)
    dst = tmp_path / "out.pth"
    assert cli.main([str(path), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "danet-convert: error: Refused" in err and "refused under safe_mode" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lambda.keras"]  # no DST, no temporary file


@pytest.mark.keras
def test_keras_unknown_class_is_refused(tmp_path):
    import danet_keras as dk

    k = _keras()
    good = tmp_path / "cam.keras"
    layer = dk.ChannelAttention()
    inp = k.Input((4, 4, 8))
    k.Model(inp, layer(inp)).save(good)
    bad = tmp_path / "unknown.keras"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "config.json":
                text = json.dumps(json.loads(data))
                text = text.replace('"ChannelAttention"', '"EvilLayer"').replace('"danet>', '"evil_pkg>')
                data = text.encode()
            zout.writestr(item, data)
    with pytest.raises(Exception, match="EvilLayer"):
        k.saving.load_model(bad, safe_mode=True)
    with pytest.raises(wc.CorruptFileError, match="names the unknown class EvilLayer") as info:
        wc.load(bad)
    assert not isinstance(info.value, wc.UnsafeFileError)
    assert "Could not locate class 'EvilLayer'" in str(info.value)  # Keras' full error text is kept
