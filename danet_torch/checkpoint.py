"""``danet-train`` checkpoints: the official key layout, the architecture record, and the state to resume.

A checkpoint is a dict that ``torch.load(path, weights_only=True)`` reads
(tensors and JSON-like values only) and ``danet-convert`` converts (it reads
the ``state_dict`` entry); ``--resume`` reads it as ``danet-convert`` does
(``weights_convert.io_torch.load_pth``: a pickle that would run code is
refused, nothing runs)::

    {"state_dict": {official DANet keys: tensors},      # no "module." prefix
     "arch": {"kind": "danet", "num_classes": ..., "backbone": ..., "in_channels": ..., ...},
     "epoch": completed epochs, "step": optimiser steps,
     "optimizer": SGD state (momentum buffers), "scaler": AMP GradScaler state or None,
     "best_miou": float or None, "metrics": the last validation metrics, "args": the command's options}

Files are written atomically (a temporary file in the folder, fsync, rename).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["FORMAT", "arch_record", "save_checkpoint", "load_checkpoint"]

FORMAT = "danet-train/1"


def arch_record(model) -> dict:
    """The architecture record of a ``danet_torch.DANet`` (``weights_convert.ArchSpec.to_dict()``)."""
    from weights_convert.frameworks import spec_from_torch

    return spec_from_torch(model).to_dict()


def save_checkpoint(path, model, optimizer, scaler, epoch: int, step: int, best_miou, metrics, args: dict) -> Path:
    """Write a checkpoint of ``model`` (a ``DANet``, unwrapped) atomically to ``path``."""
    from weights_convert.atomic import atomic_target

    path = Path(path)
    state = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "arch": arch_record(model),
        "epoch": int(epoch),
        "step": int(step),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "best_miou": best_miou,
        "metrics": metrics,
        "args": args,
    }
    with atomic_target(path, ".pth") as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path, model, optimizer=None, scaler=None) -> dict:
    """Restore ``model`` (strictly), ``optimizer`` and ``scaler`` from ``path``; returns the checkpoint dict."""
    from weights_convert.io_torch import load_pth

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`--resume` {str(path)!r} does not exist or is not a file.")
    ckpt = load_pth(path, label=f"`--resume` {str(path)!r}")  # no pickled code runs; UnsafeFileError, CorruptFileError
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "optimizer" not in ckpt:
        raise ValueError(f"`--resume` {str(path)!r} is not a danet-train checkpoint (needs `state_dict` and "
                         f"`optimizer` entries); to start from other weights use --pretrained-backbone.")
    record = arch_record(model)
    stored = ckpt.get("arch") or {}
    differ = {k: (stored.get(k), v) for k, v in record.items() if k in stored and k != "dtype" and stored[k] != v}
    if differ:
        raise ValueError(f"`--resume` {str(path)!r} was trained with another architecture: "
                         + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in differ.items()) + ".")
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # entries that do not fit this model/optimizer
        raise ValueError(f"`--resume` {str(path)!r} does not fit this model and optimizer: {e}") from None
    return ckpt
