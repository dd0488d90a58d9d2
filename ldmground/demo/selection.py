"""Choosing the demo preset on validation phantoms, and the side-swapped and lateral CSVs
used to check that maps follow the words.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..method.tokens import swap_sides

# --- checking the demo model ------------------------------------------------------------


def swapped_side_csv(csv: str | Path, out_csv: str | Path) -> Path:
    """A copy of an MS-CXR-format CSV keeping only lateralised phrases, with sides swapped.

    Boxes stay on the true finding, so a model that reads the side word points elsewhere.
    """
    import pandas as pd

    df = pd.read_csv(csv)
    lateral = df["label_text"].str.contains(r"\b(?:left|right)\b", case=False, regex=True)
    out = df[lateral].copy()
    out["label_text"] = out["label_text"].map(swap_sides)
    out_csv = Path(out_csv)
    out.to_csv(out_csv, index=False)
    return out_csv


def lateral_csv(csv: str | Path, out_csv: str | Path) -> Path:
    """The lateralised rows of a CSV, unchanged (the partner of :func:`swapped_side_csv`)."""
    import pandas as pd

    df = pd.read_csv(csv)
    df[df["label_text"].str.contains(r"\b(?:left|right)\b", case=False, regex=True)].to_csv(out_csv, index=False)
    return Path(out_csv)


# Gaussian sigmas (px at 512) that select_demo_preset tries; 32 px at 512 is 4 px of a
# 64-px model input, half a cell of its 8 x 8 maps.
SIGMAS = (0.0, 4.0, 8.0, 16.0, 32.0)


def select_demo_preset(
    pipe,
    val_csv: str | Path,
    images: str | Path | None = None,
    n_steps: int = 25,
    contrasts: Sequence[float] = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9),
    top: int = 6,
):
    """Score grounding settings on a validation split (never the test split).

    One inversion per image records every layer at every step, and the maps of the eight
    finding names (the ``contrast`` references); each candidate is then a re-aggregation.
    First every timestep window x layer group x blur x Otsu without contrast; then the
    ``top`` best of those with Otsu and the ``top`` best without, each with every weight in
    ``contrasts``. Returns the per-candidate
    macro means (over categories) sorted best first by pointing + CNR, with columns
    ``window``, ``layers``, ``sigma``, ``otsu``, ``contrast`` and the metrics.
    """
    import itertools

    import pandas as pd

    from ..config import GroundingConfig
    from ..datasets.mscxr import load_mscxr
    from ..studies.cache import cache_samples
    from ..studies.sweeps import sweep

    samples, _ = load_mscxr(val_csv, images)
    base = GroundingConfig(num_inference_steps=n_steps, window=(0.0, 1.0), layers=None, otsu=False)
    folder = images or Path(val_csv).parent
    cached = cache_samples(pipe, samples, folder, base, keep_tokens=False, references=base.reference_phrases)
    first = cached[0].maps
    sizes = {layer: tuple(m.shape[-2:]) for (layer, _), m in first.items()}
    groups: dict[str, list[int] | None] = {"all": None}
    for shape in sorted(set(sizes.values()), reverse=True):
        groups[f"{shape[0]}x{shape[1]}"] = sorted(i for i, s in sizes.items() if s == shape)
    windows = [(0.0, 1.0), (0.2, 0.8), (0.4, 0.6), (0.1, 0.5), (0.5, 0.9)]
    options = {}
    for win, (gname, layers), sigma, otsu in itertools.product(windows, groups.items(), SIGMAS, [False, True]):
        steps = list(base.replace(window=win).window_indices())
        labels = (f"{win[0]:.1f}-{win[1]:.1f}", gname, sigma, otsu)
        options[labels] = {"layers": layers, "steps": steps, "sigma": sigma, "otsu": otsu}
    keys, metrics = ["window", "layers", "sigma", "otsu", "contrast"], ["pointing", "cnr", "cnr_signed", "miou"]

    def candidates(labels_list, weight):
        for labels in labels_list:
            yield dict(zip(keys, (*labels, weight), strict=True)), {**options[labels], "contrast": weight}

    plain = rank_settings(sweep(cached, candidates(options, 0.0), base, desc="candidates"), keys, metrics)
    best = list(plain.groupby("otsu").head(top)[keys[:-1]].itertuples(index=False, name=None))
    variants = [v for w in contrasts for v in candidates(best, w)]
    contrasted = rank_settings(sweep(cached, variants, base, desc="contrast"), keys, metrics)
    table = pd.concat([plain, contrasted], ignore_index=True)
    return table.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def rank_settings(table, keys: list[str], metrics: list[str]):
    """Macro means (over categories) of a sweep's per-sample rows, one row per setting
    (``keys``), best first by ``score`` = pointing + CNR."""
    per_category = table.groupby(keys + ["category"])[metrics].mean()
    macro = per_category.groupby(keys).mean().reset_index()
    macro["score"] = macro["pointing"] + macro["cnr"]
    return macro.sort_values("score", ascending=False).reset_index(drop=True)
