"""Official vs fused position attention: time and peak memory, side by side in one run.

Each case runs in a fresh process (so peak resident memory on CPU means
something): the PAM layer (C channels, C/8 query/key channels, gamma 1) is
built, warmed up on a tiny input, then measured: peak memory of the first
full-size call above the warmed-up baseline (``torch.cuda.max_memory_allocated``
on CUDA, ``ru_maxrss`` on CPU) and the median time of ``--repeats`` calls.

    python benchmarks/pam_benchmark.py --device cpu --batch 1 --sizes 32 64 96
    python benchmarks/pam_benchmark.py --device cuda --sizes 32 64 128 181
    KERAS_BACKEND=tensorflow python benchmarks/pam_benchmark.py --framework keras --device cpu

Prints a Markdown table (and ``--json FILE`` writes the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_peak_of(fn, x) -> float:
    """Peak resident memory (MiB) that ``fn(x)`` adds above this process's peak so far."""
    base = _rss_mib()
    fn(x)
    return _rss_mib() - base


def _measure(run, make, args, peak_of) -> dict:
    """Warm up on a tiny input, take the first full-size call's peak memory, then time repeats."""
    run(make(8))
    x = make(args.size)
    peak = peak_of(run, x)
    for _ in range(args.warmup):
        run(x)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return {"ms": statistics.median(times) * 1e3, "peak_mib": peak}


def _case_torch(args) -> dict:
    import torch

    from danet_torch import PositionAttention

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    pam = PositionAttention(args.channels, fused=args.path == "fused").to(device, dtype)
    with torch.no_grad():
        pam.gamma.fill_(1.0)
    backward = args.mode == "fwd+bwd"

    def run(x):
        if backward:
            pam(x).float().pow(2).mean().backward()
        else:
            with torch.no_grad():
                pam(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def make(h):
        return torch.randn(args.batch, args.channels, h, h, device=device, dtype=dtype, requires_grad=backward)

    if device.type == "cuda":
        def peak_of(fn, x):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(x)
            return (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_of = _rss_peak_of
    return _measure(run, make, args, peak_of) | {"versions": f"torch {torch.__version__}"}


def _case_keras(args) -> dict:
    import keras
    import numpy as np

    from danet_keras import PositionAttention

    if keras.backend.backend() == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    keras.config.set_dtype_policy(args.dtype)
    pam = PositionAttention(fused=args.path == "fused")
    pam.build((None, None, None, args.channels))
    pam.gamma.assign(np.ones((1,), "float32"))

    def make(h):
        return keras.ops.convert_to_tensor(
            np.random.default_rng(0).standard_normal((args.batch, h, h, args.channels)), dtype=args.dtype)

    def run(x):
        y = pam(x)
        keras.ops.convert_to_numpy(keras.ops.sum(y))

    return _measure(run, make, args, _rss_peak_of) | {
        "versions": f"keras {keras.__version__} ({keras.backend.backend()})"}


def _one_case(args) -> None:
    result = _case_keras(args) if args.framework == "keras" else _case_torch(args)
    print("RESULT " + json.dumps(result))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=["torch", "keras"], default="torch")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="H = W of the feature map")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--one-case", nargs=4, metavar=("PATH", "SIZE", "DTYPE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one_case:
        args.path, size, args.dtype, args.mode = args.one_case
        args.size = int(size)
        _one_case(args)
        return 0
    sizes = args.sizes or ([32, 64, 96] if args.device == "cpu" else [32, 64, 128, 181])
    if args.framework == "keras":
        args.modes = ["fwd"]
    rows, versions = [], ""
    for size in sizes:
        for dtype in args.dtypes:
            for mode in args.modes:
                pair = {}
                for path in ("official", "fused"):
                    cmd = [sys.executable, __file__, "--framework", args.framework, "--device", args.device,
                           "--batch", str(args.batch), "--channels", str(args.channels),
                           "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                           "--one-case", path, str(size), dtype, mode]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
                    if proc.returncode or not line:
                        err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                        pair[path] = {"ms": float("nan"), "peak_mib": float("nan"), "error": err[:80]}
                    else:
                        pair[path] = json.loads(line[0][7:])
                        versions = pair[path].pop("versions")
                o, f = pair["official"], pair["fused"]
                rows.append({"size": f"{size}x{size}", "N": size * size, "dtype": dtype, "mode": mode,
                             "official_ms": o["ms"], "official_mib": o["peak_mib"], "fused_ms": f["ms"],
                             "fused_mib": f["peak_mib"], "time_ratio": f["ms"] / o["ms"],
                             "memory_ratio": f["peak_mib"] / o["peak_mib"] if o["peak_mib"] else float("nan"),
                             "error": o.get("error") or f.get("error") or ""})
                print(f"# {rows[-1]}", file=sys.stderr, flush=True)
    names = ("plain", "efficient") if args.framework == "keras" else ("official", "fused")
    print(f"{args.framework}, {args.device}, B={args.batch}, C={args.channels}, {versions}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; median of {args.repeats}")
    print()
    print(f"| H x W | N | dtype | pass | {names[0]} ms | {names[0]} peak MiB | {names[1]} ms | "
          f"{names[1]} peak MiB | time ratio | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        note = f" ({r['error']})" if r["error"] else ""
        print(f"| {r['size']} | {r['N']} | {r['dtype']} | {r['mode']} | {r['official_ms']:.1f} | "
              f"{r['official_mib']:.0f} | {r['fused_ms']:.1f} | {r['fused_mib']:.0f} | {r['time_ratio']:.2f} | "
              f"{r['memory_ratio']:.3f}{note} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
