"""Run the whole suite: everything once, then the Keras tests on each other backend.

Keras fixes its backend at import, so each backend runs in its own pytest
process (``KERAS_BACKEND``). Usage::

    python -m parity_tests.run_suite [--backends tensorflow,jax,torch] [pytest args...]

The first backend runs every test; the others run the tests marked ``keras``.
Tests marked ``slow`` run only with ``--slow``.
Exits non-zero if any run fails; the last line totals all runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch",
                        help="comma-separated Keras backends (default: %(default)s); missing ones are skipped")
    parser.add_argument("--slow", action="store_true",
                        help="also run the tests marked `slow` (minutes each on 2 cores; outside CI's budget)")
    args, pytest_args = parser.parse_known_args(argv)
    here = str(Path(__file__).resolve().parent / "tests")
    backends = [b for b in args.backends.split(",") if b]
    bad = [b for b in backends if b not in BACKEND_MODULES]
    if bad:
        parser.error(f"`--backends` has {bad}; accepted: {sorted(BACKEND_MODULES)}")
    totals = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    worst = 0
    first = True
    for backend in backends:
        if importlib.util.find_spec(BACKEND_MODULES[backend]) is None:
            print(f"== Keras backend {backend}: not installed, skipped", flush=True)
            continue
        cmd = [sys.executable, "-m", "pytest", here, "-p", "no:cacheprovider", "-rs", *pytest_args]
        marks = [] if first else ["keras"]
        if not args.slow:
            marks.append("not slow")
        if marks:
            cmd += ["-m", " and ".join(marks)]
        print(f"== Keras backend {backend}: {' '.join(cmd[2:])}", flush=True)
        env = dict(os.environ, KERAS_BACKEND=backend)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sys.stdout.write(proc.stdout)
        sys.stdout.flush()
        tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        for key, pattern in (("passed", r"(\d+) passed"), ("failed", r"(\d+) failed"),
                             ("skipped", r"(\d+) skipped"), ("errors", r"(\d+) errors?")):
            m = re.search(pattern, tail)
            totals[key] += int(m.group(1)) if m else 0
        if proc.returncode not in (0, 5):  # 5: no tests collected (e.g. no Keras tests)
            worst = proc.returncode or 1
        first = False
    failed = totals["failed"] + totals["errors"]
    print(f"{totals['passed']} passed, {failed} failed, {totals['skipped']} skipped")
    if totals["passed"] == 0 and worst == 0:
        print("no test ran", file=sys.stderr)
        return 1
    return worst


if __name__ == "__main__":
    sys.exit(main())
