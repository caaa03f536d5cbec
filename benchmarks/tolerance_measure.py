"""What float32 (and float64) actually reach, per tolerance scope and component: the figures beside the table.

For every installed Keras backend (each in its own process), seeded random
weights (``weights_convert.testing.randomize_``) at the suite's sizes:

* Keras against torch, as ``danet-parity`` compares them (outputs in float32
  and float64, gradients, BatchNorm statistics after one training step), for
  PAM, CAM, DualAttention and DANetHead at 9x11 and 1x1, DANet-50 outputs at
  33x33 and 65x65 (gradients at 33x33, in float64);
* torch float32 and Keras float32 against the float64 NumPy reference, for the
  attention layers at 7x9 and 45x45 (the largest layer-scope size the suite uses);
* float16 and bfloat16 (torch autocast, Keras' mixed policy) against float64,
  outputs, as ``danet-parity --dtype float16/bfloat16`` compares them, for
  PAM, CAM, DualAttention and DANetHead at 9x11 and DANet-50 at 65x65 (the
  components' default sizes, batch 2, as the command runs them).

Each comparison gives the element-wise max |diff| and max relative error, the
normwise error ``||a - b|| / ||b||`` and the headroom under the table in
force, ``max |a - b| / (atol + rtol |b|)`` (PASS iff <= 1). A tolerance is
more than 10x above what is reached where the worst headroom of its scope is
below 0.1.

    python benchmarks/tolerance_measure.py --seeds 0 1 2 --json tolerances.json

Prints, per (dtype, scope) and then per component, size and comparison, the
worst headroom, normwise error and max |diff| over every backend and seed,
and where each was reached (``--from-json FILE`` prints a saved run again).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

BACKENDS = ("tensorflow", "jax", "torch")
PARITY = [("pam", (9, 11), 2, True), ("cam", (9, 11), 2, True), ("dual_attention", (9, 11), 2, True),
          ("head", (9, 11), 2, True), ("pam", (1, 1), 3, False), ("cam", (1, 1), 3, False),
          ("dual_attention", (1, 1), 3, False), ("head", (1, 1), 3, False),
          ("danet50", (33, 33), 1, True), ("danet50", (65, 65), 1, False)]
REFERENCE = [("pam", (7, 9)), ("cam", (7, 9)), ("head", (7, 9)), ("pam", (45, 45)), ("cam", (45, 45)),
             ("dual_attention", (45, 45))]
HALF = [("pam", (9, 11), 2), ("cam", (9, 11), 2), ("dual_attention", (9, 11), 2), ("head", (9, 11), 2),
        ("danet50", (65, 65), 2)]


def _measure(seeds, device="cpu") -> list:
    """Inside one backend: one record per compared tensor."""
    import keras

    from parity_tests import harness
    from parity_tests.session import check_component
    from weights_convert.tolerances import compare, tolerance

    backend, out = keras.backend.backend(), []

    def record(dtype, scope, what, component, size, seed, name, c):
        out.append({"backend": backend, "dtype": dtype, "scope": scope, "what": what, "component": component,
                    "size": list(size), "seed": seed, "name": name, "max_abs": c.max_abs, "max_rel": c.max_rel,
                    "normwise": c.normwise, "headroom": c.headroom})

    for seed in seeds:
        for component, size, batch, gradients in PARITY:
            result = check_component(component, size=size, batch=batch, seed=seed, gradients=gradients,
                                     device=device, trace_on_failure=False, raise_errors=True)
            scope = harness.COMPONENTS[component][0].info.scope
            for r in result.rows:
                row_scope = {"outputs": scope, "gradients": "grad", "BatchNorm statistics": "layer"}[r.check]
                out.append({"backend": backend, "dtype": r.dtype, "scope": row_scope, "what": f"keras vs torch "
                            f"{r.check}", "component": component, "size": list(size), "seed": seed, "name": r.output,
                            "max_abs": r.max_abs, "max_rel": r.max_rel, "normwise": r.normwise,
                            "headroom": r.headroom})
        for dtype in ("float16", "bfloat16"):
            for component, size, batch in HALF:
                result = check_component(component, size=size, batch=batch, seed=seed, dtype=dtype, gradients=False,
                                         float64=False, device=device, trace_on_failure=False, raise_errors=True)
                for r in result.rows:  # "fused (torch)": that framework's half-precision run against float64
                    name, who = r.output.rsplit(" ", 1)
                    scope = harness.COMPONENTS[component][0].info.scope
                    out.append({"backend": backend, "dtype": dtype, "scope": scope,
                                "what": f"{who.strip('()')} {dtype} vs float64 reference", "component": component,
                                "size": list(size), "seed": seed, "name": name, "max_abs": r.max_abs,
                                "max_rel": r.max_rel, "normwise": r.normwise, "headroom": r.headroom})
        for component, size in REFERENCE:
            spec, _ = harness.component_spec(component)
            with harness.exact_numerics():
                torch_model, keras_model = harness.make_pair(spec, seed, device)
                x = harness.make_input(spec, size, 2, seed)
                expected = harness.reference_outputs(spec, __import__("weights_convert").from_torch(torch_model), x)
                for who, got in (("torch", harness.torch_outputs(torch_model, x, device=device)),
                                 ("keras", harness.keras_outputs(keras_model, x))):
                    for name, a, e in zip(spec.outputs, got, expected):
                        record("float32", "layer", f"{who} float32 vs float64 reference", component, size, seed,
                               name, compare(name, a, e, tolerance("float32", "layer")))
    return out


def _at(r) -> str:
    return f"{r['backend']} {r['component']} {r['size'][0]}x{r['size'][1]} {r['what']}: {r['name']}"


def _worst(group) -> tuple:
    """``(worst headroom record, worst normwise record, worst max |diff| record)`` of a group.

    The normwise error leaves out PAM's key-conv bias gradients: zero in exact
    arithmetic (a softmax over keys does not see that bias), pure rounding noise.
    """
    h = max(group, key=lambda r: r["headroom"])
    real = [r for r in group if not r["name"].endswith("key_conv.bias")] or group
    n = max(real, key=lambda r: r["normwise"] if r["normwise"] != float("inf") else -1)
    return h, n, max(group, key=lambda r: r["max_abs"])


def _summary(records) -> list:
    """Per (dtype, scope), then per (dtype, scope, component, comparison): the worst of each measure."""
    lines = ["| dtype | scope | comparisons | worst headroom | at | worst normwise | worst max abs | at |",
             "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["dtype"], r["scope"]) for r in records}, key=lambda k: (k[0] != "float64", k))
    for dtype, scope in keys:
        h, n, m = _worst([r for r in records if (r["dtype"], r["scope"]) == (dtype, scope)])
        count = sum((r["dtype"], r["scope"]) == (dtype, scope) for r in records)
        lines.append(f"| {dtype} | {scope} | {count} | {h['headroom']:.3g} | {_at(h)} | {n['normwise']:.2e} | "
                     f"{m['max_abs']:.2e} | {_at(m)} |")
    lines += ["", "| dtype | scope | component | size | comparison | worst headroom | worst normwise | worst max abs "
              "| worst max rel |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["dtype"], r["scope"], r["component"], tuple(r["size"]), r["what"].split(" ")[0] + (
        " vs float64" if "reference" in r["what"] else " vs torch")) for r in records},
        key=lambda k: (k[0] != "float64", k))
    for dtype, scope, component, size, what in keys:
        group = [r for r in records if (r["dtype"], r["scope"], r["component"], tuple(r["size"])) ==
                 (dtype, scope, component, size) and r["what"].startswith(what.split(" ")[0])
                 and ("reference" in r["what"]) == what.endswith("float64")]
        h, n, m = _worst(group)
        rel = max(r["max_rel"] for r in group)
        lines.append(f"| {dtype} | {scope} | {component} | {size[0]}x{size[1]} | {what} | {h['headroom']:.3g} | "
                     f"{n['normwise']:.2e} | {m['max_abs']:.2e} | {rel:.2e} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch's device (Keras on JAX and "
                   "torch uses the GPU when it has one)")
    p.add_argument("--json", help="write every record")
    p.add_argument("--from-json", metavar="FILE", help="print the tables of a run saved with --json, measure nothing")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        with open(args.worker, "w") as fh:
            json.dump(_measure(args.seeds, args.device), fh)
        return 0
    import tempfile

    if args.from_json:
        with open(args.from_json) as fh:
            print("\n".join(_summary(json.load(fh))))
        return 0
    records = []
    for backend in args.backends.split(","):
        if importlib.util.find_spec(backend) is None:
            print(f"{backend}: not installed, skipped", file=sys.stderr)
            continue
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [sys.executable, __file__, "--worker", tmp.name, "--device", args.device,
                   "--seeds", *map(str, args.seeds)]
            subprocess.run(cmd, check=True, env=dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3"))
            with open(tmp.name) as fh:
                records += json.load(fh)
        print(f"{backend}: done", file=sys.stderr, flush=True)
    print("\n".join(_summary(records)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
