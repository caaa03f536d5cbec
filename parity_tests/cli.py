"""``danet-parity``: do danet_torch and danet_keras give the same numbers, here, on these weights?

With no arguments: seeded random weights for PAM, CAM, the head and DANet-50
at a small size, every installed Keras backend (each in its own process),
the best available device. Prints one line per component, backend and check
(the worst output of each), every failing output in full, and exits 0 when
all pass, 1 when any fails, 2 on bad usage or unreadable weights.

    danet-parity
    danet-parity --torch-weights danet101.pth --input-size 97 129 --json report.json
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

from weights_convert.cli import add_arch_options, arch_options

__all__ = ["main"]

BACKENDS = ("tensorflow", "jax", "torch")
DEFAULT_COMPONENTS = ("pam", "cam", "head", "danet50")
DTYPES = ("float32", "float64", "float16", "bfloat16")
COMPONENT_NAMES = ("pam", "cam", "dual_attention", "head", "danet50", "danet101")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="danet-parity", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--torch-weights", metavar="F", help="weights for the torch side (any format danet-convert reads)")
    p.add_argument("--keras-weights", metavar="F", help="weights for the Keras side; without --torch-weights both "
                   "sides use them")
    add_arch_options(p)
    p.add_argument("--components", default=",".join(DEFAULT_COMPONENTS),
                   help="with random weights: comma-separated from pam,cam,dual_attention,head,danet50,danet101 "
                        "(default: %(default)s)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="spatial input size")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="float32/float64: torch vs Keras; float16/bfloat16: both vs float64 (autocast, mixed policy)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="torch's device (Keras on JAX/torch uses the GPU when it has one; TensorFlow stays on CPU)")
    p.add_argument("--keras-backend", default="all",
                   help="comma-separated from tensorflow,jax,torch, or 'all' installed (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gradients", action="store_true", help="compare forward outputs only")
    p.add_argument("--verbose", action="store_true", help="print every compared output")
    p.add_argument("--json", metavar="REPORT", help="write every row as JSON")
    p.add_argument("--tolerances", action="store_true", help="print the tolerance table and exit")
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p




def _worker(args) -> int:
    """Runs inside one Keras backend: compares, writes rows as JSON."""
    import torch

    import weights_convert as wc
    from parity_tests import harness

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    size = tuple(args.input_size) if args.input_size else None
    jobs = []
    if args.torch_weights or args.keras_weights:
        overrides = arch_options(args)
        neutral_k = spec_k = None
        if args.keras_weights:
            neutral_k, spec_k = wc.load(args.keras_weights, **overrides)
        if args.torch_weights:
            neutral_t, spec = wc.load(args.torch_weights, **overrides)
        else:
            neutral_t, spec = neutral_k, spec_k
        if spec_k is not None and wc.expected_shapes(spec_k) != wc.expected_shapes(spec):
            raise wc.ConvertError(f"--torch-weights is {spec.describe()} but --keras-weights is "
                                  f"{spec_k.describe()}: they must be the same architecture.")
        spec = spec.replace(dtype="float32")
        label = spec.backbone.replace("resnet", "danet") if spec.kind == "danet" else spec.kind
        jobs.append((label, spec, neutral_t, neutral_k))
    else:
        for name in args.components.split(","):
            jobs.append((name, None, None, None))
    rows = []
    for name, spec, neutral_t, neutral_k in jobs:
        rows += harness.run_component(name, spec=spec, size=size, batch=args.batch, seed=args.seed,
                                      dtype=args.dtype, device=device, gradients=not args.no_gradients,
                                      neutral=neutral_t, keras_neutral=neutral_k)
    with open(args.worker_out, "w") as fh:
        json.dump([r.as_dict() for r in rows], fh)
    return 0


def _summarise(rows, verbose: bool) -> list[str]:
    """One line per (component, backend, check): the worst output, and every failure in full."""
    lines = [f"{'component/output':<44} {'backend':<10} {'device':<20} {'dtype':<8} {'max abs':>9} {'max rel':>9} "
             f"{'tolerance':<20} result"]

    def fmt(r, label):
        tol = f"atol={r['atol']:g} rtol={r['rtol']:g}"
        return (f"{label:<44} {r['backend']:<10} {r['device']:<20} {r['dtype']:<8} {r['max_abs']:>9.2e} "
                f"{r['max_rel']:>9.2e} {tol:<20} {'PASS' if r['passed'] else 'FAIL'}")

    groups: dict = {}
    for r in rows:
        kind = "gradients" if r["output"].startswith("d/d") else (
            "BatchNorm stats" if r["output"].endswith("after 1 step") else "outputs")
        groups.setdefault((r["component"], r["backend"], kind), []).append(r)
    for (component, _, kind), group in groups.items():
        worst = max(group, key=lambda r: r["max_abs"] / (r["atol"] + r["rtol"] * max(1e-30, abs(r["max_abs"]))))
        if verbose:
            lines += [fmt(r, f"{component}/{r['output']}") for r in group]
        else:
            failed = [r for r in group if not r["passed"]]
            label = f"{component}/{kind} ({len(group)}, worst {worst['output']})"
            lines.append(fmt(dict(worst, passed=not failed), label[:44]))
            lines += ["  " + fmt(r, f"{component}/{r['output']}")[:200] for r in failed]
    return lines


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.tolerances:
        from weights_convert.tolerances import table_markdown

        print(table_markdown())
        return 0
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.input_size and min(args.input_size) < 1:
        parser.error(f"--input-size must be positive, got {args.input_size}")
    if args.worker_out:
        try:
            return _worker(args)
        except (ValueError, OSError) as e:  # ConvertError is a ValueError: unreadable or unusable weights
            print(f"danet-parity: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - a crash is not a mismatch: never exit 1 for it
            print(f"danet-parity: unexpected {type(e).__name__}: {e}", file=sys.stderr)
            return 2
    for flag in ("torch_weights", "keras_weights"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            parser.error(f"--{flag.replace('_', '-')} {path!r} does not exist or is not a file")
    unknown = [c for c in args.components.split(",") if c not in COMPONENT_NAMES]
    if unknown:
        parser.error(f"--components has {unknown}; accepted: {', '.join(COMPONENT_NAMES)}")
    wanted = BACKENDS if args.keras_backend == "all" else tuple(args.keras_backend.split(","))
    bad = [b for b in wanted if b not in BACKENDS]
    if bad:
        parser.error(f"--keras-backend has {bad}; accepted: {', '.join(BACKENDS)} or 'all'")
    backends = [b for b in wanted if importlib.util.find_spec(b) is not None]
    missing = sorted(set(wanted) - set(backends))
    if missing:
        print(f"danet-parity: Keras backend(s) not installed, skipped: {', '.join(missing)}", file=sys.stderr)
    if not backends or importlib.util.find_spec("keras") is None:
        print("danet-parity: no Keras backend is installed (pip install 'danet[all]')", file=sys.stderr)
        return 2
    rows, start = [], time.perf_counter()
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--verbose"]
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            out = os.path.join(tmp, f"{backend}.json")
            cmd = [sys.executable, "-m", "parity_tests.cli", *forwarded, "--worker-out", out]
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
            print(f"danet-parity: running Keras on {backend} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0 or not os.path.exists(out):  # no rows: the worker failed, not parity
                sys.stderr.write(proc.stderr[-4000:])
                return 2
            with open(out) as fh:
                rows += json.load(fh)
    print("\n".join(_summarise(rows, args.verbose)))
    failed = [r for r in rows if not r["passed"]]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed ({len(rows)} outputs compared, "
          f"{time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"argv": sys.argv[1:] if argv is None else list(argv), "rows": rows}, fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
