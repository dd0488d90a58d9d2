"""Pictures of heatmaps: a colour overlay on the X-ray, with optional boxes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

BOX_COLOUR = (0, 255, 255)  # cyan: absent from the heatmap's colour map
OVERLAY_CMAP = "inferno"  # perceptually uniform: equal steps of the heatmap look equally large


def heatmap_png(heatmap: np.ndarray) -> Image.Image:
    """8-bit grayscale picture of an [0, 1] heatmap; NaN becomes 0."""
    return Image.fromarray((np.nan_to_num(heatmap, nan=0.0).clip(0, 1) * 255).round().astype(np.uint8))


def overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    boxes: Sequence[Sequence[float]] = (),
    alpha: float = 0.45,
    cmap: str = OVERLAY_CMAP,
) -> Image.Image:
    """RGB picture: the X-ray in gray, the heatmap in colour where it is > 0, boxes in cyan.

    The colour map is perceptually uniform (``inferno``: black -> red -> yellow), so equal
    steps of the heatmap look equally large, and it has no cyan, the boxes' colour.

    Args:
        image: (H, W) float in [0, 1]; heatmap: (H, W) in [0, 1] with NaN allowed.
        boxes: (x, y, w, h) in the image's pixels.
    """
    from matplotlib import colormaps

    gray = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2)
    hm = np.nan_to_num(heatmap, nan=0.0).clip(0, 1)
    colour = colormaps[cmap](hm)[..., :3]
    weight = alpha * (hm > 0)[..., None]
    rgb = (1 - weight) * gray + weight * colour
    pic = Image.fromarray((rgb * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    width = max(1, round(min(image.shape) / 200))
    for x, y, w, h in boxes:
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=BOX_COLOUR, width=width)
    return pic


def save_heatmap_pngs(out: str | Path, image: np.ndarray, heatmap: np.ndarray, boxes=()) -> tuple[Path, Path]:
    """Write ``out`` (the heatmap) and ``<out stem>_overlay.png``; return both paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    heatmap_png(heatmap).save(out)
    over = out.with_name(out.stem + "_overlay.png")
    overlay(image, heatmap, boxes).save(over)
    return out, over
