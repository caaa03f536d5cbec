"""``danet-train``: train DANet on a folder dataset, in one process or under ``torchrun`` (DDP + SyncBatchNorm).

The official recipe (``danet/train.py``, ``encoding/utils/lr_scheduler.py``
of the DANet repository): SGD with momentum 0.9 and weight decay 1e-4, the
head at 10x the backbone's learning rate, the poly schedule
``lr * (1 - step / steps) ** 0.9`` per iteration, the sum of three
cross-entropies (``danet_loss``). Usage::

    danet-train --data DIR --num-classes 12 --out runs/a [--pretrained-backbone resnet101.pth]
    torchrun --nproc_per_node 4 -m danet_torch.train --data DIR --num-classes 12 --out runs/a

Every process runs the same command; rank 0 checks the data, prints, and
writes ``OUT/last.pth`` (+ ``best.pth``, ``epoch_NNNN.pth``) and
``OUT/metrics.jsonl``. Exit codes: 0 done, 2 bad options or data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .data import IGNORE_INDEX, DataError, SegmentationFolder, check_samples, scan_folder, split_samples
from .distributed import all_reduce_sum, broadcast_error, init_distributed, shutdown, unwrap, wrap_model
from .evaluate import evaluate, precise_bn

__all__ = ["build_parser", "main", "run", "poly_lr"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in ``--help`` but ``None`` (those options say in words what their absence means)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="danet-train", description=__doc__.splitlines()[0].replace("``", ""),
                                formatter_class=_HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="folder with images/ (PNG/JPEG) and masks/ (PNG class ids, 255 "
                                                 "ignored), same file stems")
    d.add_argument("--val", help="validation folder of the same layout (default: hold out --val-fraction of --data)")
    d.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of --data without --val (0: none)")
    d.add_argument("--num-classes", type=int, required=True, help="classes of the masks (ids 0 .. N-1)")
    d.add_argument("--crop", type=int, default=768, help="square training crop (padded with the ignore label)")
    d.add_argument("--scale-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("LOW", "HIGH"),
                   help="random scale of each training image")
    d.add_argument("--in-channels", type=int, default=3, choices=(1, 3, 4), help="1 grey, 3 RGB, 4 RGBA")
    d.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per process")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", choices=("resnet50", "resnet101"), default="resnet101", help="dilated ResNet depth")
    m.add_argument("--pretrained-backbone", metavar="PATH",
                   help="ImageNet ResNet weights (torchvision/timm keys; .pth, .safetensors, .npz)")
    m.add_argument("--output-stride", type=int, choices=(8, 16, 32), default=8, help="input size / feature size")
    m.add_argument("--multi-grid", nargs="+", default=["4", "8", "16"], metavar="D",
                   help="layer4 dilations, or `none`")
    m.add_argument("--deep-stem", action="store_true", help="three 3x3 stem convs instead of the 7x7 conv")
    m.add_argument("--dropout", type=float, default=0.1, help="before each classifier")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=50, help="passes over the training set (the schedule spans them)")
    o.add_argument("--batch-size", type=int, default=8, help="images per step and process")
    o.add_argument("--lr", type=float, default=0.01, help="backbone learning rate (the head's is --head-lr-mult x)")
    o.add_argument("--head-lr-mult", type=float, default=10.0, help="the head's learning rate over --lr")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    o.add_argument("--poly-power", type=float, default=0.9, help="lr * (1 - step / steps) ** power, per step")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="output folder (checkpoints, metrics.jsonl)")
    r.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (or a folder's last.pth)")
    r.add_argument("--save-every", type=int, default=0, help="also keep epoch_NNNN.pth every N epochs (0: never)")
    r.add_argument("--precise-bn", type=int, default=0, metavar="N",
                   help="before validating, set BatchNorm statistics to the average over N training batches "
                        "(upstream's precise_bn; helps short runs)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun: the LOCAL_RANK-th GPU)")
    r.add_argument("--amp", choices=("auto", "off", "fp16", "bf16"), default="auto",
                   help="mixed precision on CUDA (auto: bf16 where supported)")
    r.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="float64: for checks")
    r.add_argument("--seed", type=int, default=0, help="fixes the split, data order, augmentation and dropout")
    r.add_argument("--deterministic", action="store_true", help="deterministic CUDA kernels where they exist")
    r.add_argument("--progress", choices=("auto", "bar", "lines"), default="auto",
                   help="tqdm bar (auto: on a terminal) or plain lines")
    r.add_argument("--log-every", type=int, default=20, help="steps between plain progress lines")
    return p


def poly_lr(base: float, step: int, total: int, power: float = 0.9) -> float:
    """The official poly schedule: ``base * (1 - step / total) ** power``, 0 from ``step >= total`` on."""
    return base * max(0.0, 1.0 - step / max(total, 1)) ** power


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1009 + rank) % (2 ** 63)


# Checked before anything runs: torch's own refusals come late and name no option, and other bad values
# (a NaN rate, a negative --poly-power or --head-lr-mult) would train without a word.
_AT_LEAST = {"num_classes": 1, "crop": 1, "epochs": 1, "batch_size": 1, "log_every": 1, "workers": 0,
             "save_every": 0, "precise_bn": 0}
_NON_NEGATIVE = ("lr", "head_lr_mult", "momentum", "weight_decay", "poly_power")


def _check_args(args):
    def option(name):
        return f"`--{name.replace('_', '-')}`"

    for name, low in _AT_LEAST.items():
        if getattr(args, name) < low:
            raise ValueError(f"{option(name)} must be >= {low}, got {getattr(args, name)}.")
    for name in _NON_NEGATIVE:
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            raise ValueError(f"{option(name)} must be a finite number >= 0, got {getattr(args, name)}.")
    for name in ("dropout", "val_fraction"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"{option(name)} must be in [0, 1), got {getattr(args, name)}.")
    low, high = args.scale_range
    if not 0 < low <= high < math.inf:
        raise ValueError(f"`--scale-range` must be 0 < LOW <= HIGH (finite), got {low} {high}.")
    mg = args.multi_grid
    try:
        args.multi_grid = None if [v.lower() for v in mg] == ["none"] else tuple(int(v) for v in mg)
    except ValueError:
        raise ValueError(f"`--multi-grid` takes layer4 dilations (e.g. 4 8 16) or `none`, got {' '.join(mg)}.") from None
    out = Path(args.out)
    if args.resume and Path(args.resume).is_dir():
        args.resume = str(Path(args.resume) / "last.pth")
    if not args.resume and (out / "last.pth").exists():
        raise ValueError(f"`--out` {str(out)!r} already holds a run (last.pth): pass --resume {out / 'last.pth'} to "
                         f"continue it, or choose another folder.")


def _prepare_data(args):
    """``(train, val, notes)``: the samples, checked, and what the scan left out."""
    notes: list = []
    samples = scan_folder(args.data, notes)
    if args.val:
        train, val = samples, scan_folder(args.val, notes)
    else:
        train, val = split_samples(samples, args.val_fraction, seed=args.seed)
    check_samples(train + val, args.num_classes)
    return train, val, notes


class Diverged(RuntimeError):
    """An epoch's training loss is NaN or inf: the run stops before it writes anything of that epoch."""


