"""Write a file so that nothing is lost: a temporary file in the target folder, renamed into place."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from .errors import RefusedError

__all__ = ["check_output", "check_destination", "atomic_target", "write_files"]


def check_output(path, name: str, force: bool, replace: str = "--force") -> Path:
    """Refuse an output ``path`` before any work: a folder, an existing file (without ``force``), a missing or
    unwritable folder. ``name`` is the argument as the user wrote it (``DST``, ``--json``); ``replace`` is what
    lets an existing file be replaced."""
    dst = Path(path)
    if dst.is_dir():
        raise RefusedError(f"{name} {str(dst)!r} is a folder; give a file name.")
    if dst.exists() and not force:
        raise RefusedError(f"{name} {str(dst)!r} exists; pass {replace} to replace it.")
    folder = dst.parent
    if not folder.exists():
        raise RefusedError(f"The folder of {name} {str(dst)!r} does not exist ({str(folder)!r}).")
    if not folder.is_dir():
        raise RefusedError(f"The folder of {name} {str(dst)!r} is a file ({str(folder)!r}), not a folder; "
                           f"give a path in a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RefusedError(f"The folder of {name} {str(dst)!r} is not writable ({str(folder)!r}); it is written "
                           f"there (a temporary file, renamed into place): choose a folder you can write to.")
    return dst


def check_destination(src, dst, force: bool) -> Path:
    """Refuse ``dst`` if it is ``src``, exists (without ``force``), or cannot be written (:func:`check_output`)."""
    dst = Path(dst)
    if src is not None and Path(src).exists() and dst.exists() and os.path.samefile(src, dst):
        raise RefusedError(f"DST {str(dst)!r} is the source file; SRC is never modified: choose another DST.")
    return check_output(dst, "DST", force, replace="--force (force=True)")


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
