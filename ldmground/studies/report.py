"""Results with 95 % bootstrap confidence intervals, and the like-for-like comparison table.

Intervals are percentile bootstrap intervals of the mean over image-phrase pairs
(``scipy.stats.bootstrap``, 1,000 resamples, seeded): per category, the pairs of that
category are resampled; for the macro mean (the mean of the category means, as the paper
reports it) the pairs are resampled within each category, so every resample keeps the
category sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import bootstrap

from .reference import PAPER_TABLE, REFERENCE_SOURCES

__all__ = [
    "METRIC_LABELS",
    "REFERENCE_SOURCES",
    "comparison_table",
    "paired_difference",
    "summary_with_ci",
    "sweep_with_ci",
]

METRIC_LABELS = {
    "cnr": "CNR (abs)",
    "cnr_signed": "CNR (signed)",
    "miou": "mIoU %",
    "auc_roc_binned": "AUC (5 bins)",
    "auc_roc": "AUC (exact)",
    "pointing": "pointing",
}
"""Column labels of the table: the paper's mean of per-box absolute CNRs and MIDL 2026's signed CNR, the
paper's binned AUC-ROC and the exact one."""
PERCENT = {"miou"}


def _mean_of_means(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean([s.mean(axis=axis) for s in samples], axis=0)


def _interval(groups: Sequence[np.ndarray], n_resamples: int, seed: int, level: float) -> tuple[float, float]:
    if any(len(g) < 2 for g in groups):
        return float("nan"), float("nan")
    res = bootstrap(
        tuple(groups),
        _mean_of_means,
        n_resamples=n_resamples,
        vectorized=True,
        paired=False,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def summary_with_ci(
    results: pd.DataFrame,
    metrics: Sequence[str] = tuple(METRIC_LABELS),
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Mean and bootstrap interval of each metric per category and for the macro mean.

    Args:
        results: ``results.csv`` of :func:`ldmground.runs.evaluation.evaluate` (failed rows and
            NaN values of a metric are left out of that metric).
    Returns:
        Long table: ``category`` (the categories, then ``macro``), ``metric``, ``n``,
        ``mean``, ``ci_low``, ``ci_high``.
    """
    ok = results[results["status"] == "ok"]
    rows = []
    for metric in metrics:
        values = {cat: g[metric].astype(float).dropna().to_numpy() for cat, g in ok.groupby("category", sort=True)}
        for k, (cat, v) in enumerate(values.items()):
            low, high = _interval([v], n_resamples, seed + k, level)
            rows.append(
                {"category": cat, "metric": metric, "n": len(v), "mean": v.mean(), "ci_low": low, "ci_high": high}
            )
        groups = [v for v in values.values() if len(v)]
        if groups:
            low, high = _interval(groups, n_resamples, seed + len(values), level)
            mean = float(np.mean([g.mean() for g in groups]))
            n = sum(len(g) for g in groups)
            rows.append({"category": "macro", "metric": metric, "n": n, "mean": mean, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=["category", "metric", "n", "mean", "ci_low", "ci_high"])


def _cell(mean: float, low: float, high: float, percent: bool) -> str:
    f = 100.0 if percent else 1.0
    digits = 1 if percent else 2
    if not np.isfinite(mean):
        return ""
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{mean * f:.{digits}f}"
    return f"{mean * f:.{digits}f} [{low * f:.{digits}f}, {high * f:.{digits}f}]"


def comparison_table(
    summaries: Mapping[str, pd.DataFrame],
    metrics: Sequence[str] = ("cnr_signed", "cnr", "miou", "auc_roc_binned", "auc_roc"),
    reference: pd.DataFrame | None = PAPER_TABLE,
) -> pd.DataFrame:
    """One row per category (then ``macro``): for each model ``n`` and each metric as
    ``mean [95 % CI]``; then, when ``reference`` is given, each published method's numbers
    with the N they were computed on, labelled with their source.

    Args:
        summaries: model name -> :func:`summary_with_ci` table.
    """
    columns: dict[str, pd.Series] = {}
    order: list[str] = []
    for name, summ in summaries.items():
        s = summ.set_index(["category", "metric"])
        cats = [c for c in summ["category"].unique() if c != "macro"]
        order += [c for c in cats if c not in order]
        first = s.xs(metrics[0], level="metric")
        columns[f"{name}: n"] = first["n"].astype("Int64")
        for m in metrics:
            part = s.xs(m, level="metric")
            cells = [_cell(r["mean"], r["ci_low"], r["ci_high"], m in PERCENT) for _, r in part.iterrows()]
            columns[f"{name}: {METRIC_LABELS[m]}"] = pd.Series(cells, index=part.index)
    table = pd.DataFrame(columns)
    if reference is not None:
        ref = reference.set_index("category")
        for method in reference["method"].unique():
            rows = ref[ref["method"] == method]
            label = REFERENCE_SOURCES[method]["label"]
            table = table.join(
                pd.DataFrame(
                    {
                        f"{label}: N": rows["n"].astype("Int64"),
                        f"{label}: {REFERENCE_SOURCES[method]['cnr']}": rows["cnr"].map(lambda v: f"{v:.2f}"),
                        f"{label}: mIoU %": (rows["miou"] * 100).map(lambda v: f"{v:.1f}"),
                    }
                ),
                how="outer",
            )
        order += [c for c in reference["category"].unique() if c not in order]
    order = [c for c in order if c != "macro"] + (["macro"] if "macro" in table.index else [])
    table = table.loc[order]
    table.index.name = "category"
    return table


def sweep_with_ci(
    table: pd.DataFrame,
    by: str | Sequence[str],
    metrics: Sequence[str] = ("cnr", "pointing", "miou"),
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """A sweep's settings with ``n`` and ``mean [low, high]`` of each metric over its samples.

    Args:
        table: a sweep table of :mod:`ldmground.studies.sweeps` (one row per sample and setting).
        by: the column(s) naming a setting.
    Returns one row per setting, in the sweep's order; the interval is the percentile bootstrap
    of the mean over samples (NaN values of a metric left out).
    """
    by = [by] if isinstance(by, str) else list(by)
    rows = []
    for k, (key, g) in enumerate(table.groupby(by, sort=False)):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        row["n"] = len(g)
        for metric in metrics:
            v = g[metric].astype(float).dropna().to_numpy()
            low, high = _interval([v], n_resamples, seed + k, level)
            row[metric] = _fmt(v.mean() if len(v) else float("nan"), low, high, metric)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_difference(
    table: pd.DataFrame,
    column: str,
    a,
    b,
    metric: str,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Mean of ``metric`` under setting ``a`` minus setting ``b`` on the same samples, with a
    paired bootstrap interval (the per-sample differences are resampled).

    Args:
        table: one row per sample and setting, with ``sample_id``; ``column`` names the setting.
    Returns ``{"n", "a", "b", "difference", "ci_low", "ci_high"}``: n samples that have both.
    """
    pivot = table[table[column].isin([a, b])].pivot_table(index="sample_id", columns=column, values=metric)
    both = pivot.dropna()
    if a not in both or b not in both:
        raise ValueError(f"no sample has both {column}={a!r} and {column}={b!r}")
    diff = (both[a] - both[b]).to_numpy(float)
    low, high = _interval([diff], n_resamples, seed, level)
    return {
        "n": len(diff),
        "a": float(both[a].mean()),
        "b": float(both[b].mean()),
        "difference": float(diff.mean()),
        "ci_low": low,
        "ci_high": high,
    }


def _fmt(mean: float, low: float, high: float, metric: str) -> str:
    digits = 1 if metric in PERCENT else (2 if metric.startswith("cnr") else 3)
    scale = 100 if metric in PERCENT else 1
    return f"{mean * scale:.{digits}f} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"
