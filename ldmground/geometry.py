"""Where the model input sits in the X-ray: the resize and centre crop (:class:`Geometry`), how
boxes go into the model frame and heatmaps back to the original image.

Numpy only; imports nothing of ldmground, so data set readers and the method share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Box = tuple[float, float, float, float]  # (x, y, w, h) in pixels


@dataclass(frozen=True)
class Geometry:
    """How an X-ray becomes the S x S model input, and how maps and boxes move between frames.

    ``resize="resize-crop"`` (the authors'): the short side is resized to S (the long side
    to ``int(S * long / short)``, as torchvision's ``Resize(S)``), then a centre crop starts at
    ``L // 2 - S // 2`` of the resized long side L (MONAI's ``CenterSpatialCrop``).
    ``resize="crop-resize"``: the centre square of the original, starting at
    ``floor(margin / 2)``, resized to S.
    Either way a model-frame heatmap goes back by a nearest resize to the short side and NaN
    padding, ``floor(margin / 2)`` before and the rest after (the authors' evaluation).

    Attributes:
        width, height: original image size in pixels.
        size: model input side S in pixels.
        resize: ``"resize-crop"`` or ``"crop-resize"`` (see ``GroundingConfig.resize``).
    """

    width: int
    height: int
    size: int
    resize: str = "resize-crop"

    @property
    def short(self) -> int:
        return min(self.width, self.height)

    @property
    def resized(self) -> tuple[int, int]:
        """(width, height) after the short-side resize of ``"resize-crop"``."""
        if self.width <= self.height:
            return self.size, int(self.size * self.height / self.width)
        return int(self.size * self.width / self.height), self.size

    @property
    def crop_start(self) -> tuple[int, int]:
        """(x, y) of the crop's first pixel: in resized pixels for ``"resize-crop"``, in
        original pixels for ``"crop-resize"``."""
        if self.resize == "resize-crop":
            rw, rh = self.resized
            return rw // 2 - self.size // 2, rh // 2 - self.size // 2
        return (self.width - self.short) // 2, (self.height - self.short) // 2

    @property
    def scales(self) -> tuple[float, float]:
        """(x, y) model pixels per original pixel."""
        if self.resize == "resize-crop":
            rw, rh = self.resized
            return rw / self.width, rh / self.height
        return self.scale, self.scale

    @property
    def scale(self) -> float:
        """Model pixels per original pixel along the short side."""
        return self.size / self.short

    @property
    def crop_origin(self) -> tuple[float, float]:
        """(x, y) of the crop's top-left corner in original pixels."""
        (cx, cy), (sx, sy) = self.crop_start, self.scales
        if self.resize == "resize-crop":
            return cx / sx, cy / sy
        return float(cx), float(cy)

    def box_to_model(self, box: Box) -> Box | None:
        """Box in model pixels, clipped to the crop; None when it lies wholly outside."""
        (ox, oy), (sx, sy) = self.crop_origin, self.scales
        x0, y0 = max(box[0], ox), max(box[1], oy)
        x1 = min(box[0] + box[2], ox + self.size / sx)
        y1 = min(box[1] + box[3], oy + self.size / sy)
        if x1 <= x0 or y1 <= y0:
            return None
        return ((x0 - ox) * sx, (y0 - oy) * sy, (x1 - x0) * sx, (y1 - y0) * sy)

    def boxes_to_model(self, boxes) -> list[Box]:
        """:meth:`box_to_model` of each box, leaving out those wholly outside the crop."""
        return [b for b in (self.box_to_model(tuple(bx)) for bx in boxes) if b is not None]

    def to_original(self, heatmap: np.ndarray) -> np.ndarray:
        """Map an (S, S) model-frame heatmap to (H, W), NaN outside the crop.

        Nearest-neighbour resize to the short side (source index ``floor(i * S / short)`` in
        float32, as ``torch.nn.functional.interpolate(mode="nearest")`` computes it), then
        NaN padding: ``floor(margin / 2)`` on the top/left, the rest on the bottom/right.
        """
        short = self.short
        idx = _nearest_index(self.size, short)
        square = heatmap[np.ix_(idx, idx)].astype(np.float32)
        out = np.full((self.height, self.width), np.nan, dtype=np.float32)
        top, left = (self.height - short) // 2, (self.width - short) // 2
        out[top : top + short, left : left + short] = square
        return out


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source indices of a nearest resize from ``n_in`` to ``n_out`` samples, in torch's
    float32 arithmetic (exact copies for equal sizes and for an exact doubling)."""
    if n_out == n_in:
        return np.arange(n_out)
    if n_out == 2 * n_in:
        return np.arange(n_out) >> 1
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)
