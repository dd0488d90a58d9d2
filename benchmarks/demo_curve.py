"""Grounding quality of a demo training run against its training steps.

``ldmground train-demo`` saves an EMA snapshot of the UNet every ``--snapshot-every`` steps
(``OUT/unet-ema-<step>.safetensors``). This script grounds the first ``--limit`` samples of
the validation split (``make-phantom --split val --seed 1``, rendered here when missing; never
the committed test split) with each snapshot and prints one line per snapshot and layer group

  CURVE step=<UNet steps> layers=<group> pointing=<macro> cnr=<macro> miou=<macro> auc=<macro> text=<macro> n=<samples>

``text`` is the attention on the phrase's tokens inside the boxes over that outside them
(:func:`ldmground.studies.probes.phrase_attention_ratio`): near 1 the model spreads the text over
the whole image, and the maps ground only through small differences.

Each image is inverted once per snapshot; every layer group is a re-aggregation of the same
recorded maps (:mod:`ldmground.studies`), so extra groups cost only their scoring. The
per-sample rows of a snapshot are stored as ``--out/<step>-<config hash>-<weights hash>.csv``; a
rerun with the same config, snapshot file, samples and groups reads them instead of grounding
again (a run retrained into the same folder gets new rows).

Examples:
  python benchmarks/demo_curve.py --run runs/demo                 # every snapshot, preset layers
  python benchmarks/demo_curve.py --run runs/demo2 --steps 2000 4000 --limit 120
  python benchmarks/demo_curve.py --run runs/demo32 --groups 8x8=1,2,3 16x16=0,4,5
  python benchmarks/demo_curve.py --run runs/demo16 --groups all   # every layer of the model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

METRICS = ["pointing", "cnr", "miou", "auc_roc", "text_ratio"]


def ensure_val_split(folder: Path, n: int = 120) -> Path:
    """The validation split CSV, rendered (seed 1, split "val") if it is not there yet."""
    from ldmground.datasets.phantom.render import generate_phantom

    csv = folder / "val.csv"
    if not csv.is_file():
        generate_phantom(folder, n=n, seed=1, split="val")
    return csv


def parse_groups(specs: list[str] | None, preset_layers) -> dict[str, tuple[int, ...] | None]:
    """``NAME=i,j,k`` layer groups; ``all`` alone means every layer; none given: the preset's."""
    if not specs:
        return {"preset": preset_layers}
    groups = {}
    for spec in specs:
        name, _, layers = spec.partition("=")
        if name == "all" and not layers:
            groups["all"] = None
        elif layers:
            groups[name] = tuple(int(i) for i in layers.split(","))
        else:
            raise SystemExit(f"--groups: expected NAME=i,j,k or 'all', got {spec!r}")
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="train-demo output folder")
    ap.add_argument("--val", default="runs/val", help="validation split folder")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--window", type=float, nargs=2, metavar=("LO", "HI"), help="override the preset's window")
    ap.add_argument("--groups", nargs="+", help="layer groups NAME=i,j,k or 'all' (default: the preset's layers)")
    ap.add_argument("--contrast", type=float, help="override the preset's background contrast weight (0: off)")
    ap.add_argument("--limit", type=int, default=48, help="first N validation samples")
    ap.add_argument("--steps", type=int, nargs="*", help="only these snapshots (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="result folder (default: RUN/curve)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import pandas as pd
    from safetensors.torch import load_file

    from ldmground.config import get_preset
    from ldmground.datasets.mscxr import load_mscxr
    from ldmground.demo.export import run_scaling_factor, snapshot_pipeline
    from ldmground.demo.selection import rank_settings
    from ldmground.models.folder import sha256_file
    from ldmground.studies.cache import cache_samples
    from ldmground.studies.probes import phrase_attention_ratio
    from ldmground.studies.sweeps import sweep

    run = Path(args.run)
    val_csv = ensure_val_split(Path(args.val))
    samples = list(load_mscxr(val_csv, val_csv.parent)[0])[: args.limit]
    out = Path(args.out) if args.out else run / "curve"
    out.mkdir(parents=True, exist_ok=True)
    cfg = get_preset(args.preset)
    if args.window:
        cfg = cfg.replace(window=tuple(args.window))
    if args.contrast is not None:
        cfg = cfg.replace(contrast=args.contrast)
    groups = parse_groups(args.groups, cfg.layers)
    snapshots = {int(p.stem.rsplit("-", 1)[1]): p for p in run.glob("unet-ema-*.safetensors")}
    if args.steps:
        snapshots = {step: p for step, p in snapshots.items() if step in args.steps}
    if not snapshots:
        raise SystemExit(f"no EMA snapshots (unet-ema-*.safetensors) in {run}")
    # every layer is recorded once per image; each group re-aggregates them (None: every layer).
    # The phrase tokens' mean is all that "phrase" pooling needs; "class" needs each token.
    record, per_token = cfg.replace(layers=None), cfg.tokens == "class"
    variants = [({"layers": name}, {"layers": layers}) for name, layers in groups.items()]
    pipe = None
    for step, snap in sorted(snapshots.items()):
        # rows of another config or of other weights under the same step are not reused
        done = out / f"{step}-{cfg.digest()}-{sha256_file(snap)[:12]}.csv"
        rows = pd.read_csv(done, dtype={"layers": str}) if done.is_file() else None
        # stored rows serve a rerun that asks for the same samples and no new group
        fresh = rows is not None and "text_ratio" in rows and set(groups) <= set(rows.layers)
        if not fresh or rows.sample_id.nunique() != len(samples):
            if pipe is None:  # built once; later snapshots only swap the UNet weights
                pipe = snapshot_pipeline(run, snap, run_scaling_factor(run))
            else:
                pipe.unet.load_state_dict(load_file(snap))
            cached = cache_samples(pipe, samples, val_csv.parent, record, progress=False, keep_tokens=per_token)
            rows = sweep(cached, variants, record, progress=False)
            ratios = [
                {"sample_id": cs.sample.sample_id, "layers": name, "text_ratio": phrase_attention_ratio(cs, layers)}
                for cs in cached
                for name, layers in groups.items()
            ]
            rows = rows.merge(pd.DataFrame(ratios), on=["sample_id", "layers"])
            rows.to_csv(done, index=False)
        macro = rank_settings(rows, ["layers"], METRICS).set_index("layers")
        for name in groups:
            m = macro.loc[name]
            print(
                f"CURVE step={step} layers={name} pointing={m.pointing:.3f} cnr={m.cnr:.3f} miou={m.miou:.3f} "
                f"auc={m.auc_roc:.3f} text={m.text_ratio:.3f} n={rows.sample_id[rows.layers == name].nunique()}",
                flush=True,
            )


if __name__ == "__main__":
    main()
