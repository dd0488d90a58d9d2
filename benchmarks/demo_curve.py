"""Grounding quality of a demo training run against its training steps.

``ldmground train-demo`` saves an EMA snapshot of the UNet every ``--snapshot-every`` steps
(``OUT/unet-ema-<step>.safetensors``). This script grounds the first ``--limit`` samples of
the validation split (``make-phantom --split val --seed 1``, rendered here when missing; never
the committed test split) with each snapshot and prints one line per snapshot

  CURVE step=<UNet steps> pointing=<macro> cnr=<macro> miou=<macro> auc=<macro> n=<samples>

Results are stored per snapshot under ``--out`` (resumable: a rerun skips what is done).

Examples:
  python benchmarks/demo_curve.py --run runs/demo                 # every snapshot, 48 samples
  python benchmarks/demo_curve.py --run runs/demo2 --steps 2000 4000 --limit 120
  python benchmarks/demo_curve.py --run runs/demo16 --layers all   # a model without 8x8 layers
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def ensure_val_split(folder: Path, n: int = 120) -> Path:
    """The validation split CSV, rendered (seed 1, split "val") if it is not there yet."""
    from ldmground.phantom import generate_phantom

    csv = folder / "val.csv"
    if not csv.is_file():
        generate_phantom(folder, n=n, seed=1, split="val")
    return csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="train-demo output folder")
    ap.add_argument("--val", default="runs/val", help="validation split folder")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--layers", nargs="+", help="cross-attention layer indices, or 'all' (default: the preset's)")
    ap.add_argument("--limit", type=int, default=48, help="first N validation samples")
    ap.add_argument("--steps", type=int, nargs="*", help="only these snapshots (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="result folder (default: RUN/curve)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ldmground.config import get_preset
    from ldmground.demo import run_scaling_factor, snapshot_pipeline
    from ldmground.evaluation import DiffusionGrounder, evaluate

    run = Path(args.run)
    val_csv = ensure_val_split(Path(args.val))
    out = Path(args.out) if args.out else run / "curve"
    cfg = get_preset(args.preset)
    if args.layers:
        cfg = cfg.replace(layers=None if args.layers == ["all"] else tuple(int(i) for i in args.layers))
    snapshots = {int(p.stem.rsplit("-", 1)[1]): p for p in run.glob("unet-ema-*.safetensors")}
    if args.steps:
        snapshots = {step: p for step, p in snapshots.items() if step in args.steps}
    if not snapshots:
        raise SystemExit(f"no EMA snapshots (unet-ema-*.safetensors) in {run}")
    scale = run_scaling_factor(run)
    for step, snap in sorted(snapshots.items()):
        grounder = DiffusionGrounder(snapshot_pipeline(run, snap, scale), cfg)
        report = evaluate(grounder, val_csv, val_csv.parent, out / str(step), cfg, limit=args.limit, progress=False)
        m = report.summary.set_index("category").loc["macro"]
        print(
            f"CURVE step={step} pointing={m.pointing_mean:.3f} cnr={m.cnr_mean:.3f} miou={m.miou_mean:.3f} "
            f"auc={m.auc_roc_mean:.3f} n={int(m.n)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
