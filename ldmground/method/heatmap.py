"""From an X-ray file to the model input, and from recorded attention to a heatmap on it.

Numpy, SciPy and scikit-image, and torch's ``interpolate`` for the authors' resize.

Frames:
* *model frame*: the S x S model input (short side resized to S and centre crop, or the
  other way round: :class:`Geometry`);
* *original frame*: the image as stored, W x H pixels. :class:`Geometry` maps boxes into
  the model frame and heatmaps back, with NaN where the crop cut the image away.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from scipy.ndimage import gaussian_filter
from skimage.filters import threshold_multiotsu

from ..config import GroundingConfig
from ..errors import LdmGroundError
from ..geometry import Geometry


def load_image(path: str | Path) -> np.ndarray:
    """Read an X-ray as (H, W) float32 in [0, 1].

    Accepts 8- and 16-bit grayscale PNG/JPEG, RGB(A) (converted to luminance) and DICOM
    (``.dcm`` or ``.dicom``; rescale slope/intercept applied, then the VOI LUT or the window
    (Window Center / Width) where the file has one, as pydicom's ``apply_voi_lut`` does it,
    then min-max scaled, MONOCHROME1 inverted).
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
    arr = _apply_voi_lut(arr, ds, path)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(-1)
    lo, hi = arr.min(), arr.max()
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = 1.0 - arr
    return arr.astype(np.float32)


def _apply_voi_lut(arr: np.ndarray, ds, path: Path) -> np.ndarray:
    """The VOI LUT Sequence, else the Window Center / Width, of a monochrome image, where present
    (pydicom's ``apply_voi_lut``, which prefers the LUT); other files pass unchanged."""
    has_lut = bool(ds.get("VOILUTSequence"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    monochrome = getattr(ds, "PhotometricInterpretation", "") in ("MONOCHROME1", "MONOCHROME2")
    if arr.ndim != 2 or not monochrome or not (has_lut or has_window):
        return arr
    try:
        from pydicom.pixels import apply_voi_lut  # pydicom >= 3
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_voi_lut
    if has_lut and np.array_equal(arr, np.round(arr)):
        arr = arr.astype(np.int64)  # a LUT is indexed by integer stored values
    try:
        return np.asarray(apply_voi_lut(arr, ds), dtype=np.float64)
    except Exception as err:  # a malformed LUT or window
        raise LdmGroundError(f"cannot apply the VOI LUT / window of DICOM {path}: {err}") from err


def preprocess(image: np.ndarray, size: int, resize: str = "resize-crop") -> tuple[np.ndarray, Geometry]:
    """The model input: [0, 1] grayscale, S x S, by the ``resize`` method of :class:`Geometry`.

    ``"resize-crop"`` resizes with bilinear interpolation without antialiasing
    (``torch.nn.functional.interpolate``, which torchvision's tensor ``Resize`` calls);
    ``"crop-resize"`` with PIL's antialiased bilinear filter.

    Args:
        image: (H, W) float in [0, 1].
    Returns:
        ((size, size) float32 in [0, 1], the :class:`Geometry` to map results back).
    """
    if image.ndim != 2:
        raise LdmGroundError(f"expected a 2-D grayscale image, got shape {image.shape}")
    if resize not in ("resize-crop", "crop-resize"):
        raise LdmGroundError(f"unknown resize method {resize!r}; use 'resize-crop' or 'crop-resize'")
    h, w = image.shape
    geo = Geometry(width=w, height=h, size=size, resize=resize)
    if min(h, w) < size:
        warnings.warn(f"image {w}x{h} is smaller than the model input {size}; it is upsampled", stacklevel=2)
    left, top = geo.crop_start
    if resize == "resize-crop":
        rw, rh = geo.resized
        t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        resized = F.interpolate(t, size=(rh, rw), mode="bilinear", align_corners=False, antialias=False)
        out = resized[0, 0, top : top + size, left : left + size].numpy()
    else:
        square = np.ascontiguousarray(image[top : top + geo.short, left : left + geo.short], dtype=np.float32)
        im = Image.fromarray(square)
        out = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(out, 0, 1), geo


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
        hm = gaussian_filter(hm, sigma=config.sigma * size / 512, mode=config.blur_mode)
    hm = minmax(hm)
    if config.otsu and hm.max() > hm.min():
        try:
            (thr,) = threshold_multiotsu(hm, classes=2)
            hm = hm * (hm > thr)
        except ValueError:
            pass  # too few distinct values to threshold: keep the map as it is
    return hm.astype(np.float32)
