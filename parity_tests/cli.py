"""``danet-parity``: do danet_torch and danet_keras give the same numbers, here, on these weights?

With no arguments: seeded random weights for PAM, CAM, the head and DANet-50
at a small size, every installed Keras backend (each in its own process),
the best available device. Each component is compared in float32 (what
users run) and, by default, in float64 too (where a weight difference above
rounding cannot hide), with gradients and the BatchNorm statistics after
one training step. Where a comparison fails, both models run again module
by module and the first module that differs while its input agrees is
named, with its Keras path.

Exit codes: 0 all agree; 1 a mismatch (outputs, gradients, statistics, or
the two weight files differ); 2 bad usage, unreadable weights, or a crash
(the other backends still run and are reported).

    danet-parity
    danet-parity --torch-weights danet101.pth --input-size 97 129 --json report.json --junit-xml parity.xml
    danet-parity --torch-weights model.pth --keras-weights model.weights.h5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

from parity_tests import report as rep
from parity_tests.environment import environment
from weights_convert.atomic import check_output, write_files
from weights_convert.cli import add_arch_options, arch_options

__all__ = ["main", "build_parser", "BACKENDS", "COMPONENT_NAMES"]

BACKENDS = ("tensorflow", "jax", "torch")
DEFAULT_COMPONENTS = ("pam", "cam", "head", "danet50")
DTYPES = ("float32", "float64", "float16", "bfloat16")
COMPONENT_NAMES = ("pam", "cam", "dual_attention", "head", "danet50", "danet101")
EVENT = "@@danet-parity-event@@ "  # a worker's stdout lines that carry events start with this


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="danet-parity", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    w = p.add_argument_group("weights (default: seeded random weights, --components)")
    w.add_argument("--torch-weights", metavar="F", help="weights for the torch side (any format danet-convert reads)")
    w.add_argument("--keras-weights", metavar="F", help="weights for the Keras side; without --torch-weights both "
                   "sides use them. With both, the two files are first compared tensor by tensor (exact)")
    w.add_argument("--weights-may-differ", action="store_true",
                   help="with both files: report differing tensors but judge by the outputs alone")
    w.add_argument("--allow-partial", action="store_true",
                   help="a file whose model holds more than the danet layer (save_weights or .keras of a U-Net "
                        "with DualAttention inside): compare that layer, the rest left out and listed; the "
                        "layer's own weights must all be there")
    add_arch_options(p, source="the weights files")
    r = p.add_argument_group("what to run")
    r.add_argument("--components", help="with random weights: comma-separated from " + ",".join(COMPONENT_NAMES)
                   + f" (default: {','.join(DEFAULT_COMPONENTS)})")
    r.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="spatial input size")
    r.add_argument("--batch", type=int, default=2)
    r.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="float32/float64: torch vs Keras; float16/bfloat16: both vs float64 (autocast, mixed policy)")
    r.add_argument("--float64", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare the forward in float64 (default: on)")
    r.add_argument("--no-gradients", action="store_true", help="compare forward outputs only")
    r.add_argument("--trace", action="store_true",
                   help="trace module by module even when everything agrees (always done where a check fails)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="torch's device (Keras on JAX/torch uses the GPU when it has one; TensorFlow stays on CPU)")
    r.add_argument("--keras-backend", default="all",
                   help="comma-separated from tensorflow,jax,torch, or 'all' installed (default)")
    r.add_argument("--in-process", action="store_true",
                   help="run in this process on its KERAS_BACKEND, without worker processes (for tests and notebooks)")
    r.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--verbose", action="store_true", help="print every compared tensor")
    o.add_argument("--json", metavar="REPORT", help="write the whole report as JSON")
    o.add_argument("--junit-xml", metavar="FILE", help="write JUnit XML (a testsuite per backend)")
    o.add_argument("--tolerances", action="store_true", help="print the tolerance table and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def _validate(parser, args) -> tuple:
    """``(backends, job options, warnings)``; ``parser.error`` (exit 2) on bad usage."""
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.input_size and min(args.input_size) < 1:
        parser.error(f"--input-size must be positive, got {args.input_size}")
    for flag in ("torch_weights", "keras_weights"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            parser.error(f"--{flag.replace('_', '-')} {path!r} does not exist or is not a file")
    for flag in ("json", "junit_xml"):  # the reports are written after the run: refuse what cannot be written now
        path = getattr(args, flag)
        if path is not None:
            try:
                check_output(path, f"--{flag.replace('_', '-')}", force=True)
            except ValueError as e:
                parser.error(str(e))
    if args.json and args.junit_xml and os.path.realpath(args.json) == os.path.realpath(args.junit_xml):
        parser.error(f"--json and --junit-xml name the same file ({args.json!r}); give each report its own")
    components = args.components.split(",") if args.components else list(DEFAULT_COMPONENTS)
    unknown = [c for c in components if c not in COMPONENT_NAMES]
    if unknown:
        parser.error(f"--components has {unknown}; accepted: {', '.join(COMPONENT_NAMES)}")
    try:
        overrides = arch_options(args)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    wanted = BACKENDS if args.keras_backend == "all" else tuple(args.keras_backend.split(","))
    bad = [b for b in wanted if b not in BACKENDS]
    if bad:
        parser.error(f"--keras-backend has {bad}; accepted: {', '.join(BACKENDS)} or 'all'")
    if args.in_process:
        current = os.environ.get("KERAS_BACKEND", "tensorflow")
        if args.keras_backend != "all" and wanted != (current,):
            parser.error(f"--in-process runs on this process's KERAS_BACKEND ({current}); "
                         f"--keras-backend {args.keras_backend} needs worker processes (drop --in-process)")
        wanted = (current,)
    warnings = []
    files = bool(args.torch_weights or args.keras_weights)
    if files and args.components:
        warnings.append("--components does not apply with --torch-weights/--keras-weights (the weights' "
                        "architecture is the component); ignored")
    if not files and overrides:
        warnings.append(f"the architecture options ({', '.join('--' + k.replace('_', '-') for k in overrides)}) "
                        f"apply to weight files only; ignored with random weights")
    if args.allow_partial and not files:
        warnings.append("--allow-partial applies to weight files only; ignored with random weights")
    if args.weights_may_differ and not (args.torch_weights and args.keras_weights):
        warnings.append("--weights-may-differ applies only with both --torch-weights and --keras-weights; ignored")
    if not args.float64 and args.dtype == "float64":
        warnings.append("--no-float64 does not apply with --dtype float64; ignored")
    job = {"components": None if files else components, "torch_weights": args.torch_weights,
           "keras_weights": args.keras_weights, "overrides": overrides, "allow_partial": args.allow_partial,
           "size": list(args.input_size) if args.input_size else None, "batch": args.batch, "seed": args.seed,
           "dtype": args.dtype, "device": args.device, "gradients": not args.no_gradients,
           "float64": args.float64, "trace": args.trace}
    return wanted, job, warnings


def _worker(job_json: str) -> int:
    """Inside one Keras backend: run the job, one event per stdout line."""
    def emit(event):
        sys.stdout.write(EVENT + json.dumps(event) + "\n")
        sys.stdout.flush()

    try:
        from parity_tests.session import run_backend

        run_backend(**json.loads(job_json), emit=emit)
    except Exception as e:  # noqa: BLE001 - a crash is an error entry, never a mismatch
        import traceback

        emit({"event": "error", "type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()})
        return 2
    emit({"event": "done"})
    return 0


class _Progress:
    """Per-backend progress on a terminal (one rewritten line); one line per finished backend otherwise too."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.tty = stream, stream.isatty()

    def stage(self, backend, component, stage, elapsed):
        if self.tty:
            self.stream.write(f"\r\033[Kdanet-parity: {backend}: {component}: {stage} ({elapsed:.0f} s)")
            self.stream.flush()

    def done(self, backend, results, seconds, error=None):
        failed = sum(r["status"] != "pass" for r in results)
        status = f"crashed ({error})" if error else f"{len(results)} component(s), {failed} not passing"
        self.stream.write(("\r\033[K" if self.tty else "") + f"danet-parity: {backend}: {status}, {seconds:.0f} s\n")
        self.stream.flush()


