"""``danet-convert SRC DST``: convert DANet weights between formats, strictly and without loss.

Exit codes: 0 converted (and verified), 1 ``--verify`` above tolerance,
2 usage error, strict-check failure, corrupt/unsafe SRC or refused DST.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .arch import ARCHS, BACKBONE_DEPTHS, DATA_FORMATS
from .errors import ConvertError

__all__ = ["main", "build_parser", "arch_options", "add_arch_options"]

PROGRESS_BYTES = 32 << 20  # show progress for checkpoints larger than this
PROGRESS_TENSORS = 200
DATA_FORMAT_NOTE = ("Keras layout channels_last assumed (the weights do not show it; `--data-format channels_first` "
                    "to change)")


def _multi_grid(values):
    if len(values) == 1 and values[0].lower() == "none":
        return None
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`--multi-grid` takes dilations (e.g. 4 8 16) or `none`, got {values}")


def add_arch_options(p: argparse.ArgumentParser, source: str = "SRC") -> None:
    """The architecture options (record fields), shared by ``danet-convert``, ``danet-parity`` and
    ``danet-attention``; ``source`` names the command's weights argument in the group's title."""
    g = p.add_argument_group(f"architecture (default: the record stored in {source}, else inferred from the "
                             "weights)")
    g.add_argument("--arch", choices=ARCHS, help="kind of model")
    g.add_argument("--num-classes", type=int, help="classes of DANetHead / DANet")
    g.add_argument("--backbone", choices=sorted(BACKBONE_DEPTHS), help="DANet backbone")
    g.add_argument("--in-channels", "--channels", dest="in_channels", type=int,
                   help="input channels (PAM/CAM/DualAttention/DANetHead; DANet: image channels)")
    g.add_argument("--deep-stem", action=argparse.BooleanOptionalAction, default=None, help="DANet stem")
    g.add_argument("--output-stride", type=int, choices=(8, 16, 32), help="DANet output stride")
    g.add_argument("--multi-grid", nargs="+", metavar="D", help="layer4 dilations (e.g. 4 8 16), or `none`")
    g.add_argument("--reduction", type=int, help="PAM's query/key reduction")
    g.add_argument("--dropout", type=float, help="dropout before the classifiers (DANetHead, DANet)")
    g.add_argument("--data-format", choices=DATA_FORMATS, help="Keras layout of Keras outputs")


def arch_options(args) -> dict:
    """The record fields given on the command line (only those given; ``--multi-grid none`` is ``None``)."""
    o = {}
    if args.arch:
        o["kind"] = args.arch
    for name in ("num_classes", "backbone", "in_channels", "deep_stem", "output_stride", "reduction", "dropout",
                 "data_format"):
        if getattr(args, name) is not None:
            o[name] = getattr(args, name)
    if args.multi_grid is not None:
        o["multi_grid"] = _multi_grid(args.multi_grid)
    return o


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="danet-convert",
        description="Convert DANet weights between PyTorch (.pth/.pt), .safetensors, .npz, Keras (.weights.h5, "
                    ".keras); also reads official and mmsegmentation DANet checkpoints, and exports ONNX (.onnx, "
                    "write-only: a DST, never a SRC). The format is chosen by the file extension. The "
                    "architecture record travels with the weights in every format written; without one it is "
                    "inferred, and what was assumed is printed. Options override, with a note.",
        epilog="ONNX: `danet-convert SRC model.onnx` builds the model of SRC's weights (torch by default, "
               "--onnx-from keras for the Keras exporter) and writes a file with input \"input\" (NCHW, dynamic "
               "batch/height/width) and outputs \"fused\", \"pam\", \"cam\" (DANetHead, DANet) or \"output\"; "
               "--verify runs it with onnxruntime against the torch model. "
               "Exit codes: 0 ok, 1 --verify above tolerance, 2 usage/strict/corrupt/refused.")
    p.add_argument("src", metavar="SRC", help="source file (never modified): .pth/.pt, .safetensors, .npz, "
                                              ".weights.h5 or .keras (.onnx is refused: write-only)")
    p.add_argument("dst", metavar="DST", help="destination file, any SRC format or .onnx (refused if it exists, "
                                              "unless --force)")
    add_arch_options(p)
    p.add_argument("--key", help="the checkpoint entry holding the weights (model, ema, ...; dotted for deeper "
                                 "nesting); default: `state_dict` when present")
    p.add_argument("--strip-prefix", metavar="PREFIX", help="remove PREFIX (e.g. `model.`) from every key; with "
                                                          "--allow-partial, keep only the keys under it (the "
                                                          "DANet module inside a model of yours)")
    p.add_argument("--onnx-from", choices=("torch", "keras"), default=None,
                   help="with an .onnx DST: which framework builds and exports the model (default torch; keras "
                        "needs KERAS_BACKEND=tensorflow and tf2onnx)")
    p.add_argument("--verify", action="store_true",
                   help="run source and converted models on one seeded input and compare outputs (.onnx DST: "
                        "onnxruntime on the written file against the torch model of SRC)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --verify input")
    p.add_argument("--size", type=int, default=None, help="spatial size of the --verify input")
    p.add_argument("--dry-run", action="store_true", help="print the architecture record and the name mapping; "
                                                          "write nothing")
    p.add_argument("--force", action="store_true", help="replace an existing DST")
    p.add_argument("--allow-partial", action="store_true",
                   help="write what fits instead of refusing, and list what was left out")
    p.add_argument("--allow-cast", action="store_true",
                   help="let a Keras DST (one floating dtype, int32 counters) hold tensors cast (float32 weights "
                        "in a float64 file, a float counter as int32), and list them, or an .onnx DST (float32) "
                        "hold float64 weights rounded; refused without it")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and the summary")
    return p


def _framework(path) -> str:
    from .api import KERAS_FORMATS, detect_format

    return "keras" if detect_format(path) in KERAS_FORMATS else "torch"


def _dry_run(ckpt, dst) -> None:
    from .mapping import keras_table

    print(f"architecture record: {json.dumps(ckpt.arch.to_dict(), sort_keys=True)}")
    print(f"model: {ckpt.arch.describe()}")
    keras_dst = _framework(dst) == "keras" if dst else False
    print(f"{len(ckpt.weights)} tensors; mapping (torch name -> {'Keras weight path' if keras_dst else 'shape'}):")
    for row in keras_table(ckpt.arch):
        where = row.keras_path if keras_dst else str(row.torch_shape)
        print(f"  {row.torch_name}  ->  {where}  {row.rule if keras_dst else ''}".rstrip())
    print("dry run: nothing written")


# kill's default, and a closed terminal or SSH session: each ends the process without Python's cleanup
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(BaseException):
    """A stop signal (:data:`STOP_SIGNALS`), raised in the main thread like ``KeyboardInterrupt`` for SIGINT, so
    that the temporary file goes."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def _stop_signals_raise():
    """The stop signals raise :class:`Terminated` inside (the previous handlers are restored after); a no-op
    outside the main thread, where Python cannot set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_terminated) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up logs drown the converter's lines
    parser = build_parser()
    args = parser.parse_args(argv)
    with _stop_signals_raise():
        return _convert(parser, args)


def _convert(parser, args) -> int:
    t0 = time.perf_counter()
    written = False  # DST in place: what an interruption leaves changes

    def say(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        from . import api
        from .atomic import check_destination
        from .neutral import summary

        try:
            overrides = arch_options(args)
        except argparse.ArgumentTypeError as e:
            parser.error(str(e))
        api.check_readable(args.src)
        onnx_dst = api.detect_format(args.dst) == "onnx"
        if args.onnx_from is not None and not onnx_dst:
            parser.error("--onnx-from only applies to an .onnx DST")
        if not args.dry_run:
            check_destination(args.src, args.dst, args.force)  # refuse early, before any work
        size = Path(args.src).stat().st_size
        big = size > PROGRESS_BYTES
        if big:
            say(f"reading {args.src} ({size / 2**20:.1f} MiB) ...")
        ckpt = api.load(args.src, key=args.key, strip_prefix=args.strip_prefix, allow_partial=args.allow_partial,
                        **overrides)
        weights, spec = ckpt.weights, ckpt.arch
        n, params, nbytes = summary(weights)
        big = big or n > PROGRESS_TENSORS
        say(f"architecture: {spec.describe()}" + ("" if ckpt.stored_record else " (inferred)"))
        notes = list(ckpt.notes)
        if (_framework(args.dst) == "keras" and not ckpt.stored_record and "data_format" not in overrides
                and _framework(args.src) != "keras"):
            notes.append(DATA_FORMAT_NOTE)
        for note in notes:
            say(f"note: {note}")
        if args.dry_run:
            _dry_run(ckpt, args.dst)
            return 0
        if args.verify:  # ckpt.weights are conformed to spec already: what fits, in its order
            absent = [k for k in spec.expected_shapes() if k not in weights]
            if absent:
                raise ConvertError(f"--verify needs every weight of {spec.describe()}: --allow-partial left out "
                                   f"{len(absent)} ({', '.join(absent[:5])}), which each model would fill with "
                                   f"its own random values. Nothing written; drop --verify to convert what fits.")
        if big:
            say(f"read {n} tensors in {time.perf_counter() - t0:.1f} s; writing {args.dst} ...")
        for note in api.save(weights, args.dst, spec, force=args.force, allow_partial=args.allow_partial,
                             allow_cast=args.allow_cast, src=args.src, onnx_framework=args.onnx_from or "torch"):
            if not note.startswith(api.PARTIAL_NOTE):  # said once, above: load() conformed the weights already
                say(f"note: {note}")
        written = True
        status = 0
        if args.verify:
            status = _verify(args, ckpt)
        out_size = Path(args.dst).stat().st_size
        print(f"converted {args.src} -> {args.dst}: {n} tensors, {params:,} parameters, {nbytes:,} bytes "
              f"(file {out_size:,} bytes) in {time.perf_counter() - t0:.2f} s", flush=True)
        return status
    except ConvertError as e:
        print(f"danet-convert: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        what = f"terminated ({e.signal_name})" if isinstance(e, Terminated) else "interrupted"
        done = f"DST {args.dst!r} written, verification interrupted" if written else "DST not written"
        print(f"danet-convert: {what}; {done}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - never let a crash read as exit 1 ("verify above tolerance")
        done = f"; DST {args.dst!r} written, verification did not finish" if written else ""
        print(f"danet-convert: error: unexpected {type(e).__name__}: {e}{done}", file=sys.stderr)
        return 2


def _verify(args, ckpt) -> int:
    from . import api

    if api.detect_format(args.dst) == "onnx":
        from .io_onnx import verify_onnx

        checks = verify_onnx(ckpt.weights, ckpt.arch, args.dst, seed=args.seed, size=args.size)
    else:
        from .verify import verify

        back = api.load(args.dst, allow_partial=args.allow_partial)
        checks = verify(ckpt.weights, ckpt.arch, _framework(args.src), back.weights, back.arch,
                        _framework(args.dst), seed=args.seed, size=args.size)
    status = 0
    for c in checks:
        print(f"verify {c.message()}", flush=True)
        status = status if c.passed else 1
    unmeasured = [c.name.split(" ")[0] for c in checks if c.size and c.nonfinite == c.size]
    if unmeasured:
        print(f"verify: FAILED, every element of {', '.join(unmeasured)} is NaN or inf in both models: nothing "
              f"could be compared (do the weights hold NaN or inf?)", file=sys.stderr)
    elif status:
        print("verify: FAILED, outputs differ above the tolerance table", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
