"""Map panels and example files the figures read back, and Markdown tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import GroundingConfig
from ..datasets.mscxr import Sample
from ..method.heatmap import load_image
from ..metrics import all_metrics
from .cache import CachedSample, as_config, heatmap_from_cache


def map_panels(
    cs: CachedSample, config: GroundingConfig | str, by: str, values: Sequence[int]
) -> list[tuple[str, np.ndarray]]:
    """(title, original-frame heatmap) of one sample for each layer or step in ``values``.

    Args:
        by: ``"layer"`` (each layer alone, the config's window) or ``"step"`` (each step
            alone, the config's layers).
    """
    cfg = as_config(config)
    panels = []
    for v in values:
        sel = {"layers": [v]} if by == "layer" else {"steps": [v]}
        _, hm = heatmap_from_cache(cs, cfg, **sel)
        panels.append((f"{by} {v}", hm))
    return panels


def save_panels(path: str | Path, cs: CachedSample, panels: Sequence[tuple[str, np.ndarray]]) -> Path:
    """Store map panels of one sample (with its image and boxes) as ``.npz`` for re-plotting."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        image=cs.image,
        boxes=np.asarray(cs.sample.boxes, dtype=np.float64).reshape(-1, 4),
        titles=np.asarray([t for t, _ in panels]),
        maps=np.stack([m for _, m in panels]),
        phrase=np.asarray(cs.sample.phrase),
    )
    return path


def load_panels(path: str | Path) -> dict[str, Any]:
    """What :func:`save_panels` wrote: ``panels``, ``image``, ``boxes``, ``phrase``."""
    with np.load(path) as z:
        return {
            "panels": list(zip([str(t) for t in z["titles"]], list(z["maps"]), strict=True)),
            "image": z["image"],
            "boxes": [tuple(b) for b in z["boxes"]],
            "phrase": str(z["phrase"]),
        }


def _join(values: Iterable[int]) -> str:
    return ",".join(str(v) for v in values)


# --- evaluation tables -----------------------------------------------------------------------


def to_markdown(table: pd.DataFrame, digits: int = 2) -> str:
    """A GitHub markdown table (no extra dependency); NaN shows as an empty cell."""
    index = table.index.name or ""
    header = [index, *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for idx, row in table.iterrows():
        cells = [str(idx)]
        for v in row:
            if v is None or v is pd.NA:
                cells.append("")
            elif isinstance(v, float | np.floating):
                cells.append("" if not np.isfinite(v) else f"{v:.{digits}f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- qualitative examples --------------------------------------------------------------------


def save_examples(
    pipe,
    samples: Sequence[Sample],
    images: str | Path,
    config: GroundingConfig | str,
    out_dir: str | Path,
) -> pd.DataFrame:
    """Ground ``samples`` and store their heatmaps for the qualitative figure.

    Writes ``out_dir/heatmaps/<sample_id>.npy`` ((H, W) float32, NaN outside the crop) and
    ``out_dir/examples.csv`` (sample_id, category, phrase, image path, boxes, metrics).
    """
    from ..method.grounding import ground

    out = Path(out_dir)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in samples:
        path = Path(images) / s.path
        image = load_image(path)
        words = [[s.category]] if as_config(config).tokens == "class" else None
        [res] = ground(pipe, image, [s.phrase], config, words)
        np.save(out / "heatmaps" / f"{s.sample_id}.npy", res.heatmap)
        rows.append(
            {
                "sample_id": s.sample_id,
                "category": s.category,
                "phrase": s.phrase,
                "image": str(path.resolve()),
                "boxes": ";".join(" ".join(f"{v:g}" for v in b) for b in s.boxes),
                **all_metrics(res.heatmap, s.boxes),
            }
        )
    df = pd.DataFrame(rows)
    df.to_csv(out / "examples.csv", index=False)
    return df


def load_examples(out_dir: str | Path) -> list[dict[str, Any]]:
    """What :func:`save_examples` wrote, as dicts for :func:`ldmground.studies.figures.qualitative_grid`."""
    out = Path(out_dir)
    df = pd.read_csv(out / "examples.csv", keep_default_na=False)
    items = []
    for r in df.to_dict("records"):
        boxes = [tuple(float(v) for v in b.split()) for b in str(r["boxes"]).split(";") if b.strip()]
        items.append(
            {
                **r,
                "image": load_image(r["image"]),
                "heatmap": np.load(out / "heatmaps" / f"{r['sample_id']}.npy"),
                "boxes": boxes,
            }
        )
    return items
