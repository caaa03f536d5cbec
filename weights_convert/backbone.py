"""ImageNet ResNet-50/101 weights (torchvision / timm keys) as DANet's ``pretrained.*`` backbone.

torchvision's and timm's ResNets name their tensors as the official DANet
backbone does, less the ``pretrained.`` prefix, plus the ImageNet classifier
``fc.*``: ``conv1.weight`` (64, 3, 7, 7), ``bn1.*``, ``layer{1..4}.{i}.conv{1,2,3}.weight``,
``layer{1..4}.{i}.bn{1,2,3}.*``, ``layer{1..4}.0.downsample.{0.weight, 1.*}``,
``fc.weight`` (1000, 2048), ``fc.bias``. ResNet-50 has (3, 4, 6, 3) blocks,
ResNet-101 (3, 4, 23, 3). :func:`read_imagenet_backbone` reads such a file,
checks it strictly against the backbone of the requested depth and stem,
drops ``fc.*`` (with a note), adapts ``conv1`` to ``in_channels`` and returns
the tensors under their ``pretrained.*`` names.

Input-channel rule (timm's ``adapt_input_conv``, ``timm/models/_manipulate.py``):
``in_channels == 1`` sums the RGB filters; any other width ``c != 3`` repeats
them ``ceil(c / 3)`` times, keeps the first ``c`` and scales by ``3 / c``, so a
constant input gives the same response. Computed in float32 (float64 stays
float64), then cast back to the file's dtype.

Pure NumPy: no framework is imported here (``.pth`` files are read through
:func:`weights_convert.api.read_raw`, which imports torch when it reads one).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import ConvertError, StrictLoadError

__all__ = ["RESNET_BLOCKS", "BackboneLoadError", "imagenet_resnet_shapes", "adapt_input_conv",
           "read_imagenet_backbone", "IMAGE_MODES", "IMAGENET_MEAN", "IMAGENET_STD", "default_normalization"]

# The image readers' side of the rule (danet-train, examples/train_keras.py, danet-attention): the Pillow mode
# an image is read in for each input width, and its normalisation.
IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_STAGE_PLANES = (64, 128, 256, 512)
_DEEP_STEM_CONVS = ("conv1.0.weight", "conv1.3.weight", "conv1.6.weight")


class BackboneLoadError(StrictLoadError):
    """ImageNet weights that do not fit the requested backbone (missing, unexpected, mismatched keys)."""

    def _format(self, limit: int = 40) -> str:
        lines = super()._format(limit).splitlines()[:-1]  # drop danet-convert's CLI hint
        lines.append("Expected a torchvision/timm ResNet state dict (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, "
                     "..., `fc.*`) of the same depth and stem as the model.")
        return "\n".join(lines)


def _conv(name, o, i, k):
    return [(f"{name}.weight", (o, i, k, k))]


def _bn(name, c):
    return [(f"{name}.{p}", (c,)) for p in ("weight", "bias", "running_mean", "running_var")] + \
        [(f"{name}.num_batches_tracked", ())]


def imagenet_resnet_shapes(depth: int, deep_stem: bool = False, in_channels: int = 3) -> "OrderedDict[str, tuple]":
    """``{key: shape}`` of a ResNet-``depth`` backbone in torchvision's key format, without ``fc``.

    The order is ``state_dict()`` order. ``deep_stem`` gives the official deep
    stem (three 3x3 convs, 64, 64, 128 wide, as ``conv1.0/.3/.6`` with BN ``conv1.1/.4``).
    """
    if depth not in RESNET_BLOCKS:
        raise ValueError(f"`depth` must be one of {sorted(RESNET_BLOCKS)}, got {depth!r}.")
    if deep_stem:
        rows = (_conv("conv1.0", 64, in_channels, 3) + _bn("conv1.1", 64) + _conv("conv1.3", 64, 64, 3)
                + _bn("conv1.4", 64) + _conv("conv1.6", 128, 64, 3))
        inplanes = 128
    else:
        rows, inplanes = _conv("conv1", 64, in_channels, 7), 64
    rows += _bn("bn1", inplanes)
    for li, (planes, n) in enumerate(zip(_STAGE_PLANES, RESNET_BLOCKS[depth]), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            rows += (_conv(f"{p}.conv1", planes, inplanes, 1) + _bn(f"{p}.bn1", planes)
                     + _conv(f"{p}.conv2", planes, planes, 3) + _bn(f"{p}.bn2", planes)
                     + _conv(f"{p}.conv3", planes * 4, planes, 1) + _bn(f"{p}.bn3", planes * 4))
            if b == 0:
                rows += _conv(f"{p}.downsample.0", planes * 4, inplanes, 1) + _bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    return OrderedDict(rows)


def adapt_input_conv(weight: np.ndarray, in_channels: int) -> np.ndarray:
    """A first-conv ``weight`` ``(O, 3, k, k)`` for ``in_channels`` inputs, by timm's ``adapt_input_conv`` rule.

    1 channel: the sum over the RGB filters. ``c`` channels (``c != 3``): the
    RGB filters repeated ``ceil(c / 3)`` times, the first ``c`` kept, times ``3 / c``.
    3 channels: unchanged. The result has the dtype of ``weight``.
    """
    weight = np.asarray(weight)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"`in_channels` must be an int >= 1, got {in_channels!r}.")
    if weight.ndim != 4:
        raise ValueError(f"`weight` must be a 4-D conv weight (O, I, kH, kW), got shape {weight.shape}.")
    if in_channels == weight.shape[1]:
        return weight
    if weight.shape[1] != 3:
        raise ValueError(f"Can only adapt a 3-channel (RGB) first conv to `in_channels`={in_channels}; "
                         f"the weights' first conv has {weight.shape[1]} input channels {weight.shape}.")
    work = weight.astype(np.float64 if weight.dtype == np.float64 else np.float32)
    if in_channels == 1:
        out = work.sum(axis=1, keepdims=True)
    else:
        repeat = int(math.ceil(in_channels / 3))
        out = np.tile(work, (1, repeat, 1, 1))[:, :in_channels]
        out = out * (3 / float(in_channels))
    return np.ascontiguousarray(out.astype(weight.dtype))


def default_normalization(in_channels: int):
    """``(mean, std)`` per channel: ImageNet's for RGB; for other widths the same rule as :func:`adapt_input_conv`
    (1 channel: the RGB average; ``c`` channels: RGB repeated). Here, without torch, for every framework's reader."""
    if in_channels == 1:
        return (float(np.mean(IMAGENET_MEAN)),), (float(np.mean(IMAGENET_STD)),)
    reps = -(-in_channels // 3)
    return (IMAGENET_MEAN * reps)[:in_channels], (IMAGENET_STD * reps)[:in_channels]


def _unwrap(obj, notes: list, source: str):
    if not isinstance(obj, Mapping):
        raise ConvertError(f"{source} holds a {type(obj).__name__}, not a state dict; accepted: a dict of tensors, "
                           f"or a dict with a `state_dict` or `model` entry.")
    for entry in ("state_dict", "model"):
        if isinstance(obj.get(entry), Mapping):
            extras = [str(k) for k in obj if k != entry]
            notes.append(f"read the `{entry}` entry" + (f" (ignored: {', '.join(extras)})" if extras else ""))
            obj = obj[entry]
            break
    bad = [(k, type(v).__name__) for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ConvertError(f"{source}: the state dict has non-tensor entries (key, type) {bad[:5]}; accepted: "
                           f"tensors only, or a dict with a `state_dict` or `model` entry.")
    sd = OrderedDict((str(k), v) for k, v in obj.items())
    if sd and all(k.startswith("module.") for k in sd):
        sd = OrderedDict((k[len("module."):], v) for k, v in sd.items())
        notes.append("removed the `module.` prefix (DataParallel / DistributedDataParallel)")
    return sd


def _blocks(sd) -> tuple:
    return tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.") and k.count(".") >= 2})
                 for i in range(1, 5))


def _check_structure(sd, depth: int, deep_stem: bool, source: str) -> None:
    """The clear errors before the key-by-key check: a stem of the other kind, a ResNet of another depth."""
    file_deep = "conv1.0.weight" in sd
    if file_deep != deep_stem:
        if file_deep:
            widths = tuple(int(np.shape(sd[k])[0]) for k in _DEEP_STEM_CONVS if k in sd)
            raise ConvertError(
                f"{source} holds a deep-stem ResNet (three 3x3 stem convs `conv1.0/.3/.6`, widths {widths}; "
                f"timm's resnet50d/resnet101d use 32, 32, 64), but the model uses the 7x7 stem "
                f"(`deep_stem=False`); use weights of a 7x7-stem ResNet (torchvision's, timm's resnet50/resnet101).")
        shape = tuple(np.shape(sd["conv1.weight"])) if "conv1.weight" in sd else None
        raise ConvertError(f"{source} holds a 7x7-stem ResNet (`conv1.weight` {shape}), but the model uses the deep "
                           f"stem (`deep_stem=True`, convs 64, 64, 128 wide); build the model with `deep_stem=False`.")
    if deep_stem:
        widths = tuple(int(np.shape(sd[k])[0]) for k in _DEEP_STEM_CONVS if k in sd)
        if widths != (64, 64, 128):
            raise ConvertError(f"{source}: its deep stem is {widths} wide, the official deep stem is (64, 64, 128) "
                               f"(timm's resnet50d/101d stems, 32, 32, 64, do not fit it).")
    found = _blocks(sd)
    if not any(found):
        raise ConvertError(f"{source} holds no ResNet stage keys (`layer1.0.conv1.weight`, ...); its first keys: "
                           f"{', '.join(list(sd)[:5]) or 'none'}. Expected a torchvision/timm ResNet-{depth} state dict.")
    if found != RESNET_BLOCKS[depth]:
        names = {v: f"ResNet-{k}" for k, v in RESNET_BLOCKS.items()}
        what = names.get(found, f"a network with {found} blocks per stage")
        if "layer1.0.conv3.weight" not in sd and found[0]:
            what += " of basic blocks (ResNet-18/34: no conv3)"
        raise ConvertError(f"{source} holds {what}, but the model's backbone is ResNet-{depth} "
                           f"({RESNET_BLOCKS[depth]} blocks per stage); pass the matching `backbone` "
                           f"('resnet50' or 'resnet101') or other weights.")


def read_imagenet_backbone(source, depth: int = 101, deep_stem: bool = False, in_channels: int = 3):
    """Read ImageNet ResNet weights into DANet's backbone names, strictly.

    Args:
        source: A file ``weights_convert`` reads (``.pth``/``.pt``, ``.safetensors``,
            ``.npz``), holding a state dict in torchvision/timm key format, possibly
            inside a ``state_dict`` or ``model`` entry and with a ``module.``
            prefix; or such a mapping of NumPy arrays.
        depth: 50 or 101 (the model's backbone).
        deep_stem: The model uses the deep stem (the file must have one, 64, 64, 128 wide).
        in_channels: The model's input channels; ``conv1`` is adapted by
            :func:`adapt_input_conv` when the file's differs.

    Returns:
        ``(neutral, notes)``: ``neutral`` maps ``pretrained.<key>`` to NumPy
        arrays in the backbone's ``state_dict()`` order, in the file's dtypes;
        ``notes`` lists what was ignored or changed (``fc.*``, a prefix, the
        adapted ``conv1``, BatchNorm counters the file lacks, filled with 0).

    Raises:
        ConvertError: not a state dict, a stem of the other kind, a ResNet of another depth.
        BackboneLoadError: missing, unexpected or shape-mismatched keys (all listed).
        CorruptFileError, UnsafeFileError: the file cannot be read safely.
    """
    if depth not in RESNET_BLOCKS:
        raise ValueError(f"`depth` must be one of {sorted(RESNET_BLOCKS)}, got {depth!r}.")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"`in_channels` must be an int >= 1, got {in_channels!r}.")
    notes: list = []
    if isinstance(source, Mapping):
        obj, label = source, "the ImageNet state dict"
    elif isinstance(source, (str, Path)):
        from .api import read_raw

        path = Path(source)
        if not path.is_file():
            raise ConvertError(f"`pretrained_backbone` {str(path)!r} does not exist or is not a file.")
        obj, label = read_raw(path)[0], f"{str(path)!r}"
    else:
        raise TypeError(f"`source` must be a path (str or pathlib.Path) or a mapping of arrays, "
                        f"got {type(source).__name__}.")
    sd = _unwrap(obj, notes, label)
    fc = [k for k in sd if k.split(".")[0] == "fc"]
    if fc:
        notes.append(f"ignored the ImageNet classifier: {', '.join(f'{k} {tuple(np.shape(sd[k]))}' for k in fc)}")
        for k in fc:
            del sd[k]
    _check_structure(sd, depth, deep_stem, label)
    first = "conv1.0.weight" if deep_stem else "conv1.weight"
    file_in = int(np.shape(sd[first])[1]) if first in sd and np.ndim(sd[first]) == 4 else 3
    expected = imagenet_resnet_shapes(depth, deep_stem, in_channels=file_in)
    counters = [k for k in expected if k.endswith("num_batches_tracked") and k not in sd]
    if counters and all(k in sd for k in expected if not k.endswith("num_batches_tracked")):
        for k in counters:
            sd[k] = np.zeros((), np.int64)
        notes.append(f"the file has no BatchNorm `num_batches_tracked` counters ({len(counters)}, as torchvision's "
                     f"older checkpoints); set them to 0")
    missing = [(k, s) for k, s in expected.items() if k not in sd]
    unexpected = [(k, tuple(np.shape(v))) for k, v in sd.items() if k not in expected]
    mismatched = [(k, expected[k], tuple(np.shape(v))) for k, v in sd.items()
                  if k in expected and tuple(np.shape(v)) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        raise BackboneLoadError(missing, unexpected, mismatched,
                                context=f"{label} against ResNet-{depth}, {'deep' if deep_stem else '7x7'} stem")
    if file_in != in_channels:
        sd[first] = adapt_input_conv(sd[first], in_channels)
        how = "summed over RGB" if in_channels == 1 else f"RGB repeated, scaled by 3/{in_channels}"
        notes.append(f"adapted `{first}` from {file_in} to {in_channels} input channel(s) ({how}; timm's "
                     f"adapt_input_conv rule)")
    return OrderedDict((f"pretrained.{k}", sd[k]) for k in expected), notes
