"""Effect of bf16/fp16 autocast on the grounding metrics, measured on the phantom set.

Evaluates the same model, split and preset once in fp32 and once per requested dtype
(results go to one resumable folder: a rerun only computes what is missing), then prints
the per-category and macro metrics side by side and one line per dtype

  DRIFT dtype=<d> cnr=<macro CNR - fp32's> max_category_cnr=<largest |per-category diff|>
        pointing=<diff> miou=<diff> auc=<diff> max_pixel=<largest |heatmap diff|>
        mean_pixel=<mean |heatmap diff|> n=<samples>

The issue's target is |macro CNR drift| <= 0.01 against fp32.

Examples:
  python benchmarks/dtype_drift.py                        # demo model, bf16, all 200 test samples
  python benchmarks/dtype_drift.py --dtypes bf16 fp16 --limit 40
  python benchmarks/dtype_drift.py --model models/cxr-ldm --preset paper --device cuda \
      --dataset MS_CXR_Local_Alignment_v1.1.0.csv --images /data/mimic-cxr-jpg
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["pointing", "cnr", "cnr_signed", "miou", "auc_roc"]


def heatmaps(grounder, samples, root: Path, limit: int) -> list[np.ndarray]:
    """Heatmaps of the first ``limit`` samples (for the pixel-level difference)."""
    from ldmground.method.heatmap import load_image

    out = []
    for s in samples[:limit]:
        out.append(grounder(load_image(s.image_path(root)), [s.phrase], [[]]).maps[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--dataset", default=str(ROOT / "data" / "phantom" / "test.csv"))
    ap.add_argument("--images", default=str(ROOT / "data" / "phantom"))
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16"])
    ap.add_argument("--limit", type=int, default=None, help="first N samples only")
    ap.add_argument("--pixel-samples", type=int, default=8, help="samples whose heatmaps are compared")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/dtype_drift")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ldmground.config import get_preset
    from ldmground.datasets.mscxr import load_mscxr
    from ldmground.models.folder import load_pipeline
    from ldmground.runs.evaluation import evaluate
    from ldmground.runs.grounders import DiffusionGrounder

    pipe = load_pipeline(args.model, device=args.device)  # once: only the autocast dtype changes
    samples, _ = load_mscxr(args.dataset, args.images, crop_size=pipe.image_size, check_files=False)
    summaries, maps = {}, {}
    for dtype in ["fp32", *args.dtypes]:
        cfg = get_preset(args.preset).replace(dtype=dtype)
        grounder = DiffusionGrounder(pipe, cfg)
        start = time.perf_counter()
        report = evaluate(grounder, args.dataset, args.images, args.out, cfg, limit=args.limit, progress=False)
        seconds = time.perf_counter() - start
        summaries[dtype] = report.summary.set_index("category")
        maps[dtype] = heatmaps(grounder, samples, Path(args.images), args.pixel_samples)
        print(
            f"{dtype:5s} {report.succeeded + report.skipped} samples ({report.succeeded} computed now in "
            f"{seconds:.0f} s, {report.failed} failed)",
            flush=True,
        )

    base = summaries["fp32"]
    mean_cols = [f"{c}_mean" for c in COLUMNS]
    print("\nper category (fp32 | " + " | ".join(args.dtypes) + "):")
    table = base[mean_cols].rename(columns=lambda c: c[:-5] + " fp32")
    for dtype in args.dtypes:
        table = table.join(summaries[dtype][mean_cols].rename(columns=lambda c, d=dtype: c[:-5] + " " + d))
    print(table.round(4).to_string())
    for dtype in args.dtypes:
        diff = summaries[dtype][mean_cols] - base[mean_cols]
        cats = diff.drop(index=["macro", "all"])
        gaps = [np.abs(a - b) for a, b in zip(maps[dtype], maps["fp32"], strict=True)]
        pixel_max = max(float(np.nanmax(g)) for g in gaps)
        pixel_mean = float(np.mean([np.nanmean(g) for g in gaps]))
        print(
            f"DRIFT dtype={dtype} cnr={diff.loc['macro', 'cnr_mean']:+.4f} "
            f"max_category_cnr={cats['cnr_mean'].abs().max():.4f} "
            f"pointing={diff.loc['macro', 'pointing_mean']:+.4f} miou={diff.loc['macro', 'miou_mean']:+.4f} "
            f"auc={diff.loc['macro', 'auc_roc_mean']:+.4f} max_pixel={pixel_max:.3f} mean_pixel={pixel_mean:.4f} "
            f"n={int(base.loc['all', 'n'])}"
        )


if __name__ == "__main__":
    main()
