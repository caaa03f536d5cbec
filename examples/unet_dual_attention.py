"""A 2-D U-Net with DANet's ``DualAttention`` at the bottleneck (and optionally on the skips).

Trains on a synthetic segmentation set made here (discs and squares on noise,
three classes), checks that the loss falls and the attention gammas left zero,
then saves the model as ``.keras``, reloads it and compares predictions.
Runs on any Keras 3 backend::

    KERAS_BACKEND=jax python examples/unet_dual_attention.py --epochs 8

The block is a drop-in: ``x = DualAttention()(x)`` keeps the feature shape.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import keras
import numpy as np

from danet_keras import DualAttention

__all__ = ["build_unet", "make_dataset", "attention_gammas", "main"]


def make_dataset(samples: int, size: int = 32, channels: int = 1, seed: int = 0):
    """Noisy images with a disc (class 1) and a square (class 2) each; masks ``(B, H, W)`` int."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = rng.normal(0.0, 0.3, (samples, size, size, channels)).astype("float32")
    masks = np.zeros((samples, size, size), "int32")
    for i in range(samples):
        r = rng.integers(size // 8, size // 4)
        cy, cx = rng.integers(r, size - r, 2)
        masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        s = rng.integers(size // 6, size // 3)
        y0, x0 = rng.integers(0, size - s, 2)
        masks[i, y0:y0 + s, x0:x0 + s] = 2
    images += (masks[..., None] == 1) * 1.0 - (masks[..., None] == 2) * 1.0
    return images, masks


def _block(x, filters, name):
    for i in range(2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = keras.layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


def build_unet(channels: int = 1, num_classes: int = 3, width: int = 16, skip_attention: bool = False):
    """U-Net (two levels) on ``(None, None, channels)``: spatial sizes must be divisible by 4."""
    inputs = keras.Input((None, None, channels), name="image")
    s1 = _block(inputs, width, "enc1")
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
    return keras.Model(inputs, outputs, name="unet_dual_attention")


def attention_gammas(model) -> dict[str, float]:
    """The PAM/CAM ``gamma`` of every attention block, by variable path."""
    return {v.path: float(keras.ops.convert_to_numpy(v)[0]) for v in model.weights
            if v.path.endswith(("/sa/gamma", "/sc/gamma"))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip-attention", action="store_true", help="also put DualAttention on a skip")
    parser.add_argument("--out", default=None, help="where to write unet.keras (default: a temp dir)")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    x, y = make_dataset(args.samples, args.size)
    model = build_unet(skip_attention=args.skip_attention)
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
        raise SystemExit("training did not converge: loss did not fall or a gamma is still zero")
