"""Anomaly-map figures: image, ground truth and the map overlaid, written as PNG.

Figures are built as plain `matplotlib.figure.Figure` objects (rendered by Agg when
saved), not through pyplot, so no display is needed and no global figure registry
grows when many figures are made in a loop.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from moeclip.atomic import atomic_path

CMAP = "jet"
OVERLAY_ALPHA = 0.5


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 images as they are, float images clipped to [0, 1] (imshow's valid range)."""
    return image if image.dtype == np.uint8 else np.clip(image.astype(np.float32), 0.0, 1.0)


def _check_shapes(image: np.ndarray, amap: np.ndarray) -> None:
    """A map of another size than its image would be drawn misaligned without any warning."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    if amap.shape != image.shape[:2]:
        raise ValueError(f"anomaly map {amap.shape} does not match image {image.shape[:2]}")


def _draw_overlay(ax: Axes, image: np.ndarray, amap: np.ndarray) -> AxesImage:
    """The map, on a fixed [0, 1] colour scale, half-transparent over the image."""
    ax.imshow(_as_rgb(image))
    overlay = ax.imshow(amap, cmap=CMAP, alpha=OVERLAY_ALPHA, vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    return overlay


def _draw_mask(ax: Axes, mask: np.ndarray | None) -> None:
    """The ground truth in black and white, or a note when the image has none (normal or unlabelled)."""
    if mask is None:
        ax.text(0.5, 0.5, "no mask", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.imshow(mask.astype(np.float32), cmap="gray", vmin=0.0, vmax=1.0)
    ax.set_title("ground truth")
    ax.set_axis_off()


def anomaly_map_figure(image: np.ndarray, mask: np.ndarray | None, amap: np.ndarray, title: str) -> Figure:
    """Three panels side by side (image, ground truth, overlay with colourbar) for qualitative checks."""
    _check_shapes(image, amap)
    fig = Figure(figsize=(12, 4))
    ax_image, ax_mask, ax_map = fig.subplots(1, 3)
    # Fixed margins: a layout engine doubles the rendering time, and an evaluation saves several of these.
    fig.subplots_adjust(left=0.01, right=0.96, bottom=0.02, top=0.86, wspace=0.08)
    ax_image.imshow(_as_rgb(image))
    ax_image.set_title("image")
    ax_image.set_axis_off()
    _draw_mask(ax_mask, mask)
    overlay = _draw_overlay(ax_map, image, amap)
    ax_map.set_title("anomaly map")
    fig.colorbar(overlay, ax=ax_map, fraction=0.046)
    fig.suptitle(title)
    return fig


def _close(fig: Figure) -> None:
    """Drop pyplot's reference when the figure came from pyplot; plain Figures need nothing."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)


def save_figure(fig: Figure, path: Path | str) -> Path:
    """Write `fig` as PNG via a temporary file and `os.replace`, so readers never see a partial
    image, then close it."""
    path = Path(path)
    try:
        with atomic_path(path) as temporary:
            fig.savefig(temporary, format="png")
    finally:
        _close(fig)
    return path


def prediction_figure(image: np.ndarray, amap: np.ndarray, title: str) -> Figure:
    """A user's image with its calibrated map on the fixed [0, 1] scale, a colour bar and `title` (the score):
    a normal image stays cold, whatever else was scored with it."""
    _check_shapes(image, amap)
    height, width = amap.shape
    fig = Figure(figsize=(6.0 * width / max(height, width) + 1.2, 6.0 * height / max(height, width) + 0.6))
    ax = fig.add_axes((0.02, 0.02, 0.78, 0.88))
    overlay = _draw_overlay(ax, image, amap)
    fig.colorbar(overlay, ax=ax, fraction=0.046, label="anomaly (calibrated)")
    ax.set_title(title)
    return fig
