"""What the benchmarks share: memory meters, a timer, and official/efficient runs in fresh processes.

Peak memory is measured above the memory in use just before the measured
call: resident memory on CPU (``VmHWM`` after ``/proc/self/clear_refs`` and
``malloc_trim``, less ``VmRSS``), TensorFlow's own allocator statistics
(its pool keeps freed memory, so resident memory does not fall), and the
frameworks' device statistics on a GPU.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

__all__ = ["PATHS", "CpuMemory", "TensorFlowMemory", "TorchCudaMemory", "JaxGpuMemory", "keras_memory", "processes",
           "time_calls", "run_pairs", "paired_ratio", "machine"]

PATHS = ("official", "efficient")


class CpuMemory:
    """Peak resident memory (MiB) of this process above the memory in use at :meth:`reset`."""

    @staticmethod
    def _status(key: str) -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
        raise RuntimeError(f"/proc/self/status has no {key}")

    def reset(self) -> None:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS is what is live
        except OSError:
            pass
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to VmRSS
        self.base = self._status("VmRSS")

    def peak(self) -> float:
        return self._status("VmHWM") - self.base


class TensorFlowMemory:
    """Peak bytes (MiB) in use by TensorFlow's allocator on ``device`` above those in use at :meth:`reset`.

    TensorFlow keeps freed memory in its allocator's pool, so resident memory
    does not fall after the warm-up call; its own statistics are exact.
    """

    def __init__(self, device: str = "CPU:0"):
        self.device = device

    def reset(self) -> None:
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats(self.device)
        self.base = tf.config.experimental.get_memory_info(self.device)["current"] / 2**20

    def peak(self) -> float:
        import tensorflow as tf

        return tf.config.experimental.get_memory_info(self.device)["peak"] / 2**20 - self.base


class TorchCudaMemory:
    """``torch.cuda.max_memory_allocated`` above the memory allocated at :meth:`reset` (MiB)."""

    def reset(self) -> None:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated() / 2**20

    def peak(self) -> float:
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - self.base


class JaxGpuMemory:
    """JAX's ``peak_bytes_in_use`` on the GPU above the bytes in use at :meth:`reset` (MiB).

    JAX cannot reset its peak; the warm-up call ran the same computation, so
    the process's peak is the measured call's.
    """

    def reset(self) -> None:
        import jax

        self.device = jax.local_devices()[0]
        self.base = self.device.memory_stats()["bytes_in_use"] / 2**20

    def peak(self) -> float:
        return self.device.memory_stats()["peak_bytes_in_use"] / 2**20 - self.base


def keras_memory():
    """The right meter for the current Keras backend and device."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return TensorFlowMemory("GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0")
    if backend == "jax":
        import jax

        return JaxGpuMemory() if jax.default_backend() == "gpu" else CpuMemory()
    import torch

    return TorchCudaMemory() if torch.cuda.is_available() else CpuMemory()


def time_calls(run, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run_pairs(script: str, case_args: list[str], repeats: int) -> dict:
    """Run ``script --one-case PATH ...`` in fresh processes, official and efficient alternating.

    Returns ``{path: {"ms", "peak_mib", "error"}, "versions", "paired_ratio"}``: medians over
    ``repeats``, and :func:`paired_ratio` of the repeats where both paths ran.
    """
    results = {p: [] for p in PATHS}
    pairs = []
    errors, versions = {}, ""
    for rep in range(repeats):
        times = {}
        for path in (PATHS if rep % 2 == 0 else PATHS[::-1]):
            proc = subprocess.run([sys.executable, script, "--one-case", path] + case_args,
                                  capture_output=True, text=True)
            line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
            if proc.returncode or not line:
                errors[path] = ((proc.stderr.strip().splitlines() or ["failed"])[-1])[:100]
                continue
            row = json.loads(line[0][7:])
            versions = row.pop("versions")
            results[path].append(row)
            times[path] = row["ms"]
            print(f"# {path} {case_args}: {row}", file=sys.stderr, flush=True)
        if len(times) == len(PATHS):
            pairs.append((times["official"], times["efficient"]))
    out = {"versions": versions, "paired_ratio": paired_ratio(pairs)}
    for path in PATHS:
        rows = results[path]
        out[path] = {"ms": statistics.median(r["ms"] for r in rows) if rows else float("nan"),
                     "peak_mib": statistics.median(r["peak_mib"] for r in rows) if rows else float("nan"),
                     "error": errors.get(path, "")}
    return out


def paired_ratio(pairs) -> float:
    """The median over ``(official_ms, efficient_ms)`` pairs of ``efficient / official``.

    Each pair's processes ran one after the other, so a drift of the
    machine's speed over a run (a shared machine's neighbours) reaches both
    alike; the quotient of the two paths' medians mixes processes from
    different moments. NaN without pairs.
    """
    ratios = [e / o for o, e in pairs if o > 0]
    return statistics.median(ratios) if ratios else float("nan")


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {platform.machine()}, {os.cpu_count()} CPUs"


def processes(repeats: int) -> str:
    """How the table's figures were taken, for its header."""
    return "one fresh process" if repeats == 1 else f"medians of {repeats} fresh processes"
