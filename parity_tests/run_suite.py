"""Run the whole suite: the framework-free and torch tests once, the Keras tests once per backend.

Keras fixes its backend at import, so each backend runs in its own pytest
process (``KERAS_BACKEND``); the processes run side by side, ``--jobs`` at a
time (default: the CPU count), and their outputs are printed whole, in
order, as each finishes. The processes share the CPUs: each runs torch
(OpenMP) and TensorFlow on ``--threads`` threads (default: the CPU count
divided by ``--jobs``) so that side by side they do not oversubscribe the
cores; thread variables already set in the environment are kept. The
longest run starts first and a short one comes last, so that the cores
finish close together. Usage::

    python -m parity_tests.run_suite [--backends tensorflow,jax,torch] [--jobs N] [--threads N] [--slow]
                                     [pytest args...]

Tests marked ``slow`` run only with ``--slow``. Exits non-zero if any run
fails; the last line totals all runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
TESTS = str(Path(__file__).resolve().parent / "tests")
# Run last, in a process of their own: two gloo processes that each take one DANet-50 training step, and short
# torch training runs; about 40 s on one core, which the core that finishes first takes while the other ends
# its runs (JAX's Keras tests finish about a minute before the other three runs).
LAST = ("test_torch_distributed.py", "test_torch_train.py")
# Thread pools sized from the environment: OpenMP (torch) and MKL, TensorFlow's intra- and inter-op pools.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
COUNTS = (("passed", r"(\d+) passed"), ("failed", r"(\d+) failed"), ("skipped", r"(\d+) skipped"),
          ("errors", r"(\d+) errors?"))


def _runs(backends, slow: bool) -> list:
    """``[(label, KERAS_BACKEND, marker expression, paths)]`` in the order they start: JAX's Keras tests (the
    longest: eager JAX compiles each new op), the tests without Keras, the other backends' Keras tests, and last
    the short :data:`LAST`, which the first core to finish its other runs takes."""
    extra = "" if slow else " and not slow"
    keras = [(f"Keras tests on {b}", b, f"keras{extra}", [TESTS]) for b in sorted(backends, key=lambda b: b != "jax")]
    backend = backends[0] if backends else "tensorflow"
    last = [str(Path(TESTS) / name) for name in LAST]
    rest = ("tests without Keras", backend, f"not keras{extra}", [TESTS, *(f"--ignore={p}" for p in last)])
    return keras[:1] + [rest] + keras[1:] + [(f"tests without Keras in {', '.join(LAST)}", backend,
                                              f"not keras{extra}", last)]


def _environment(backend: str, threads: int, base=None) -> dict:
    """``base`` (default: this process's environment) with ``KERAS_BACKEND`` and, where unset, the thread counts."""
    env = dict(os.environ if base is None else base, KERAS_BACKEND=backend)
    for name in THREAD_VARIABLES:
        env.setdefault(name, str(threads))
    return env


def _run(label, backend, marks, paths, pytest_args, threads):
    cmd = [sys.executable, "-m", "pytest", *paths, "-p", "no:cacheprovider", "-rs", "-m", marks, *pytest_args]
    env = _environment(backend, threads)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    header = f"== {label} ({time.perf_counter() - start:.0f} s): KERAS_BACKEND={backend} {' '.join(cmd[2:])}"
    return header, proc.returncode, proc.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch",
                        help="comma-separated Keras backends (default: %(default)s); missing ones are skipped")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="pytest processes at a time (default: the CPU count, %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per pytest process for torch and TensorFlow (default: CPU count // jobs, "
                             "at least 1)")
    parser.add_argument("--slow", action="store_true",
                        help="also run the tests marked `slow` (minutes each on 2 cores; outside CI's budget)")
    args, pytest_args = parser.parse_known_args(argv)
    wanted = [b for b in args.backends.split(",") if b]
    bad = [b for b in wanted if b not in BACKEND_MODULES]
    if bad:
        parser.error(f"`--backends` has {bad}; accepted: {sorted(BACKEND_MODULES)}")
    if args.jobs < 1:
        parser.error(f"`--jobs` must be >= 1, got {args.jobs}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"`--threads` must be >= 1, got {args.threads}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    backends = []
    for b in wanted:
        if importlib.util.find_spec(BACKEND_MODULES[b]) is None:
            print(f"== Keras backend {b}: not installed, skipped", flush=True)
        else:
            backends.append(b)
    totals = dict.fromkeys(("passed", "failed", "skipped", "errors"), 0)
    worst = 0
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(_run, *run, pytest_args, threads) for run in _runs(backends, args.slow)]
        for future in futures:
            header, code, output = future.result()
            print(header, flush=True)
            sys.stdout.write(output)
            sys.stdout.flush()
            tail = output.strip().splitlines()[-1] if output.strip() else ""
            for key, pattern in COUNTS:
                m = re.search(pattern, tail)
                totals[key] += int(m.group(1)) if m else 0
            if code not in (0, 5):  # 5: no tests collected (e.g. no Keras tests)
                worst = code or 1
    failed = totals["failed"] + totals["errors"]
    print(f"{totals['passed']} passed, {failed} failed, {totals['skipped']} skipped "
          f"in {time.perf_counter() - start:.0f} s ({args.jobs} at a time, threads each: {threads})")
    if totals["passed"] == 0 and worst == 0:
        print("no test ran", file=sys.stderr)
        return 1
    return worst


if __name__ == "__main__":
    sys.exit(main())
