"""A whole DANet training step with PAM's official and efficient paths: peak memory and time.

One step is the forward pass in training mode, upstream's loss (the sum of
the three outputs' cross-entropies) and the backward pass for every weight.
Each measurement runs in a fresh process, official and efficient
alternating (``--repeats`` times, medians reported); in each process the
model is built, one step runs as warm-up (tracing and compiling included),
then the peak memory of the next step above the memory in use before it and
the median time of ``--calls`` steps are taken (``measure.py``).

    python benchmarks/danet_step_benchmark.py --size 256 --batch 2
    KERAS_BACKEND=jax python benchmarks/danet_step_benchmark.py --framework keras --size 256 --batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import CpuMemory, keras_memory, machine, processes, run_pairs, time_calls  # noqa: E402

__all__ = ["main"]


def _torch_case(args) -> dict:
    import torch

    from danet_torch import DANet, danet_loss

    torch.manual_seed(0)
    model = DANet(args.classes, backbone=args.backbone, pam_path=args.path).train()
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, args.classes, (args.batch, args.size, args.size))

    def step():
        model.zero_grad(set_to_none=True)
        danet_loss(model(x), target).backward()

    step()
    memory = CpuMemory()
    memory.reset()
    step()
    return {"ms": time_calls(step, args.calls), "peak_mib": memory.peak(), "versions": f"torch {torch.__version__}"}


def _keras_step(model, x, y):
    """One training step's loss and gradients, as ``fit`` would run it on the current backend."""
    import keras

    backend = keras.backend.backend()
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss_of(outputs):
        return sum(ce(y, o) for o in outputs)

    if backend == "jax":
        import jax

        def loss_fn(tv, ntv):
            outputs, ntv = model.stateless_call(tv, ntv, x, training=True)
            return loss_of(outputs), ntv

        grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

        def step():
            (loss, ntv), grads = grad([v.value for v in model.trainable_variables],
                                      [v.value for v in model.non_trainable_variables])
            return [loss] + list(grads)

        return step
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def tf_step():
            with tf.GradientTape() as tape:
                loss = loss_of(model(x, training=True))
            return [loss] + tape.gradient(loss, model.trainable_variables)

        return tf_step

    def torch_step():
        for v in model.trainable_variables:
            v.value.grad = None
        loss = loss_of(model(x, training=True))
        loss.backward()
        return [loss]

    return torch_step


def _keras_case(args) -> dict:
    import keras
    import numpy as np

    import danet_keras as dk

    if keras.backend.backend() == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    keras.utils.set_random_seed(0)
    model = dk.DANet(args.classes, backbone=args.backbone, pam_path=args.path)
    model.build((None, args.size, args.size, 3))
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.standard_normal((args.batch, args.size, args.size, 3)).astype("float32"))
    y = keras.ops.convert_to_tensor(rng.integers(0, args.classes, (args.batch, args.size, args.size)))
    train_step = _keras_step(model, x, y)

    def step():
        keras.tree.map_structure(lambda t: keras.ops.convert_to_numpy(keras.ops.sum(t)), train_step())

    step()
    memory = keras_memory()
    memory.reset()
    step()
    return {"ms": time_calls(step, args.calls), "peak_mib": memory.peak(),
            "versions": f"keras {keras.__version__} ({keras.backend.backend()})"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=["torch", "keras"], default="torch")
    p.add_argument("--backbone", choices=["resnet50", "resnet101"], default="resnet50")
    p.add_argument("--size", type=int, default=256, help="input crop, H = W")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per path (medians reported)")
    p.add_argument("--calls", type=int, default=1, help="timed steps per process (median)")
    p.add_argument("--json", default=None)
    p.add_argument("--one-case", metavar="PATH", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one_case:
        args.path = args.one_case
        result = _keras_case(args) if args.framework == "keras" else _torch_case(args)
        print("RESULT " + json.dumps(result))
        return 0
    case = ["--framework", args.framework, "--backbone", args.backbone, "--size", str(args.size), "--batch",
            str(args.batch), "--classes", str(args.classes), "--calls", str(args.calls)]
    pair = run_pairs(__file__, case, args.repeats)
    o, e = pair["official"], pair["efficient"]
    print(f"{args.framework}, DANet {args.backbone}, B={args.batch}, {args.size}x{args.size}, {args.classes} classes, "
          f"{pair['versions']}; {machine()}; {processes(args.repeats)} per path")
    print()
    print("| PAM path | step ms | peak MiB |")
    print("|---|---|---|")
    for name, r in (("official", o), ("efficient (default)", e)):
        note = f" ({r['error']})" if r["error"] else ""
        print(f"| {name} | {r['ms']:.0f} | {r['peak_mib']:.0f}{note} |")
    print(f"\nefficient / official: time {e['ms'] / o['ms']:.2f}, memory {e['peak_mib'] / o['peak_mib']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(pair, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
