"""Fuzz every weight-format reader: truncated and bit-flipped files give exit 2, a message, no DST.

For each format a valid small file (a PositionAttention, 16 channels) is
written, then damaged: truncated at several offsets and with single random
bit flips (seeded). ``danet-convert SRC DST`` (in process, ``cli.main``) must
exit 2 with ``danet-convert: error: ...`` and leave no DST and no temporary
file, never raise. A bit flip can leave a valid file (a flipped bit inside a
tensor's data, where the format has no checksum): then the exit code is 0 and
DST must hold exactly what SRC now holds.
"""

from __future__ import annotations

import numpy as np
import pytest

import weights_convert as wc
from weights_convert import cli

SPEC = wc.ArchSpec("pam", in_channels=16)
TORCH_FORMATS = [".pth", ".safetensors", ".npz"]
KERAS_FORMATS = [".weights.h5", ".keras"]
TRUNCATE_AT = [0, 1, 8, 0.25, 0.5, 0.9, -1]  # bytes, or a fraction of the file, -1: all but the last byte
FLIPS = 10


def _neutral():
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype("float32") for k, s in wc.expected_shapes(SPEC).items()}


def _variants(data: bytes):
    n = len(data)
    for at in TRUNCATE_AT:
        cut = n - 1 if at == -1 else (int(n * at) if isinstance(at, float) else at)
        yield f"truncated to {cut} of {n} bytes", data[:cut]
    rng = np.random.default_rng(1234)
    for _ in range(FLIPS):
        pos, bit = int(rng.integers(n)), int(rng.integers(8))
        flipped = bytearray(data)
        flipped[pos] ^= 1 << bit
        yield f"bit {bit} of byte {pos} flipped", bytes(flipped)


def _fuzz(ext, tmp_path, capsys):
    good = tmp_path / f"good{ext}"
    wc.save(_neutral(), good, arch=SPEC)
    data = good.read_bytes()
    dst_ext = ".npz" if ext == ".safetensors" else ".safetensors"
    outcomes = {0: 0, 2: 0}
    for i, (what, payload) in enumerate(_variants(data)):
        work = tmp_path / f"case{i}"
        work.mkdir()
        src, dst = work / f"src{ext}", work / f"dst{dst_ext}"
        src.write_bytes(payload)
        try:
            code = cli.main([str(src), str(dst), "-q", "--arch", "pam", "--channels", "16"])
        except BaseException as e:  # noqa: BLE001 - the point: nothing may escape
            pytest.fail(f"{ext} {what}: danet-convert raised {type(e).__name__}: {e}")
        err = capsys.readouterr().err
        leftovers = sorted(p.name for p in work.iterdir() if p.name != src.name)
        assert "Traceback" not in err, f"{ext} {what}: traceback printed\n{err}"
        if code == 2:
            assert "danet-convert: error:" in err and len(err.strip()) > 30, f"{ext} {what}: unclear message {err!r}"
            assert leftovers == [], f"{ext} {what}: left {leftovers} after a failure"
        else:
            assert code == 0, f"{ext} {what}: exit {code}, expected 2 (or 0 for a still-valid file)\n{err}"
            assert leftovers == [dst.name], f"{ext} {what}: left {leftovers}"
            got, _ = wc.load(dst)
            expected, _ = wc.load(src)
            for k in expected:
                assert np.array_equal(got[k], expected[k], equal_nan=True), f"{ext} {what}: {k} differs"
        outcomes[code] += 1
    assert outcomes[2] >= len(TRUNCATE_AT), f"{ext}: every truncation must be refused ({outcomes})"
    print(f"{ext}: {outcomes[2]} refused (exit 2), {outcomes[0]} still-valid bit flips converted (exit 0)")


@pytest.mark.parametrize("ext", TORCH_FORMATS)
def test_damaged_files_are_refused(ext, tmp_path, capsys):
    if ext == ".pth":
        pytest.importorskip("torch")
    _fuzz(ext, tmp_path, capsys)


@pytest.mark.keras
@pytest.mark.parametrize("ext", KERAS_FORMATS)
def test_damaged_keras_files_are_refused(ext, tmp_path, capsys):
    pytest.importorskip("keras")
    _fuzz(ext, tmp_path, capsys)


def test_npz_with_object_arrays_is_refused_without_unpickling(tmp_path, capsys):
    src = tmp_path / "objects.npz"
    arrays = {k: v for k, v in _neutral().items()}
    first = next(iter(arrays))
    arrays[first] = np.array([{"payload": 1}], dtype=object)  # loading it would need pickle
    np.savez(src, **arrays)
    dst = tmp_path / "out.pth"
    assert cli.main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "pickled object arrays" in err and "allow_pickle=False" in err
    assert not dst.exists() and not list(tmp_path.glob(".out.pth.tmp-*"))


@pytest.mark.parametrize("ext, words, text", [
    (".npz", "is not a NumPy .npz archive (not a zip file)", "hello\n"),
    (".keras", "is not a Keras .keras archive (not a zip file)", "hello\n"),
    (".pth", "is not a PyTorch file (neither a zip archive nor a pickle)", "hello\n"),
    (".pth", "is not a PyTorch file (neither a zip archive nor a pickle)", "garbage\n"),
    (".pth", "is not a PyTorch file (neither a zip archive nor a pickle)", "\x89PNG\r\n\x1a\n" + "\0" * 64)])
def test_a_file_that_is_no_zip_is_named_so(ext, words, text, tmp_path, capsys):
    """A text file named like a zip format: said to be no zip archive (not "pickled", not "not found").

    A ``.pth`` that is no pickle either (text, an image) was refused as if its
    pickle would run code: torch's weights-only reader refuses any opcode it
    does not know, and "garbage" starts with pickle's ``GET``.
    """
    pytest.importorskip("torch" if ext == ".pth" else "numpy")
    if ext == ".keras":
        pytest.importorskip("keras")
    src = tmp_path / f"t{ext}"
    src.write_bytes(text.encode("latin-1"))
    assert cli.main([str(src), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"{str(src)!r} {words}" in err, err
    assert "pickled" not in err and "would import" not in err and "not found" not in err
    assert [p.name for p in tmp_path.iterdir()] == [src.name]
