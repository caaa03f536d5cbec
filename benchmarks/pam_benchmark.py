"""PAM's official and efficient paths: time and peak memory, forward and forward+backward.

Every measurement runs in a fresh process, and the two paths alternate
(official, efficient, efficient, official, ...) ``--repeats`` times; the
table gives the medians, their quotients, and the paired time ratio: the
median over the repeats of each repeat's efficient / official time, which a
drift of a shared machine's speed over the run reaches less. In each process
the ``PositionAttention`` layer (C channels, C/8 query/key channels, gamma 1)
is built and run once at full size (warm-up: tracing and compiling
included), then:

* peak memory: the first measured call's peak above the memory in use just
  before it. CPU: resident memory (``VmHWM`` after ``/proc/self/clear_refs``
  and ``malloc_trim``, less ``VmRSS``), except Keras on TensorFlow, whose
  allocator keeps freed memory: its own peak bytes in use
  (``tf.config.experimental.get_memory_info``). GPU: ``torch.cuda.max_memory_allocated``
  (torch, Keras on torch), JAX's ``peak_bytes_in_use``, TensorFlow's
  ``get_memory_info("GPU:0")``.
* time: the median of ``--calls`` further calls.

"fwd" is inference as ``predict`` runs it: torch and Keras-on-torch eager under
``no_grad``/without a tape, Keras on TensorFlow in a ``tf.function``, on JAX
``jit(stateless_call)``.
"fwd+bwd" is the loss ``sum(y * y)`` and its gradients for the input and every
weight: torch autograd; Keras as ``fit`` would run it: TensorFlow
``tf.function`` + ``GradientTape``, JAX ``jit(value_and_grad)`` over
``stateless_call``, torch-backend autograd.

    python benchmarks/pam_benchmark.py --batch 1 --sizes 96 --dtypes float32
    KERAS_BACKEND=jax python benchmarks/pam_benchmark.py --framework keras --batch 1 --sizes 96 --dtypes float32
    python benchmarks/pam_benchmark.py --device cuda --batch 2 --sizes 64 128 181
    python benchmarks/pam_benchmark.py --device cuda --part core --batch 2 --sizes 181 --dtypes float32 bfloat16

Prints a Markdown table (``--json FILE`` also writes the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import CpuMemory, TorchCudaMemory, keras_memory, machine, processes, run_pairs, time_calls  # noqa: E402

__all__ = ["main"]


def _torch_case(args) -> dict:
    import torch

    from danet_torch import PositionAttention

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backward = args.mode == "fwd+bwd"
    if args.part == "core":  # q, k, v given: (B, C/8, N), (B, C/8, N), (B, C, N)
        from danet_torch.pam import position_attention

        n = args.size * args.size
        inputs = [(torch.randn(args.batch, c, n, device=device, dtype=dtype) * scale).requires_grad_(backward)
                  for c, scale in ((args.channels // 8, args.qk_scale), (args.channels // 8, args.qk_scale),
                                   (args.channels, 1.0))]
        call = lambda: position_attention(*inputs, path=args.path)  # noqa: E731
    else:
        pam = PositionAttention(args.channels, pam_path=args.path).to(device, dtype)
        with torch.no_grad():
            pam.gamma.fill_(1.0)
            for conv in (pam.query_conv, pam.key_conv):
                conv.weight.mul_(args.qk_scale)
        inputs = [torch.randn(args.batch, args.channels, args.size, args.size, device=device, dtype=dtype,
                              requires_grad=backward)] + list(pam.parameters())
        call = lambda: pam(inputs[0])  # noqa: E731

    def run():
        if backward:
            for t in inputs:
                t.grad = None
            y = call()
            (y.float() * y.float()).sum().backward()
        else:
            with torch.no_grad():
                call()
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()
    memory = TorchCudaMemory() if device.type == "cuda" else CpuMemory()
    memory.reset()
    run()
    peak = memory.peak()
    return {"ms": time_calls(run, args.calls), "peak_mib": peak, "versions": f"torch {torch.__version__}"}


def _keras_step(layer, backward: bool):
    """A function ``x -> outputs`` that computes ``sum(y * y)`` and its gradients when ``backward``."""
    import keras

    backend = keras.backend.backend()
    ops = keras.ops

    def loss_of(y):
        y = ops.cast(y, "float32")
        return ops.sum(y * y)

    if not backward:
        if backend == "jax":
            import jax

            fn = jax.jit(lambda tv, ntv, x: layer.stateless_call(tv, ntv, x)[0])
            return lambda x: fn([v.value for v in layer.trainable_variables],
                                [v.value for v in layer.non_trainable_variables], x)
        if backend == "tensorflow":  # as `predict` runs it: one traced graph
            import tensorflow as tf

            return tf.function(lambda x: layer(x))
        import torch

        def torch_predict(x):  # as `predict` runs it: without autograd recording (its variables need gradients)
            with torch.no_grad():
                return layer(x)

        return torch_predict
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = loss_of(layer(x))
            return tape.gradient(loss, [x] + layer.trainable_variables)

        return step
    if backend == "jax":
        import jax

        def loss_fn(tv, x, ntv):
            return loss_of(layer.stateless_call(tv, ntv, x)[0])

        grad = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
        return lambda x: grad([v.value for v in layer.trainable_variables], x,
                              [v.value for v in layer.non_trainable_variables])

    def torch_step(x):
        for v in layer.trainable_variables:
            v.value.grad = None
        x = x.detach().requires_grad_(True)
        loss_of(layer(x)).backward()
        return [x.grad] + [v.value.grad for v in layer.trainable_variables]

    return torch_step


def _keras_core_step(path: str, backward: bool):
    """A function ``[q, k, v] -> outputs``: PAM's attention core, with the gradients of ``sum(y * y)`` when ``backward``."""
    import keras

    from danet_keras.pam import position_attention

    backend = keras.backend.backend()
    ops = keras.ops

    def loss_of(q, k, v):
        y = ops.cast(position_attention(q, k, v, path), "float32")
        return ops.sum(y * y)

    if backend == "jax":
        import jax

        fn = jax.jit(jax.grad(loss_of, argnums=(0, 1, 2)) if backward else lambda *t: position_attention(*t, path))
        return lambda x: fn(*x)
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def step(x):
            if not backward:
                return position_attention(*x, path)
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = loss_of(*x)
            return tape.gradient(loss, x)

        return step

    def torch_step(x):
        if not backward:
            return position_attention(*x, path)
        x = [t.detach().requires_grad_(True) for t in x]
        loss_of(*x).backward()
        return [t.grad for t in x]

    return torch_step


