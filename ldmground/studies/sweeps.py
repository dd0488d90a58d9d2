"""Sweeps over the read-out's settings from cached attention: long tables, one row per
sample and variant, that the notebooks save as CSV and :mod:`ldmground.studies.figures` plots.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import GroundingConfig
from ..datasets.mscxr import Sample
from ..metrics import miou
from .cache import METRICS, CachedSample, as_config, cache_samples, heatmap_from_cache, score
from .panels import _join


def _row(cs: CachedSample, metrics: Mapping[str, float], **variant: Any) -> dict[str, Any]:
    return {"sample_id": cs.sample.sample_id, "category": cs.sample.category, **variant, **metrics}


def sweep(
    cached: Sequence[CachedSample],
    variants: Iterable[tuple[dict[str, Any], dict[str, Any]]],
    config: GroundingConfig | str,
    progress: bool = True,
    desc: str = "sweep",
) -> pd.DataFrame:
    """Score every variant on every cached sample.

    Args:
        variants: ``(labels, options)`` pairs: ``labels`` become columns of the table;
            ``options`` may hold ``config`` changes (any :class:`GroundingConfig` field)
            and the selection keys ``layers``, ``steps``, ``tokens``.
        config: the base config the options change.

    Returns:
        one row per (sample, variant): sample_id, category, the labels, the metrics.
    """
    from tqdm.auto import tqdm

    base = as_config(config)
    variants = list(variants)
    rows = []
    for cs in tqdm(cached, desc=desc, unit="sample", disable=not progress):
        for labels, options in variants:
            opts = dict(options)
            sel = {k: opts.pop(k) for k in ("layers", "steps", "tokens") if k in opts}
            cfg = base.replace(**opts) if opts else base
            _, hm = heatmap_from_cache(cs, cfg, **sel)
            rows.append(_row(cs, score(cs, hm), **labels))
    return pd.DataFrame(rows)


def layer_sweep(
    cached: Sequence[CachedSample],
    config: GroundingConfig | str,
    extra: Mapping[str, Sequence[int]] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Each cross-attention layer alone, then named layer sets: the config's, ``extra``, all.

    Args:
        extra: more named layer sets, e.g. ``{"paper": (3, 4, 6, 7)}``; indices the model
            lacks are dropped (a set left empty is skipped).

    Columns ``layer`` (the layer index as text, ``"config"``, an ``extra`` name or ``"all"``)
    and ``layers`` (the set used, e.g. ``"3,4,6,7"``).
    """
    cfg = as_config(config)
    all_layers = cached[0].layers
    sets = {str(i): [i] for i in all_layers}
    if cfg.layers is not None:
        sets["config"] = list(cfg.layers)
    for name, layers in (extra or {}).items():
        sets[name] = [i for i in layers if i in all_layers]
    sets["all"] = list(all_layers)
    variants = [({"layer": name, "layers": _join(ls)}, {"layers": ls}) for name, ls in sets.items() if ls]
    return sweep(cached, variants, cfg, progress, "layers")


def step_sweep(
    cached: Sequence[CachedSample], config: GroundingConfig | str, pipe=None, progress: bool = True
) -> pd.DataFrame:
    """Each recorded timestep alone (the config's layers), over the steps the cache holds.

    Columns ``step`` (index in the ascending inversion order), ``fraction`` (step / N),
    ``in_window`` (inside the config's window) and, when ``pipe`` is given, ``t`` (train step).
    """
    cfg = as_config(config)
    n = cached[0].config.num_inference_steps
    window = set(cfg.window_indices())
    ts = timesteps(pipe, cfg) if pipe is not None else None
    variants = []
    for step in cached[0].steps:
        labels = {"step": step, "fraction": step / n, "in_window": step in window}
        if ts is not None:
            labels["t"] = ts[step]
        variants.append((labels, {"steps": [step]}))
    return sweep(cached, variants, cfg, progress, "timesteps")


def window_sweep(
    cached: Sequence[CachedSample],
    config: GroundingConfig | str,
    windows: Sequence[tuple[float, float]],
    progress: bool = True,
) -> pd.DataFrame:
    """Each timestep window (fractions of N) with the config's layers; column ``window``."""
    cfg = as_config(config)
    variants = [({"window": f"{a:.2f}-{b:.2f}"}, {"window": (a, b)}) for a, b in windows]
    return sweep(cached, variants, cfg, progress, "windows")


def aggregation_sweep(
    cached: Sequence[CachedSample], config: GroundingConfig | str, progress: bool = True
) -> pd.DataFrame:
    """Per-map normalisation x pooling x tokens; columns ``normalize``, ``pooling``, ``tokens``."""
    variants = [
        ({"normalize": norm, "pooling": pool, "tokens": tok}, {"normalize_maps": norm, "pooling": pool, "tokens": tok})
        for norm in (True, False)
        for pool in ("mean", "max", "median")
        for tok in ("phrase", "class")
    ]
    return sweep(cached, variants, config, progress, "aggregation")


def attribution_experiment(
    cached: Sequence[CachedSample], config: GroundingConfig | str, progress: bool = True
) -> pd.DataFrame:
    """The paper's attribution experiment: all phrase tokens against the class name's tokens
    as the authors select them (``tokens="class-span"``), on the same inversions.

    Returns one row per (sample, ``tokens``) with ``has_class_name``; a phrase without its
    class name has an all-NaN ``class-span`` map, which the metrics score as the authors'
    code does (CNR 0, mIoU 0, binned AUC 0.5, exact AUC NaN, pointing 0).
    """
    table = sweep(cached, [({"tokens": t}, {"tokens": t}) for t in ("phrase", "class-span")], config, progress)
    has = {cs.sample.sample_id: cs.has_class_name for cs in cached}
    return table.assign(has_class_name=table["sample_id"].map(has))


