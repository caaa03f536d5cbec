"""Draw DANet's attention maps like the paper's Figure 4, with matplotlib's Agg canvas (no display, no pyplot).

One panel per query point (its PAM map over the image, the point marked),
then CAM's matrix with a colorbar, CAM's weight against channel similarity
(the max-subtraction makes the weight fall as similarity rises), and the
predicted segmentation. Needs the ``viz`` extra (``pip install 'danet[viz]'``).
"""

from __future__ import annotations

import io

import numpy as np

__all__ = ["render_png", "COLUMNS"]

COLUMNS = 4
PANEL_INCHES = 3.0
CAM_ROWS_PLOTTED = 4


def _show_image(ax, image):
    if image.ndim == 2:
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])


def _mark(ax, points, colors, labels=True):
    for i, (r, c) in enumerate(points):
        ax.plot([c], [r], marker="o", markersize=9, markerfacecolor=colors[i], markeredgecolor="white",
                markeredgewidth=1.5)
        if labels:
            ax.annotate(str(i + 1), (c, r), xytext=(6, 6), textcoords="offset points", color="white",
                        fontsize=9, fontweight="bold")


def _cam_vs_similarity(ax, attention, energy):
    """Each plotted row i: weight A[i, j] against similarity E[i, j] over j (log weight axis)."""
    c = attention.shape[0]
    rows = np.linspace(0, c - 1, min(CAM_ROWS_PLOTTED, c)).round().astype(int)
    for i in rows:
        keep = attention[i] > 0  # weights that underflowed to 0 cannot be drawn on a log axis
        ax.scatter(energy[i][keep], attention[i][keep], s=8, label=f"channel {i}")
    ax.set_yscale("log")
    ax.set_xlabel("similarity E[i, j] = <x_i, x_j>")
    ax.set_ylabel("CAM weight A[i, j]")
    ax.set_title("CAM: less similar, more weight", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")


def render_png(image: np.ndarray, maps: dict, title: str | None = None, dpi: int = 72) -> bytes:
    """The figure as PNG bytes.

    Args:
        image: ``(H, W, 3)`` or ``(H, W)`` in ``[0, 1]``, for display.
        maps: ``AttentionMaps.numpy()`` of one call (the first image of the batch is drawn).
        title: Figure title.
        dpi: Resolution (72 keeps a four-point figure around 100 KB).

    Returns:
        The PNG file's bytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pam, seg = maps["pam"][0], maps["segmentation"][0]
    cam, energy = maps["cam"][0], maps["cam_energy"][0]
    points = maps["image_points"]
    n = len(points) + 4
    cols = min(COLUMNS, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES + (0.4 if title else 0.0)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(points))]
    gray = image if image.ndim == 2 else image @ np.array([0.299, 0.587, 0.114])

    _show_image(axes[0], image)
    _mark(axes[0], points, colors)
    axes[0].set_title("image, query points", fontsize=10)
    for i, (r, c) in enumerate(points):
        ax = axes[i + 1]
        ax.imshow(gray, cmap="gray", vmin=0.0, vmax=1.0)
        ax.imshow(pam[i], cmap="jet", alpha=0.55)
        _mark(ax, [(r, c)], [colors[i]], labels=False)
        ax.set_xticks([])
        ax.set_yticks([])
        q = maps["query_points"][i]
        ax.set_title(f"PAM, point {i + 1} ({q[0]}, {q[1]})", fontsize=10)
    k = len(points) + 1
    im = axes[k].imshow(cam, cmap="viridis")
    fig.colorbar(im, ax=axes[k], fraction=0.046, pad=0.04)
    axes[k].set_title(f"CAM attention ({cam.shape[0]} x {cam.shape[1]})", fontsize=10)
    axes[k].set_xlabel("channel j")
    axes[k].set_ylabel("channel i")
    _cam_vs_similarity(axes[k + 1], cam, energy)
    axes[k + 2].imshow(seg, cmap="tab20", interpolation="nearest", vmin=0, vmax=19)
    axes[k + 2].set_xticks([])
    axes[k + 2].set_yticks([])
    axes[k + 2].set_title("segmentation (argmax)", fontsize=10)
    for ax in axes[k + 3:]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