def _run_worker(backend, job, on_event) -> None:
    cmd = [sys.executable, "-m", "parity_tests.cli", "--worker", json.dumps(job)]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        finished = False
        for line in proc.stdout:
            if line.startswith(EVENT):
                event = json.loads(line[len(EVENT):])
                finished = finished or event["event"] in ("done", "error")
                on_event(event)
        code = proc.wait()
        if code != 0 and not finished:
            err.seek(0)
            tail = err.read()[-4000:]
            on_event({"event": "error", "type": "WorkerCrash", "traceback": tail,
                      "message": f"the {backend} worker exited with status {code} "
                                 f"({tail.strip().splitlines()[-1] if tail.strip() else 'no message'})"})


def _run_all(backends, job, in_process, progress) -> tuple:
    """``(backend entries, results, errors)``; every backend runs whatever the others did."""
    entries, results, errors = [], [], []
    for backend in backends:
        start = time.perf_counter()
        entry = {"name": backend, "status": "ok"}
        mine = []

        def on_event(event, backend=backend, entry=entry, mine=mine, start=start):
            kind = event.pop("event")
            if kind == "meta":
                entry.update(event)
            elif kind == "progress":
                progress.stage(backend, event["component"], event["stage"], time.perf_counter() - start)
            elif kind == "component":
                mine.append(event["result"])
                if event["result"]["error"]:
                    errors.append({"backend": backend, "component": event["result"]["component"],
                                   **event["result"]["error"]})
            elif kind == "error":
                entry["status"] = "error"
                errors.append({"backend": backend, "component": None, **event})

        if in_process:
            try:
                from parity_tests.session import run_backend

                def emit(event, on_event=on_event):
                    on_event(json.loads(json.dumps(event)))  # the same plain dicts a worker sends

                run_backend(**job, emit=emit)
            except Exception as e:  # noqa: BLE001
                import traceback

                on_event({"event": "error", "type": type(e).__name__, "message": str(e),
                          "traceback": traceback.format_exc()})
        else:
            _run_worker(backend, job, on_event)
        entry["seconds"] = time.perf_counter() - start
        entries.append(entry)
        results += mine
        progress.done(backend, mine, entry["seconds"], errors[-1]["message"] if entry["status"] == "error" else None)
    return entries, results, errors


