"""One process, one Keras backend: every check of every component, traced where it fails.

:func:`check_component` is the library entry point for one component (the
rows, and the first divergence by module when a row fails or ``trace`` is
set); :func:`run_backend` runs a list of components (seeded random weights,
or the weights of files) on the running backend, as ``danet-parity`` does in
each of its worker processes, and reports through ``emit`` as it goes.

This module imports Keras: the backend is the one ``KERAS_BACKEND`` named
when the process started.
"""

from __future__ import annotations

import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import keras
import torch

import weights_convert as wc
from parity_tests import harness
from parity_tests.trace import forward_divergences, training_divergences
from parity_tests.weights_check import load_complete

__all__ = ["ComponentResult", "check_component", "weight_jobs", "run_backend", "backend_meta"]


@dataclass
class ComponentResult:
    """Everything measured for one component on one backend.

    Attributes:
        rows: Every compared tensor (:class:`parity_tests.harness.Row`).
        divergences: Per traced mode and dtype, the modules that differ while
            the modules inside them agree (:mod:`parity_tests.trace`), first
            divergence first; empty when all agree or nothing was traced.
        notes: What the trace could not do, or found instead of a module.
        error: ``{"type", "message", "traceback"}`` if the component crashed (rows so far are kept).
    """

    component: str
    backend: str
    spec: dict
    size: tuple
    batch: int
    rows: list = field(default_factory=list)
    divergences: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    error: Optional[dict] = None

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        return "fail" if any(not r.passed for r in self.rows) else "pass"

    def as_dict(self) -> dict:
        out = asdict(self)
        out["rows"] = [r.as_dict() for r in self.rows]
        out["status"] = self.status
        out["size"] = list(self.size)
        return out


