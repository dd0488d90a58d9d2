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


CnrVariant = Literal["paper", "abs-of-mean", "union"]


def cnr(heatmap: np.ndarray, boxes: Sequence[Box], variant: CnrVariant = "paper", signed: bool = False) -> float:
    """Contrast-to-noise ratio (mean_in - mean_out) / sqrt(var_in + var_out), as in the paper.

    ``variant="paper"`` (the authors' ``CNR``): one CNR per box, in order; after each box its
    pixels are set to NaN, so later boxes compare against the rest without earlier boxes;
    the mean over boxes of the per-box |CNR| (of the signed CNRs when ``signed``: the
    authors' "non-absolute" CNR, which MIDL 2026 reports).
    ``variant="abs-of-mean"``: |mean of the signed per-box CNRs| (this project's CNR before
    0.2; it differs from ``"paper"`` when one phrase's boxes have CNRs of both signs).
    ``variant="union"``: one CNR for the union of the boxes.
    Variances are population variances over the non-NaN pixels. A NaN CNR (empty region,
    zero variance) counts as 0; so does an infinite one (both regions constant), which the
    authors' ``torch.nan_to_num`` would turn into 3.4e38.
    """
    hm = np.array(heatmap, dtype=np.float64)
    if variant == "union":
        values = [_contrast(hm, union_mask(hm.shape, boxes))]
    elif variant in ("paper", "abs-of-mean"):
        values = []
        for b in boxes:
            inside = box_mask(hm.shape, b)
            values.append(_contrast(hm, inside))
            hm[inside] = np.nan
    else:
        raise ValueError(f"unknown CNR variant {variant!r}; use 'paper', 'abs-of-mean' or 'union'")
    if not values:
        return 0.0
    values = np.array([v if np.isfinite(v) else 0.0 for v in values])
    if variant == "paper" and not signed:
        return float(np.mean(np.abs(values)))
    result = float(np.mean(values))
    return result if signed else abs(result)


def miou(
    heatmap: np.ndarray,
    boxes: Sequence[Box],
    thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5),
    field_of_view_only: bool = False,
) -> float:
    """Mean over ``thresholds`` of IoU(heatmap > t, union of boxes).

    NaN pixels are never predicted (NaN > t is false). The ground truth is the union of the
    boxes on the whole image, box pixels in the NaN padding included, as the authors' mIoU
    has it; ``field_of_view_only=True`` drops those pixels from the ground truth (this
    project's mIoU before 0.2).
    """
    hm = np.asarray(heatmap, dtype=np.float64)
    valid = np.isfinite(hm)
    gt = union_mask(hm.shape, boxes)
    if field_of_view_only:
        gt &= valid
    ious = []
    for t in thresholds:
        pred = valid & (np.nan_to_num(hm, nan=-np.inf) > t)
        union = np.count_nonzero(pred | gt)
        ious.append(np.count_nonzero(pred & gt) / union if union else 0.0)
    return float(np.mean(ious))


def auc_roc(heatmap: np.ndarray, boxes: Sequence[Box], binned: bool = False) -> float:
    """Pixel-level AUC-ROC of the heatmap as a score for "inside a box", over non-NaN pixels.

    ``binned=False``: exact AUC (scikit-learn); NaN when the pixels hold only one class.
    ``binned=True``: the paper's coarse AUROC (torcheval's ``binary_binned_auroc`` with 5
    thresholds {0, .25, .5, .75, 1}): the trapezoid through (0, 0) and the ROC points of
    ``score >= threshold``, the last of which (threshold 0) is (1, 1) for maps in [0, 1];
    0.5 when only one class is present, as torcheval returns.
    """
    hm = np.asarray(heatmap, dtype=np.float64)
    valid = np.isfinite(hm)
    y = union_mask(hm.shape, boxes)[valid]
    s = hm[valid]
    if y.all() or not y.any():
        return 0.5 if binned else float("nan")
    if not binned:
        return float(roc_auc_score(y, s))
    thresholds = np.array([1.0, 0.75, 0.5, 0.25, 0.0])
    tp = np.array([0] + [np.count_nonzero((s >= t) & y) for t in thresholds], dtype=np.float64)
    fp = np.array([0] + [np.count_nonzero((s >= t) & ~y) for t in thresholds], dtype=np.float64)
    if tp[-1] * fp[-1] == 0:
        return 0.5
    # torcheval normalises by the counts at the last threshold (0), not by all pixels.
    return float(np.trapezoid(tp, fp) / (tp[-1] * fp[-1]))


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
