"""Can post-processing or the inversion's step count alone lift a demo model's scores?

Each validation image is inverted once with the preset; its aggregated map (the preset's
layers, window and background contrast, before any blur or Otsu) is then sharpened by an exponent
``p`` (``map ** p`` after min-max), blurred and optionally Otsu-masked, for every
combination of ``--powers``, ``--sigmas`` and Otsu. The centre prior gets the same
treatment, so that a setting which only reshapes blobs shows up as helping both. With
``--inversion-steps``, the preset's own post-processing is also scored for other numbers of
DDIM steps (same window fractions). One line per setting:

  POST src=<model|centre> p=<exponent> sigma=<px at 512> otsu=<0|1> pointing=.. cnr=.. miou=.. auc=..
  STEPS n=<DDIM steps> pointing=.. cnr=.. miou=.. auc=..

(macro means over categories). The 120-sample validation split takes ~6 minutes on 2 CPU
cores for the post-processing grid, plus ~1 minute per 10 inversion steps per extra N.

Example:
  python benchmarks/demo_postprocess.py --model demo --val runs/val --inversion-steps 10 50
  python benchmarks/demo_postprocess.py --model demo --val runs/val --contrast 0   # without the contrast
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

METRICS = ["pointing", "cnr", "miou", "auc_roc"]


def sharpen(raw, p: float):
    """Min-max to [0, 1], then raise to the power ``p`` (1 leaves the map as it is)."""
    from ldmground.method.heatmap import minmax

    return minmax(raw).astype("float64") ** p


def figures(m) -> str:
    return " ".join(f"{k if k != 'auc_roc' else 'auc'}={m[k]:.3f}" for k in METRICS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--contrast", type=float, help="override the preset's background contrast weight (0: off)")
    ap.add_argument("--val", type=Path, default=Path("runs/val"), help="validation folder (rendered if missing)")
    ap.add_argument("--powers", type=float, nargs="+", default=[1, 1.5, 2, 3])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0, 8, 16, 32])
    ap.add_argument("--inversion-steps", type=int, nargs="*", default=[], help="other DDIM step counts to score")
    ap.add_argument("--limit", type=int, help="first N samples (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import pandas as pd
    from demo_curve import ensure_val_split

    from ldmground.config import get_preset
    from ldmground.datasets.mscxr import load_mscxr
    from ldmground.demo.selection import rank_settings
    from ldmground.method.heatmap import postprocess
    from ldmground.models.folder import load_pipeline
    from ldmground.runs.baselines import centre_prior
    from ldmground.studies.cache import cache_samples, heatmap_from_cache, score

    csv = ensure_val_split(args.val)
    samples = list(load_mscxr(csv, csv.parent)[0])[: args.limit]
    pipe = load_pipeline(args.model)
    cfg = get_preset(args.preset)
    if args.contrast is not None:
        cfg = cfg.replace(contrast=args.contrast)
    cached = cache_samples(pipe, samples, csv.parent, cfg, keep_tokens=False, prune=True)

    rows = []
    grid = list(itertools.product(args.powers, args.sigmas, [False, True]))
    for cs in cached:
        geo = cs.cache.geometry
        aggregated, _ = heatmap_from_cache(cs, cfg.replace(sigma=0.0, otsu=False))  # min-max only
        sources = {"model": aggregated, "centre": centre_prior(geo)}
        for (src, raw), (p, sigma, otsu) in itertools.product(sources.items(), grid):
            hm = postprocess(sharpen(raw, p), cfg.replace(sigma=sigma, otsu=otsu))
            labels = {"src": src, "p": p, "sigma": sigma, "otsu": otsu}
            rows.append({"category": cs.sample.category, **labels, **score(cs, geo.to_original(hm))})
    macro = rank_settings(pd.DataFrame(rows), ["src", "p", "sigma", "otsu"], METRICS)
    for _, m in macro.sort_values(["src", "p", "sigma", "otsu"]).iterrows():
        print(f"POST src={m.src} p={m.p:g} sigma={m.sigma:g} otsu={int(m.otsu)} {figures(m)}", flush=True)

    for n in args.inversion_steps:
        other = cfg.replace(num_inference_steps=n)
        rows = []
        for cs in cache_samples(pipe, samples, csv.parent, other, keep_tokens=False, prune=True):
            _, hm = heatmap_from_cache(cs, other)
            rows.append({"category": cs.sample.category, "n": n, **score(cs, hm)})
        m = rank_settings(pd.DataFrame(rows), ["n"], METRICS).iloc[0]
        print(f"STEPS n={n} {figures(m)}", flush=True)


if __name__ == "__main__":
    main()
