"""Where Keras-TensorFlow's PAM attention spends its forward+backward time, operation by operation.

The attention alone (q, k, v given, ``(1, N, C/8)``, ``(1, N, C/8)``,
``(1, N, C)``, standard normal), the loss ``sum(y * y)`` and its gradients for
q, k and v, in one graph (``tf.compat.v1`` session) run with one inter-op
thread, so that the operations' times add up instead of overlapping. For the
official path and for the blocks with each ``--backward-rows`` (keys per block
of the backward pass; the forward pass keeps its default rows unless
``--both``): the median wall time of ``--calls`` runs, then from TensorFlow's
step statistics of one more run the time per kind of operation (products,
softmax, exp, ...) summed over the graph.

    KERAS_BACKEND=tensorflow python benchmarks/tf_pam_ops.py --size 96 --backward-rows 439 1536
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _kind(label: str) -> str:
    """``"_MklEinsum"``, ``"Exp"``, ... from a step-statistics label ``"[...] name = Op(inputs)"``."""
    return label.split(" = ")[-1].split("(")[0] if " = " in label else label


def measure(tf, pam, size: int, channels: int, path: str, rows, both: bool, calls: int) -> tuple[float, dict]:
    import numpy as np

    n = size * size
    rng = np.random.default_rng(0)
    values = [rng.standard_normal((1, n, c)).astype("float32") for c in (channels // 8, channels // 8, channels)]
    graph = tf.Graph()
    with graph.as_default():
        q, k, v = (tf.compat.v1.placeholder(tf.float32, x.shape) for x in values)
        if path == "official":
            y = pam.position_attention_official(q, k, v)
        else:
            y = pam.position_attention_blocks(q, k, v, rows=rows if both else None, backward_rows=rows)
        grads = tf.gradients(tf.reduce_sum(y * y), [q, k, v])
    feed = dict(zip((q, k, v), values))
    config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=1)
    with tf.compat.v1.Session(graph=graph, config=config) as session:
        session.run(grads, feed)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            session.run(grads, feed)
            times.append(time.perf_counter() - start)
        metadata = tf.compat.v1.RunMetadata()
        session.run(grads, feed, options=tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE),
                    run_metadata=metadata)
    kinds = collections.Counter()
    for device in metadata.step_stats.dev_stats:
        for node in device.node_stats:
            kinds[_kind(node.timeline_label)] += node.all_end_rel_micros / 1e3
    return statistics.median(times) * 1e3, dict(kinds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=96, help="H = W of the feature map")
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--backward-rows", type=int, nargs="*", default=[],
                   help="keys per block of the backward pass, one measurement each (none: the default rule)")
    p.add_argument("--both", action="store_true", help="the forward pass's blocks of the same rows too")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--top", type=int, default=10, help="kinds of operation listed per measurement")
    args = p.parse_args(argv)
    for name, value in (("--size", args.size), ("--channels", args.channels), ("--calls", args.calls)):
        if value < 1:
            p.error(f"{name} must be a positive integer, got {value}")
    if any(r < 1 for r in args.backward_rows):
        p.error(f"--backward-rows must be positive integers, got {args.backward_rows}")

    import keras
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        p.error(f"needs KERAS_BACKEND=tensorflow, got {keras.backend.backend()!r}")
    from danet_keras import pam

    cases = [("official", None)] + [("blocks", r) for r in (args.backward_rows or [None])]
    base = None
    for path, rows in cases:
        ms, kinds = measure(tf, pam, args.size, args.channels, path, rows, args.both, args.calls)
        base = base or ms
        label = path if path == "official" else f"blocks, backward rows {rows or 'default'}"
        print(f"{label}: {ms:.1f} ms ({ms / base:.3f}x), operations {sum(kinds.values()):.1f} ms")
        for kind, total in sorted(kinds.items(), key=lambda item: -item[1])[:args.top]:
            print(f"    {total:8.1f} ms  {kind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
