"""Does the model use the phrase where the finding is? The text's denoising gain per category.

For each validation sample (``make-phantom --split val --seed 1``, rendered here when missing;
never the committed test split) :func:`ldmground.studies.probes.text_denoising_gain` compares the
UNet's denoising error with the phrase, the empty phrase and the side-swapped phrase, inside
and outside the true boxes. Prints one line per category and the macro mean:

  GAIN category=<name> in=<gain inside> out=<gain outside> swap=<gain over the swapped side> n=<samples>

``in`` well above ``out`` means the model draws the finding from the text; ``swap`` above 0
means it reads the side word. Categories whose findings the model barely draws from the text
cannot ground well from its cross-attention.

Examples:
  python benchmarks/demo_text_gain.py                              # the shipped demo model
  python benchmarks/demo_text_gain.py --model runs/cool/model --limit 48
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="model spec (demo, a model folder, tiny, ...)")
    ap.add_argument("--val", default="runs/val", help="validation split folder")
    ap.add_argument("--limit", type=int, help="first N validation samples (default: all)")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[200, 400, 600, 800])
    ap.add_argument("--draws", type=int, default=2, help="noise draws per timestep")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import pandas as pd
    from demo_curve import ensure_val_split

    from ldmground.datasets.mscxr import load_mscxr
    from ldmground.models.folder import load_pipeline
    from ldmground.studies.probes import text_denoising_gain

    val_csv = ensure_val_split(Path(args.val))
    samples = list(load_mscxr(val_csv, val_csv.parent)[0])[: args.limit]
    pipe = load_pipeline(args.model)
    rows = [
        {"category": s.category, **text_denoising_gain(pipe, s, val_csv.parent, args.timesteps, args.draws)}
        for s in samples
    ]
    per_category = pd.DataFrame(rows).groupby("category")
    table = per_category.mean()
    table["n"] = per_category.size()
    table.loc["macro"] = [*table.drop(columns="n").mean(), len(rows)]
    for name, r in table.iterrows():
        print(
            f"GAIN category={name.replace(' ', '_')} in={r.gain_in:.3f} out={r.gain_out:.3f} "
            f"swap={r.swap_in:.3f} n={int(r.n)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
