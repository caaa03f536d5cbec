"""PAM's attention core on a GPU: the kernels the efficient path could run, side by side.

PAM's q and k are ``C/8`` wide and v is ``C`` wide, a shape fused attention
kernels take in different ways: V split into heads of q/k's width (every
kernel; the energies and exponentials are recomputed ``8`` times), heads of
128 or 256 columns beside q/k's 64 (cuDNN's kernel; 4 or 2 times), q and k
zero-padded to the heads' width, one head (the memory-efficient kernel), or
a kernel of our own that splits V's columns over programs: the Pallas kernel
on JAX (``danet_keras._pam_pallas``) and a Triton kernel for torch in float32
(``pam_triton_float32.py``, not used by ``danet_torch``); and, in float32,
products over blocks of queries with the keys split into runs: cuBLAS'
(``danet_torch.pam.position_attention_split_k``), the same as three TF32
products each (``pam_split_k_tf32x3.py``, not used), and XLA's with its dot
algorithms (``danet_keras._pam_xla``). This script times each on the same
inputs, B = 2, C = 512, in one process (CUDA events in torch, wall clock
after ``block_until_ready`` on JAX; the median of ``--calls`` calls after
two warm-ups) with the peak memory above the inputs (torch; on JAX, for
XLA's blocks, the compiled program's temporaries and output), over our
kernels' tile sizes (the fastest printed), and checks the float32
candidates' first and last 256 queries against float64. TF32 is off
throughout, but for the products that ask for it. ``--only`` runs the rows
whose names match (and the official path's).

    python benchmarks/pam_gpu_kernels.py --framework torch --size 181
    python benchmarks/pam_gpu_kernels.py --framework jax --size 181

The efficient path's choices (``danet_torch.pam``, ``danet_keras.pam``) and
docs/BENCHMARKS.md rest on these figures.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import machine  # noqa: E402

__all__ = ["main"]

# (BLOCK_M, BLOCK_N, BLOCK_C, warps, stages) tried for pam_triton_float32.py (torch, float32) and
# danet_keras._pam_pallas (float32; half precision: PALLAS_HALF_TILES).
FLOAT32_TILES = ((128, 64, 128, 8, 2), (128, 64, 128, 8, 3), (64, 64, 128, 4, 2), (64, 64, 128, 4, 3),
                (64, 64, 256, 8, 2), (128, 32, 256, 8, 2), (128, 128, 128, 8, 2), (64, 32, 128, 4, 3))
PALLAS_HALF_TILES = ((128, 64, 256, 8, 2), (64, 64, 256, 4, 2), (128, 64, 128, 8, 3), (128, 128, 256, 8, 2))
# (rows, splits) tried for danet_torch.pam.position_attention_split_k (torch, float32 inference).
SPLIT_K_CONFIGS = ((256, 32), (256, 16), (384, 16), (384, 32), (192, 32), (128, 32), (128, 64), (320, 24))
# (rows, splits) tried for pam_split_k_tf32x3.py (torch, float32 inference; one image at a time).
TF32X3_CONFIGS = ((256, 32), (128, 32), (512, 16), (256, 16))
# (rows, splits, XLA's dot algorithm) tried for danet_keras._pam_xla (JAX, float32 inference).
XLA_BLOCKS_CONFIGS = (*((rows, splits, "TF32_TF32_F32_X3") for rows in (256, 512, 1024) for splits in (1, 8, 32)),
                      (256, 1, "BF16_BF16_F32_X6"), (512, 1, "BF16_BF16_F32_X6"), (256, 8, "BF16_BF16_F32_X6"))


def _median_row(name: str, times: list, *extra: str) -> float:
    """Print a table row, the median of ``times`` (ms) and ``extra`` columns; return the median."""
    median = sorted(times)[len(times) // 2]
    print("| " + " | ".join([name, f"{median:.2f}", *extra]) + " |")
    return median


def _refused_row(name: str, err: Exception, columns: int) -> float:
    """Print a row for a kernel that refused the inputs (or did not compile); return infinity."""
    reason = (str(err).splitlines() or [type(err).__name__])[0][:80]
    print("| " + " | ".join([name, f"refused: {reason}"] + [""] * (columns - 2)) + " |")
    return float("inf")


def _selected(args, name: str) -> bool:
    """Whether ``--only`` lets the row ``name`` run (the official path's rows always run)."""
    return not args.only or name.startswith("official") or any(re.search(p, name) for p in args.only)


def _rows():
    """The queries whose outputs are checked against float64: the first 256 and the last 256."""
    import numpy as np

    return np.r_[0:256, -256:0]


def _float64_rows(q, k, v):
    """``softmax(q k^T) v`` for :func:`_rows`'s queries in float64 NumPy; q, k, v tokens ``(B, N, C)``."""
    import numpy as np

    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    s = q[:, _rows()] @ k.transpose(0, 2, 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _jax_mib(compiled) -> float:
    """MiB of XLA's temporary buffers and output of a compiled program (``jax.jit(...).lower(...).compile()``)."""
    stats = compiled.memory_analysis()
    return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20


def _max_error(out, expected) -> str:
    import numpy as np

    return f"{np.abs(np.asarray(out, np.float64)[:, _rows()] - expected).max():.2e}"


def _torch(args) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    if not torch.cuda.is_available():
        raise SystemExit("pam_gpu_kernels.py --framework torch needs CUDA: no CUDA device on this machine.")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    n = args.size * args.size

    def inputs(dtype):
        g = torch.Generator(device="cuda").manual_seed(0)
        return [torch.randn(2, c, n, device="cuda", generator=g).to(dtype) for c in (64, 64, 512)]

    def report(name, fn):
        if not _selected(args, name):
            return float("inf")
        try:
            for _ in range(2):
                fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            times = []
            for _ in range(args.calls):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return _median_row(name, times, f"{peak:.0f}")
        except Exception as err:  # noqa: BLE001 - a kernel that refuses the inputs or does not compile
            return _refused_row(name, err, 3)

    # The split of danet_torch.pam._sdpa_heads without its final reshape to (B, N, C): the table gives each
    # kernel's own time and memory (the efficient path's rows in pam_benchmark.py include that copy).
    def heads(q, k, v, width, backend=None, pad=False):
        b, ck, _ = q.shape
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)
        if pad and width > ck:
            qt, kt = F.pad(qt, (0, width - ck)), F.pad(kt, (0, width - ck))
        count, d = v.shape[1] // width, qt.shape[-1]
        qh = qt.unsqueeze(1).expand(b, count, n, d).contiguous()
        kh = kt.unsqueeze(1).expand(b, count, n, d).contiguous()
        vh = v.transpose(1, 2).reshape(b, n, count, width).transpose(1, 2).contiguous()
        if backend is None:
            return F.scaled_dot_product_attention(qh, kh, vh, scale=1.0)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(qh, kh, vh, scale=1.0)

    if "bfloat16" in args.dtypes:
        _torch_bfloat16(args, inputs, report, heads)
    if "float32" in args.dtypes:
        _torch_float32(args, inputs, report, heads)


def _torch_bfloat16(args, inputs, report, heads) -> None:
    import torch
    from torch.nn.attention import SDPBackend

    from danet_torch import pam

    print(f"\nbfloat16 forward, B = 2, {args.size} x {args.size}, C = 512\n")
    print("| kernel | ms | MiB above the inputs |\n|---|---|---|")
    q, k, v = inputs(torch.bfloat16)
    with torch.no_grad():
        report("official: bmm + softmax", lambda: pam.position_attention_official(q, k, v))
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            report(f"SDPA, 8 heads of 64, {backend.name}", lambda: heads(q, k, v, 64, backend))
        for width in (128, 256):
            for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                report(f"SDPA, q/k 64, heads of {width}, {backend.name}", lambda: heads(q, k, v, width, backend))
            report(f"SDPA, q/k padded to {width}, heads of {width}, default", lambda: heads(q, k, v, width, pad=True))
        report("SDPA, one head of 512, EFFICIENT_ATTENTION",
               lambda: heads(q, k, v, 512, SDPBackend.EFFICIENT_ATTENTION))
        report("danet_torch efficient path", lambda: pam.position_attention_efficient(q, k, v))


def _torch_float32(args, inputs, report, heads) -> None:
    import torch
    from torch.nn.attention import SDPBackend

    import pam_split_k_tf32x3 as split_k_tf32x3
    import pam_triton_float32 as triton_kernel

    from danet_torch import pam

    n = args.size * args.size
    print(f"\nfloat32 forward, B = 2, {args.size} x {args.size}, C = 512\n")
    print("| kernel | ms | MiB above the inputs |\n|---|---|---|")
    q, k, v = inputs(torch.float32)
    with torch.no_grad():
        report("official: bmm + softmax", lambda: pam.position_attention_official(q, k, v))
        for elements in (1 << 22, 1 << 24):
            rows = max(1, elements // (2 * n))
            report(f"blocks of {rows} queries ({elements >> 20}M elements)",
                   lambda: pam.position_attention_blocks(q, k, v, rows))
        for width in (512, 256, 128):
            report(f"SDPA, q/k 64, heads of {width}, EFFICIENT_ATTENTION",
                   lambda: heads(q, k, v, width, SDPBackend.EFFICIENT_ATTENTION))
        times = {config: report(f"blocks of {config[0]} queries, keys in {config[1]} runs (split products)",
                                lambda config=config: pam.position_attention_split_k(q, k, v, *config))
                 for config in SPLIT_K_CONFIGS}
        fastest = [f"fastest torch float32 split products (rows, splits): {min(times, key=times.get)}"]
        for parts in ("explicit", "truncate", "nearest"):
            for config in TF32X3_CONFIGS:
                report(f"split products as three TF32 products, parts {parts}, {config[0]} queries, {config[1]} runs",
                       lambda config=config, parts=parts: split_k_tf32x3.position_attention_forward(
                           q, k, v, *config, parts=parts))
        tokens = [t.transpose(1, 2).cpu().numpy() for t in (q, k, v)]
        expected = _float64_rows(*tokens)
        for name, fn in (("official", pam.position_attention_official),
                         ("split products", pam.position_attention_split_k),
                         *((f"split products as three TF32 products, parts {parts}",
                            functools.partial(split_k_tf32x3.position_attention_forward, parts=parts))
                           for parts in ("explicit", "truncate", "nearest"))):
            error = _max_error(fn(q, k, v).transpose(1, 2).cpu().numpy(), expected)
            print(f"| {name}: largest error against float64, {2 * len(_rows())} rows | {error} | |")
        report("danet_torch efficient path", lambda: pam.position_attention_efficient(q, k, v))
        if triton_kernel.triton is None:
            print("| Triton kernel | not run: Triton is not installed | |")
            print("\n" + "\n".join(fastest))
            return
        times = {tiles: report(f"Triton kernel, tf32x3, tiles {tiles}",
                               lambda tiles=tiles: triton_kernel.position_attention_forward(q, k, v, tiles))
                 for tiles in FLOAT32_TILES}
        best = min(times, key=times.get)
        fastest.append(f"fastest torch float32 tiles: {best}")
        kt = k.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, C' contiguous
        report(f"Triton kernel, tf32x3, tiles {best}, k stored (B, N, C')",
               lambda: triton_kernel.position_attention_forward(q, kt, v, best))
        report(f"Triton kernel, ieee (CUDA cores), tiles {best}",
               lambda: triton_kernel.position_attention_forward(q, k, v, best, precision="ieee"))
        if _selected(args, "Triton kernel"):
            error = _max_error(triton_kernel.position_attention_forward(q, k, v).transpose(1, 2).cpu().numpy(),
                               expected)
            print(f"| Triton kernel: largest error against float64, {2 * len(_rows())} rows | {error} | |")
        print("\n" + "\n".join(fastest))


def _jax(args) -> None:
    os.environ.setdefault("KERAS_BACKEND", "jax")  # danet_keras imports Keras, whose default is TensorFlow
    import jax
    import jax.numpy as jnp
    import numpy as np

    from danet_keras import _pam_pallas

    if jax.devices()[0].platform != "gpu":
        raise SystemExit("pam_gpu_kernels.py --framework jax needs a GPU: JAX sees none on this machine.")
    jax.config.update("jax_default_matmul_precision", "highest")
    print(f"JAX {jax.__version__}, {jax.devices()[0].device_kind}")
    n = args.size * args.size
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((2, n, c)).astype(np.float32) for c in (64, 64, 512)]

    def report(name, fn, q, k, v, *extra):
        if not _selected(args, name):
            return float("inf")
        try:
            for _ in range(2):
                jax.block_until_ready(fn(q, k, v))
            times = []
            for _ in range(args.calls):
                start = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                times.append((time.perf_counter() - start) * 1e3)
            return _median_row(name, times, *extra)
        except Exception as err:  # noqa: BLE001 - a kernel that refuses the inputs or does not compile
            return _refused_row(name, err, 2 + len(extra))

    @jax.jit
    def official(q, k, v):
        energy = jnp.einsum("bnc,bmc->bnm", q, k, preferred_element_type=jnp.float32)
        return jnp.einsum("bnm,bmc->bnc", jax.nn.softmax(energy, -1).astype(v.dtype), v)

    def heads(width, implementation):
        def fn(q, k, v):
            count = v.shape[-1] // width
            qh, kh = (jnp.repeat(t[:, :, None], count, 2) for t in (q, k))
            out = jax.nn.dot_product_attention(qh, kh, v.reshape(2, n, count, width), scale=1.0,
                                               implementation=implementation)
            return out.reshape(v.shape)
        return jax.jit(fn)

    def pallas(tiles):
        return lambda q, k, v: _pam_pallas.position_attention_forward(q, k, v, *tiles)

    if "bfloat16" in args.dtypes:
        half = [jnp.asarray(t, jnp.bfloat16) for t in data]
        print(f"\nbfloat16 forward, B = 2, {args.size} x {args.size}, C = 512\n")
        print("| kernel | ms |\n|---|---|")
        report("official: matmul + softmax (float32)", official, *half)
        for width in (64, 256):
            for implementation in ("cudnn", None):
                report(f"dot_product_attention, q/k 64, heads of {width}, implementation={implementation}",
                       heads(width, implementation), *half)
        times = {tiles: report(f"Pallas kernel, tiles {tiles}", pallas(tiles), *half) for tiles in PALLAS_HALF_TILES}
        print(f"\nfastest jax half tiles: {min(times, key=times.get)}\n")
    if "float32" in args.dtypes:
        from danet_keras import _pam_xla, pam

        full = [jnp.asarray(t) for t in data]
        print(f"\nfloat32 forward, B = 2, {args.size} x {args.size}, C = 512\n")
        print("| kernel | ms |\n|---|---|")
        report("official: matmul + softmax", official, *full)
        report("blocks (the float32 path before the kernel)", jax.jit(pam.position_attention_blocks), *full)
        times = {tiles: report(f"Pallas kernel, TF32x3, tiles {tiles}", pallas(tiles), *full)
                 for tiles in FLOAT32_TILES}
        print(f"\nfastest jax float32 tiles: {min(times, key=times.get)}\n")
        x3 = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
        report("matmul + softmax (N x N), products TF32_TF32_F32_X3", jax.jit(lambda q, k, v: jnp.einsum(
            "bnm,bmc->bnc", jax.nn.softmax(jnp.einsum("bnc,bmc->bnm", q, k, precision=x3), -1), v, precision=x3)),
            *full)
        print("\nXLA's blocks (danet_keras._pam_xla), B * rows * N elements per block; MiB: XLA's temporary "
              "buffers and the output\n\n| kernel | ms | MiB |\n|---|---|---|")
        times = {}
        for rows, splits, algorithm in XLA_BLOCKS_CONFIGS:
            name = f"XLA's blocks of {rows} queries, keys in {splits} run{'s' * (splits > 1)}, products {algorithm}"
            fn = functools.partial(_pam_xla.position_attention_forward, rows=rows, splits=splits, algorithm=algorithm)
            try:  # compiled once: timed and its memory read
                fn = _pam_xla.position_attention_forward.lower(*full, rows=rows, splits=splits,
                                                               algorithm=algorithm).compile()
                mib = _jax_mib(fn)
            except Exception:  # noqa: BLE001 - report() says why, calling the uncompiled function
                mib = float("nan")
            times[(rows, splits, algorithm)] = (report(name, fn, *full, f"{mib:.0f}"), mib)
        within = [c for c, (_, mib) in times.items() if mib <= 256]
        best = min(within or times, key=lambda c: times[c][0])
        print(f"\nfastest jax float32 XLA blocks within 256 MiB (rows, splits, algorithm): {best}")
        print(f"XLA_BLOCKS_ELEMENTS {2 * best[0] * n} {best[1]} {best[2]}\n")
        expected = _float64_rows(*data)
        for name, fn in (("official", official), ("Pallas kernel", _pam_pallas.position_attention_forward),
                         (f"XLA's blocks {best}", functools.partial(
                             _pam_xla.position_attention_forward, rows=best[0], splits=best[1], algorithm=best[2]))):
            if not _selected(args, name):
                continue
            print(f"| {name}: largest error against float64, {2 * len(_rows())} rows | "
                  f"{_max_error(fn(*full), expected)} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=["torch", "jax"], default="torch")
    p.add_argument("--size", type=int, default=181, help="H = W of the feature map")
    p.add_argument("--calls", type=int, default=8, help="timed calls per kernel (median)")
    p.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32"], default=["bfloat16", "float32"])
    p.add_argument("--only", nargs="+", default=None, metavar="REGEX",
                   help="run only the rows whose names match one of these (and the official path's)")
    args = p.parse_args(argv)
    print(machine())
    if args.framework == "torch":
        _torch(args)
    else:
        _jax(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
