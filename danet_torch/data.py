"""The folder dataset of ``danet-train``: ``DIR/images/*.png|jpg`` + ``DIR/masks/*.png`` class ids, 255 ignored.

Images and masks pair by file stem (``images/a.jpg`` with ``masks/a.png``).
A mask is a single-channel PNG (mode ``L``, ``P``, ``I``, or 1-bit ``1``) of class ids
``0 .. num_classes - 1``; ``255`` marks pixels the loss and the metrics
ignore. :func:`check_samples` opens every pair before training and reports
every problem at once (missing mask, unknown class id, size mismatch, RGB
mask, empty folder). Augmentation follows the official recipe
(``encoding/datasets/base.py``): random mirror, random scale, pad with the
ignore label, random crop; each sample's randomness comes from
``(seed, epoch, index)``, so a resumed run sees the same crops.

Only NumPy and Pillow are used here: the items are NumPy arrays, which
``torch.utils.data.DataLoader`` collates into tensors.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from weights_convert.backbone import IMAGE_MODES, IMAGENET_MEAN, IMAGENET_STD, default_normalization  # noqa: F401

__all__ = ["DataError", "Sample", "IGNORE_INDEX", "IMAGE_SUFFIXES", "scan_folder", "split_samples", "check_samples",
           "default_normalization", "SegmentationFolder"]

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_MODES = ("1", "L", "P", "I", "I;16")  # single channel; "1" (1-bit, as Pillow saves a bool array): ids 0, 1
_MAX_LISTED = 10


class DataError(ValueError):
    """A dataset that cannot be trained on; the message lists every problem found."""


@dataclass(frozen=True)
class Sample:
    stem: str
    image: str
    mask: str


def _listing(problems: Sequence[str]) -> str:
    shown = [f"  {p}" for p in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        shown.append(f"  ... and {len(problems) - _MAX_LISTED} more")
    return "\n".join(shown)


def scan_folder(root, notes: list | None = None) -> list:
    """The ``Sample`` pairs of ``root`` (sorted by stem); :class:`DataError` if none or a mask is missing.

    Files left out (in ``images/`` not PNG/JPEG, in ``masks/`` a mask without
    its image; hidden files aside) are named in ``notes``, or in a
    ``UserWarning`` without it.
    """
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DataError(f"`{root}` must hold `images/` and `masks/` folders; `{d}` does not exist.")
    images: dict = {}
    for p in sorted(images_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in images:
                raise DataError(f"Two images share the stem {p.stem!r} in `{images_dir}`: {images[p.stem].name} "
                                f"and {p.name}; keep one.")
            images[p.stem] = p
    if not images:
        raise DataError(f"No images (.png, .jpg, .jpeg) in `{images_dir}`: the dataset is empty.")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    missing = [f"{images[s].name}: no `{s}.png` in masks/" for s in images if s not in masks]
    if missing:
        raise DataError(f"{len(missing)} image(s) in `{images_dir}` have no mask in `{masks_dir}` (masks are "
                        f"PNG files with the image's stem):\n{_listing(missing)}")
    left_out = {images_dir: ([p.name for p in sorted(images_dir.iterdir()) if p.is_file() and not p.name.startswith(".")
                              and p.suffix.lower() not in IMAGE_SUFFIXES], "file(s)", "are not PNG/JPEG images"),
                masks_dir: ([masks[s].name for s in sorted(masks) if s not in images and not s.startswith(".")],
                            "mask(s)", "have no image")}
    for folder, (names, what, why) in left_out.items():
        if names:
            note = f"{len(names)} {what} in `{folder}` {why}, left out: {', '.join(names[:5])}" + (
                f" and {len(names) - 5} more" if len(names) > 5 else "")
            if notes is None:
                warnings.warn(note, UserWarning, stacklevel=2)
            else:
                notes.append(note)
    return [Sample(s, str(images[s]), str(masks[s])) for s in sorted(images)]


def split_samples(samples: Sequence[Sample], fraction: float, seed: int = 0):
    """``(train, val)``: a seeded random ``fraction`` held out (at least one sample when ``fraction > 0``)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {fraction!r}.")
    n_val = 0 if fraction == 0 else max(1, int(round(fraction * len(samples))))
    if n_val and len(samples) - n_val < 1:
        raise DataError(f"{len(samples)} sample(s) cannot be split into training and validation; add images or "
                        f"pass --val DIR.")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    val = sorted(order[:n_val])
    keep = set(val)
    return [s for i, s in enumerate(samples) if i not in keep], [samples[i] for i in val]


