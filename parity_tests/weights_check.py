"""Do two weight files hold the same tensors? Exact equality, tensor by tensor, after the name mapping.

Both files are read into the neutral form (torch names and layout, through
:func:`weights_convert.load`, so a ``.weights.h5`` or ``.keras`` file is
compared after its Keras paths and layouts are mapped back), then every
tensor is compared for exact equality of its values (a float16 file against
a float32 file differs wherever float16 rounded). Imports no framework
beyond what reading the files needs.
"""

from __future__ import annotations

import numpy as np

import weights_convert as wc

__all__ = ["compare_weights", "compare_weight_files"]

SHOWN = 10  # differing tensors printed (the report's JSON lists all)


def compare_weights(torch_side, keras_side, allow_differences: bool = False, labels=("torch", "keras")) -> dict:
    """Compare two neutral forms; returns the report's ``weights`` entry.

    Returns:
        ``{"tensors", "identical", "differing": [{"name", "max_abs", "elements", "size", "dtype_torch",
        "dtype_keras"}], "missing": [...], "allowed", "passed", "lines"}``; ``passed`` is ``False`` when
        any tensor differs and ``allow_differences`` is not set.
    """
    differing, missing = [], sorted(set(torch_side) ^ set(keras_side))
    for name, a in torch_side.items():
        if name not in keras_side:
            continue
        a, b = np.asarray(a), np.asarray(keras_side[name])
        entry = {"name": name, "dtype_torch": str(a.dtype), "dtype_keras": str(b.dtype), "size": int(a.size)}
        if a.shape != b.shape:
            differing.append({**entry, "max_abs": float("inf"), "elements": int(a.size),
                              "shapes": [list(a.shape), list(b.shape)]})
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
        if not same.all():
            with np.errstate(invalid="ignore"):
                diff = np.abs(a64 - b64)[~same]
            differing.append({**entry, "max_abs": float(np.nanmax(diff)) if np.isfinite(diff).any() else
                              float("inf"), "elements": int((~same).sum())})
    identical = not differing and not missing
    passed = identical or allow_differences
    total = len(set(torch_side) | set(keras_side))
    if identical:
        lines = [f"weights: identical ({total} tensors, exact equality after the mapping)"]
    else:
        verdict = "allowed by --weights-may-differ" if allow_differences else \
            "a mismatch (exit 1) unless --weights-may-differ"
        lines = [f"weights: {len(differing) + len(missing)} of {total} tensors differ, {verdict}:"]
        for d in differing[:SHOWN]:
            dtypes = "" if d["dtype_torch"] == d["dtype_keras"] else f" ({d['dtype_torch']} vs {d['dtype_keras']})"
            lines.append(f"  {d['name']}: {d['elements']} of {d['size']} elements differ, max |diff| "
                         f"{d['max_abs']:.3g}{dtypes}")
        if len(differing) > SHOWN:
            lines.append(f"  ... and {len(differing) - SHOWN} more (--json lists them all)")
        for name in missing[:SHOWN]:
            side = labels[1] if name in keras_side else labels[0]
            lines.append(f"  {name}: only in the {side} file")
    return {"tensors": total, "identical": identical, "differing": differing, "missing": missing,
            "allowed": allow_differences, "passed": passed, "lines": lines}


def load_complete(path, overrides=None, allow_partial: bool = False):
    """``weights_convert.load(path)``; with ``allow_partial`` the danet layer of a file that holds more (a
    U-Net's ``.keras``/``.weights.h5``), whose own weights must all be there (the two frameworks would draw
    what is missing differently). The ``Checkpoint``'s notes say what was left out.

    Raises:
        weights_convert.ConvertError: unreadable, or (``allow_partial``) the layer lacks weights.
    """
    loaded = wc.load(path, allow_partial=allow_partial, **(overrides or {}))
    if allow_partial:
        shapes = wc.expected_shapes(loaded.arch)
        lacking = [k for k in shapes if k not in loaded.weights]
        if lacking:
            raise wc.ConvertError(f"{str(path)!r} lacks {len(lacking)} weight(s) of its {loaded.arch.describe()} "
                                  f"({', '.join(lacking[:5])}{', ...' if len(lacking) > 5 else ''}): a parity "
                                  f"check needs them all (--allow-partial leaves out only what lies outside it).")
    return loaded


def compare_weight_files(torch_path, keras_path, overrides=None, allow_differences: bool = False,
                         allow_partial: bool = False) -> dict:
    """:func:`compare_weights` of two files (any format ``danet-convert`` reads), with their paths; ``notes``
    says what ``allow_partial`` left out (:func:`load_complete`).

    Raises:
        weights_convert.ConvertError: a file is unreadable, or the two are different architectures.
    """
    t = load_complete(torch_path, overrides, allow_partial)
    k = load_complete(keras_path, overrides, allow_partial)
    if wc.expected_shapes(t.arch) != wc.expected_shapes(k.arch):
        raise wc.ConvertError(f"--torch-weights is {t.arch.describe()} but --keras-weights is "
                              f"{k.arch.describe()}: they must be the same architecture.")
    out = compare_weights(t.weights, k.weights, allow_differences)
    out.update(torch=str(torch_path), keras=str(keras_path), architecture=t.arch.describe(),
               notes=t.notes + k.notes)
    return out
