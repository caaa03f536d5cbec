"""What the attention looks at: PAM rows of query points, CAM's matrix, maps at image size (NCHW).

The paper's Figure 4 (Fu et al., CVPR 2019) shows, for a query position,
the row of PAM's ``N x N`` attention (how much every position contributes
to the query's output) and CAM's channel attention. Here:

* :func:`position_attention_rows` computes only the rows of the query
  points: ``energy = Q[:, :, idx]^T K`` is ``(B, P, N)``, never ``N x N``,
  so a 1024 x 2048 frame (128 x 256 features, ``N = 32768``) costs
  ``P * N`` numbers per image instead of 4 GiB. The rows come from the
  formula, not from PAM's forward path, so they are the same whichever
  path (official or fused) the layer's forward takes.
* :func:`channel_attention_matrix` is CAM's ``softmax(max(E) - E)``,
  ``E = X X^T``: after the official max-subtraction, which equals
  ``softmax(-E)``, so less similar channels get more weight.
* :func:`head_attention_maps` / :func:`danet_attention_maps` map query points
  given in image pixels to the feature grid with the ``align_corners=True``
  geometry of DANet's upsampling (feature index ``p * (h - 1) / (H - 1)``,
  rounded half up) and back (``f * (H - 1) / (h - 1)``), and upsample the
  PAM rows to the image like DANet upsamples its logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import check_input

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

    Args:
        points: A sequence of ``(row, col)`` integer pairs (list, tuple, array, tensor).
        size: ``(H, W)``; rows must be in ``0..H-1`` and columns in ``0..W-1``.
        name: The argument's name in error messages.

    Raises:
        TypeError: ``points`` does not hold integers.
        ValueError: wrong shape, no points, or a point outside the grid.
    """
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().numpy()
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
    h, w = int(size[0]), int(size[1])
    bad = (arr[:, 0] < 0) | (arr[:, 0] >= h) | (arr[:, 1] < 0) | (arr[:, 1] >= w)
    if bad.any():
        r, c = arr[int(np.argmax(bad))]
        raise ValueError(f"`{name}` has ({r}, {c}) outside the {h} x {w} grid; accepted rows 0..{h - 1} and "
                         f"cols 0..{w - 1}.")
    return arr


