"""Helpers for tests and examples: random models with non-default statistics, mmseg-named checkpoints."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .arch import ArchSpec
from .importers import MMSEG_HEAD_MAP, MMSEG_STEM_MAP

__all__ = ["random_torch_model", "to_mmseg_names", "SMALL_SPECS"]

# Every architecture, with small channel counts where the architecture allows.
SMALL_SPECS = {
    "pam": ArchSpec("pam", channels=16),
    "cam": ArchSpec("cam", channels=16),
    "dual_attention": ArchSpec("dual_attention", channels=64),
    "dual_attention_custom": ArchSpec("dual_attention", channels=32, inter_channels=16, out_channels=24),
    "head": ArchSpec("head", channels=64, num_classes=5),
}


def random_torch_model(spec: ArchSpec, seed: int = 0):
    """``spec``'s torch model with random weights, non-zero gammas and non-default BatchNorm statistics."""
    import torch

    torch.manual_seed(seed)
    model = spec.build_torch()
    with torch.no_grad():
        for i, m in enumerate(model.modules()):
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(100 + i)
            elif hasattr(m, "gamma") and isinstance(m.gamma, torch.nn.Parameter):
                m.gamma.fill_(0.3 + 0.1 * (i % 5))
    return model


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