def _amp(args, device):
    if args.amp == "off" or args.dtype == "float64" or (args.amp == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ValueError(f"`--amp {args.amp}` needs CUDA; the device is {device}. Use --amp off.")
    if args.amp == "fp16" or (args.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def _loss(outputs, masks):
    from .model import danet_loss

    if not bool((masks != IGNORE_INDEX).any()):  # every pixel ignored: a zero loss, not NaN
        return sum(o.float().sum() * 0.0 for o in outputs)
    return danet_loss([o.float() for o in outputs], masks, ignore_index=IGNORE_INDEX)


class _Progress:
    """A tqdm bar on a terminal (rank 0), else a plain line every ``every`` steps."""

    def __init__(self, args, ctx, epoch: int, steps: int):
        self.enabled, self.every, self.steps, self.epoch, self.epochs = ctx.is_main, args.log_every, steps, epoch, \
            args.epochs
        bar = args.progress == "bar" or (args.progress == "auto" and sys.stderr.isatty())
        self.bar = None
        if self.enabled and bar:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True, leave=False)

    def update(self, i: int, loss: float, lr: float):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}")
        elif self.enabled and (i % self.every == 0 or i == self.steps):
            print(f"epoch {self.epoch + 1}/{self.epochs} step {i}/{self.steps} loss {loss:.4f} lr {lr:.3g}",
                  flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run(args) -> int:
    """Train as ``args`` say (parsed by :func:`build_parser`); returns the exit code."""
    from torch.utils.data import DataLoader, DistributedSampler

    from .checkpoint import load_checkpoint, save_checkpoint
    from .model import DANet

    _check_args(args)
    ctx = init_distributed(args.device)
    try:
        say = print if ctx.is_main else (lambda *a, **k: None)
        if args.deterministic:
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
            torch.use_deterministic_algorithms(True, warn_only=True)
        train_s, val_s, data_notes = broadcast_error(lambda: _prepare_data(args), ctx)
        for note in data_notes:
            say(f"data: {note}")
        dtype = getattr(torch, args.dtype)
        torch.manual_seed(args.seed)
        model = DANet(args.num_classes, backbone=args.backbone, output_stride=args.output_stride,
                      deep_stem=args.deep_stem, multi_grid=args.multi_grid, dropout=args.dropout,
                      in_channels=args.in_channels, pretrained_backbone=args.pretrained_backbone)
        model.to(ctx.device, dtype)
        for note in model.backbone_notes:
            say(f"pretrained backbone: {note}")
        groups = [{"params": list(model.pretrained.parameters()), "lr_mult": 1.0},
                  {"params": list(model.head.parameters()), "lr_mult": args.head_lr_mult}]
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        amp_dtype = _amp(args, ctx.device)
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        start, step, best, out = 0, 0, None, Path(args.out)
        if args.resume:
            ckpt = load_checkpoint(args.resume, model, optimizer, scaler)
            start, step, best = int(ckpt["epoch"]), int(ckpt["step"]), ckpt.get("best_miou")
            say(f"resumed from {args.resume}: {start} epoch(s), {step} step(s) done")
            if start >= args.epochs:
                say(f"nothing to train: {args.resume} has {start} epoch(s) done, --epochs {args.epochs}")
                return 0
        net = wrap_model(model, ctx)
        kw = dict(in_channels=args.in_channels, seed=args.seed)
        train_set = SegmentationFolder(train_s, train=True, crop=args.crop, scale_range=args.scale_range, **kw)
        val_set = SegmentationFolder(val_s, train=False, **kw)
        sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=args.seed, drop_last=True)
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                            drop_last=True, pin_memory=ctx.device.type == "cuda")
        steps = len(loader)
        if steps == 0:
            raise DataError(f"{len(train_s)} training image(s) make no batch of --batch-size {args.batch_size} "
                            f"x {ctx.world_size} process(es); lower --batch-size or add images.")
        total = args.epochs * steps
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
        say(f"danet-train: {ctx.world_size} process(es) on {ctx.device.type} ({ctx.backend or 'single'}), DANet "
            f"{args.backbone} {args.num_classes} classes, {len(train_s)} training / {len(val_s)} validation "
            f"images, {steps} steps per epoch x {args.epochs} epochs, batch {args.batch_size} per process", flush=True)
        for epoch in range(start, args.epochs):
            t0 = time.time()
            torch.manual_seed(_epoch_seed(args.seed, epoch, ctx.rank))
            sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            net.train()
            bar, sums = _Progress(args, ctx, epoch, steps), torch.zeros(2, dtype=torch.float64)
            for i, (images, masks) in enumerate(loader, start=1):
                # upstream's T = epoch * iters_per_epoch + i, not the optimiser's step count: a resume with another
                # --batch-size or process count (other steps per epoch) goes on from the epoch reached
                lr = poly_lr(args.lr, epoch * steps + i - 1, total, args.poly_power)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_mult"]
                images, masks = images.to(ctx.device, dtype, non_blocking=True), masks.to(ctx.device)
                with torch.autocast(ctx.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss = _loss(net(images), masks)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                value = float(loss.detach())
                sums += torch.tensor([value, 1.0], dtype=torch.float64)
                bar.update(i, value, lr)
            bar.close()
            train_loss = float(all_reduce_sum(sums.to(ctx.device), ctx)[0] / (steps * ctx.world_size))
            if not math.isfinite(train_loss):  # the same sum on every rank: all stop together
                raise Diverged(f"the training loss of epoch {epoch + 1} is {train_loss}: the run diverged (lower "
                               f"--lr, or --amp off); nothing of this epoch was written"
                               + (f", {out / 'last.pth'} holds epoch {epoch}" if epoch > start else ""))
            if args.precise_bn:
                precise_bn(unwrap(net), loader, args.precise_bn, ctx.device, dtype)
            metrics = evaluate(unwrap(net), val_set, ctx, args.num_classes, amp_dtype, args.workers) if val_s else None
            if not ctx.is_main:
                continue
            record = {"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": train_loss,
                      "time_s": round(time.time() - t0, 3)}
            if metrics is not None:
                record.update(val_miou=metrics["miou"], val_pixel_acc=metrics["pixel_acc"], val_iou=metrics["iou"])
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            miou = metrics["miou"] if metrics else None
            improved = miou is not None and not math.isnan(miou) and (best is None or miou > best)
            best = miou if improved else best
            state = dict(model=unwrap(net), optimizer=optimizer, scaler=scaler, epoch=epoch + 1, step=step,
                         best_miou=best, metrics=metrics, args={k: (list(v) if isinstance(v, tuple) else v)
                                                                for k, v in vars(args).items()})
            save_checkpoint(out / "last.pth", **state)
            if args.save_every and (epoch + 1) % args.save_every == 0:
                save_checkpoint(out / f"epoch_{epoch + 1:04d}.pth", **state)
            if improved:
                save_checkpoint(out / "best.pth", **state)
            val = "" if metrics is None else f", val mIoU {metrics['miou']:.4f}, pixel acc {metrics['pixel_acc']:.4f}"
            say(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f}{val}, {record['time_s']:.1f} s", flush=True)
        return 0
    finally:
        shutdown(ctx)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, Diverged) as e:  # DataError, ConvertError (pretrained weights), bad option values
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank raises the same error; one prints it
            print(f"danet-train: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, Diverged) else 2


if __name__ == "__main__":
    sys.exit(main())
