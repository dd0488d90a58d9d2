"""The project's figures as functions: each takes tables or arrays and returns a Figure.

Inputs are the files the notebooks write (sweep tables of :mod:`ldmground.studies`,
``summary.csv`` of :func:`ldmground.runs.evaluation.evaluate`, the examples of
:func:`ldmground.studies.panels.save_examples`), so every figure can be redrawn without a model.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .overlay import OVERLAY_CMAP, overlay
from .sweeps import summarize_sweep

LABELS = {
    "cnr": "CNR (abs)",
    "cnr_signed": "CNR (signed)",
    "cnr_union": "CNR (union)",
    "miou": "mIoU",
    "auc_roc": "AUC-ROC",
    "auc_roc_binned": "AUC-ROC (binned)",
    "pointing": "pointing game",
    "iou": "IoU",
}


HUE_LABELS = {"otsu": {True: "with Otsu", False: "without Otsu"}}
"""Legend text of a second swept setting drawn as separate lines."""

VALUE_LABELS = {
    "normalize": {True: "min-max each map", False: "raw maps"},
    "pooling": {"mean": "mean", "max": "max", "median": "median"},
    "tokens": {"phrase": "all phrase tokens", "class": "class-name tokens", "class-span": "class-name span"},
}
"""Swept settings' values in words, for figure labels."""

SET_LABELS = {"config": "preset", "all": "all layers"}
"""Names of the layer sets of :func:`ldmground.studies.sweeps.layer_sweep` in figure legends."""


