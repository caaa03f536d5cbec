"""Helpers for tests and examples: random models with non-default statistics, mmseg-named checkpoints."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .arch import ArchSpec
from .importers import MMSEG_HEAD_MAP, MMSEG_STEM_MAP

__all__ = ["randomize_", "random_torch_model", "to_mmseg_names", "SMALL_SPECS"]

# Every architecture, with small channel counts where the architecture allows.
SMALL_SPECS = {
    "pam": ArchSpec("pam", in_channels=16),
    "cam": ArchSpec("cam", in_channels=16),
    "dual_attention": ArchSpec("dual_attention", in_channels=64),
    "dual_attention_custom": ArchSpec("dual_attention", in_channels=32, inter_channels=16, out_channels=24),
    "head": ArchSpec("head", in_channels=64, num_classes=5),
}


def randomize_(module, seed: int = 0, gamma: float | None = None):
    """Give every parameter and BatchNorm statistic of a torch ``module`` non-default random values, in place.

    Weights ``N(0, 1/fan_in)``; BatchNorm running means ``N(0, 0.01)``,
    variances in ``[0.5, 1.5)``, ``num_batches_tracked`` in ``[1, 1000)``;
    the attention gammas ``gamma`` if given, else uniform in ``[0.5, 1.5)``.
    Returns ``module``.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma") and p.numel() == 1:
                p.fill_(gamma if gamma is not None else 0.5 + torch.rand(1, generator=g).item())
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                b.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
    return module


def random_torch_model(spec: ArchSpec, seed: int = 0):
    """``spec``'s torch model (eval mode) with :func:`randomize_` weights."""
    return randomize_(spec.build_torch(initialize=False), seed=seed)


def to_mmseg_names(neutral, stem_channels: int | None = None, aux: bool = True, meta: bool = True):
    """An mmseg DANet checkpoint dict (``state_dict`` + ``meta``) from our DANet/DANetHead names.

    ``stem_channels=64`` replaces the deep stem by mmseg ResNetV1c's default
    (3->32->32->64), which does not match ours; ``None`` keeps our shapes.
    """
    inv_head = {v: k for k, v in MMSEG_HEAD_MAP.items()}
    inv_stem = {v: k for k, v in MMSEG_STEM_MAP.items()}
    rng = np.random.default_rng(0)
    out = OrderedDict()
    for key, value in neutral.items():
        head_key = key[len("head."):] if key.startswith("head.") else (None if key.startswith("pretrained.") else key)
        if head_key is not None:
            for ours, theirs in inv_head.items():
                if head_key.startswith(ours):
                    new = theirs + head_key[len(ours):]
                    if theirs.endswith("gamma.scale"):
                        value = np.asarray(value).reshape(())
                    out["decode_head." + new] = value
                    break
            else:
                raise KeyError(key)
            continue
        rest = key[len("pretrained."):]
        for ours, idx in inv_stem.items():
            if rest.startswith(ours + "."):
                rest = f"stem.{idx}{rest[len(ours):]}"
                break
        out["backbone." + rest] = value
    if stem_channels is not None:
        half = stem_channels // 2
        shapes = {"stem.0.weight": (half, 3, 3, 3), "stem.3.weight": (half, half, 3, 3),
                  "stem.6.weight": (stem_channels, half, 3, 3), "layer1.0.conv1.weight": (64, stem_channels, 1, 1),
                  "layer1.0.downsample.0.weight": (256, stem_channels, 1, 1)}
        for n, c in (("stem.1", half), ("stem.4", half), ("stem.7", stem_channels)):
            for p in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{n}.{p}"] = (c,)
        for k, s in shapes.items():
            if "backbone." + k in out:
                out["backbone." + k] = rng.standard_normal(s).astype(np.float32)
    if aux:
        out["auxiliary_head.convs.0.conv.weight"] = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
        out["auxiliary_head.convs.0.bn.weight"] = np.ones(8, np.float32)
        out["auxiliary_head.conv_seg.weight"] = rng.standard_normal((5, 8, 1, 1)).astype(np.float32)
        out["auxiliary_head.conv_seg.bias"] = np.zeros(5, np.float32)
    ckpt = {"state_dict": out}
    if meta:
        ckpt["meta"] = {"mmseg_version": "1.2.2", "iter": 80000, "CLASSES": ["a", "b"]}
    return ckpt
