"""Localisation metrics of a heatmap against boxes: NaN-aware numpy, no model code.

Conventions: ``heatmap`` is (H, W) float with NaN outside the field of view; ``boxes`` are
``(x, y, w, h)`` in the heatmap's pixel frame (x to the right, y down). A box covers the
pixels whose centres fall inside it: columns ``round(x) .. round(x + w) - 1``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from sklearn.metrics import roc_auc_score

Box = Sequence[float]


def box_mask(shape: tuple[int, int], box: Box) -> np.ndarray:
    """Boolean (H, W) mask of one box, clipped to the image."""
    h, w = shape
    x, y, bw, bh = (float(v) for v in box)
    c0, c1 = max(0, int(round(x))), min(w, int(round(x + bw)))
    r0, r1 = max(0, int(round(y))), min(h, int(round(y + bh)))
    mask = np.zeros(shape, dtype=bool)
    if c1 > c0 and r1 > r0:
        mask[r0:r1, c0:c1] = True
    return mask


def union_mask(shape: tuple[int, int], boxes: Iterable[Box]) -> np.ndarray:
    """Boolean (H, W) union of the boxes."""
    mask = np.zeros(shape, dtype=bool)
    for b in boxes:
        mask |= box_mask(shape, b)
    return mask


def _contrast(heatmap: np.ndarray, inside: np.ndarray) -> float:
    valid = np.isfinite(heatmap)
    a, b = heatmap[inside & valid], heatmap[~inside & valid]
    if a.size == 0 or b.size == 0:
        return float("nan")
    denom = np.sqrt(a.var() + b.var())  # population variances
    if denom == 0:
        return float("nan")
    return float((a.mean() - b.mean()) / denom)


def cnr(
    heatmap: np.ndarray, boxes: Sequence[Box], variant: Literal["paper", "union"] = "paper", signed: bool = False
) -> float:
    """Contrast-to-noise ratio |mean_in - mean_out| / sqrt(var_in + var_out).

    ``variant="paper"``: one CNR per box, in order; after each box its pixels are set to
    NaN, so later boxes compare against the rest without earlier boxes; mean over boxes.
    ``variant="union"``: one CNR for the union of the boxes.
    A NaN CNR (empty region, zero variance) counts as 0. The absolute value is returned
    unless ``signed`` (positive = heatmap higher inside the boxes).
    """
    hm = np.array(heatmap, dtype=np.float64)
    if variant == "union":
        values = [_contrast(hm, union_mask(hm.shape, boxes))]
    elif variant == "paper":
        values = []
        for b in boxes:
            inside = box_mask(hm.shape, b)
            values.append(_contrast(hm, inside))
            hm[inside] = np.nan
    else:
        raise ValueError(f"unknown CNR variant {variant!r}; use 'paper' or 'union'")
    if not values:
        return 0.0
    values = [0.0 if not np.isfinite(v) else v for v in values]
    result = float(np.mean(values))
    return result if signed else abs(result)


def miou(heatmap: np.ndarray, boxes: Sequence[Box], thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5)) -> float:
    """Mean over ``thresholds`` of IoU(heatmap > t, union of boxes); NaN pixels are neither."""
    hm = np.asarray(heatmap, dtype=np.float64)
    valid = np.isfinite(hm)
    gt = union_mask(hm.shape, boxes) & valid
    ious = []
    for t in thresholds:
        pred = valid & (np.nan_to_num(hm, nan=-np.inf) > t)
        union = np.count_nonzero(pred | gt)
        ious.append(np.count_nonzero(pred & gt) / union if union else 0.0)
    return float(np.mean(ious))


def auc_roc(heatmap: np.ndarray, boxes: Sequence[Box], binned: bool = False) -> float:
    """Pixel-level AUC-ROC of the heatmap as a score for "inside a box".

    ``binned=False``: exact AUC (scikit-learn) over the non-NaN pixels.
    ``binned=True``: the paper's coarse AUROC on the five thresholds {0, .25, .5, .75, 1}
    (trapezoid over the ROC points of ``score >= threshold``). NaN when only one class.
    """
    hm = np.asarray(heatmap, dtype=np.float64)
    valid = np.isfinite(hm)
    y = union_mask(hm.shape, boxes)[valid]
    s = hm[valid]
    if y.all() or not y.any():
        return float("nan")
    if not binned:
        return float(roc_auc_score(y, s))
    thresholds = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    pos, neg = y.sum(), (~y).sum()
    tpr = np.array([np.count_nonzero((s >= t) & y) / pos for t in thresholds])
    fpr = np.array([np.count_nonzero((s >= t) & ~y) / neg for t in thresholds])
    # thresholds ascend, so the ROC points go from (1, 1)-ish towards (0, 0); close the curve.
    fpr = np.concatenate([[1.0], fpr, [0.0]])
    tpr = np.concatenate([[1.0], tpr, [0.0]])
    return float(-np.trapezoid(tpr, fpr))


def pointing_game(heatmap: np.ndarray, boxes: Sequence[Box]) -> float:
    """1.0 when the heatmap's maximum (first, in row-major order) lies in a box, else 0.0."""
    hm = np.asarray(heatmap, dtype=np.float64)
    if not np.isfinite(hm).any():
        return 0.0
    r, c = np.unravel_index(np.nanargmax(hm), hm.shape)
    return float(union_mask(hm.shape, boxes)[r, c])


def all_metrics(heatmap: np.ndarray, boxes: Sequence[Box]) -> dict[str, float]:
    """The four headline metrics plus the signed CNR and the paper's binned AUROC."""
    return {
        "cnr": cnr(heatmap, boxes),
        "cnr_signed": cnr(heatmap, boxes, signed=True),
        "cnr_union": cnr(heatmap, boxes, variant="union"),
        "miou": miou(heatmap, boxes),
        "auc_roc": auc_roc(heatmap, boxes),
        "auc_roc_binned": auc_roc(heatmap, boxes, binned=True),
        "pointing": pointing_game(heatmap, boxes),
    }