def _to_grid(p: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    # round(p * (n_out - 1) / (n_in - 1)), half up, in exact integer arithmetic
    if n_in == 1 or n_out == 1:
        return np.zeros_like(p)
    return (2 * p * (n_out - 1) + (n_in - 1)) // (2 * (n_in - 1))


def _to_image(f: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    if n_out == 1:
        return np.zeros(f.shape, dtype=np.float64)
    return f * (n_in - 1) / (n_out - 1)


def feature_grid_points(points, image_size, feature_size) -> tuple[np.ndarray, np.ndarray]:
    """Image-pixel points -> feature-grid points, and those back to image pixels.

    Args:
        points: ``(P, 2)`` integer ``(row, col)`` inside ``image_size``.
        image_size: ``(H, W)`` of the image.
        feature_size: ``(h, w)`` of the feature grid.

    Returns:
        ``(grid, image_points)``: ``(P, 2)`` int64 feature indices
        ``round(p * (h - 1) / (H - 1))`` (half up), and ``(P, 2)`` float64
        image positions ``f * (H - 1) / (h - 1)`` of those grid points (the
        ``align_corners=True`` geometry: corners map to corners).
    """
    pts = check_points(points, image_size)
    grid = np.stack([_to_grid(pts[:, i], int(image_size[i]), int(feature_size[i])) for i in (0, 1)], axis=1)
    back = np.stack([_to_image(grid[:, i], int(image_size[i]), int(feature_size[i])) for i in (0, 1)], axis=1)
    return grid.astype(np.int64), back.astype(np.float64)


def _result_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def position_attention_rows(pam, x: torch.Tensor, points) -> torch.Tensor:
    """PAM's softmax rows of the query ``points`` only.

    Args:
        pam: A :class:`~danet_torch.PositionAttention`.
        x: PAM's input ``(B, C, H, W)``.
        points: ``(row, col)`` pairs on x's ``H x W`` grid.

    Returns:
        ``(B, P, H, W)``: row ``p`` is ``softmax(q_p^T K)`` over all ``N = H W``
        positions (no ``1/sqrt(d)``), each summing to 1; float32 (float64 for
        float64 inputs), computed in that dtype even under autocast.
    """
    check_input(x, pam.in_channels, "PositionAttention.attention_rows")
    b, _, h, w = x.shape
    pts = check_points(points, (h, w))
    idx = torch.as_tensor(pts[:, 0] * w + pts[:, 1], device=x.device)
    dtype = _result_dtype(x)
    q = pam.query_conv(x).flatten(2)  # (B, C', N)
    k = pam.key_conv(x).flatten(2)  # (B, C', N)
    with torch.autocast(device_type=x.device.type, enabled=False):
        energy = torch.bmm(q[:, :, idx].transpose(1, 2).to(dtype), k.to(dtype))  # (B, P, N)
        rows = torch.softmax(energy, dim=-1)
    return rows.reshape(b, len(pts), h, w)


def channel_attention_energy(x: torch.Tensor) -> torch.Tensor:
    """CAM's energy ``E = X X^T`` ``(B, C, C)``: the channels' similarity (float32, float64 stays)."""
    dtype = _result_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.flatten(2).to(dtype)
        return torch.bmm(xf, xf.transpose(1, 2))


def channel_attention_matrix(cam, x: torch.Tensor) -> torch.Tensor:
    """CAM's attention ``softmax(max(E) - E)`` ``(B, C, C)``, ``E = X X^T``.

    Args:
        cam: A :class:`~danet_torch.ChannelAttention` (checks the channels).
        x: CAM's input ``(B, C, H, W)``.

    Returns:
        ``(B, C, C)``; row ``i`` (summing to 1) weighs the channels that
        make channel ``i``'s output. The official max-subtraction makes this
        ``softmax(-E)``: the *less* similar a channel, the *more* weight.
    """
    check_input(x, cam.in_channels, "ChannelAttention.attention_matrix")
    energy = channel_attention_energy(x)
    return torch.softmax(energy.amax(dim=-1, keepdim=True) - energy, dim=-1)


@dataclass
class AttentionMaps:
    """What :func:`danet_attention_maps` returns (the same fields in ``danet_keras``).

    Attributes:
        pam: ``(B, P, H, W)`` PAM rows upsampled to the image (``align_corners=True``).
        pam_rows: ``(B, P, h, w)`` PAM rows on the feature grid.
        cam: ``(B, C, C)`` CAM's attention after the max-subtraction.
        cam_energy: ``(B, C, C)`` CAM's energy ``X X^T`` (channel similarity).
        segmentation: ``(B, H, W)`` int64, argmax of the fused logits at the image size.
        points: ``(P, 2)`` int64 feature-grid ``(row, col)`` of the query points.
        image_points: ``(P, 2)`` float64 image position of those grid points.
        query_points: ``(P, 2)`` int64 image-pixel points as asked.
    """

    pam: torch.Tensor
    pam_rows: torch.Tensor
    cam: torch.Tensor
    cam_energy: torch.Tensor
    segmentation: torch.Tensor
    points: np.ndarray
    image_points: np.ndarray
    query_points: np.ndarray

    def numpy(self) -> dict:
        """Every field as a NumPy array (what ``danet-attention --npz`` saves)."""
        out = {}
        for name, value in vars(self).items():
            out[name] = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        return out


def _check_size(size) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"`size` must be (H, W) with positive ints, got {size!r}.") from None
    if h < 1 or w < 1:
        raise ValueError(f"`size` must be (H, W) with positive ints, got {size!r}.")
    return h, w


@torch.no_grad()
def head_attention_maps(head, features: torch.Tensor, points, size=None) -> AttentionMaps:
    """Attention maps of a :class:`~danet_torch.DANetHead` on backbone ``features``.

    One forward pass of the head: the inputs of PAM (``sa``) and CAM (``sc``)
    are captured with forward pre-hooks, so the maps belong to the very pass
    that gives the segmentation. The module's mode is kept (call ``eval()``
    first for inference statistics); no gradients are recorded.

    Args:
        head: A ``DANetHead``.
        features: ``(B, C, h, w)``.
        points: ``(row, col)`` pixel pairs in the ``size`` frame.
        size: ``(H, W)`` of the image the features come from (default ``(h, w)``).
    """
    check_input(features, head.in_channels, "DANetHead.attention_maps")
    grid_size = tuple(features.shape[-2:])
    size = grid_size if size is None else _check_size(size)
    query = check_points(points, size)
    grid, back = feature_grid_points(query, size, grid_size)
    captured = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, key=key: captured.__setitem__(key, args[0]))
             for key, m in (("sa", head.sa), ("sc", head.sc))]
    try:
        fused = head(features)[0]
    finally:
        for hook in hooks:
            hook.remove()
    rows = position_attention_rows(head.sa, captured["sa"], grid)
    energy = channel_attention_energy(captured["sc"])
    cam = channel_attention_matrix(head.sc, captured["sc"])
    up = dict(size=size, mode="bilinear", align_corners=True)
    return AttentionMaps(pam=F.interpolate(rows, **up), pam_rows=rows, cam=cam, cam_energy=energy,
                         segmentation=F.interpolate(fused, **up).argmax(dim=1), points=grid,
                         image_points=back, query_points=query)


@torch.no_grad()
def danet_attention_maps(model, images: torch.Tensor, points) -> AttentionMaps:
    """Attention maps of a :class:`~danet_torch.DANet` for query ``points`` in image pixels.

    Args:
        model: A ``DANet`` (its mode is kept: call ``eval()`` first).
        images: ``(B, in_channels, H, W)``, normalised as the model was trained (ImageNet's RGB
            statistics for the released weights).
        points: ``(row, col)`` pixel pairs, rows ``0..H-1``, cols ``0..W-1``.

    Returns:
        :class:`AttentionMaps` with ``pam`` ``(B, P, H, W)``, ``cam`` ``(B, 512, 512)``,
        ``segmentation`` ``(B, H, W)`` and the feature-grid points used
        (``h = ceil(H / output_stride)`` for the official backbone).
    """
    check_input(images, model.in_channels, "DANet.attention_maps")
    size = tuple(images.shape[-2:])
    check_points(points, size)  # fail before the backbone runs
    c4 = model.pretrained(images)[-1]
    return head_attention_maps(model.head, c4, points, size=size)