def _keras_case(args) -> dict:
    import keras
    import numpy as np

    from danet_keras import PositionAttention

    if keras.backend.backend() == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    keras.config.set_dtype_policy(args.dtype)
    rng = np.random.default_rng(0)
    if args.part == "core":  # q, k, v given: (B, N, C/8), (B, N, C/8), (B, N, C)
        n = args.size * args.size
        x = [keras.ops.convert_to_tensor(rng.standard_normal((args.batch, n, c)) * scale, dtype=args.dtype)
             for c, scale in ((args.channels // 8, args.qk_scale), (args.channels // 8, args.qk_scale),
                              (args.channels, 1.0))]
        step = _keras_core_step(args.path, args.mode == "fwd+bwd")
    else:
        pam = PositionAttention(pam_path=args.path)
        pam.build((None, None, None, args.channels))
        pam.gamma.assign(np.ones((1,), "float32"))
        for conv in (pam.query_conv, pam.key_conv):
            conv.kernel.assign(conv.kernel * args.qk_scale)
        x = keras.ops.convert_to_tensor(rng.standard_normal((args.batch, args.size, args.size, args.channels)),
                                        dtype=args.dtype)
        step = _keras_step(pam, args.mode == "fwd+bwd")

    def run():
        out = step(x)
        keras.tree.map_structure(lambda t: keras.ops.convert_to_numpy(keras.ops.sum(t)), out)  # waits for it

    run()
    memory = keras_memory()
    memory.reset()
    run()
    peak = memory.peak()
    return {"ms": time_calls(run, args.calls), "peak_mib": peak,
            "versions": f"keras {keras.__version__} ({keras.backend.backend()})"}


def overrides(args) -> str:
    """The block sizes a run sets instead of the packages' own, for the table's heading (empty where none)."""
    given = []
    if args.block_elements:
        given.append(f"BLOCK_ELEMENTS={args.block_elements}")
    if args.tf_backward_block_elements:
        given.append(f"TF_BACKWARD_BLOCK_ELEMENTS={args.tf_backward_block_elements}")
    if args.xla_blocks:
        given.append("_pam_xla ELEMENTS={}, SPLITS={}".format(*args.xla_blocks))
    return f", overriding {', '.join(given)}" if given else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=["torch", "keras"], default="torch")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="torch only; Keras runs on its backend's default device (a GPU when there is one)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96], help="H = W of the feature map")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--part", choices=["layer", "core"], default="layer",
                   help="layer: PositionAttention (convolutions, gamma, residual); core: the attention alone, "
                        "q, k, v given")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per path (medians reported)")
    p.add_argument("--calls", type=int, default=2, help="timed calls per process (median)")
    p.add_argument("--qk-scale", type=float, default=1.0,
                   help="multiply the query and key projections' weights (core: q and k) by this: energies "
                        "spread wider, as trained weights or Keras' default initialisation spread them")
    p.add_argument("--block-elements", type=int, default=None,
                   help="override BLOCK_ELEMENTS (attention elements per block) of the efficient path")
    p.add_argument("--tf-backward-block-elements", type=int, default=None,
                   help="override danet_keras.pam's TF_BACKWARD_BLOCK_ELEMENTS (Keras on TensorFlow: attention "
                        "elements per block of queries of the backward pass)")
    p.add_argument("--xla-blocks", nargs=2, type=int, default=None, metavar=("ELEMENTS", "SPLITS"),
                   help="override danet_keras._pam_xla's ELEMENTS and SPLITS (Keras on JAX, float32 on a GPU)")
    p.add_argument("--json", default=None)
    p.add_argument("--one-case", nargs=4, metavar=("PATH", "SIZE", "DTYPE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    least = [("--sizes", args.sizes, 1), ("--batch", [args.batch], 1), ("--channels", [args.channels], 8),
             ("--repeats", [args.repeats], 1), ("--calls", [args.calls], 1),
             ("--block-elements", [args.block_elements], 1),
             ("--tf-backward-block-elements", [args.tf_backward_block_elements], 1),
             ("--xla-blocks", args.xla_blocks or [], 1)]
    for name, values, low in least:
        values = [value for value in values if value is not None]  # options not given
        if any(value < low for value in values):
            why = " (the layer has C / 8 query/key channels)" if name == "--channels" else ""
            p.error(f"{name} takes integers >= {low}{why}, got {values if len(values) > 1 else values[0]}")
    if args.one_case:
        args.path, size, args.dtype, args.mode = args.one_case
        args.size = int(size)
        if args.block_elements:
            import importlib

            module = importlib.import_module("danet_keras.pam" if args.framework == "keras" else "danet_torch.pam")
            module.BLOCK_ELEMENTS = args.block_elements
        if args.tf_backward_block_elements:
            from danet_keras import pam

            pam.TF_BACKWARD_BLOCK_ELEMENTS = args.tf_backward_block_elements
        if args.xla_blocks:
            from danet_keras import _pam_xla

            _pam_xla.ELEMENTS, _pam_xla.SPLITS = args.xla_blocks
        result = _keras_case(args) if args.framework == "keras" else _torch_case(args)
        print("RESULT " + json.dumps(result))
        return 0
    rows, versions = [], ""
    common = ["--framework", args.framework, "--device", args.device, "--batch", str(args.batch), "--part", args.part,
              "--channels", str(args.channels), "--calls", str(args.calls), "--qk-scale", str(args.qk_scale)]
    if args.block_elements:
        common += ["--block-elements", str(args.block_elements)]
    if args.tf_backward_block_elements:
        common += ["--tf-backward-block-elements", str(args.tf_backward_block_elements)]
    if args.xla_blocks:
        common += ["--xla-blocks", *map(str, args.xla_blocks)]
    for size in args.sizes:
        for dtype in args.dtypes:
            for mode in args.modes:
                pair = run_pairs(__file__, [str(size), dtype, mode] + common, args.repeats)
                versions = pair["versions"] or versions
                o, e = pair["official"], pair["efficient"]
                rows.append({"size": f"{size}x{size}", "N": size * size, "dtype": dtype, "mode": mode,
                             "official_ms": o["ms"], "official_mib": o["peak_mib"], "efficient_ms": e["ms"],
                             "efficient_mib": e["peak_mib"], "time_ratio": e["ms"] / o["ms"],
                             "paired_time_ratio": pair["paired_ratio"],
                             "memory_ratio": e["peak_mib"] / o["peak_mib"] if o["peak_mib"] else float("nan"),
                             "error": o["error"] or e["error"]})
    scaled = f", q/k x {args.qk_scale:g}" if args.qk_scale != 1 else ""
    print(f"{args.framework}, {args.device}, {args.part}, B={args.batch}, C={args.channels}{scaled}{overrides(args)}, "
          f"{versions}; "
          f"{machine()}; {processes(args.repeats)} per path, {args.calls} timed calls each")
    print()
    print("| H x W | N | dtype | pass | official ms | official MiB | efficient ms | efficient MiB "
          "| time ratio | paired time ratio | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        note = f" ({r['error']})" if r["error"] else ""
        print(f"| {r['size']} | {r['N']} | {r['dtype']} | {r['mode']} | {r['official_ms']:.1f} | "
              f"{r['official_mib']:.1f} | {r['efficient_ms']:.1f} | {r['efficient_mib']:.1f} | "
              f"{r['time_ratio']:.2f} | {r['paired_time_ratio']:.2f} | {r['memory_ratio']:.3f}{note} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
