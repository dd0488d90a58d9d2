"""Pairs per minute against the number of images per UNet batch (B), per model and dtype.

Grounds the committed phantom test pairs (one phrase per image, as most MS-CXR images have)
with :func:`ldmground.method.grounding.ground_many` at each B, after one warm-up image per model
and dtype. Every setting grounds max(B, --images) images (the same first ones); the UNet
rows are counted with a forward hook. Prints one line per setting:

  SETTING model=<m> dtype=<d> B=<b> images=<n> pairs=<n> steps=<N> rows=<UNet rows> seconds=<s>
          pairs_per_min=<x> rows_per_s=<r> speedup=<x over B=1, same model and dtype, this run>
          peak_mb=<GPU peak>

then, per model, the best setting:

  THROUGHPUT model=<m> dtype=<d> B=<b> pairs_per_min=<x> speedup=<x> projected_1160_min=<t>

``projected_1160_min``: minutes for MS-CXR's 1,160 pairs under the paper preset (300 steps,
one phrase per image: 240 UNet rows per pair) at the measured seconds per UNet row of that
setting, i.e. the rows' cost as measured here, whatever --steps the run used.

With ``--drift-pairs K`` it also grounds K pairs in fp32 and in bf16 (B=1) and prints

  DRIFT model=<m> pairs=<K> max_abs_heatmap=<x> mean_abs_heatmap=<x> min_corr_raw=<x>

Examples:
  python benchmarks/throughput.py --quick                      # tiny model, CPU, < 1 min
  python benchmarks/throughput.py --models tiny,demo,paper-random --steps 10 --batches 1,2,4
  python benchmarks/throughput.py --models paper-random --device cuda --batches 1,8,32   # paper preset
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
MSCXR_PAIRS = 1160
PAPER_ROWS_PER_PAIR = 240  # 180 empty-prompt steps + 60 phrase rows (300 steps, window 0.4-0.6)


def build_pipeline(model: str, device: str):
    """A pipeline by spec; ``paper-random`` is the paper's architecture with random weights
    (built as in bench_grounding.py)."""
    spec = importlib.util.spec_from_file_location("bench_grounding", ROOT / "benchmarks" / "bench_grounding.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.build_pipeline(model, device)


def phantom_items(n: int) -> list[tuple[np.ndarray, list[str]]]:
    """The first ``n`` committed phantom test images with their phrases."""
    from ldmground.method.heatmap import load_image

    df = pd.read_csv(ROOT / "data" / "phantom" / "test.csv")
    items = []
    for path, group in df.groupby("path", sort=False):
        items.append((load_image(ROOT / "data" / "phantom" / path), list(dict.fromkeys(group["label_text"]))))
        if len(items) == n:
            break
    if len(items) < n:
        sys.exit(f"the phantom test split has only {len(items)} images; asked for {n}")
    return items


class Rows:
    """Counts UNet rows through a forward pre-hook."""

    def __init__(self, unet):
        self.n = 0
        unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.n += (args[0] if args else kwargs["sample"]).shape[0]


def config_for(pipe, args, dtype: str):
    from ldmground.config import get_preset

    cfg = get_preset(pipe.default_preset).replace(dtype=dtype, threads=args.threads)
    if args.steps:
        cfg = cfg.replace(num_inference_steps=args.steps)
    return cfg


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(pipe, items, cfg, batch: int, device: str, rows: Rows) -> dict:
    from ldmground.method.grounding import ground_many

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = rows.n
    sync(device)
    start = time.perf_counter()
    out = ground_many(pipe, items, cfg, batch_size=batch)
    sync(device)
    seconds = time.perf_counter() - start
    pairs = sum(len(r) for r in out)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")
    return {"seconds": seconds, "pairs": pairs, "rows": rows.n - before, "peak_mb": peak}


def drift(pipe, items, args) -> str:
    from ldmground.method.grounding import ground_many

    maps = {}
    for dtype in ("fp32", "bf16"):
        maps[dtype] = ground_many(pipe, items, config_for(pipe, args, dtype), batch_size=1)
    diffs, means, corrs = [], [], []
    for a_img, b_img in zip(maps["fp32"], maps["bf16"], strict=True):
        for a, b in zip(a_img, b_img, strict=True):
            d = np.abs(a.model_heatmap - b.model_heatmap)
            diffs.append(float(np.nanmax(d)))
            means.append(float(np.nanmean(d)))
            corrs.append(float(np.corrcoef(a.raw_map.ravel(), b.raw_map.ravel())[0, 1]))
    return (
        f"DRIFT model={args.model_name} pairs={len(diffs)} max_abs_heatmap={max(diffs):.4f} "
        f"mean_abs_heatmap={np.mean(means):.4f} min_corr_raw={min(corrs):.4f}"
    )


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny", help="comma-separated: tiny, demo, paper-random or any model spec")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated autocast dtypes")
    ap.add_argument("--batches", default="1,2,4,8", help="comma-separated images per batch; 1 is always measured")
    ap.add_argument("--images", type=int, default=8, help="at least this many images per setting (B at most)")
    ap.add_argument("--steps", type=int, help="DDIM steps (default: the model's preset: 300 paper, 25 demo)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--threads",
        type=lambda v: None if v == "auto" else int(v),
        default=1,
        help="the config's CPU threads (default 1, the project's default; 'auto': torch's own)",
    )
    ap.add_argument("--drift-pairs", type=int, default=0, help="also the bf16 drift of the heatmaps on this many pairs")
    ap.add_argument("--quick", action="store_true", help="tiny model, 50 steps, B in 1,2,4, 4 images: < 1 min on CPU")
    args = ap.parse_args()
    if args.quick:
        args.models, args.steps, args.batches, args.images = "tiny", 50, "1,2,4", 4
    batches = sorted({1, *(int(b) for b in args.batches.split(","))})
    warnings.filterwarnings("ignore", message=".*smaller than the model input.*")
    print(f"machine: {machine(args.device)}; threads={args.threads}", flush=True)
    items_all = phantom_items(max(args.images, *batches))
    finals = []
    for model in args.models.split(","):
        args.model_name = model
        t0 = time.perf_counter()
        pipe = build_pipeline(model, args.device)
        rows = Rows(pipe.unet)
        from ldmground.method.batch_size import default_batch_size

        print(
            f"model={model} built in {time.perf_counter() - t0:.1f} s; default batch size here: "
            f"{default_batch_size(pipe)}",
            flush=True,
        )
        results = []
        for dtype in args.dtypes.split(","):
            cfg = config_for(pipe, args, dtype)
            measure(pipe, items_all[:1], cfg, 1, args.device, rows)  # warm-up
            base = None
            for b in batches:
                r = measure(pipe, items_all[: max(b, args.images)], cfg, b, args.device, rows)
                per_min = 60 * r["pairs"] / r["seconds"]
                base = base or per_min
                r |= {"model": model, "dtype": dtype, "B": b, "per_min": per_min, "speedup": per_min / base}
                r["sec_per_row"] = r["seconds"] / r["rows"]
                results.append(r)
                print(
                    f"SETTING model={model} dtype={dtype} B={b} images={max(b, args.images)} pairs={r['pairs']} "
                    f"steps={cfg.num_inference_steps} rows={r['rows']} seconds={r['seconds']:.3f} "
                    f"pairs_per_min={per_min:.2f} rows_per_s={r['rows'] / r['seconds']:.1f} "
                    f"speedup={r['speedup']:.2f} peak_mb={r['peak_mb']:.0f}",
                    flush=True,
                )
        if args.drift_pairs:
            print(drift(pipe, items_all[: args.drift_pairs], args), flush=True)
        best = max(results, key=lambda r: r["per_min"])
        projected = MSCXR_PAIRS * PAPER_ROWS_PER_PAIR * best["sec_per_row"] / 60
        finals.append(
            f"THROUGHPUT model={model} dtype={best['dtype']} B={best['B']} pairs_per_min={best['per_min']:.2f} "
            f"speedup={best['speedup']:.2f} projected_1160_min={projected:.1f}"
        )
        del pipe
    for line in finals:
        print(line)


if __name__ == "__main__":
    main()
