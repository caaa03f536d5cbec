"""Error types of the converter: each carries the message the CLI prints (exit code 2)."""

from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ["ConvertError", "StrictLoadError", "CorruptFileError", "UnsafeFileError", "RefusedError", "one_line"]


class ConvertError(ValueError):
    """Base class: a conversion that cannot go on. ``danet-convert`` exits 2 on it."""


class CorruptFileError(ConvertError):
    """The source file is truncated, corrupt or not of the format its extension says."""


class UnsafeFileError(ConvertError):
    """A ``.pth`` whose pickle would run code (refused by ``torch.load(weights_only=True)``)."""


class RefusedError(ConvertError):
    """The tool refuses to write (existing destination without ``--force``, SRC == DST, ...)."""


Shape = Sequence[int]


def one_line(e: BaseException, limit: int = 800) -> str:
    """``Type: message`` of ``e`` on one line (its lines joined, not cut at the first), at most ``limit`` characters."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 4].rstrip() + " ..."


class StrictLoadError(ConvertError):
    """Weights that do not fit the architecture: missing, unexpected and shape-mismatched keys.

    Attributes:
        missing: ``[(key, expected_shape)]``, keys the architecture needs and the weights lack.
        unexpected: ``[(key, found_shape)]``, keys the weights have and the architecture lacks.
        mismatched: ``[(key, expected_shape, found_shape)]``.
    """

    def __init__(self, missing, unexpected, mismatched, context: str = ""):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        self.context = context
        super().__init__(self._format())

    def _format(self, limit: int = 40) -> str:
        head = "Weights do not match the architecture" + (f" ({self.context})" if self.context else "")
        lines = [f"{head}: {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                 f"{len(self.mismatched)} shape-mismatched key(s)."]
        for title, rows, fmt in (
                ("missing (key, expected shape)", self.missing, lambda r: f"  {r[0]}  expected {tuple(r[1])}"),
                ("unexpected (key, found shape)", self.unexpected, lambda r: f"  {r[0]}  found {tuple(r[1])}"),
                ("shape mismatch (key, expected, found)", self.mismatched,
                 lambda r: f"  {r[0]}  expected {tuple(r[1])}, found {tuple(r[2])}")):
            if rows:
                lines.append(f"{title}:")
                lines += [fmt(r) for r in rows[:limit]]
                if len(rows) > limit:
                    lines.append(f"  ... and {len(rows) - limit} more")
        lines.append("Pass --arch/--num-classes/--backbone/... to pick another architecture, "
                     "or --allow-partial to load what fits.")
        return "\n".join(lines)


def check_strict(expected: Mapping[str, Shape], found: Mapping[str, object], context: str = "",
                 allow_partial: bool = False):
    """Compare ``found`` (name -> array) against ``expected`` (name -> shape).

    Returns ``(missing, unexpected, mismatched)``; raises :class:`StrictLoadError`
    when any is non-empty and ``allow_partial`` is false.
    """
    missing = [(k, tuple(s)) for k, s in expected.items() if k not in found]
    unexpected = [(k, tuple(getattr(v, "shape", ()))) for k, v in found.items() if k not in expected]
    mismatched = [(k, tuple(expected[k]), tuple(getattr(v, "shape", ())))
                  for k, v in found.items() if k in expected and tuple(getattr(v, "shape", ())) != tuple(expected[k])]
    if (missing or unexpected or mismatched) and not allow_partial:
        raise StrictLoadError(missing, unexpected, mismatched, context)
    return missing, unexpected, mismatched
