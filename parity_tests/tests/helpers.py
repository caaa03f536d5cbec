"""Helpers shared by the test files: layouts, comparisons, torch-layout weights for Keras layers.

Test files import from here (never from each other). Nothing here imports a
framework at import time: torch and Keras are imported inside the functions
that need them.
"""

from __future__ import annotations

import numpy as np

from weights_convert.tolerances import compare, tolerance

__all__ = ["check", "nhwc", "nchw", "to_numpy", "state_numpy", "resolve", "set_torch_weights",
           "pam_state_dict", "dual_state_dict", "head_state_dict", "border_points", "check_segmentation"]

BN_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance",
            "num_batches_tracked": "num_batches_tracked"}


def check(name, actual, expected, dtype="float32", scope="layer"):
    """Assert ``actual`` equals ``expected`` within the table's ``(dtype, scope)`` tolerance."""
    result = compare(name, actual, expected, tolerance(dtype, scope))
    assert result.passed, result.message()


def nhwc(x):
    """NCHW -> NHWC (a NumPy array)."""
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nchw(y):
    """NHWC (NumPy or a Keras tensor) -> NCHW NumPy."""
    import keras

    return np.transpose(keras.ops.convert_to_numpy(y), (0, 3, 1, 2))


def to_numpy(t) -> np.ndarray:
    """A torch tensor as NumPy (floats in float64)."""
    import torch

    return t.detach().cpu().to(torch.float64 if t.is_floating_point() else t.dtype).numpy()


def state_numpy(module) -> dict:
    """A torch module's state_dict as NumPy arrays (floats in float64)."""
    return {k: to_numpy(v) for k, v in module.state_dict().items()}


def resolve(root, key: str):
    """Walk a torch state_dict key on a Keras layer: returns ``(keras_variable, is_conv_kernel)``.

    Written here on purpose, apart from ``weights_convert.mapping``: the Keras
    tests check the mirror rule without the converter's table.
    """
    import danet_keras as dk

    *parts, leaf = key.split(".")
    obj = root
    for part in parts:
        obj = obj.layers[int(part)] if part.isdigit() else getattr(obj, part)
    if isinstance(obj, dk.BatchNorm):
        return getattr(obj, BN_NAMES[leaf]), False
    if isinstance(obj, dk.Conv2d):
        return (obj.kernel, True) if leaf == "weight" else (obj.bias, False)
    return getattr(obj, leaf), False


def set_torch_weights(root, sd) -> None:
    """Assign a torch-layout state_dict (NumPy arrays) to a built Keras layer."""
    for key, value in sd.items():
        var, is_kernel = resolve(root, key)
        value = np.asarray(value)
        if is_kernel:
            value = value.transpose(2, 3, 1, 0)
        assert tuple(var.shape) == value.shape, f"{key}: keras {tuple(var.shape)} vs torch {value.shape}"
        var.assign(value.astype(var.dtype))


def _conv(rng, o, i, k=1, bias=True):
    sd = {"weight": rng.normal(0, 1 / np.sqrt(i * k * k), (o, i, k, k))}
    if bias:
        sd["bias"] = rng.normal(0, 0.1, (o,))
    return sd


def _bn(rng, c):
    return {"weight": rng.uniform(0.5, 1.5, c), "bias": rng.normal(0, 0.1, c),
            "running_mean": rng.normal(0, 0.1, c), "running_var": rng.uniform(0.5, 1.5, c)}


def pam_state_dict(rng, c, reduction=8, gamma=0.7, prefix=""):
    """Random PositionAttention weights (torch names and layout)."""
    sd = {}
    for name, o in (("query_conv", c // reduction), ("key_conv", c // reduction), ("value_conv", c)):
        sd.update({f"{prefix}{name}.{k}": v for k, v in _conv(rng, o, c).items()})
    sd[f"{prefix}gamma"] = np.array([gamma])
    return sd


def dual_state_dict(rng, c, inter, out, reduction=8, gammas=(0.7, -0.4)):
    """Random DualAttention weights (torch names and layout)."""
    sd = {}
    for name, i, o in (("conv5a", c, inter), ("conv5c", c, inter), ("conv51", inter, out), ("conv52", inter, out)):
        sd[f"{name}.0.weight"] = _conv(rng, o, i, 3, bias=False)["weight"]
        sd.update({f"{name}.1.{k}": v for k, v in _bn(rng, o).items()})
    sd.update(pam_state_dict(rng, inter, reduction, gammas[0], prefix="sa."))
    sd["sc.gamma"] = np.array([gammas[1]])
    return sd


def head_state_dict(rng, c, num_classes, reduction=8):
    """Random DANetHead weights (torch names and layout)."""
    inter = c // 4
    sd = dual_state_dict(rng, c, inter, inter, reduction)
    for name in ("conv6", "conv7", "conv8"):
        sd.update({f"{name}.1.{k}": v for k, v in _conv(rng, num_classes, inter).items()})
    return sd


def border_points(h: int, w: int) -> list:
    """Query points on every corner and in the middle of every border of an ``h x w`` grid, plus an inner one."""
    rows, cols = (0, h // 2, h - 1), (0, w // 2, w - 1)
    pts = [(r, c) for r in rows for c in cols]
    return list(dict.fromkeys(pts))  # drop repeats when h or w is 1 or 2


def check_segmentation(name, labels, logits, tol=1e-3):
    """``labels`` (B, H, W) equals ``argmax(logits, axis=1)`` wherever the top two logits differ by > ``tol``."""
    logits = np.asarray(logits, dtype=np.float64)
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > tol
    labels = np.asarray(labels)
    assert labels.shape == clear.shape, f"{name}: shape {labels.shape}, expected {clear.shape}"
    assert clear.mean() > 0.9, f"{name}: too few clear-cut pixels to compare ({clear.mean():.2f})"
    wrong = (labels != logits.argmax(axis=1)) & clear
    assert not wrong.any(), f"{name}: {int(wrong.sum())} of {int(clear.sum())} clear-cut pixels differ"