def attribution_table(rows: pd.DataFrame, metrics: Sequence[str] = ("cnr", "miou", "auc_roc_binned")) -> pd.DataFrame:
    """Macro means with 95 % bootstrap intervals of :func:`attribution_experiment` under both
    treatments of phrases that lack their class name: left out, or scored as no map."""
    from .report import summary_with_ci

    with_name = rows["has_class_name"]
    variants = {
        "all phrase tokens (every pair)": rows["tokens"] == "phrase",
        "all phrase tokens (pairs naming their class)": (rows["tokens"] == "phrase") & with_name,
        "class-name tokens, pairs without the name left out": (rows["tokens"] == "class-span") & with_name,
        "class-name tokens, no map scored as the authors do": rows["tokens"] == "class-span",
    }
    out = []
    for label, pick in variants.items():
        summary = summary_with_ci(rows[pick].assign(status="ok"), metrics).query("category == 'macro'")
        for _, r in summary.iterrows():
            out.append(
                {
                    "variant": label,
                    "metric": r["metric"],
                    "n": r["n"],
                    "mean": r["mean"],
                    "ci_low": r["ci_low"],
                    "ci_high": r["ci_high"],
                }
            )
    return pd.DataFrame(out)


def postprocess_sweep(
    cached: Sequence[CachedSample],
    config: GroundingConfig | str,
    sigmas: Sequence[float] = (0.0, 2.5, 5.0, 10.0, 20.0, 40.0),
    progress: bool = True,
) -> pd.DataFrame:
    """Gaussian sigma (px at 512) x Otsu on/off; columns ``sigma``, ``otsu``."""
    variants = [({"sigma": s, "otsu": o}, {"sigma": float(s), "otsu": o}) for s in sigmas for o in (False, True)]
    return sweep(cached, variants, config, progress, "post-processing")


def contrast_sweep(
    cached: Sequence[CachedSample],
    config: GroundingConfig | str,
    weights: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    progress: bool = True,
) -> pd.DataFrame:
    """Background weight (``contrast``) x Otsu on/off; columns ``contrast``, ``otsu``.

    The cache must hold the maps of the config's reference phrases
    (``cache_samples(..., references=config.reference_phrases)``).
    """
    variants = [({"contrast": w, "otsu": o}, {"contrast": float(w), "otsu": o}) for w in weights for o in (False, True)]
    return sweep(cached, variants, config, progress, "contrast")


def threshold_sweep(
    cached: Sequence[CachedSample],
    config: GroundingConfig | str,
    thresholds: Sequence[float] = tuple(np.round(np.arange(0.1, 1.0, 0.1), 2)),
    progress: bool = True,
) -> pd.DataFrame:
    """IoU of ``heatmap > threshold`` with the union of the boxes, per threshold and Otsu.

    Columns ``otsu``, ``threshold``, ``iou``.
    """
    from tqdm.auto import tqdm

    base = as_config(config)
    rows = []
    for cs in tqdm(cached, desc="thresholds", unit="sample", disable=not progress):
        for otsu in (False, True):
            _, hm = heatmap_from_cache(cs, base.replace(otsu=otsu))
            for t in thresholds:
                rows.append(_row(cs, {"iou": miou(hm, cs.sample.boxes, (float(t),))}, otsu=otsu, threshold=float(t)))
    return pd.DataFrame(rows)


def timesteps(pipe, config: GroundingConfig | str) -> list[int]:
    """Train-step t of every step index of the config's grid (ascending)."""
    from ..method.inversion import inversion_timesteps, make_scheduler

    cfg = as_config(config)
    return inversion_timesteps(make_scheduler(pipe.scheduler_config, cfg.timestep_spacing), cfg.num_inference_steps)


def inversion_steps_sweep(
    pipe,
    samples: Sequence[Sample],
    images: str | Path,
    config: GroundingConfig | str,
    step_counts: Sequence[int] = (10, 25, 50),
    progress: bool = True,
) -> pd.DataFrame:
    """The config at several numbers of inversion steps N (same window fractions).

    Every N needs its own inversion. Column ``num_inference_steps``.
    """
    cfg = as_config(config)
    frames = []
    for n in step_counts:
        cfg_n = cfg.replace(num_inference_steps=int(n))
        cached = cache_samples(pipe, samples, images, cfg_n, progress=progress, prune=True)
        frames.append(sweep(cached, [({"num_inference_steps": int(n)}, {})], cfg_n, progress, f"N={n}"))
    return pd.concat(frames, ignore_index=True)


def summarize_sweep(df: pd.DataFrame, by: str | Sequence[str], metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean, std and standard error over samples of each metric, per variant.

    Returns one row per value of ``by`` with columns ``n``, ``<metric>_mean``,
    ``<metric>_std``, ``<metric>_sem``; NaN metrics (e.g. AUC on one class) are skipped.
    """
    by = [by] if isinstance(by, str) else list(by)
    metrics = [m for m in (metrics or METRICS + ["iou"]) if m in df.columns]
    g = df.groupby(by, sort=False)[metrics]
    mean, std, count = g.mean(), g.std(ddof=0), g.count()
    sem = std / np.sqrt(count.clip(lower=1))
    out = mean.add_suffix("_mean").join(std.add_suffix("_std")).join(sem.add_suffix("_sem"))
    out.insert(0, "n", df.groupby(by, sort=False).size())
    return out.reset_index()
