"""Findings inserted into the projections, one renderer per category, each returning the
change of line integral, its mask and a report-style phrase.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi

from .anatomy import (
    _MIN_FOOT_MM,
    _MU_LUNG,
    _Base,
    _cap,
    _Insert,
    _lat,
    _pick,
    _rowcol,
    _side_adj,
    _size_word,
    _smooth_noise,
    _vert,
)


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
