"""What a parity report was measured with: versions, machine, devices (no framework is imported here)."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from importlib import metadata

__all__ = ["versions", "machine", "environment"]

# Distributions whose versions a report names (the first installed name of each).
DISTRIBUTIONS = {"danet": ("danet",), "numpy": ("numpy",), "torch": ("torch",), "keras": ("keras",),
                 "tensorflow": ("tensorflow", "tensorflow-cpu"), "jax": ("jax",), "jaxlib": ("jaxlib",)}


def versions() -> dict:
    """``{"python", "danet", "numpy", "torch", "keras", "tensorflow", "jax", "jaxlib"}``; ``None`` if not installed."""
    out = {"python": platform.python_version()}
    for key, names in DISTRIBUTIONS.items():
        out[key] = None
        for name in names:
            try:
                out[key] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "executable": sys.executable}


def environment(backends: list) -> dict:
    """The report's ``versions``, ``machine``, ``device`` and ``started`` entries.

    ``backends``: the per-backend entries, each with what its process
    reported (``keras_device``, ``torch_device``, ``backend_version``).
    """
    v = versions()
    for b in backends:
        if b.get("backend_version"):
            v[b["name"]] = b["backend_version"]
    device = {"torch": next((b["torch_device"] for b in backends if b.get("torch_device")), None),
              "keras": {b["name"]: b.get("keras_device") for b in backends}}
    gpu = next((b["torch_device_name"] for b in backends if b.get("torch_device_name")), None)
    if gpu:
        device["gpu"] = gpu
    return {"versions": v, "machine": machine(), "device": device,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
