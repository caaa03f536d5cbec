"""Write a file so that nothing is lost: a temporary file in the target folder, renamed into place."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from .errors import RefusedError

__all__ = ["check_destination", "atomic_target", "write_files"]


def check_destination(src, dst, force: bool) -> Path:
    """Refuse ``dst`` if it exists (without ``force``), is ``src``, or its folder is missing."""
    dst = Path(dst)
    if src is not None and Path(src).exists() and dst.exists() and os.path.samefile(src, dst):
        raise RefusedError(f"DST {str(dst)!r} is the source file; SRC is never modified: choose another DST.")
    if dst.exists() and not force:
        raise RefusedError(f"DST {str(dst)!r} exists; pass --force (force=True) to replace it.")
    if dst.exists() and dst.is_dir():
        raise RefusedError(f"DST {str(dst)!r} is a folder; give a file name with a supported extension.")
    if not dst.parent.exists():
        raise RefusedError(f"The folder of DST {str(dst)!r} does not exist ({str(dst.parent)!r}).")
    return dst


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary(dst: Path, suffix: str = "") -> Path:
    return dst.parent / f".{dst.name}.tmp-{secrets.token_hex(4)}{suffix}"


def _settle(tmp: Path) -> None:
    """Give ``tmp`` the usual permissions and put it on disk, ready to be renamed."""
    if not tmp.exists():
        raise OSError(f"the writer left no file at {tmp}")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # some writers create 0600 files
    with open(tmp, "rb") as fh:  # on disk before the rename, so a crash cannot leave a short DST
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_target(dst, suffix: str):
    """Yield a temporary path ``.{name}.tmp-XXXX{suffix}`` beside ``dst``; on success rename it to ``dst``.

    ``suffix`` keeps what writers need (Keras insists on ``.keras`` / ``.weights.h5``).
    On any error the temporary file is removed and ``dst`` is untouched.
    """
    dst = Path(dst)
    tmp = _temporary(dst, suffix)
    try:
        yield tmp
        _settle(tmp)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_files(files: dict) -> None:
    """Write ``{path: bytes}`` all or nothing: every file to a temporary beside it, then each renamed into place."""
    temps = {}
    try:
        for dst, data in files.items():
            dst = Path(dst)
            temps[dst] = _temporary(dst)
            temps[dst].write_bytes(data)
            _settle(temps[dst])
        for dst, tmp in temps.items():
            os.replace(tmp, dst)
            _fsync_dir(dst.parent)
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
