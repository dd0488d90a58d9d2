"""Which aggregation settings suit a demo model, beyond those its preset search tries.

``ldmground.demo.selection.select_demo_preset`` chooses window, layer group, blur and Otsu. This script
keeps the blur and Otsu of the ``demo`` preset and crosses windows and layer groups with the
other aggregation knobs: phrase vs class-name tokens, mean / max / median pooling, and
per-map min-max normalisation. Each image is inverted once; every setting is a
re-aggregation of the cached maps. It prints the best settings and one line

  KNOBS best=<pointing + CNR> preset=<pointing + CNR of the demo preset's own setting> n=<samples>

and writes every per-sample row and the macro table (means over categories) to ``--out``.
The 120-sample validation split takes ~50 minutes on 2 CPU cores, mostly in scoring.

Example:
  python benchmarks/demo_knobs.py --model demo --val runs/val --out runs/knobs
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

WINDOWS = [(0.0, 1.0), (0.1, 0.5), (0.4, 0.6), (0.2, 0.8), (0.0, 0.3), (0.1, 0.3)]  # 0.4-0.6: the demo preset
# layer indices of the shipped demo UNet: 1-3 are its 8x8 cross-attention layers
GROUPS = {"8x8": (1, 2, 3), "L1": (1,), "L2": (2,), "L3": (3,), "L12": (1, 2), "L23": (2, 3), "all": None}
KEYS = ["window", "layers", "tokens", "pooling", "norm"]


def window_label(window: tuple[float, float]) -> str:
    return f"{window[0]:.1f}-{window[1]:.1f}"


def variants(base):
    for win, (group, layers), tokens, pooling, norm in itertools.product(
        WINDOWS, GROUPS.items(), ["phrase", "class"], ["mean", "max", "median"], [True, False]
    ):
        labels = {"window": window_label(win), "layers": group, "tokens": tokens, "pooling": pooling}
        options = {
            "layers": layers,
            "steps": list(base.replace(window=win).window_indices()),
            "tokens": tokens,
            "pooling": pooling,
            "normalize_maps": norm,
        }
        yield {**labels, "norm": norm}, options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--val", default="runs/val", help="validation split folder (val.csv + images/)")
    ap.add_argument("--limit", type=int, help="first N validation samples (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/knobs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ldmground.config import get_preset
    from ldmground.datasets.mscxr import load_mscxr
    from ldmground.demo.selection import rank_settings
    from ldmground.models.folder import load_pipeline
    from ldmground.studies.cache import cache_samples
    from ldmground.studies.sweeps import sweep

    preset = get_preset("demo")
    base = preset.replace(window=(0.0, 1.0), layers=None)
    samples, _ = load_mscxr(Path(args.val) / "val.csv", args.val)
    samples = list(samples)[: args.limit]
    cached = cache_samples(load_pipeline(args.model), samples, args.val, base, keep_tokens=True)
    rows = sweep(cached, variants(base), base, desc="settings")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out / "rows.csv", index=False)
    macro = rank_settings(rows, KEYS, ["pointing", "cnr", "miou", "auc_roc"])
    macro.to_csv(out / "macro.csv", index=False)
    print(macro.head(10).to_string(index=False))
    group = next(name for name, layers in GROUPS.items() if layers == preset.layers)
    own = (window_label(preset.window), group, preset.tokens, preset.pooling, preset.normalize_maps)
    own_score = macro.set_index(KEYS).loc[own, "score"]
    print(f"KNOBS best={macro['score'].iloc[0]:.3f} preset={own_score:.3f} n={len(samples)}")


if __name__ == "__main__":
    main()
