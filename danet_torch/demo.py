"""``danet-demo``: one DANet forward pass on random input, printing shapes and time."""

from __future__ import annotations

import argparse
import time

import torch

from .model import DANet


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="resnet101", choices=["resnet50", "resnet101"])
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--size", type=int, nargs=2, default=(129, 129), metavar=("H", "W"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = DANet(args.num_classes, backbone=args.backbone).eval()
    x = torch.randn(1, 3, *args.size)
    with torch.no_grad():
        start = time.perf_counter()
        outputs = model(x)
        elapsed = time.perf_counter() - start
    for name, y in zip(("fused", "pam", "cam"), outputs):
        print(f"{name:>5}: {tuple(y.shape)}")
    print(f"DANet-{args.backbone[6:]} forward, input {tuple(x.shape)}: {elapsed * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
