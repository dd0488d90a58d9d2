"""How far a layer's map resolution alone limits the grounding metrics.

For each side in ``--sides``, every sample's true boxes are averaged over side x side cells
and upsampled back (:func:`ldmground.runs.baselines.oracle_at`), post-processed with the preset
(blur, Otsu) and scored like a heatmap. A perfect map of that resolution scores this; a
model's maps at that resolution can only score less. One line per side:

  CEILING side=<cells> pointing=<macro> cnr=<macro> miou=<macro> auc=<macro> n=<samples>

No model is run (~40 s for the 200-sample test split on 2 CPU cores).

Example:
  python benchmarks/map_ceiling.py --csv data/phantom/test.csv --sides 4 8 16 32
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default="data/phantom/test.csv", help="MS-CXR-format CSV")
    ap.add_argument("--images", help="image folder (default: the CSV's folder)")
    ap.add_argument("--preset", default="demo", help="post-processing (blur, Otsu) to apply")
    ap.add_argument("--image-size", type=int, default=64, help="model input side S in pixels")
    ap.add_argument("--sides", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--limit", type=int, help="first N samples (default: all)")
    args = ap.parse_args()

    import pandas as pd

    from ldmground.config import get_preset
    from ldmground.datasets.mscxr import load_mscxr
    from ldmground.demo.selection import rank_settings
    from ldmground.geometry import Geometry
    from ldmground.method.heatmap import postprocess
    from ldmground.metrics import all_metrics
    from ldmground.runs.baselines import oracle_at

    cfg = get_preset(args.preset)
    samples, _ = load_mscxr(args.csv, args.images or Path(args.csv).parent, check_files=False)
    samples = list(samples)[: args.limit]
    rows = []
    for s in samples:
        geo = Geometry(s.width, s.height, args.image_size)
        for side in args.sides:
            heatmap = geo.to_original(postprocess(oracle_at(geo, s.boxes, side), cfg))
            rows.append({"category": s.category, "side": side, **all_metrics(heatmap, s.boxes)})
    macro = rank_settings(pd.DataFrame(rows), ["side"], ["pointing", "cnr", "miou", "auc_roc"]).set_index("side")
    for side in args.sides:
        m = macro.loc[side]
        print(
            f"CEILING side={side} pointing={m.pointing:.3f} cnr={m.cnr:.3f} miou={m.miou:.3f} "
            f"auc={m.auc_roc:.3f} n={len(samples)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
