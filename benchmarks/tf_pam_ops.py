"""Where Keras-TensorFlow's PAM attention spends its forward+backward time, operation by operation.

The attention alone (q, k, v given, ``(1, N, C/8)``, ``(1, N, C/8)``,
``(1, N, C)``, standard normal), the loss ``sum(y * y)`` and its gradients for
q, k and v, in one graph (``tf.compat.v1`` session) run with one inter-op
thread, so that the operations' times add up instead of overlapping. For the
official path and for the blocks with each ``--backward-rows`` (rows per block
of the backward pass: queries on TensorFlow; the forward pass keeps its
default rows unless ``--both``): the median wall time of ``--calls`` runs, the
cases' runs interleaved round by round (every graph built first), so that the
machine's drift reaches all of them alike, and the median of the rounds'
ratios to the official path; then from TensorFlow's step statistics of one
more run the time per kind of operation (products, softmax, exp, ...)
summed over the graph.

    KERAS_BACKEND=tensorflow python benchmarks/tf_pam_ops.py --size 96 --backward-rows 1024 1536
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import paired_ratio  # noqa: E402


def _kind(label: str) -> str:
    """``"_MklEinsum"``, ``"Exp"``, ... from a step-statistics label ``"[...] name = Op(inputs)"``."""
    return label.split(" = ")[-1].split("(")[0] if " = " in label else label


def build(tf, pam, values, path: str, rows, both: bool):
    """A session that runs the graph of one case: ``(session, gradients, feed)``, run once (warm-up)."""
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
    session = tf.compat.v1.Session(graph=graph, config=config)
    session.run(grads, feed)
    return session, grads, feed


def operation_times(tf, session, grads, feed) -> dict:
    """Milliseconds per kind of operation in one traced run, from TensorFlow's step statistics."""
    metadata = tf.compat.v1.RunMetadata()
    session.run(grads, feed, options=tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE),
                run_metadata=metadata)
    kinds = collections.Counter()
    for device in metadata.step_stats.dev_stats:
        for node in device.node_stats:
            kinds[_kind(node.timeline_label)] += node.all_end_rel_micros / 1e3
    return dict(kinds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=96, help="H = W of the feature map")
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--backward-rows", type=int, nargs="*", default=[],
                   help="rows per block of the backward pass, one measurement each (none: the default rule)")
    p.add_argument("--both", action="store_true", help="the forward pass's blocks of the same rows too")
    p.add_argument("--calls", type=int, default=7, help="timed runs per case, interleaved")
    p.add_argument("--top", type=int, default=10, help="kinds of operation listed per measurement")
    args = p.parse_args(argv)
    for name, value, low in (("--size", args.size, 1), ("--channels", args.channels, 8), ("--calls", args.calls, 1),
                             ("--top", args.top, 0)):
        if value < low:
            why = " (C / 8 query/key channels)" if name == "--channels" else ""
            p.error(f"{name} must be an integer >= {low}{why}, got {value}")
    if any(r < 1 for r in args.backward_rows):
        p.error(f"--backward-rows must be positive integers, got {args.backward_rows}")

    import keras
    import numpy as np
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        p.error(f"needs KERAS_BACKEND=tensorflow, got {keras.backend.backend()!r}")
    from danet_keras import pam

    cases = [("official", None)] + [("blocks", r) for r in (args.backward_rows or [None])]
    n = args.size * args.size
    rng = np.random.default_rng(0)
    values = [rng.standard_normal((1, n, c)).astype("float32")
              for c in (args.channels // 8, args.channels // 8, args.channels)]
    sessions = [build(tf, pam, values, path, rows, args.both) for path, rows in cases]
    times = [[] for _ in cases]
    for _ in range(args.calls):  # round by round, so that the machine's drift reaches every case alike
        for (session, grads, feed), case_times in zip(sessions, times):
            start = time.perf_counter()
            session.run(grads, feed)
            case_times.append((time.perf_counter() - start) * 1e3)
    for (path, rows), (session, grads, feed), case_times in zip(cases, sessions, times):
        kinds = operation_times(tf, session, grads, feed)
        session.close()
        ratio = paired_ratio(zip(times[0], case_times))
        label = path if path == "official" else f"blocks, backward rows {rows or 'default'}"
        print(f"{label}: {statistics.median(case_times):.1f} ms ({ratio:.3f}x), "
              f"operations {sum(kinds.values()):.1f} ms")
        for kind, total in sorted(kinds.items(), key=lambda item: -item[1])[:args.top]:
            print(f"    {total:8.1f} ms  {kind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
