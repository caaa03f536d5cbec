"""A 2-D U-Net with DANet's ``DualAttention`` at the bottleneck (and optionally on the skips).

Trains on a synthetic segmentation set made here (discs and squares on noise,
three classes), checks that the loss falls and the attention gammas left zero,
then saves the model as ``.keras``, reloads it and compares predictions.
Runs on any Keras 3 backend::

    KERAS_BACKEND=jax python examples/unet_dual_attention.py --epochs 8

The block is a drop-in: ``x = DualAttention()(x)`` keeps the feature shape,
at any size. The U-Net around it pools twice, so its own sizes are multiples
of 4; a fixed size that is not (``--size 37 53``) is zero-padded up to one
inside the model and the logits are cropped back (``ZeroPadding2D`` /
``Cropping2D``, built-in layers that save, reload and export).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import keras
import numpy as np

from danet_keras import DualAttention

__all__ = ["build_unet", "make_dataset", "attention_gammas", "main"]


def make_dataset(samples: int, size=32, channels: int = 1, seed: int = 0):
    """Noisy images with a disc (class 1) and a square (class 2) each; masks ``(B, H, W)`` int.

    ``size``: ``H = W``, or ``(H, W)``; 8 at least.
    """
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    images = rng.normal(0.0, 0.3, (samples, h, w, channels)).astype("float32")
    masks = np.zeros((samples, h, w), "int32")
    side = min(h, w)
    for i in range(samples):
        r = rng.integers(side // 8, side // 4)
        cy, cx = rng.integers(r, h - r), rng.integers(r, w - r)
        masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        s = rng.integers(side // 6, side // 3)
        y0, x0 = rng.integers(0, h - s), rng.integers(0, w - s)
        masks[i, y0:y0 + s, x0:x0 + s] = 2
    images += (masks[..., None] == 1) * 1.0 - (masks[..., None] == 2) * 1.0
    return images, masks


def _block(x, filters, name):
    for i in range(2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = keras.layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


def build_unet(channels: int = 1, num_classes: int = 3, width: int = 16, skip_attention: bool = False,
               size=None):
    """U-Net (two levels) with ``DualAttention`` at the bottleneck.

    ``size=None``: inputs ``(None, None, channels)`` of any ``H, W``
    divisible by 4 (two poolings). ``size=(H, W)``: that size only, any
    ``H, W``: zero-padded up to multiples of 4, the logits cropped back.
    """
    inputs = keras.Input((*(size or (None, None)), channels), name="image")
    pad = [(0, -n % 4) for n in size] if size else [(0, 0), (0, 0)]
    padded = any(p for _, p in pad)
    x = keras.layers.ZeroPadding2D(pad, name="pad")(inputs) if padded else inputs
    s1 = _block(x, width, "enc1")
    s2 = _block(keras.layers.MaxPooling2D(name="pool1")(s1), 2 * width, "enc2")
    x = _block(keras.layers.MaxPooling2D(name="pool2")(s2), 4 * width, "bottleneck")
    x = DualAttention(name="bottleneck_attention")(x)  # the drop-in line
    if skip_attention:
        s2 = DualAttention(name="skip2_attention")(s2)
    x = keras.layers.UpSampling2D(interpolation="bilinear", name="up2")(x)
    x = _block(keras.layers.Concatenate(name="cat2")([x, s2]), 2 * width, "dec2")
    x = keras.layers.UpSampling2D(interpolation="bilinear", name="up1")(x)
    x = _block(keras.layers.Concatenate(name="cat1")([x, s1]), width, "dec1")
    outputs = keras.layers.Conv2D(num_classes, 1, name="logits")(x)
    if padded:
        outputs = keras.layers.Cropping2D(pad, name="crop")(outputs)
    return keras.Model(inputs, outputs, name="unet_dual_attention")


def attention_gammas(model) -> dict[str, float]:
    """The PAM/CAM ``gamma`` of every attention block, by variable path."""
    return {v.path: float(keras.ops.convert_to_numpy(v)[0]) for v in model.weights
            if v.path.endswith(("/sa/gamma", "/sc/gamma"))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--size", type=int, nargs="+", default=[32],
                        help="H = W, or H W; 8 at least (not multiples of 4: padded inside the model)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip-attention", action="store_true", help="also put DualAttention on a skip")
    parser.add_argument("--out", default=None, help="folder to write unet.keras into, made if missing "
                                                    "(default: a temp dir)")
    args = parser.parse_args(argv)
    for name in ("epochs", "samples", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} takes an integer >= 1, got {getattr(args, name)}")
    if len(args.size) > 2 or min(args.size) < 8:
        parser.error(f"--size takes 1 or 2 integers >= 8, got {args.size}")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out takes a folder, got {args.out!r}, a file")
    size = tuple(args.size * 2)[:2]

    keras.utils.set_random_seed(0)
    x, y = make_dataset(args.samples, size)
    fixed = size if any(n % 4 for n in size) else None  # else any size divisible by 4
    model = build_unet(skip_attention=args.skip_attention, size=fixed)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    initial = float(model.evaluate(x, y, batch_size=args.batch_size, verbose=0)[0])
    history = model.fit(x, y, epochs=args.epochs, batch_size=args.batch_size, verbose=0)
    final = float(model.evaluate(x, y, batch_size=args.batch_size, verbose=0)[0])
    gammas = attention_gammas(model)
    print(f"loss {initial:.4f} -> {final:.4f} over {args.epochs} epochs "
          f"(per epoch: {', '.join(f'{v:.3f}' for v in history.history['loss'])})")
    print("gammas:", {k: round(v, 5) for k, v in gammas.items()})

    out_dir = args.out or tempfile.mkdtemp(prefix="unet_dual_attention_")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "unet.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    before = model.predict(x[:4], verbose=0)
    after = reloaded.predict(x[:4], verbose=0)
    max_diff = float(np.max(np.abs(before - after)))
    print(f"saved {path}; reloaded, max |prediction difference| = {max_diff:.3g}")
    return {"initial_loss": initial, "final_loss": final, "gammas": gammas, "reload_max_diff": max_diff,
            "path": path}


if __name__ == "__main__":
    result = main()
    if not (result["final_loss"] < 0.7 * result["initial_loss"] and all(result["gammas"].values())):
        zero = [k for k, v in result["gammas"].items() if not v]
        raise SystemExit(f"training did not converge: loss {result['initial_loss']:.4f} -> {result['final_loss']:.4f} "
                         f"(asked: below 70% of the start; more --epochs or --samples)"
                         + (f", gammas still zero: {zero}" if zero else ""))
