"""``danet-convert SRC DST``: convert DANet weights between formats, strictly and without loss.

Exit codes: 0 converted (and verified), 1 ``--verify`` above tolerance,
2 usage error, strict-check failure, corrupt/unsafe SRC or refused DST.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .arch import ARCHS, BACKBONE_DEPTHS
from .errors import ConvertError

__all__ = ["main", "build_parser"]

PROGRESS_BYTES = 32 << 20  # show progress for checkpoints larger than this
PROGRESS_TENSORS = 200


def _multi_grid(values):
    if values is None:
        return None
    if len(values) == 1 and values[0].lower() == "none":
        return "none"
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`--multi-grid` takes dilations (e.g. 4 8 16) or `none`, got {values}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="danet-convert",
        description="Convert DANet weights between PyTorch (.pth/.pt), .safetensors, .npz, Keras (.weights.h5, "
                    ".keras); also reads official and mmsegmentation DANet checkpoints, and exports ONNX (.onnx, "
                    "write-only: a DST, never a SRC). The format is chosen by the file extension; the "
                    "architecture is inferred from the weights, options override it.",
        epilog="ONNX: `danet-convert SRC model.onnx` builds the model of SRC's weights (torch by default, "
               "--onnx-from keras for the Keras exporter) and writes a file with input \"input\" (NCHW, dynamic "
               "batch/height/width) and outputs \"fused\", \"pam\", \"cam\" (DANetHead, DANet) or \"output\"; "
               "--verify runs it with onnxruntime against the torch model. "
               "Exit codes: 0 ok, 1 --verify above tolerance, 2 usage/strict/corrupt/refused.")
    p.add_argument("src", metavar="SRC", help="source file (never modified): .pth/.pt, .safetensors, .npz, "
                                              ".weights.h5 or .keras (.onnx is refused: write-only)")
    p.add_argument("dst", metavar="DST", help="destination file, any SRC format or .onnx (refused if it exists, "
                                              "unless --force)")
    p.add_argument("--arch", choices=("auto",) + ARCHS, default="auto", help="architecture (default: inferred)")
    p.add_argument("--num-classes", type=int, help="classes of DANetHead / DANet")
    p.add_argument("--backbone", choices=sorted(BACKBONE_DEPTHS), help="DANet backbone")
    p.add_argument("--channels", type=int, help="input channels of PAM/CAM/DualAttention/DANetHead")
    p.add_argument("--deep-stem", action=argparse.BooleanOptionalAction, default=None, help="DANet stem")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32), help="DANet output stride (default 8)")
    p.add_argument("--multi-grid", nargs="+", metavar="D",
                   help="layer4 dilations (default 4 8 16, the released checkpoint), or `none`")
    p.add_argument("--onnx-from", choices=("torch", "keras"), default=None,
                   help="with an .onnx DST: which framework builds and exports the model (default torch; keras "
                        "needs KERAS_BACKEND=tensorflow and tf2onnx)")
    p.add_argument("--verify", action="store_true",
                   help="run source and converted models on one seeded input and compare outputs (.onnx DST: "
                        "onnxruntime on the written file against the torch model of SRC)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --verify input")
    p.add_argument("--size", type=int, default=None, help="spatial size of the --verify input")
    p.add_argument("--force", action="store_true", help="replace an existing DST")
    p.add_argument("--allow-partial", action="store_true",
                   help="write what fits instead of refusing, and list what was left out")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and the summary")
    return p


def _overrides(args) -> dict:
    o = {}
    if args.arch != "auto":
        o["arch"] = args.arch
    for name in ("num_classes", "backbone", "channels", "deep_stem", "output_stride"):
        if getattr(args, name) is not None:
            o[name] = getattr(args, name)
    mg = _multi_grid(args.multi_grid)
    if mg is not None:
        o["multi_grid"] = None if mg == "none" else mg
    return o


def _framework(path) -> str:
    from .api import detect_format

    return "keras" if detect_format(path) in ("keras", "keras_weights") else "torch"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    def say(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        from . import api
        from .atomic import check_destination
        from .neutral import summary

        try:
            overrides = _overrides(args)
        except argparse.ArgumentTypeError as e:
            parser.error(str(e))
        api.check_readable(args.src)
        onnx_dst = api.detect_format(args.dst) == "onnx"
        if args.onnx_from is not None and not onnx_dst:
            parser.error("--onnx-from only applies to an .onnx DST")
        check_destination(args.src, args.dst, args.force)  # refuse early, before any work
        size = Path(args.src).stat().st_size if Path(args.src).is_file() else 0
        big = size > PROGRESS_BYTES
        if big:
            say(f"reading {args.src} ({size / 2**20:.1f} MiB) ...")
        neutral, spec = api.load(args.src, allow_partial=args.allow_partial, **overrides)
        n, params, nbytes = summary(neutral)
        big = big or n > PROGRESS_TENSORS
        say(f"architecture: {spec.describe()}")
        for note in spec.notes:
            say(f"note: {note}")
        if big:
            say(f"read {n} tensors in {time.perf_counter() - t0:.1f} s; writing {args.dst} ...")
        api.save(neutral, args.dst, arch=spec, force=args.force, allow_partial=args.allow_partial, src=args.src,
                 onnx_framework=args.onnx_from or "torch")
        if big:
            say(f"wrote {n}/{n} tensors")
        status = 0
        if args.verify:
            if onnx_dst:
                from .io_onnx import verify_onnx

                checks = verify_onnx(neutral, spec, args.dst, seed=args.seed, size=args.size)
            else:
                from .verify import verify

                dst_neutral, dst_spec = api.load(args.dst, allow_partial=args.allow_partial, **overrides)
                checks = verify(neutral, spec, _framework(args.src), dst_neutral, dst_spec, _framework(args.dst),
                                seed=args.seed, size=args.size)
            for c in checks:
                print(f"verify {c.message()}", flush=True)
                status = status if c.passed else 1
            if status:
                print("verify: FAILED, outputs differ above the tolerance table", file=sys.stderr)
        out_size = Path(args.dst).stat().st_size
        print(f"converted {args.src} -> {args.dst}: {n} tensors, {params:,} parameters, {nbytes:,} bytes "
              f"(file {out_size:,} bytes) in {time.perf_counter() - t0:.2f} s", flush=True)
        return status
    except ConvertError as e:
        print(f"danet-convert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("danet-convert: interrupted; DST not written", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - never let a crash read as exit 1 ("verify above tolerance")
        print(f"danet-convert: error: unexpected {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
