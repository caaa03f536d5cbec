"""What the attention looks at: PAM rows of query points, CAM's matrix, maps at image size (Keras 3).

The same functions and results as ``danet_torch.attention_maps``, with
``keras.ops`` only (every backend). Inputs are in the layer's
``data_format``; the outputs do not depend on it: PAM rows ``(B, P, H, W)``,
CAM's matrix ``(B, C, C)``, segmentation ``(B, H, W)``.

* :func:`position_attention_rows` computes only the query rows,
  ``energy[b, p, h, w] = q_p . k_hw`` (``(B, P, H, W)``, never ``N x N``),
  from the formula, so the rows do not depend on the path PAM's ``call``
  takes. Query vectors are sliced at static points, so the function also
  runs on symbolic inputs with ``None`` spatial sizes (points are then
  checked against the grid only when its size is known).
* :func:`channel_attention_matrix` is CAM's ``softmax(max(E) - E)``,
  ``E = X^T X`` (the official max-subtraction: less similar channels get
  more weight).
* Query points in image pixels map to the feature grid with the
  ``align_corners=True`` geometry of DANet's upsampling: feature index
  ``round(p * (h - 1) / (H - 1))`` (half up), and back ``f * (H - 1) / (h - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from keras import ops

from ._checks import check_inputs
from .layers import backend_result_type, layout_axes, resize_bilinear_align_corners
from .pam import softmax

__all__ = [
    "AttentionMaps",
    "check_points",
    "feature_grid_points",
    "position_attention_rows",
    "channel_attention_energy",
    "channel_attention_matrix",
    "head_attention_maps",
    "danet_attention_maps",
]


def check_points(points, size, name: str = "points") -> np.ndarray:
    """``points`` as a ``(P, 2)`` int64 array of ``(row, col)`` inside ``size = (H, W)``.

    A ``None`` in ``size`` (a symbolic dimension) skips that upper bound.

    Raises:
        TypeError: ``points`` does not hold integers.
        ValueError: wrong shape, no points, or a point outside the grid.
    """
    if not isinstance(points, (list, tuple, np.ndarray)):
        points = ops.convert_to_numpy(points)
    try:
        arr = np.asarray(points)
    except ValueError:
        arr = np.asarray(points, dtype=object)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty sequence of (row, col) pairs, shape (P, 2), e.g. "
                         f"[(3, 4), (0, 7)]; got {points!r} (shape {arr.shape}).")
    has_bool = arr.dtype.kind == "b" or (not isinstance(points, np.ndarray) and any(
        isinstance(v, (bool, np.bool_)) for v in np.asarray(points, dtype=object).ravel()))
    if arr.dtype.kind not in "iu" or has_bool:
        kind = "bool" if has_bool else arr.dtype
        raise TypeError(f"`{name}` must hold integer (row, col) pairs, got {kind} values in {points!r}.")
    arr = arr.astype(np.int64)
    h, w = (None if s is None else int(s) for s in size)
    bad = (arr[:, 0] < 0) | (arr[:, 1] < 0)
    if h is not None:
        bad |= arr[:, 0] >= h
    if w is not None:
        bad |= arr[:, 1] >= w
    if bad.any():
        r, c = arr[int(np.argmax(bad))]
        rows = "0.." + ("H-1" if h is None else str(h - 1))
        cols = "0.." + ("W-1" if w is None else str(w - 1))
        raise ValueError(f"`{name}` has ({r}, {c}) outside the {h} x {w} grid; accepted rows {rows} and "
                         f"cols {cols}.")
    return arr


def _to_grid(p, n_in: int, n_out: int):
    # round(p * (n_out - 1) / (n_in - 1)), half up, in exact integer arithmetic
    if n_in == 1 or n_out == 1:
        return np.zeros_like(p)
    return (2 * p * (n_out - 1) + (n_in - 1)) // (2 * (n_in - 1))


def _to_image(f, n_in: int, n_out: int):
    if n_out == 1:
        return np.zeros(f.shape, dtype=np.float64)
    return f * (n_in - 1) / (n_out - 1)


def feature_grid_points(points, image_size, feature_size) -> tuple[np.ndarray, np.ndarray]:
    """Image-pixel points -> feature-grid points, and those back to image pixels.

    Returns:
        ``(grid, image_points)``: ``(P, 2)`` int64 feature indices and
        ``(P, 2)`` float64 image positions of those grid points.
    """
    pts = check_points(points, image_size)
    grid = np.stack([_to_grid(pts[:, i], int(image_size[i]), int(feature_size[i])) for i in (0, 1)], axis=1)
    back = np.stack([_to_image(grid[:, i], int(image_size[i]), int(feature_size[i])) for i in (0, 1)], axis=1)
    return grid.astype(np.int64), back.astype(np.float64)


def _channels_last(x, data_format):
    return ops.transpose(x, (0, 2, 3, 1)) if data_format == "channels_first" else x


def _spatial_shape(x, data_format):
    h_ax, w_ax, _ = layout_axes(data_format)
    return x.shape[h_ax], x.shape[w_ax]


def _ensure_built(layer, x):
    if not layer.built:
        layer.build(tuple(x.shape))


def position_attention_rows(layer, x, points):
    """PAM's softmax rows of the query ``points`` only.

    Args:
        layer: A :class:`~danet_keras.PositionAttention` (built on first use).
        x: PAM's input, ``(B, H, W, C)`` (``(B, C, H, W)`` for channels_first).
        points: ``(row, col)`` pairs on x's ``H x W`` grid.

    Returns:
        ``(B, P, H, W)``: row ``p`` is ``softmax(q_p . k)`` over all
        positions (no ``1/sqrt(d)``), in float32 (float64 for float64 inputs).
    """
    _ensure_built(layer, x)
    check_inputs("PositionAttention.attention_rows", x, layer.data_format, layer.in_channels)
    size = _spatial_shape(x, layer.data_format)
    pts = check_points(points, size)
    dtype = backend_result_type(x.dtype)
    q = ops.cast(_channels_last(layer.query_conv(x), layer.data_format), dtype)  # (B, H, W, C')
    k = ops.cast(_channels_last(layer.key_conv(x), layer.data_format), dtype)
    if None in size:  # checked when the graph runs: a point outside that grid gets a row of NaN
        qp, outside = _query_rows_checked(q, pts)
    else:
        qp, outside = ops.stack([q[:, int(r), int(c), :] for r, c in pts], axis=1), None  # (B, P, C')
    energy = ops.einsum("bpc,bhwc->bphw", qp, k)  # no 1/sqrt(d)
    energy = energy - ops.max(energy, axis=(2, 3), keepdims=True)
    e = ops.exp(energy)
    rows = e / ops.sum(e, axis=(2, 3), keepdims=True)
    if outside is None:
        return rows
    return ops.where(ops.reshape(outside, (1, -1, 1, 1)), ops.cast(float("nan"), rows.dtype), rows)


def _query_rows_checked(q, pts):
    """``(q at pts (B, P, C'), outside (P,) bool)`` for ``q`` ``(B, H, W, C')`` whose ``H`` or ``W`` is known only
    when the graph runs (a functional model traced with ``None`` sizes).

    A graph cannot raise on every backend when it runs, and indexing outside the grid fails differently on each
    (JAX clamps to the border: another point's row, silently). Each point is selected by comparing its row and
    column with the grid's (positions counted from the tensor, as a symbolic size cannot be), and flagged where
    none matches, so that the caller can give its row NaN. ``where``, not a product with a one-hot mask: an inf
    elsewhere in ``q`` stays out of the points' rows.
    """
    grid_rows = ops.cumsum(ops.ones_like(q[0, :, 0, 0])) - 1  # (H,): 0 .. H - 1
    grid_cols = ops.cumsum(ops.ones_like(q[0, 0, :, 0])) - 1  # (W,)
    at_row = ops.equal(ops.expand_dims(grid_rows, 0), ops.cast(pts[:, :1], grid_rows.dtype))  # (P, H)
    at_col = ops.equal(ops.expand_dims(grid_cols, 0), ops.cast(pts[:, 1:], grid_cols.dtype))  # (P, W)
    zero = ops.zeros((), q.dtype)
    q_rows = ops.sum(ops.where(at_row[None, :, :, None, None], ops.expand_dims(q, 1), zero), axis=2)  # (B, P, W, C')
    qp = ops.sum(ops.where(at_col[None, :, :, None], q_rows, zero), axis=2)  # (B, P, C')
    outside = ops.logical_not(ops.logical_and(ops.any(at_row, axis=1), ops.any(at_col, axis=1)))
    return qp, outside

def channel_attention_energy(x, data_format: str = "channels_last"):
    """CAM's energy ``E`` ``(B, C, C)`` of ``x``: the channels' similarity (float32, float64 stays)."""
    x = ops.cast(_channels_last(x, data_format), backend_result_type(x.dtype))
    return ops.einsum("bhwc,bhwd->bcd", x, x)  # no reshape: symbolic None sizes work


def channel_attention_matrix(layer, x):
    """CAM's attention ``softmax(max(E) - E)`` ``(B, C, C)``.

    Args:
        layer: A :class:`~danet_keras.ChannelAttention` (built on first use).
        x: CAM's input in the layer's data format.

    Returns:
        ``(B, C, C)``; the official max-subtraction makes this ``softmax(-E)``:
        the *less* similar a channel, the *more* weight.
    """
    _ensure_built(layer, x)
    check_inputs("ChannelAttention.attention_matrix", x, layer.data_format, layer.in_channels)
    energy = channel_attention_energy(x, layer.data_format)
    return softmax(ops.max(energy, axis=-1, keepdims=True) - energy, axis=-1)


@dataclass
class AttentionMaps:
    """What :func:`danet_attention_maps` returns (the same fields as in ``danet_torch``).

    Attributes:
        pam: ``(B, P, H, W)`` PAM rows upsampled to the image (``align_corners=True``).
        pam_rows: ``(B, P, h, w)`` PAM rows on the feature grid.
        cam: ``(B, C, C)`` CAM's attention after the max-subtraction.
        cam_energy: ``(B, C, C)`` CAM's energy (channel similarity).
        segmentation: ``(B, H, W)`` int, argmax of the fused logits at the image size.
        points: ``(P, 2)`` int64 feature-grid ``(row, col)`` of the query points.
        image_points: ``(P, 2)`` float64 image position of those grid points.
        query_points: ``(P, 2)`` int64 image-pixel points as asked.
    """

    pam: object
    pam_rows: object
    cam: object
    cam_energy: object
    segmentation: object
    points: np.ndarray
    image_points: np.ndarray
    query_points: np.ndarray

    def numpy(self) -> dict:
        """Every field as a NumPy array (what ``danet-attention --npz`` saves)."""
        out = {name: np.asarray(ops.convert_to_numpy(value)) for name, value in vars(self).items()}
        out["segmentation"] = out["segmentation"].astype(np.int64)
        return out


def _static_size(layer_name: str, x, data_format) -> tuple[int, int]:
    h, w = _spatial_shape(x, data_format)
    if h is None or w is None:
        raise ValueError(f"{layer_name}: attention maps need a concrete input with known spatial sizes, got "
                         f"shape {tuple(x.shape)}; call it eagerly on an array.")
    return int(h), int(w)


def _check_size(size) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"`size` must be (H, W) with positive ints, got {size!r}.") from None
    if h < 1 or w < 1:
        raise ValueError(f"`size` must be (H, W) with positive ints, got {size!r}.")
    return h, w


def head_attention_maps(head, features, points, size=None, training=False) -> AttentionMaps:
    """Attention maps of a :class:`~danet_keras.DANetHead` on backbone ``features``.

    Args:
        head: A built ``DANetHead``.
        features: ``(B, h, w, C)`` (the head's data format), concrete.
        points: ``(row, col)`` pixel pairs in the ``size`` frame.
        size: ``(H, W)`` of the image the features come from (default ``(h, w)``).
        training: Passed to the head's layers (BatchNorm, dropout).
    """
    _ensure_built(head, features)
    check_inputs("DANetHead.attention_maps", features, head.data_format, head.in_channels)
    grid_size = _static_size("DANetHead.attention_maps", features, head.data_format)
    size = grid_size if size is None else _check_size(size)
    query = check_points(points, size)
    grid, back = feature_grid_points(query, size, grid_size)
    pa = head.conv5a(features, training=training)
    pc = head.conv5c(features, training=training)
    rows = position_attention_rows(head.sa, pa, grid)
    energy = channel_attention_energy(pc, head.data_format)
    cam = channel_attention_matrix(head.sc, pc)
    fused = resize_bilinear_align_corners(head(features, training=training)[0], size, head.data_format)
    seg = ops.argmax(fused, axis=layout_axes(head.data_format)[2])
    return AttentionMaps(pam=resize_bilinear_align_corners(rows, size, "channels_first"), pam_rows=rows, cam=cam,
                         cam_energy=energy, segmentation=seg, points=grid, image_points=back, query_points=query)


def danet_attention_maps(model, images, points, training=False) -> AttentionMaps:
    """Attention maps of a :class:`~danet_keras.DANet` for query ``points`` in image pixels.

    Args:
        model: A ``DANet``.
        images: ``(B, H, W, in_channels)`` (the model's data format), normalised as the model was trained
            (ImageNet's RGB statistics for the released weights), concrete.
        points: ``(row, col)`` pixel pairs, rows ``0..H-1``, cols ``0..W-1``.
        training: Passed to the layers (BatchNorm, dropout).

    Returns:
        :class:`AttentionMaps`: ``pam`` ``(B, P, H, W)``, ``cam`` ``(B, C, C)``,
        ``segmentation`` ``(B, H, W)`` and the feature-grid points used.
    """
    if not model.built:
        model.build(tuple(images.shape))
    check_inputs("DANet.attention_maps", images, model.data_format, model.in_channels)
    size = _static_size("DANet.attention_maps", images, model.data_format)
    check_points(points, size)  # fail before the backbone runs
    c4 = model.pretrained(images, training=training)[-1]
    return head_attention_maps(model.head, c4, points, size=size, training=training)
