"""Helpers shared by the test files: layouts, comparisons, torch-layout weights for Keras layers.

Test files import from here (never from each other). Nothing here imports a
framework at import time: torch and Keras are imported inside the functions
that need them.
"""

from __future__ import annotations

import numpy as np

from weights_convert.tolerances import compare, tolerance

__all__ = ["check", "nhwc", "nchw", "to_numpy", "subnormal_products", "state_numpy", "resolve", "set_torch_weights",
           "pam_state_dict", "dual_state_dict", "head_state_dict", "border_points", "check_segmentation", "RESNET_STAGES",
           "imagenet_resnet_state_dict", "reference_dilated_resnet", "PALETTE", "make_segmentation_folder",
           "PickleMarker", "hostile_pth"]

BN_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance",
            "num_batches_tracked": "num_batches_tracked"}


def check(name, actual, expected, dtype="float32", scope="layer"):
    """Assert ``actual`` equals ``expected`` within the table's ``(dtype, scope)`` tolerance."""
    result = compare(name, actual, expected, tolerance(dtype, scope))
    assert result.passed, result.message()


def subnormal_products(run) -> tuple[int, int]:
    """Run ``run()`` and count torch's matrix products: ``(all, those with a subnormal number in an operand)``.

    CPUs multiply subnormal numbers tens of times slower than normal ones.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    products = {aten.bmm.default, aten.bmm.out, aten.baddbmm.default, aten.baddbmm.out, aten.baddbmm_.default,
                aten.mm.default, aten.mm.out, aten.addmm.default, aten.addmm.out}
    counts = [0, 0]

    def subnormal(t):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return False
        a = t.detach().abs()
        return bool(((a > 0) & (a < torch.finfo(t.dtype).tiny)).any())

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in products:
                counts[0] += 1
                counts[1] += any(subnormal(t) for t in args)
            return func(*args, **(kwargs or {}))

    with Watch():
        run()
    return counts[0], counts[1]


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


# -- ImageNet ResNets in torchvision/timm key format, and a reference dilated ResNet ------------------------
# Written here from the published key layout (torchvision's resnet50/resnet101), apart from
# weights_convert.backbone, so the tests check the reader against an independent description.
RESNET_STAGES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def imagenet_resnet_state_dict(rng, depth=50, deep_stem=False, stem_widths=(64, 64, 128), fc=True,
                               num_batches_tracked=True, dtype="float32"):
    """Random ResNet-``depth`` weights with torchvision's keys (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``,
    ..., ``fc.*``), NumPy arrays. ``deep_stem``: ``conv1.0/.3/.6`` convs ``stem_widths`` wide (BN ``conv1.1/.4``)."""
    sd = {}

    def conv(name, o, i, k):
        sd[f"{name}.weight"] = rng.normal(0, 1 / np.sqrt(i * k * k), (o, i, k, k)).astype(dtype)

    def bn(name, c, scale=(0.5, 1.0)):
        sd[f"{name}.weight"] = rng.uniform(*scale, c).astype(dtype)
        sd[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(dtype)
        sd[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype(dtype)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(dtype)
        if num_batches_tracked:
            sd[f"{name}.num_batches_tracked"] = np.array(int(rng.integers(1, 1000)), np.int64)

    if deep_stem:
        a, b, c = stem_widths
        conv("conv1.0", a, 3, 3), bn("conv1.1", a), conv("conv1.3", b, a, 3), bn("conv1.4", b), conv("conv1.6", c, b, 3)
        inplanes = c
    else:
        conv("conv1", 64, 3, 7)
        inplanes = 64
    bn("bn1", inplanes)
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), RESNET_STAGES[depth]), start=1):
        for j in range(n):
            p = f"layer{li}.{j}"
            conv(f"{p}.conv1", planes, inplanes, 1), bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4, scale=(0.1, 0.3))
            if j == 0:
                conv(f"{p}.downsample.0", planes * 4, inplanes, 1), bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    if fc:
        sd["fc.weight"] = rng.normal(0, 0.02, (1000, 2048)).astype(dtype)
        sd["fc.bias"] = np.zeros(1000, dtype)
    return sd


def reference_dilated_resnet(sd, x, stages):
    """The features ``(c1, c2, c3, c4)`` of a 7x7-stem dilated ResNet in eval mode, from plain
    ``torch.nn.functional`` ops on ImageNet-format weights ``sd`` (NumPy), in float64.

    ``stages``: per stage ``(stride, [dilation of each block])``; stride and dilation sit on
    each block's 3x3 conv (ResNet v1.5), padding equals dilation.
    """
    import torch
    import torch.nn.functional as F

    w = {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in sd.items() if not k.endswith("tracked")}
    x = torch.from_numpy(np.asarray(x, np.float64))

    def bn(t, p):
        return F.batch_norm(t, w[f"{p}.running_mean"], w[f"{p}.running_var"], w[f"{p}.weight"], w[f"{p}.bias"],
                            training=False, eps=1e-5)

    x = F.relu(bn(F.conv2d(x, w["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    feats = []
    for li, (stride, dilations) in enumerate(stages, start=1):
        for j, d in enumerate(dilations):
            p, s = f"layer{li}.{j}", (stride if j == 0 else 1)
            out = F.relu(bn(F.conv2d(x, w[f"{p}.conv1.weight"]), f"{p}.bn1"))
            out = F.relu(bn(F.conv2d(out, w[f"{p}.conv2.weight"], stride=s, padding=d, dilation=d), f"{p}.bn2"))
            out = bn(F.conv2d(out, w[f"{p}.conv3.weight"]), f"{p}.bn3")
            identity = bn(F.conv2d(x, w[f"{p}.downsample.0.weight"], stride=s), f"{p}.downsample.1") \
                if f"{p}.downsample.0.weight" in w else x
            x = F.relu(out + identity)
        feats.append(x.numpy())
    return tuple(feats)


# -- a synthetic folder dataset (images/ + masks/) for the training tests ------------------------------------
PALETTE = np.array([[90, 90, 90], [220, 40, 40], [40, 80, 220], [40, 200, 60], [230, 210, 40]], np.uint8)


def make_segmentation_folder(root, n: int, size: int = 32, num_classes: int = 3, block: int = 8, seed: int = 0,
                             jpeg_every: int = 0, ignore_border: bool = True):
    """``root/images/NNN.png|jpg`` + ``root/masks/NNN.png``: ``block`` x ``block`` tiles of random classes, each
    class its own colour (``PALETTE``) plus noise; the first row of each mask is 255 (ignored) if ``ignore_border``.
    Every ``jpeg_every``-th image is a JPEG. Returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    tiles = size // block
    for i in range(n):
        ids = rng.choice(num_classes, size=(tiles, tiles), p=[0.5] + [0.5 / (num_classes - 1)] * (num_classes - 1))
        mask = np.kron(ids, np.ones((block, block), np.int64)).astype(np.uint8)
        image = PALETTE[mask].astype(np.float64) + rng.normal(0, 20, (size, size, 3))
        image = np.clip(image, 0, 255).astype(np.uint8)
        if ignore_border:
            mask[0] = 255
        ext = ".jpg" if jpeg_every and i % jpeg_every == jpeg_every - 1 else ".png"
        Image.fromarray(image).save(root / "images" / f"{i:03d}{ext}")
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
    return root


# -- a hostile .pth: its pickle runs code when loaded unsafely -------------------------------------------------
class PickleMarker:
    """Unpickling this calls ``open(path, "w")``: it creates the marker file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def hostile_pth(path, marker):
    """Write ``path``: CAM weights plus a :class:`PickleMarker` that creates ``marker`` if the file is unpickled
    with code allowed (``torch.load(weights_only=False)``). Returns ``path``."""
    import torch

    import danet_torch as dt

    state = dict(dt.ChannelAttention(8).state_dict())
    state["payload"] = PickleMarker(marker)
    torch.save(state, path)
    return path