def save(fig, figures_dir: str | Path, name: str, dpi: int = 120) -> Path:
    """Write ``fig`` to ``figures_dir/name`` (PNG unless ``name`` has a suffix); return the path."""
    out = Path(figures_dir) / (name if Path(name).suffix else f"{name}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    return out


def _colour_bar(fig, axes, label: str = "heatmap (0 to 1)"):
    """One colour bar for every panel: the overlay's colour map on [0, 1]."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(Normalize(0, 1), colormaps[OVERLAY_CMAP])
    fig.colorbar(mappable, ax=list(np.ravel(axes)), shrink=0.6, pad=0.02, label=label)


def qualitative_grid(items: Sequence[Mapping[str, Any]], ncols: int = 4, metric: str = "cnr", title: str | None = None):
    """X-ray with boxes (cyan) and the heatmap overlaid, titled with category and phrase.

    Args:
        items: dicts with ``image`` ((H, W) in [0, 1]), ``heatmap`` ((H, W), NaN allowed),
            ``boxes`` ((x, y, w, h) in pixels), ``category``, ``phrase`` and optionally the
            ``metric`` value (shown in the title).
        title: what the figure shows (e.g. "phantom X-rays, demo model").
    """
    import matplotlib.pyplot as plt

    n = max(1, len(items))
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols + 1, 3.7 * nrows), squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, it in zip(axes.ravel(), items, strict=False):
        ax.imshow(np.asarray(overlay(it["image"], it["heatmap"], it["boxes"])))
        label = f"{it['category']}\n" + textwrap.fill(str(it["phrase"]), 34)
        if metric in it and it[metric] is not None and np.isfinite(float(it[metric])):
            label += f"\n{LABELS.get(metric, metric)} {float(it[metric]):.2f}"
        ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title + "; true boxes in cyan", fontsize=11)
    _colour_bar(fig, axes)
    return fig


def map_grid(
    panels: Sequence[tuple[str, np.ndarray]],
    image: np.ndarray | None = None,
    boxes=(),
    ncols: int = 6,
    title: str | None = None,
):
    """Small multiples of heatmaps (e.g. one per layer or per step), optionally over the X-ray,
    with one colour bar."""
    import matplotlib.pyplot as plt

    n = max(1, len(panels))
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    size = (2.2 * ncols + 1, 2.4 * nrows + 0.4)
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (label, hm) in zip(axes.ravel(), panels, strict=False):
        if image is not None:
            ax.imshow(np.asarray(overlay(image, hm, boxes)))
        else:
            ax.imshow(np.nan_to_num(hm, nan=0.0), cmap=OVERLAY_CMAP, vmin=0, vmax=1)
        ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    _colour_bar(fig, axes)
    return fig


def category_bars(
    cis: Mapping[str, pd.DataFrame],
    metrics: Sequence[str] = ("cnr_signed", "cnr", "miou", "auc_roc_binned"),
    reference: pd.DataFrame | None = None,
    reference_method: str = "LDM frozen",
):
    """Per-category bars with 95 % bootstrap intervals, one bar per model.

    Args:
        cis: model name -> :func:`ldmground.studies.report.summary_with_ci` table.
        reference: ``ldmground.studies.reference.PAPER_TABLE``: ``reference_method``'s published
            signed CNR and mIoU drawn as black ticks on those panels, labelled with the source.
    """
    import matplotlib.pyplot as plt

    from .reference import REFERENCE_SOURCES

    names = list(cis)
    cats: list[str] = []
    for s in cis.values():
        cats += [c for c in s["category"].unique() if c not in cats]
    cats = [c for c in cats if c != "macro"] + ["macro"]
    fig, axes = plt.subplots(
        len(metrics), 1, figsize=(max(6.0, 1.1 * len(cats) + 2), 2.6 * len(metrics)), squeeze=False
    )
    width = 0.8 / max(1, len(names))
    x = np.arange(len(cats))
    for ax, m in zip(axes[:, 0], metrics, strict=True):
        for i, name in enumerate(names):
            s = cis[name].query("metric == @m").set_index("category").reindex(cats)
            mean, low, high = (s[c].to_numpy(float) for c in ("mean", "ci_low", "ci_high"))
            err = np.nan_to_num(np.stack([mean - low, high - mean]))
            ax.bar(x + (i - (len(names) - 1) / 2) * width, mean, width, yerr=err, capsize=2, label=name)
        if reference is not None and m in ("cnr_signed", "miou"):
            ref = reference[reference["method"] == reference_method].set_index("category").reindex(cats)
            label = REFERENCE_SOURCES[reference_method]["label"]
            ax.scatter(x, ref["cnr" if m == "cnr_signed" else m], marker="_", s=300, color="k", zorder=3, label=label)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_ylabel(LABELS.get(m, m))
        ax.set_xticks(x, cats, rotation=20, ha="right", fontsize=8)
    axes[0, 0].legend(fontsize=8, ncols=min(4, len(names) + 1))
    n_pairs = ", ".join(
        f"{name}: n = {int(cis[name].loc[cis[name]['category'] == 'macro', 'n'].max())}" for name in names
    )
    axes[0, 0].set_title(
        f"mean per category and macro mean; error bars: 95 % bootstrap intervals ({n_pairs} pairs)", fontsize=9
    )
    fig.tight_layout()
    return fig


def ablation_curve(
    df: pd.DataFrame,
    x: str,
    metrics: Sequence[str] = ("cnr", "pointing", "miou"),
    hue: str | None = None,
    highlight: Sequence[Any] | None = None,
    categorical: bool | None = None,
    title: str | None = None,
    xlabel: str | None = None,
    marks: Mapping[str, Any] | None = None,
):
    """Mean +- standard error over samples of each metric against ``x`` (one panel per metric).

    Args:
        df: a sweep table of :mod:`ldmground.studies` (one row per sample and variant).
        x: the swept column; ``hue``: an optional second column drawn as separate lines.
        highlight: values of ``x`` to shade (e.g. the config's timestep window or layers).
        categorical: treat ``x`` as labels (default: when it is not numeric).
        marks: label -> value of ``x`` drawn as a dashed vertical line (e.g. the preset's and
            the paper's value).
    """
    import matplotlib.pyplot as plt

    if categorical is None:
        categorical = not pd.api.types.is_numeric_dtype(df[x])
    metrics = [m for m in metrics if m in df.columns]
    by = [x] if hue is None else [hue, x]
    summ = summarize_sweep(df, by, metrics)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.0 * len(metrics), 3.2), squeeze=False)
    groups = [(None, summ)] if hue is None else list(summ.groupby(hue, sort=False))
    labels = list(dict.fromkeys(summ[x])) if categorical else None
    for ax, m in zip(axes[0], metrics, strict=True):
        for key, g in groups:
            xs = [labels.index(v) for v in g[x]] if categorical else g[x].to_numpy(float)
            ax.errorbar(
                xs,
                g[f"{m}_mean"],
                yerr=g[f"{m}_sem"],
                marker="o",
                ms=3,
                capsize=2,
                label=None if key is None else HUE_LABELS.get(hue, {}).get(key, f"{hue} {key}"),
            )
        if highlight is not None:
            pos = [labels.index(v) for v in highlight if v in labels] if categorical else list(highlight)
            for p in pos:
                ax.axvspan(float(p) - 0.5, float(p) + 0.5, color="orange", alpha=0.15, lw=0)
        _marks(ax, marks, labels if categorical else None)
        if categorical:
            ax.set_xticks(range(len(labels)), [str(v) for v in labels], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(LABELS.get(m, m))
        if hue is not None or marks:
            ax.legend(fontsize=7)
    fig.suptitle(_title(title, df, x), fontsize=10)
    fig.tight_layout()
    return fig


def _n_samples(df: pd.DataFrame) -> int:
    return int(df["sample_id"].nunique()) if "sample_id" in df else len(df)


def _title(title: str | None, df: pd.DataFrame, x: str | None = None) -> str:
    return f"{title or ''}\nmean ± standard error over n = {_n_samples(df)} samples".strip()


MARK_STYLES = {"paper": ("k", "--"), "preset": ("C3", ":")}


def _marks(ax, marks: Mapping[str, Any] | None, labels: list | None = None) -> None:
    """Dashed vertical lines at the marked values, labelled for the legend."""
    for k, (name, value) in enumerate((marks or {}).items()):
        if value is None:
            continue
        if labels is not None:
            if value not in labels:
                continue
            value = labels.index(value)
        colour, style = MARK_STYLES.get(name.split()[0], (f"C{k + 4}", "-."))
        ax.axvline(float(value), color=colour, ls=style, lw=1.2, label=name)


def variant_bars(
    df: pd.DataFrame,
    by: Sequence[str],
    metrics: Sequence[str] = ("cnr", "miou", "auc_roc"),
    title: str | None = None,
    marks: Mapping[str, Sequence[Any]] | None = None,
):
    """Horizontal bars (mean +- standard error) of every combination of the ``by`` columns,
    named in words (:data:`VALUE_LABELS`); ``marks``: label -> the ``by`` values of a
    combination to name (e.g. ``{"paper": (True, "mean", "phrase")}``)."""
    import matplotlib.pyplot as plt

    summ = summarize_sweep(df, list(by), metrics)
    names = []
    for _, r in summ.iterrows():
        values = tuple(r[c] for c in by)
        name = ", ".join(VALUE_LABELS.get(c, {}).get(v, f"{c} {v}") for c, v in zip(by, values, strict=True))
        tags = [label for label, want in (marks or {}).items() if tuple(want) == values]
        names.append(name + (f"  ({', '.join(tags)})" if tags else ""))
    metrics = [m for m in metrics if f"{m}_mean" in summ.columns]
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(3.6 * len(metrics) + 1.5, 0.32 * len(names) + 1.2), squeeze=False, sharey=True
    )
    y = np.arange(len(names))
    for ax, m in zip(axes[0], metrics, strict=True):
        ax.barh(y, summ[f"{m}_mean"], xerr=np.nan_to_num(summ[f"{m}_sem"].to_numpy(float)), capsize=2, color="C0")
        ax.set_xlabel(LABELS.get(m, m))
        ax.axvline(0, color="0.6", lw=0.8)
    axes[0, 0].set_yticks(y, names, fontsize=8)
    axes[0, 0].invert_yaxis()
    fig.suptitle(_title(title, df), fontsize=10)
    fig.tight_layout()
    return fig


# --- the project's figures, by name, from the notebooks' results files ---------------------------


def layers_figure(
    table: pd.DataFrame,
    metrics: Sequence[str] = ("cnr", "pointing", "miou"),
    shade: str = "paper",
    layer_labels: Mapping[int, str] | None = None,
):
    """01: each layer alone (line, mean +- standard error); the named layer sets (e.g. the
    paper's equivalent, the preset's, ``all``) as horizontal lines; the layers of the set
    ``shade`` shaded. ``layer_labels``: index -> "block, resolution" for the x axis."""
    import matplotlib.pyplot as plt

    single = table[table["layer"].astype(str).str.isdigit()].assign(layer=lambda d: d["layer"].astype(int))
    named = table[~table["layer"].astype(str).str.isdigit()]
    metrics = [m for m in metrics if m in table.columns]
    per_layer = summarize_sweep(single, "layer", metrics)
    per_set = summarize_sweep(named, ["layer", "layers"], metrics) if not named.empty else None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    shaded = []
    if per_set is not None and shade in set(per_set["layer"]):
        shaded = [int(v) for v in str(per_set.set_index("layer").loc[shade, "layers"]).split(",") if v]
    for ax, m in zip(axes[0], metrics, strict=True):
        ax.errorbar(
            per_layer["layer"],
            per_layer[f"{m}_mean"],
            yerr=per_layer[f"{m}_sem"],
            marker="o",
            ms=3,
            capsize=2,
            color="C0",
            label="one layer alone",
        )
        for i in shaded:
            ax.axvspan(i - 0.5, i + 0.5, color="orange", alpha=0.15, lw=0)
        if per_set is not None:
            for k, (_, r) in enumerate(per_set.iterrows()):
                name = SET_LABELS.get(r["layer"], r["layer"])
                ax.axhline(r[f"{m}_mean"], color=f"C{k + 1}", ls="--", lw=1.2, label=f"{name} {{{r['layers']}}}")
        ticks = per_layer["layer"].tolist()
        names = [layer_labels.get(i, str(i)) if layer_labels else str(i) for i in ticks]
        rotation, align = (45, "right") if layer_labels else (0, "center")
        ax.set_xticks(ticks, names, rotation=rotation, ha=align, fontsize=7)
        ax.set_xlabel("cross-attention layer (index · block · resolution)" if layer_labels else "cross-attention layer")
        ax.set_ylabel(LABELS.get(m, m))
    axes[0, 0].legend(fontsize=7)
    head = "Cross-attention layers" + (f" (shaded: the {shade} set)" if shaded else "")
    fig.suptitle(_title(head, table), fontsize=10)
    fig.tight_layout()
    return fig


def steps_figure(table: pd.DataFrame, marks: Mapping[str, Any] | None = None):
    """01: metrics of each timestep alone; shaded: the window of the sweep's config; ``marks``:
    e.g. the paper window's first and last step."""
    window = sorted(table.loc[table["in_window"].astype(bool), "step"].unique()) if "in_window" in table else None
    return ablation_curve(
        table,
        "step",
        ("cnr", "pointing", "miou"),
        highlight=window,
        title="Timesteps, each alone (shaded: the preset's window)",
        xlabel="step index (inversion order: 0 = clean image)",
        marks=marks,
    )


def windows_figure(table: pd.DataFrame, marks: Mapping[str, Any] | None = None):
    """01: metrics of timestep windows (fractions of N)."""
    return ablation_curve(
        table,
        "window",
        ("cnr", "pointing", "miou"),
        categorical=True,
        title="Timestep windows (fractions of N)",
        xlabel="window",
        marks=marks,
    )


def aggregation_figure(table: pd.DataFrame, marks: Mapping[str, Sequence[Any]] | None = None):
    """02: normalisation x pooling x tokens; the paper's combination named by default."""
    marks = marks if marks is not None else {"paper": (True, "mean", "phrase")}
    return variant_bars(table, ["normalize", "pooling", "tokens"], title="Aggregation", marks=marks)


def inversion_steps_figure(table: pd.DataFrame, marks: Mapping[str, Any] | None = None):
    """02: metrics against the number of inversion steps N."""
    return ablation_curve(
        table,
        "num_inference_steps",
        ("cnr", "miou", "auc_roc"),
        title="Inversion steps",
        xlabel="inversion steps N",
        marks=marks,
    )


def sigma_figure(table: pd.DataFrame, marks: Mapping[str, Any] | None = None):
    """03: Gaussian sigma with and without Otsu."""
    return ablation_curve(
        table,
        "sigma",
        ("cnr", "miou", "auc_roc"),
        hue="otsu",
        title="Gaussian blur, with and without Otsu",
        xlabel="sigma (px at a 512-px input)",
        marks=marks,
    )


def contrast_figure(table: pd.DataFrame, marks: Mapping[str, Any] | None = None):
    """03: the weight of the subtracted reference background, with and without Otsu."""
    return ablation_curve(
        table,
        "contrast",
        ("cnr", "miou", "auc_roc"),
        hue="otsu",
        title="Background contrast (this project's extension; the paper has none)",
        xlabel="contrast weight",
        marks=marks,
    )


def thresholds_figure(table: pd.DataFrame, marks: Mapping[str, Any] | None = None):
    """03: IoU of the thresholded heatmap against the threshold, with and without Otsu."""
    return ablation_curve(
        table, "threshold", ("iou",), hue="otsu", title="IoU of heatmap > threshold", xlabel="threshold", marks=marks
    )


TABLE_FIGURES = {
    "feature_selection_layers": ("01_feature_selection/layers.csv", layers_figure),
    "feature_selection_steps": ("01_feature_selection/steps.csv", steps_figure),
    "feature_selection_windows": ("01_feature_selection/windows.csv", windows_figure),
    "aggregation": ("02_aggregation/aggregation.csv", aggregation_figure),
    "aggregation_inversion_steps": ("02_aggregation/inversion_steps.csv", inversion_steps_figure),
    "postprocessing_sigma": ("03_postprocessing/postprocessing.csv", sigma_figure),
    "postprocessing_thresholds": ("03_postprocessing/thresholds.csv", thresholds_figure),
    "postprocessing_contrast": ("03_postprocessing/contrast.csv", contrast_figure),
}
"""Figure name -> (table under the results folder, plot function)."""

PANEL_FIGURES = {
    "feature_selection_layer_maps": "01_feature_selection/layer_maps.npz",
    "feature_selection_step_maps": "01_feature_selection/step_maps.npz",
}
EVALUATION_DIR = "04_mscxr_evaluation"


def evaluation_figures(eval_dir: str | Path) -> dict[str, Any]:
    """04: per-category bars of every evaluated model and the qualitative grid."""
    from .panels import load_examples
    from .reference import PAPER_TABLE

    eval_dir = Path(eval_dir)
    figs: dict[str, Any] = {}
    summary = eval_dir / "summaries_ci.csv"
    if summary.is_file():
        df = pd.read_csv(summary)
        cis = {name: g.drop(columns="model") for name, g in df.groupby("model", sort=False)}
        info = eval_dir / "evaluation.json"
        with_paper = info.is_file() and bool(pd.read_json(info, typ="series").get("compare_with_paper", False))
        figs["evaluation_per_category"] = category_bars(cis, reference=PAPER_TABLE if with_paper else None)
    if (eval_dir / "examples.csv").is_file():
        options = figure_options(eval_dir / "examples.csv", "qualitative")
        figs["qualitative"] = qualitative_grid(load_examples(eval_dir), **options)
    return figs


def from_results(results_dir: str | Path) -> dict[str, Any]:
    """Every figure whose results file exists under ``results_dir``: name -> Figure."""
    from .panels import load_panels

    root = Path(results_dir)
    figs: dict[str, Any] = {}
    for name, (rel, plot) in TABLE_FIGURES.items():
        if (root / rel).is_file():
            figs[name] = plot(pd.read_csv(root / rel), **figure_options(root / rel, name))
    for name, rel in PANEL_FIGURES.items():
        if (root / rel).is_file():
            p = load_panels(root / rel)
            figs[name] = map_grid(p["panels"], p["image"], p["boxes"], **figure_options(root / rel, name))
    figs.update(evaluation_figures(root / EVALUATION_DIR))
    return figs


FIGURE_OPTIONS = "figure_options.json"
"""Per results folder: figure name -> keyword arguments of its plot function (marks, labels,
titles), written by the notebook that made the table so that 05 redraws the same figure."""


def save_figure_options(out_dir: str | Path, options: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``options`` (figure name -> keyword arguments) next to a notebook's tables."""
    import json

    path = Path(out_dir) / FIGURE_OPTIONS
    path.write_text(json.dumps(options, indent=1, default=str) + "\n")
    return path


def figure_options(table_path: Path, name: str) -> dict[str, Any]:
    """The keyword arguments saved for figure ``name`` beside ``table_path`` (or none)."""
    import json

    path = Path(table_path).parent / FIGURE_OPTIONS
    if not path.is_file():
        return {}
    options = json.loads(path.read_text()).get(name, {})
    if "layer_labels" in options:
        options["layer_labels"] = {int(k): v for k, v in options["layer_labels"].items()}
    return options
