"""``danet-attention``: draw what DANet's attention looks at, from any weights ``danet-convert`` reads.

    danet-attention WEIGHTS IMAGE --points R,C [R,C ...] --out FIG.png [--npz MAPS.npz]
    danet-attention WEIGHTS IMAGE --grid K --out FIG.png
    danet-attention HEAD_WEIGHTS IMAGE --features F.npy --points R,C --npz MAPS.npz

WEIGHTS: DANet, or DANetHead with --features (backbone features, a .npy of
shape (C, h, w) or (1, C, h, w)). IMAGE: PNG/JPEG (Pillow, converted to RGB,
scaled to [0, 1] and ImageNet-normalised: mean 0.485 0.456 0.406, std 0.229
0.224 0.225) or .npy (H, W, C) / (H, W): uint8 arrays are treated like a PNG,
float arrays are the model input as they are. Points are (row, col) in image
pixels. Exit codes: 0 written, 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import numpy as np

from weights_convert import backbone
from weights_convert.atomic import check_output, write_files
from weights_convert.cli import add_arch_options, arch_options

__all__ = ["main", "build_parser", "load_image", "grid_points", "compute_maps", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN, IMAGENET_STD = np.array(backbone.IMAGENET_MEAN), np.array(backbone.IMAGENET_STD)
MAX_POINTS = 64


class UsageError(ValueError):
    """Bad input: printed, exit code 2, nothing written."""


def _point(text: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is ROW,COL in image pixels (e.g. 120,64), got {text!r}")
    return r, c


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="danet-attention", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("weights", metavar="WEIGHTS", help="DANet or DANetHead weights (.pth/.pt, .safetensors, .npz, "
                                                      ".weights.h5, .keras)")
    p.add_argument("image", metavar="IMAGE", help="PNG/JPEG or .npy image")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--points", nargs="+", type=_point, metavar="R,C", help="query points (row,col) in pixels")
    where.add_argument("--grid", type=int, metavar="K", help="a K x K grid of query points: the centres of K "
                                                             "equal bands in each direction (K <= 8)")
    p.add_argument("--out", metavar="FIG.png", help="the figure (needs matplotlib: the `viz` extra)")
    p.add_argument("--npz", metavar="MAPS.npz", help="the raw maps (the fields of AttentionMaps)")
    p.add_argument("--framework", choices=("torch", "keras"), default="torch",
                   help="who computes the maps (keras: on $KERAS_BACKEND)")
    p.add_argument("--features", metavar="F.npy", help="backbone features for DANetHead weights")
    p.add_argument("--no-normalize", action="store_true", help="feed PNG/JPEG pixels in [0, 1] without the "
                                                               "ImageNet normalisation")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--title", help="figure title (default: the weights' architecture)")
    add_arch_options(p, source="WEIGHTS")
    return p


def _check_output(path, ext: str, flag: str, force: bool) -> Path | None:
    if path is None:
        return None
    if Path(path).suffix.lower() != ext:
        raise UsageError(f"`{flag}` must name a {ext} file, got {str(path)!r}.")
    return check_output(path, f"`{flag}`", force)


def load_image(path, normalize: bool = True, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``(display, model_input)``: ``(H, W[, C])`` in ``[0, 1]`` and ``(H, W, C)`` float32.

    PNG/JPEG (any mode Pillow reads, converted to the model's ``channels``:
    1 grey, 3 RGB, 4 RGBA) and uint8 ``.npy`` arrays are scaled to ``[0, 1]``
    and normalised as ``danet-train`` normalises them (unless not
    ``normalize``: ImageNet's mean and std, their average for grey, repeated
    beyond 3 channels); float ``.npy`` arrays are the model input as they are.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"IMAGE {str(path)!r} does not exist or is not a file.")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UsageError(f"IMAGE {str(path)!r} is not a readable .npy array: {e}") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.dtype.kind not in "uif" or min(arr.shape) < 1:
            raise UsageError(f"IMAGE {str(path)!r} must be an (H, W, C) or (H, W) numeric array, got shape "
                             f"{arr.shape}, dtype {arr.dtype}.")
        if arr.dtype == np.uint8:
            pixels = arr.astype(np.float64) / 255.0
        else:
            arr = arr.astype(np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            display = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
            return _squeeze(display), arr.astype(np.float32)
    else:
        try:
            from PIL import Image, UnidentifiedImageError
        except ImportError:
            raise UsageError("reading PNG/JPEG needs Pillow: pip install 'danet[viz]'") from None
        try:
            if channels not in backbone.IMAGE_MODES:
                raise UsageError(f"IMAGE {str(path)!r}: a PNG/JPEG gives 1 (grey), 3 (RGB) or 4 (RGBA) channels, "
                                 f"the model takes {channels}: give a (H, W, {channels}) .npy array.")
            with Image.open(path) as img:
                pixels = np.asarray(img.convert(backbone.IMAGE_MODES[channels]), dtype=np.float64) / 255.0
            pixels = pixels.reshape(*pixels.shape[:2], -1)  # grey: (H, W, 1)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UsageError(f"IMAGE {str(path)!r} is not a readable image (PNG/JPEG or .npy): {e}") from None
    model_input = pixels
    if normalize and pixels.shape[-1] == channels:
        mean, std = (np.asarray(v) for v in backbone.default_normalization(channels))
        model_input = (pixels - mean) / std
    return _squeeze(pixels), model_input.astype(np.float32)


def _squeeze(display):
    return display[:, :, 0] if display.shape[-1] == 1 else display


def grid_points(k: int, size) -> list:
    """A ``k x k`` grid: row ``floor((2 i + 1) H / (2 k))``, the centres of ``k`` equal bands (same for columns)."""
    h, w = size
    rows = [(2 * i + 1) * h // (2 * k) for i in range(k)]
    cols = [(2 * i + 1) * w // (2 * k) for i in range(k)]
    return [(r, c) for r in rows for c in cols]


def _query_points(args, size) -> list:
    if args.grid is not None:
        if not 1 <= args.grid <= 8:
            raise UsageError(f"`--grid` must be 1..8, got {args.grid}.")
        return grid_points(args.grid, size)
    if len(args.points) > MAX_POINTS:
        raise UsageError(f"`--points` takes at most {MAX_POINTS} points, got {len(args.points)}.")
    h, w = size
    for r, c in args.points:
        if not (0 <= r < h and 0 <= c < w):
            raise UsageError(f"`--points` {r},{c} is outside the image ({h} x {w}): rows 0..{h - 1}, "
                             f"cols 0..{w - 1}.")
    return list(args.points)


def _load_features(path, channels: int) -> np.ndarray:
    try:
        feats = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UsageError(f"`--features` {str(path)!r} is not a readable .npy array: {e}") from None
    if feats.ndim == 3:
        feats = feats[None]
    if feats.ndim != 4 or feats.shape[0] != 1 or feats.dtype.kind != "f":
        raise UsageError(f"`--features` must be a float (C, h, w) or (1, C, h, w) array, got shape {feats.shape}, "
                         f"dtype {feats.dtype}.")
    if feats.shape[1] != channels:
        raise UsageError(f"`--features` has {feats.shape[1]} channels (shape {feats.shape}), the DANetHead "
                         f"weights take {channels}.")
    return feats.astype(np.float32)


def compute_maps(neutral, spec, inputs: np.ndarray, points, framework: str, size) -> dict:
    """``AttentionMaps.numpy()`` of the model of ``(neutral, spec)``.

    ``inputs`` is ``(1, C, h, w)`` (NCHW: the image for DANet, features for
    DANetHead); Keras gets it as NHWC.
    """
    import weights_convert as wc

    if framework == "torch":
        import torch

        model = wc.to_torch(neutral, spec)
        x = torch.from_numpy(np.ascontiguousarray(inputs))
        maps = model.attention_maps(x, points) if spec.kind == "danet" else model.attention_maps(x, points, size)
    else:
        model = wc.to_keras(neutral, spec)
        x = np.ascontiguousarray(np.transpose(inputs, (0, 2, 3, 1)))
        maps = model.attention_maps(x, points) if spec.kind == "danet" else model.attention_maps(x, points, size)
    return maps.numpy()


def run(args) -> str:
    import weights_convert as wc

    if args.out is None and args.npz is None:
        raise UsageError("nothing to write: pass --out FIG.png and/or --npz MAPS.npz.")
    if not os.path.isfile(args.weights):  # before the loader, which would call it danet-convert's SRC
        raise UsageError(f"WEIGHTS {str(args.weights)!r} does not exist or is not a file.")
    out = _check_output(args.out, ".png", "--out", args.force)
    npz = _check_output(args.npz, ".npz", "--npz", args.force)
    if out is not None and npz is not None and out.resolve() == npz.resolve():
        raise UsageError("`--out` and `--npz` name the same file.")
    if out is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--out needs matplotlib: pip install 'danet[viz]'") from None
    neutral, spec = wc.load(args.weights, **arch_options(args))
    spec = spec.replace(dtype="float32")
    display, image = load_image(args.image, normalize=not args.no_normalize,
                                channels=spec.in_channels if spec.kind == "danet" else 3)
    size = image.shape[:2]
    points = _query_points(args, size)
    if spec.kind == "danet":
        if args.features:
            raise UsageError("`--features` is for DANetHead weights; these are " + spec.describe() + ".")
        if image.shape[-1] != spec.in_channels:
            raise UsageError(f"IMAGE has {image.shape[-1]} channel(s); {spec.describe()} takes {spec.in_channels}.")
        inputs = np.transpose(image, (2, 0, 1))[None]
    elif spec.kind == "head":
        if not args.features:
            raise UsageError(f"{spec.describe()} needs its input: pass --features F.npy ((C, h, w) backbone "
                             f"features of IMAGE).")
        inputs = _load_features(args.features, spec.in_channels)
    else:
        raise UsageError(f"danet-attention draws DANet or DANetHead weights; WEIGHTS are {spec.describe()}.")
    maps = compute_maps(neutral, spec, inputs, points, args.framework, size)
    files = {}
    if npz is not None:
        buf = io.BytesIO()
        np.savez(buf, **maps)
        files[npz] = buf.getvalue()
    if out is not None:
        from .attention_figure import render_png

        files[out] = render_png(display, maps, title=args.title or f"{spec.describe()}, {args.framework}")
    write_files(files)
    return ", ".join(str(p) for p in files)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        written = run(args)
    except ValueError as e:  # UsageError, ConvertError (unreadable or unfitting weights), bad points
        print(f"danet-attention: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - any failure: exit 2, nothing written
        print(f"danet-attention: error: unexpected {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"danet-attention: wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