def _check_weights(args, job) -> tuple:
    """``(weights entry or None, error message or None, notes)``: read the files first; compare two exactly.

    ``notes``: what ``--allow-partial`` left out of each file.
    """
    from parity_tests.weights_check import compare_weight_files, load_complete

    try:
        if args.torch_weights and args.keras_weights:
            entry = compare_weight_files(args.torch_weights, args.keras_weights, job["overrides"],
                                         args.weights_may_differ, args.allow_partial)
            return entry, None, entry.pop("notes")
        return None, None, load_complete(args.torch_weights or args.keras_weights, job["overrides"],
                                         args.allow_partial).notes
    except (ValueError, OSError) as e:  # ConvertError is a ValueError
        return None, str(e), []


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tolerances:
        from weights_convert.tolerances import table_markdown

        print(table_markdown())
        return 0
    if args.worker:
        return _worker(args.worker)
    backends, job, warnings = _validate(parser, args)
    for w in warnings:
        print(f"danet-parity: warning: {w}", file=sys.stderr)
    installed = [b for b in backends if importlib.util.find_spec(b) is not None]
    missing = sorted(set(backends) - set(installed))
    if missing:
        print(f"danet-parity: Keras backend(s) not installed, skipped: {', '.join(missing)}", file=sys.stderr)
    if not installed or importlib.util.find_spec("keras") is None:
        print("danet-parity: no Keras backend is installed (pip install 'danet[all]')", file=sys.stderr)
        return 2
    start = time.perf_counter()
    weights = None
    if args.torch_weights or args.keras_weights:
        weights, problem, notes = _check_weights(args, job)
        if problem:
            print(f"danet-parity: {problem}", file=sys.stderr)
            return 2
        for note in notes:  # --allow-partial: what was left out
            warnings.append(note)
            print(f"danet-parity: warning: {note}", file=sys.stderr)
        if weights:
            print("\n".join(weights["lines"]), flush=True)
    entries, results, errors = _run_all(installed, job, args.in_process, _Progress())
    report = {"schema": rep.SCHEMA, "argv": sys.argv[1:] if argv is None else list(argv),
              **environment(entries), "options": {k: v for k, v in job.items() if k != "overrides"},
              "architecture_options": job["overrides"], "warnings": warnings, "weights": weights,
              "backends": entries + [{"name": b, "status": "not installed"} for b in missing],
              "results": [{k: v for k, v in r.items() if k != "rows"} for r in results],
              "rows": [row for r in results for row in r["rows"]], "errors": errors,
              "seconds": time.perf_counter() - start}
    report["exit_code"] = rep.exit_code(report)
    report["result"] = {0: "pass", 1: "fail", 2: "error"}[report["exit_code"]]
    report["totals"] = rep.totals(report)
    print("\n".join(rep.table(report, args.verbose) + rep.divergence_lines(report) + rep.summary_lines(report)))
    reports = {}
    if args.json:
        reports[args.json] = json.dumps(rep.plain_json(report), indent=1, default=str, allow_nan=False).encode()
    if args.junit_xml:
        reports[args.junit_xml] = rep.junit_xml(report).encode()
    try:
        write_files(reports)  # each to a temporary file renamed into place: never a half-written report
    except OSError as e:
        print(f"danet-parity: error: the report(s) could not be written ({', '.join(reports)}): {e}",
              file=sys.stderr)
        return 2
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
