"""Train ``danet_keras.DANet`` with ``model.fit`` on a folder dataset (the ``danet-train`` format), any backend.

``DIR/images/*.png|jpg`` and ``DIR/masks/*.png`` (class ids, 255 ignored),
paired by file stem; random mirror, scale and crop as ``danet-train``.
``--in-channels 1`` (grey, e.g. MRI slices) or ``4`` (RGBA) reads the images
in that mode and builds the model for it, normalised as ``danet-train`` does. The
three outputs are trained with one ``SegmentationCrossEntropy`` each (their
sum is upstream's loss) and the fused output is scored with ``MeanIoU``::

    KERAS_BACKEND=jax python examples/train_keras.py --data DIR --num-classes 12 --out runs/k \\
        --pretrained-backbone resnet50.pth --backbone resnet50

Several devices: ``--distribute data-parallel`` (JAX,
``keras.distribution.DataParallel``: global BatchNorm statistics) or
``--distribute mirrored`` (TensorFlow, ``tf.distribute.MirroredStrategy``:
per-replica statistics unless ``--sync-batchnorm``). ``--batch-size`` is the
global batch; validation runs one image per device, so the validation images
must share one size there. One learning rate for every layer (``danet-train``
gives the head 10x): Keras optimizers take one schedule.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import keras
import numpy as np

import danet_keras
from danet_keras.distribution import sync_batchnorm
from danet_keras.losses import SegmentationCrossEntropy
from danet_keras.metrics import MeanIoU
from weights_convert.backbone import IMAGE_MODES, default_normalization

__all__ = ["scan", "FolderDataset", "build_parser", "main"]

IGNORE = 255


def scan(root, num_classes: int):
    """``[(image path, mask path)]`` of ``root``, every pair opened and checked; ``ValueError`` lists problems."""
    from PIL import Image

    root = Path(root)
    images = {p.stem: p for p in sorted((root / "images").glob("*")) if p.suffix.lower() in (".png", ".jpg", ".jpeg")}
    if not images:
        raise ValueError(f"No images (.png, .jpg, .jpeg) in `{root / 'images'}`: the dataset is empty.")
    pairs, problems = [], []
    for stem, image in images.items():
        mask = root / "masks" / f"{stem}.png"
        if not mask.is_file():
            problems.append(f"{image.name}: no `{stem}.png` in masks/")
            continue
        try:
            with Image.open(image) as im, Image.open(mask) as m:
                im.load()  # decoded: a file cut short keeps an intact header, and would fail inside fit
                values = np.asarray(m)
                if im.size != m.size or values.ndim != 2:
                    problems.append(f"{stem}: image {im.size}, mask {m.size} mode {m.mode} (single channel, same "
                                    f"size)")
                    continue
        except OSError as e:
            problems.append(f"{stem}: cannot be read ({e})")
            continue
        bad = sorted(set(np.unique(values).tolist()) - set(range(num_classes)) - {IGNORE})
        if bad:
            problems.append(f"{mask.name}: class id(s) {bad[:8]} outside 0..{num_classes - 1} (and {IGNORE})")
        pairs.append((image, mask))
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in `{root}`:\n" + "\n".join(f"  {p}" for p in problems[:10]))
    return pairs


class FolderDataset(keras.utils.PyDataset):
    """Batches ``(image (B, H, W, in_channels) float32, (mask, mask, mask) (B, H, W) int32)``; training:
    mirror/scale/crop. Images are read as ``L``, ``RGB`` or ``RGBA`` for 1, 3 or 4 ``in_channels``."""

    def __init__(self, pairs, batch_size: int, crop: int | None = None, seed: int = 0, in_channels: int = 3,
                 **kwargs):
        super().__init__(**kwargs)
        self.pairs, self.batch_size, self.crop, self.seed, self.epoch = list(pairs), batch_size, crop, seed, 0
        self.mode = IMAGE_MODES[in_channels]
        self.mean, self.std = (np.asarray(v, np.float32) for v in default_normalization(in_channels))

    def __len__(self):
        return len(self.pairs) // self.batch_size

    def on_epoch_end(self):
        self.epoch += 1

    def _item(self, i, rng):
        from PIL import Image

        with Image.open(self.pairs[i][0]) as im, Image.open(self.pairs[i][1]) as m:
            image, mask = im.convert(self.mode), m.copy()
        if self.crop:
            if rng.random() < 0.5:
                image, mask = (t.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for t in (image, mask))
            s = rng.uniform(0.5, 2.0)
            size = (max(1, round(image.size[0] * s)), max(1, round(image.size[1] * s)))
            image, mask = image.resize(size, Image.Resampling.BILINEAR), mask.resize(size, Image.Resampling.NEAREST)
        x = np.asarray(image, np.float32).reshape(image.size[1], image.size[0], -1)  # L: (H, W) -> (H, W, 1)
        x = (x / 255.0 - self.mean) / self.std
        y = np.asarray(mask, np.int32)
        if self.crop:
            c = self.crop
            ph, pw = max(0, c - y.shape[0]), max(0, c - y.shape[1])
            x, y = np.pad(x, ((0, ph), (0, pw), (0, 0))), np.pad(y, ((0, ph), (0, pw)), constant_values=IGNORE)
            top, left = rng.integers(0, y.shape[0] - c + 1), rng.integers(0, y.shape[1] - c + 1)
            x, y = x[top:top + c, left:left + c], y[top:top + c, left:left + c]
        return x, y

    def __getitem__(self, index):
        if not self.crop:  # validation: whole images, in order (a batch of several needs images of one size)
            items = [self._item(i, None) for i in range(index * self.batch_size, (index + 1) * self.batch_size)]
            if len({t[1].shape for t in items}) > 1:
                raise ValueError(f"Validation images {[self.pairs[i][0].name for i in range(len(items))]} differ in "
                                 f"size; batches of {self.batch_size} (one per device) need one size.")
            y = np.stack([t[1] for t in items])
            return np.stack([t[0] for t in items]), (y, y, y)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.pairs))
        items = [self._item(int(i), np.random.default_rng([self.seed, self.epoch, int(i)]))
                 for i in order[index * self.batch_size:(index + 1) * self.batch_size]]
        y = np.stack([t[1] for t in items])
        return np.stack([t[0] for t in items]), (y, y, y)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--val", help="validation folder (default: none)")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--in-channels", type=int, choices=sorted(IMAGE_MODES), default=3, help="1 grey, 3 RGB, 4 RGBA")
    p.add_argument("--backbone", choices=("resnet50", "resnet101"), default="resnet101")
    p.add_argument("--pretrained-backbone", help="ImageNet ResNet weights (torchvision/timm keys)")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32), default=8)
    p.add_argument("--multi-grid", nargs="+", default=["4", "8", "16"], help="layer4 dilations, or `none`")
    p.add_argument("--crop", type=int, default=768)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--steps-per-epoch", type=int, help="default: the whole training set")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (split over devices)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--distribute", choices=("none", "data-parallel", "mirrored"), default="none")
    p.add_argument("--sync-batchnorm", action="store_true", help="global BatchNorm statistics under --distribute "
                                                                 "mirrored")
    p.add_argument("--out", required=True, help="folder for model.keras and history.json")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    needs = {"data-parallel": "jax", "mirrored": "tensorflow"}.get(args.distribute)
    if needs is not None and keras.backend.backend() != needs:
        parser.error(f"--distribute {args.distribute} needs KERAS_BACKEND={needs}, got {keras.backend.backend()}")
    for name in ("num_classes", "crop", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr >= 0):
        parser.error(f"--lr must be a finite number >= 0, got {args.lr}")
    keras.utils.set_random_seed(args.seed)
    pairs = scan(args.data, args.num_classes)
    if len(pairs) < args.batch_size:
        parser.error(f"{len(pairs)} training image(s) make no batch of --batch-size {args.batch_size}; "
                     f"give a smaller --batch-size or more images")
    train = FolderDataset(pairs, args.batch_size, crop=args.crop, seed=args.seed, in_channels=args.in_channels)
    steps = len(train) if args.steps_per_epoch is None else args.steps_per_epoch
    if steps < 1:
        parser.error(f"--steps-per-epoch must be >= 1, got {steps}")
    if steps > len(train):  # Keras would stop each epoch at the end of the data, and the decay would not end
        parser.error(f"--steps-per-epoch {steps} is more than the {len(train)} batch(es) of {args.batch_size} in the "
                     f"training set ({len(pairs)} images); leave it out to use them all")
    scope, val_batch = None, 1
    if args.distribute == "data-parallel":
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        val_batch = len(keras.distribution.list_devices())  # batches are sharded: one image per device
    elif args.distribute == "mirrored":
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy()
        scope, val_batch = strategy.scope(), strategy.num_replicas_in_sync  # no replica may get an empty batch
    val = (FolderDataset(scan(args.val, args.num_classes), val_batch, in_channels=args.in_channels) if args.val
           else None)
    mg = None if [v.lower() for v in args.multi_grid] == ["none"] else [int(v) for v in args.multi_grid]
    with scope if scope is not None else _null():
        model = danet_keras.DANet(args.num_classes, backbone=args.backbone, output_stride=args.output_stride,
                                  multi_grid=mg, in_channels=args.in_channels,
                                  pretrained_backbone=args.pretrained_backbone)
        model.build((None, None, None, args.in_channels))
        if args.sync_batchnorm:
            sync_batchnorm(model)
        schedule = keras.optimizers.schedules.PolynomialDecay(args.lr, max(1, args.epochs * steps), 0.0, power=0.9)
        loss = SegmentationCrossEntropy(ignore_index=IGNORE)
        model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=1e-4),
                      loss=[loss, loss, loss], metrics=[[MeanIoU(args.num_classes, ignore_index=IGNORE)], [], []])
    for note in model.backbone_notes:
        print(f"pretrained backbone: {note}")
    history = model.fit(train, validation_data=val, epochs=args.epochs, steps_per_epoch=steps, verbose=2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    clean = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    (out / "history.json").write_text(json.dumps(clean, indent=1))
    return {"history": clean, "model": model, "out": out, "finite": all(math.isfinite(v) for vals in clean.values()
                                                                         for v in vals)}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