def _error(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": str(e),
            "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:]}


def check_component(component: str, spec=None, size=None, batch: int = 2, seed: int = 0, dtype: str = "float32",
                    device: str = "cpu", gradients: bool = True, neutral=None, keras_neutral=None,
                    float64: bool = True, trace: bool = False, trace_on_failure: bool = True,
                    progress: Optional[Callable] = None, raise_errors: bool = False) -> ComponentResult:
    """Compare one component, torch against Keras on the running backend.

    Args:
        component: A name from :data:`parity_tests.harness.COMPONENTS`, or a label when ``spec`` is given.
        spec: The architecture (:class:`weights_convert.ArchSpec`); default: the component's.
        size: ``(H, W)``; default: the component's.
        dtype: The run users see: ``float32``/``float64`` (torch vs Keras) or
            ``float16``/``bfloat16`` (both vs float64).
        float64: Also compare the forward in float64 (where a weight
            difference above rounding cannot hide).
        gradients: Compare gradients and updated BatchNorm statistics
            (float32 for the attention layers, float64 for a whole DANet).
        neutral, keras_neutral: Weights (torch names); default random.
        trace: Trace even when every row passes; ``trace_on_failure``: when any fails.
        progress: Called with ``(component, stage)`` as stages start.
        raise_errors: Raise instead of recording a crash in ``error``.
    """
    start = time.perf_counter()
    spec, size = harness.component_spec(component, spec, size)
    spec = spec.replace(data_format="channels_last", dtype="float32")
    result = ComponentResult(component, keras.backend.backend(), spec.to_dict(), size, batch)
    say = progress or (lambda *_: None)
    try:
        x = harness.make_input(spec, size, batch, seed)

        def pair(d):
            return harness.make_pair(spec, seed, device, d, neutral, keras_neutral)

        with harness.exact_numerics():
            forwards = [dtype] + (["float64"] if float64 and dtype != "float64" else [])
            pairs = {}
            for d in forwards:
                say(component, f"{d} forward")
                pairs[d] = pair(d)
                result.rows += harness.forward_rows(component, spec, *pairs[d], x, d, device, neutral)
            if gradients:  # a training step changes the BatchNorm statistics: the pair is not used again
                grad_dtype = "float64" if spec.kind == "danet" or dtype == "float64" else "float32"
                say(component, f"{grad_dtype} gradients")
                models = pairs.pop(grad_dtype, None) or pair(grad_dtype)
                result.rows += harness.gradient_rows(component, spec, *models, x, device, seed + 1, grad_dtype)
                del models
            failed = [r for r in result.rows if not r.passed]
            if trace or (trace_on_failure and failed):
                def unused_pair(d):
                    return pairs.pop(d, None) or pair(d)

                _trace(result, spec, x, unused_pair, dtype, device, gradients, trace, failed, say)
            pairs.clear()
    except Exception as e:  # noqa: BLE001 - recorded, the other components still run
        if raise_errors:
            raise
        result.error = _error(e)
    result.seconds = time.perf_counter() - start
    return result


def _trace(result, spec, x, pair, dtype, device, gradients, always, failed, say):
    scope = spec.info.scope
    for d in ["float64"] + ([dtype] if dtype != "float64" else []):
        say(result.component, f"tracing the {d} forward")
        found, note = forward_divergences(*pair(d), x, d, scope, device)
        result.divergences += found
        if note:
            result.notes.append(f"{d} forward: {note}")
        if not found and any(r.dtype == d and r.check == "outputs" for r in failed):
            result.notes.append(f"{d} forward: no single module differs beyond the tolerance on the same input; "
                                f"the outputs' difference accumulates across modules")
    if gradients and (always or any(r.check != "outputs" for r in failed)):
        say(result.component, "tracing one training step (BatchNorm)")
        found, note = training_divergences(*pair("float64"), x, "float64", scope, device)
        result.divergences += found
        if not found and any(r.check != "outputs" for r in failed):
            result.notes.append("training step: every BatchNorm, given torch's input, updates its statistics as "
                                "torch does; the difference is elsewhere (gradients are not traced by module)")


def weight_jobs(torch_weights=None, keras_weights=None, overrides=None, allow_partial: bool = False) -> list:
    """``[(label, spec, torch-side weights, Keras-side weights or None)]`` for weight files.

    Raises:
        weights_convert.ConvertError: a file is unreadable, or the two hold different architectures.
    """
    overrides = overrides or {}
    neutral_k = spec_k = None
    if keras_weights:
        neutral_k, spec_k = load_complete(keras_weights, overrides, allow_partial)
    if torch_weights:
        neutral_t, spec = load_complete(torch_weights, overrides, allow_partial)
    else:
        neutral_t, spec = neutral_k, spec_k
    if spec_k is not None and wc.expected_shapes(spec_k) != wc.expected_shapes(spec):
        raise wc.ConvertError(f"--torch-weights is {spec.describe()} but --keras-weights is "
                              f"{spec_k.describe()}: they must be the same architecture.")
    label = spec.backbone.replace("resnet", "danet") if spec.kind == "danet" else spec.kind
    return [(label, spec, neutral_t, neutral_k if torch_weights else None)]


def backend_meta(device: str) -> dict:
    """Versions and devices of this process: Keras, its backend, torch."""
    backend = keras.backend.backend()
    module = sys.modules.get(backend) or __import__(backend)
    meta = {"backend": backend, "keras": keras.__version__, "backend_version": getattr(module, "__version__", "?"),
            "torch": torch.__version__, "torch_device": device, "keras_device": harness.keras_device(),
            "machine": platform.machine()}
    if device.startswith("cuda"):
        meta["torch_device_name"] = torch.cuda.get_device_name(0)
    return meta


def run_backend(components=None, torch_weights=None, keras_weights=None, overrides=None, size=None, batch=2,
                seed=0, dtype="float32", device="auto", gradients=True, float64=True, trace=False,
                allow_partial: bool = False, emit: Optional[Callable] = None) -> dict:
    """Every component on the running backend; ``emit(event)`` gets each event as it happens.

    Events: ``{"event": "meta", ...}`` (versions, devices), ``{"event":
    "progress", "component", "stage"}``, ``{"event": "component", "result":
    ComponentResult.as_dict()}``. Returns ``{"meta", "results", "seconds"}``.
    """
    emit = emit or (lambda event: None)
    start = time.perf_counter()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`--device cuda`: torch sees no CUDA device here (torch.cuda.is_available() is False); "
                         "use --device cpu, or auto")
    meta = backend_meta(device)
    emit({"event": "meta", **meta})
    if torch_weights or keras_weights:
        jobs = weight_jobs(torch_weights, keras_weights, overrides, allow_partial)
    else:
        jobs = [(name, None, None, None) for name in (components or ("pam", "cam", "head", "danet50"))]
    results = []
    for name, spec, neutral_t, neutral_k in jobs:
        r = check_component(name, spec=spec, size=size, batch=batch, seed=seed, dtype=dtype, device=device,
                            gradients=gradients, neutral=neutral_t, keras_neutral=neutral_k, float64=float64,
                            trace=trace, progress=lambda c, s: emit({"event": "progress", "component": c,
                                                                     "stage": s})).as_dict()
        results.append(r)
        emit({"event": "component", "result": r})
    return {"meta": meta, "results": results, "seconds": time.perf_counter() - start}
