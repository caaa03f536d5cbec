"""Process-group set-up for ``danet-train``: one process, or ``torchrun`` (one or several machines).

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` reads them, picks the device (the
``LOCAL_RANK``-th GPU, or the CPU) and the backend (NCCL on CUDA, gloo on
CPU). :func:`wrap_model` turns BatchNorm into :class:`SyncBatchNorm` and wraps
the model in ``DistributedDataParallel`` when there is more than one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["DistContext", "init_distributed", "wrap_model", "unwrap", "all_reduce_sum", "broadcast_error",
           "shutdown"]


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"`--device` {device!r}: CUDA is not available on this machine; use --device cpu.")
        if device == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(device)
    if device != "cpu":
        raise ValueError(f"`--device` must be auto, cpu, cuda or cuda:N, got {device!r}.")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistContext:
    """The process group of a ``torchrun`` launch (``WORLD_SIZE`` > 1), or a single-process context."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world <= 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistContext(rank, world, local_rank, dev, backend)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` on ``ctx.device``; with several processes, SyncBatchNorm + ``DistributedDataParallel``."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    from .sync_batchnorm import convert_sync_batchnorm

    model = convert_sync_batchnorm(model, device=ctx.device)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (or ``model``)."""
    return getattr(model, "module", model)


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """``t`` summed over all processes (in place; a no-op for one process)."""
    if ctx.distributed:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_error(fn, ctx: DistContext):
    """Run ``fn`` on rank 0 only; every rank raises the same ``ValueError`` if it raised, else gets its result."""
    if not ctx.distributed:
        return fn()
    import torch.distributed as dist

    box = [None, None]
    if ctx.is_main:
        try:
            box = [fn(), None]
        except ValueError as e:
            box = [None, (type(e), str(e))]
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        kind, message = box[1]
        raise kind(message)
    return box[0]


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
