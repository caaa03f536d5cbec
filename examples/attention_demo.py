"""Inputs for ``danet-attention`` whose maps can be read by eye: a synthetic scene and a hand-built DANetHead.

Writes three files into ``--out``:

* ``scene.png`` (96 x 128): sky, road, two red cars far apart, a green tree.
* ``features.npy`` (64, 12, 16): "backbone" features at output stride 8
  (the ``align_corners=True`` grid of the image); channels 0..3 say which
  object a position belongs to (one-hot, plus noise), channels 4..63 are
  noisy mixtures of them.
* ``head.pth``: a ``DANetHead(64, 4)`` whose PAM query and key projections
  map each object's channel to its own direction, so ``q_i . k_j`` is large
  only where positions ``i`` and ``j`` show the same object; the classifiers
  read the object channels. CAM gets a seeded random ``conv5c``.

So a query on one car lights up both cars (PAM's long-range context), and
the segmentation shows the four objects. Then::

    python examples/attention_demo.py --out /tmp/attention-demo
    danet-attention /tmp/attention-demo/head.pth /tmp/attention-demo/scene.png \\
        --features /tmp/attention-demo/features.npy --points 60,28 30,96 84,64 8,64 \\
        --out docs/figures/attention.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import danet_torch as dt

__all__ = ["make_scene", "make_features", "make_head", "main", "CLASSES"]

CLASSES = ("sky", "road", "car", "tree")
COLORS = np.array([[0.55, 0.75, 0.95], [0.45, 0.45, 0.45], [0.85, 0.15, 0.15], [0.15, 0.6, 0.2]])
IMAGE_SIZE, FEATURE_SIZE, CHANNELS = (96, 128), (12, 16), 64


def make_scene(seed: int = 0):
    """``(image (H, W, 3) uint8, labels (H, W) int)``: sky, road, two cars, a tree."""
    h, w = IMAGE_SIZE
    yy, xx = np.mgrid[:h, :w]
    labels = np.where(yy < 44, 0, 1)
    labels[(yy - 60) ** 2 + (xx - 28) ** 2 <= 13 ** 2] = 2
    labels[(yy - 66) ** 2 + (xx - 104) ** 2 <= 11 ** 2] = 2
    labels[18:50, 82:110] = 3
    rng = np.random.default_rng(seed)
    image = COLORS[labels] + rng.normal(0, 0.02, (h, w, 3))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), labels


def make_features(labels, seed: int = 0) -> np.ndarray:
    """``(64, 12, 16)`` float32: the object one-hot at each feature position (sampled at its image
    position ``f * (H - 1) / (h - 1)``) in channels 0..3, noisy mixtures in 4..63."""
    (h, w), (fh, fw) = IMAGE_SIZE, FEATURE_SIZE
    rows = np.round(np.arange(fh) * (h - 1) / (fh - 1)).astype(int)
    cols = np.round(np.arange(fw) * (w - 1) / (fw - 1)).astype(int)
    onehot = np.eye(len(CLASSES))[labels[np.ix_(rows, cols)]].transpose(2, 0, 1)  # (4, fh, fw)
    rng = np.random.default_rng(seed)
    mix = rng.uniform(0, 1, (CHANNELS - 4, 4))
    rest = np.einsum("ck,khw->chw", mix, onehot) + rng.normal(0, 0.1, (CHANNELS - 4, fh, fw))
    feats = np.concatenate([onehot + rng.normal(0, 0.03, onehot.shape), rest])
    return feats.astype(np.float32)


def _identity_conv(conv, k: int, scale: float = 1.0):
    with torch.no_grad():
        conv.weight.zero_()
        centre = conv.weight.shape[-1] // 2
        for i in range(k):
            conv.weight[i, i, centre, centre] = scale
        if conv.bias is not None:
            conv.bias.zero_()


def make_head(seed: int = 0, sharpness: float = 3.0) -> dt.DANetHead:
    """The hand-built ``DANetHead(64, 4)`` described in the module docstring (eval mode)."""
    head = dt.DANetHead(CHANNELS, len(CLASSES)).eval()
    inter = head.inter_channels  # 16; PAM's query/key have 16 // 8 = 2 channels
    for seq in (head.conv5a, head.conv5c, head.conv51, head.conv52):
        bn = seq[1]
        bn.reset_running_stats()
        with torch.no_grad():
            bn.weight.fill_(1.0)
            bn.bias.zero_()
    _identity_conv(head.conv5a[0], inter)
    _identity_conv(head.conv51[0], inter)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.conv5c[0].weight.copy_(torch.randn(head.conv5c[0].weight.shape, generator=g) * 0.05)
        head.conv52[0].weight.zero_()  # the CAM branch is drawn, not needed for the segmentation
        angles = torch.arange(len(CLASSES)) * (torch.pi / 2)
        direction = torch.stack([torch.cos(angles), torch.sin(angles)])  # (2, 4): one direction per object
        for conv in (head.sa.query_conv, head.sa.key_conv):
            conv.weight.zero_()
            conv.weight[:, :len(CLASSES), 0, 0] = sharpness * direction
            conv.bias.zero_()
        _identity_conv(head.sa.value_conv, inter)
        head.sa.gamma.fill_(1.0)
        head.sc.gamma.fill_(0.5)
        for seq in (head.conv6, head.conv7, head.conv8):
            seq[1].weight.zero_()
            seq[1].bias.zero_()
            for k in range(len(CLASSES)):
                seq[1].weight[k, k, 0, 0] = 1.0
    return head


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for scene.png, features.npy, head.pth")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from PIL import Image

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image, labels = make_scene(args.seed)
    Image.fromarray(image).save(out / "scene.png")
    np.save(out / "features.npy", make_features(labels, args.seed))
    torch.save(make_head(args.seed).state_dict(), out / "head.pth")
    print(f"wrote {out / 'scene.png'}, {out / 'features.npy'}, {out / 'head.pth'}")
    return {"dir": out, "labels": labels}


if __name__ == "__main__":
    main()
