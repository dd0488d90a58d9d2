"""From recorded attention to a heatmap on the original image: pure numpy / scikit-image.

Frames:
* *model frame*: the S x S model input (short side resized to S, centre crop);
* *original frame*: the image as stored, W x H pixels. :class:`Geometry` maps boxes into
  the model frame and heatmaps back, with NaN where the crop cut the image away.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from skimage.filters import gaussian, threshold_multiotsu

from .config import GroundingConfig
from .errors import LdmGroundError

Box = tuple[float, float, float, float]  # (x, y, w, h) in pixels


@dataclass(frozen=True)
class Geometry:
    """Short-side resize to ``size`` followed by a centre crop of ``size`` x ``size``.

    Attributes:
        width, height: original image size in pixels.
        size: model input side S in pixels.
    """

    width: int
    height: int
    size: int

    @property
    def short(self) -> int:
        return min(self.width, self.height)

    @property
    def scale(self) -> float:
        """Model pixels per original pixel."""
        return self.size / self.short

    @property
    def crop_origin(self) -> tuple[float, float]:
        """(x, y) of the crop's top-left corner in original pixels."""
        return (self.width - self.short) / 2, (self.height - self.short) / 2

    def box_to_model(self, box: Box) -> Box | None:
        """Box in model pixels, clipped to the crop; None when it lies wholly outside."""
        ox, oy = self.crop_origin
        x0, y0 = max(box[0], ox), max(box[1], oy)
        x1, y1 = min(box[0] + box[2], ox + self.short), min(box[1] + box[3], oy + self.short)
        if x1 <= x0 or y1 <= y0:
            return None
        s = self.scale
        return ((x0 - ox) * s, (y0 - oy) * s, (x1 - x0) * s, (y1 - y0) * s)

    def boxes_to_model(self, boxes) -> list[Box]:
        """:meth:`box_to_model` of each box, leaving out those wholly outside the crop."""
        return [b for b in (self.box_to_model(tuple(bx)) for bx in boxes) if b is not None]

    def to_original(self, heatmap: np.ndarray) -> np.ndarray:
        """Map an (S, S) model-frame heatmap to (H, W), NaN outside the crop.

        Nearest-neighbour resize to the short side, then NaN padding (floor on the
        top/left, ceil on the bottom/right), as in the paper's evaluation.
        """
        short = self.short
        idx = np.minimum((np.arange(short) * self.size / short).astype(int), self.size - 1)
        square = heatmap[np.ix_(idx, idx)].astype(np.float32)
        out = np.full((self.height, self.width), np.nan, dtype=np.float32)
        top, left = (self.height - short) // 2, (self.width - short) // 2
        out[top : top + short, left : left + short] = square
        return out


def load_image(path: str | Path) -> np.ndarray:
    """Read an X-ray as (H, W) float32 in [0, 1].

    Accepts 8- and 16-bit grayscale PNG/JPEG, RGB(A) (converted to luminance) and DICOM
    (``.dcm``; rescale slope/intercept applied, MONOCHROME1 inverted, min-max scaled).
    """
    path = Path(path)
    if not path.is_file():
        raise LdmGroundError(f"image file not found: {path}")
    if path.suffix.lower() in {".dcm", ".dicom"}:
        return _load_dicom(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 or im.mode.startswith("I;16") else 255.0
                arr = arr / top
            elif im.mode == "F":
                arr = np.asarray(im, dtype=np.float64)
                arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-12)
            else:
                arr = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise LdmGroundError(f"cannot read image {path}: {err}") from err
    return np.clip(arr, 0, 1).astype(np.float32)


def _load_dicom(path: Path) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float64)
    except Exception as err:  # pydicom raises many types for broken files
        raise LdmGroundError(f"cannot read DICOM {path}: {err}") from err
    arr = arr * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
    if arr.ndim == 3:
        arr = arr[..., :3].mean(-1)
    lo, hi = arr.min(), arr.max()
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = 1.0 - arr
    return arr.astype(np.float32)


def preprocess(image: np.ndarray, size: int) -> tuple[np.ndarray, Geometry]:
    """The paper's transform: [0, 1] grayscale, short side to ``size``, centre crop.

    Args:
        image: (H, W) float in [0, 1].
    Returns:
        ((size, size) float32 in [0, 1], the :class:`Geometry` to map results back).
    """
    if image.ndim != 2:
        raise LdmGroundError(f"expected a 2-D grayscale image, got shape {image.shape}")
    h, w = image.shape
    geo = Geometry(width=w, height=h, size=size)
    if min(h, w) < size:
        warnings.warn(f"image {w}x{h} is smaller than the model input {size}; it is upsampled", stacklevel=2)
    ox, oy = geo.crop_origin
    # Crop the square first, then resize it: the same pixels as resize-then-crop.
    top, left = int(round(oy)), int(round(ox))
    square = image[top : top + geo.short, left : left + geo.short]
    im = Image.fromarray(np.ascontiguousarray(square, dtype=np.float32))
    resized = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(resized, 0, 1), geo


def minmax(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] ignoring NaN; a constant map becomes zeros."""
    lo, hi = np.nanmin(x), np.nanmax(x)
    if not np.isfinite(lo) or hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def postprocess(heatmap: np.ndarray, config: GroundingConfig) -> np.ndarray:
    """Border suppression, Gaussian blur, min-max and Otsu masking, each per ``config``.

    Args:
        heatmap: (S, S) aggregated attention in the model frame.
    Returns:
        (S, S) float32 in [0, 1].
    """
    hm = np.asarray(heatmap, dtype=np.float64).copy()
    size = hm.shape[0]
    if config.border > 0:
        b = max(1, int(round(config.border * size)))
        inner_min = hm[b:-b, b:-b].min()
        hm[:b, :], hm[-b:, :], hm[:, :b], hm[:, -b:] = inner_min, inner_min, inner_min, inner_min
    if config.sigma > 0:
        hm = gaussian(hm, sigma=config.sigma * size / 512, mode="nearest", preserve_range=True)
    hm = minmax(hm)
    if config.otsu and hm.max() > hm.min():
        try:
            (thr,) = threshold_multiotsu(hm, classes=2)
            hm = hm * (hm > thr)
        except ValueError:
            pass  # too few distinct values to threshold: keep the map as it is
    return hm.astype(np.float32)