def check_samples(samples: Sequence[Sample], num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Open every pair; raise :class:`DataError` listing every problem. Returns pixels per class."""
    from PIL import Image

    counts = np.zeros(num_classes, np.int64)
    problems = []
    for s in samples:
        path = s.image
        try:
            with Image.open(path) as im:
                im.load()  # decoded: a file cut short keeps an intact header, and would fail mid-epoch
                image_size = im.size
            path = s.mask
            with Image.open(path) as m:
                mode, mask_size = m.mode, m.size
                if mode not in MASK_MODES:
                    problems.append(f"{s.mask}: mode {mode}, a mask must be a single-channel PNG of class ids "
                                    f"(mode L or P)")
                    continue
                values = np.asarray(m)
        except OSError as e:
            problems.append(f"{path}: cannot be read ({e})")
            continue
        if image_size != mask_size:
            problems.append(f"{s.stem}: image {image_size[0]}x{image_size[1]}, mask {mask_size[0]}x{mask_size[1]} "
                            f"(width x height); they must match")
            continue
        ids, n = np.unique(values, return_counts=True)
        bad = [int(v) for v in ids if v != ignore_index and not 0 <= v < num_classes]
        if bad:
            problems.append(f"{s.mask}: class id(s) {bad[:8]} outside 0..{num_classes - 1} (and {ignore_index}, "
                            f"ignored); check --num-classes")
            continue
        keep = ids != ignore_index
        np.add.at(counts, ids[keep].astype(np.int64), n[keep])
    if problems:
        raise DataError(f"{len(problems)} problem(s) in the dataset ({len(samples)} pairs checked):\n"
                        f"{_listing(problems)}")
    return counts


class SegmentationFolder:
    """Map-style dataset of :class:`Sample` pairs: ``(image (C, H, W) float32, mask (H, W) int64)``.

    Args:
        samples: The pairs.
        train: Random mirror, scale (``scale_range``), pad and crop (``crop``); else the whole image.
        crop: Square crop side (training); images smaller than it are padded (mask with ``ignore_index``).
        scale_range: Random scale factors ``(low, high)`` of the image's own size.
        in_channels: 1 (``L``), 3 (``RGB``) or 4 (``RGBA``): the Pillow mode images are converted to.
        mean, std: Normalisation (of values in 0..1), one per channel.
        seed: With :meth:`set_epoch` and the index, fixes every random choice.
    """

    def __init__(self, samples: Sequence[Sample], train: bool, crop: int = 768, scale_range=(0.5, 2.0),
                 in_channels: int = 3, mean=None, std=None, seed: int = 0, ignore_index: int = IGNORE_INDEX):
        if in_channels not in IMAGE_MODES:
            raise ValueError(f"`in_channels` must be 1 (grey), 3 (RGB) or 4 (RGBA) for PNG/JPEG images, "
                             f"got {in_channels!r}.")
        self.samples, self.train, self.crop = list(samples), bool(train), int(crop)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.mode = IMAGE_MODES[in_channels]
        dm, ds = default_normalization(in_channels)
        self.mean = np.asarray(dm if mean is None else mean, np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(ds if std is None else std, np.float32).reshape(-1, 1, 1)
        for name, v in (("mean", self.mean), ("std", self.std)):
            if v.shape[0] != in_channels:
                raise ValueError(f"`{name}` needs {in_channels} value(s), got {v.ravel().tolist()}.")
        self.seed, self.ignore_index, self.epoch = int(seed), int(ignore_index), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        index = int(index)
        s = self.samples[index]
        with Image.open(s.image) as im:
            image = im.convert(self.mode)
        with Image.open(s.mask) as m:
            mask = m.copy() if m.mode in ("L", "P") else Image.fromarray(np.asarray(m).astype(np.uint8))
        if self.train:
            image, mask = self._augment(image, mask, np.random.default_rng([self.seed, self.epoch, index]))
        x = np.asarray(image, np.float32).reshape(image.size[1], image.size[0], -1).transpose(2, 0, 1) / 255.0
        x = (x - self.mean) / self.std
        y = np.asarray(mask, np.int64)
        if self.train:
            x, y = self._pad_crop(x, y, np.random.default_rng([self.seed, self.epoch, index, 1]))
        return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y)

    def _augment(self, image, mask, rng):
        from PIL import Image

        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        s = rng.uniform(*self.scale_range)
        w, h = image.size
        size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
        return image.resize(size, Image.Resampling.BILINEAR), mask.resize(size, Image.Resampling.NEAREST)

    def _pad_crop(self, x, y, rng):
        c = self.crop
        h, w = y.shape
        ph, pw = max(0, c - h), max(0, c - w)
        if ph or pw:  # normalised zero (the mean colour) for the image, the ignore label for the mask
            x = np.pad(x, ((0, 0), (0, ph), (0, pw)))
            y = np.pad(y, ((0, ph), (0, pw)), constant_values=self.ignore_index)
        h, w = y.shape
        top, left = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        return x[:, top:top + c, left:left + c], y[top:top + c, left:left + c]
