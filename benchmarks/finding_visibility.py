"""Is each phantom finding visible to the demo model: in its 64 px input, and in its latent?

Renders ``--n`` phantoms per category with that one finding (a fixed seed), scales each to
the model's input size and measures :func:`ldmground.studies.probes.finding_visibility`: the
finding's contrast against a 2-pixel band around it, in the image and in the VAE's
reconstruction. One line per category, means over the samples (``kept``: median share of
the contrast the VAE keeps):

  VISIBLE category=<name> area=<px> contrast=<input> recon=<after the VAE> kept=<share> n=<samples>

~25 s for the demo model at --n 30 on 2 CPU cores.

Example:
  python benchmarks/finding_visibility.py --model demo --n 30
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="model spec (see ldmground evaluate --help)")
    ap.add_argument("--n", type=int, default=30, help="phantoms per category")
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--categories", nargs="+", help="default: all eight")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from ldmground.datasets.phantom.anatomy import CATEGORIES
    from ldmground.datasets.phantom.render import render_sample
    from ldmground.method.heatmap import preprocess
    from ldmground.models.folder import load_pipeline
    from ldmground.studies.probes import finding_visibility

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    size = pipe.image_size
    rng = np.random.default_rng(args.seed)
    for category in args.categories or CATEGORIES:
        rows = []
        for _ in range(args.n):
            image, findings = render_sample(rng, categories=[category])
            small, _ = preprocess(image.astype(np.float32) / 255.0, size)
            mask, _ = preprocess(findings[0].mask.astype(np.float32), size)
            if (mask > 0.5).any():
                rows.append(finding_visibility(pipe, small, mask > 0.5))
        area, contrast, recon = (np.mean([r[k] for r in rows]) for k in ("area", "contrast", "recon"))
        kept = np.nanmedian([r["kept"] for r in rows])
        name = category.replace(" ", "_")
        print(
            f"VISIBLE category={name} area={area:.1f} contrast={contrast:.4f} recon={recon:.4f} "
            f"kept={kept:.2f} n={len(rows)}"
        )


if __name__ == "__main__":
    main()
