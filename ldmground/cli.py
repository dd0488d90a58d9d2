"""Command line: ``ldmground ground | evaluate | make-phantom | convert-monai | train-demo``."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .config import PRESETS, GroundingConfig, get_preset
from .errors import LdmGroundError


def _layers(text: str) -> tuple[int, ...] | None:
    return None if text == "all" else tuple(int(v) for v in text.split(","))


def _threads(text: str) -> int | None:
    return None if text == "auto" else int(text)


def _batch_images(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-images takes a number >= 1 or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--batch-images takes a number >= 1 or 'auto', got {text!r}")
    return value


def _int_levels(text: str) -> int | tuple[int, ...]:
    """'2' -> 2 (every level); '1,4,2' -> (1, 4, 2) (one per level)."""
    parts = [int(x) for x in text.split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _window(text: str) -> tuple[float, float]:
    a, b = (float(v) for v in text.split(","))
    return a, b


def _add_config_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("grounding settings (start from --preset, then override)")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="named settings (default: the model's own, from its ldmground.json: demo for the demo model, "
        "paper for converted MONAI bundles and other models)",
    )
    g.add_argument("--steps", type=int, help="number of DDIM inversion steps N (paper: 300)")
    g.add_argument("--window", type=_window, help="timestep window as fractions of N, e.g. 0.4,0.6 (paper)")
    g.add_argument(
        "--layers",
        type=_layers,
        default=argparse.SUPPRESS,
        help="cross-attention layer indices in forward order, e.g. 3,4,6,7, or 'all'",
    )
    g.add_argument("--tokens", choices=["phrase", "class"], help="average all phrase tokens or the class-name tokens")
    g.add_argument("--sigma", type=float, help="Gaussian blur in pixels of a 512-px input (0: none)")
    g.add_argument("--otsu", action=argparse.BooleanOptionalAction, default=None, help="binary Otsu masking")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="autocast dtype of the UNet")
    g.add_argument("--seed", type=int, help="random seed")
    g.add_argument(
        "--threads",
        type=_threads,
        default=argparse.SUPPRESS,
        help="torch CPU threads while grounding (default 1: bitwise-identical results in every process and "
        "on every core count); 'auto' leaves torch's own count (faster, last bits depend on it)",
    )
    g.add_argument(
        "--contrast",
        type=float,
        help="subtract this multiple of the reference phrases' mean map (0: off, the paper; not in the paper)",
    )
    g.add_argument(
        "--reference-phrase",
        action="append",
        dest="reference_phrases",
        help="a reference phrase for --contrast (repeat it; default: the eight MS-CXR finding names)",
    )


def _config(args: argparse.Namespace) -> GroundingConfig:
    preset = args.preset
    if preset is None:
        from .models.folder import default_preset_of

        preset = default_preset_of(args.model)
    cfg = get_preset(preset)
    changes = {
        "num_inference_steps": args.steps,
        "window": args.window,
        "tokens": args.tokens,
        "sigma": args.sigma,
        "otsu": args.otsu,
        "dtype": args.dtype,
        "seed": args.seed,
        "contrast": args.contrast,
        "reference_phrases": tuple(args.reference_phrases) if args.reference_phrases else None,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    for name in ("layers", "threads"):
        if hasattr(args, name):
            changes[name] = getattr(args, name)
    return cfg.replace(**changes)


def cmd_ground(args: argparse.Namespace) -> int:
    from .method.grounding import ground
    from .method.heatmap import load_image
    from .models.folder import load_pipeline
    from .studies.overlay import save_heatmap_pngs

    cfg = _config(args)
    pipe = load_pipeline(args.model, text_encoder=args.text_encoder, device=args.device)
    image = load_image(args.image)
    words = [args.words.split(",")] if args.words else None
    start = time.perf_counter()
    [result] = ground(pipe, image, [args.phrase], cfg, words, progress=True)
    heat, over = save_heatmap_pngs(args.out, image, result.heatmap)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(
        f"wrote {heat} and {over} ({result.unet_evals} UNet evaluations, "
        f"{time.perf_counter() - start:.1f} s; tokens {list(result.tokens.pieces)})"
    )
    return 0


def _run_workers(args: argparse.Namespace) -> list[int]:
    """Run ``evaluate`` as ``args.workers`` processes, one shard each; return their exit codes.

    Each worker computes its images (single-threaded by default, see ``--threads``) and
    commits them to the shared results store; none writes the summary.
    """
    import os
    import subprocess

    argv = list(args.argv)
    i = argv.index("--workers") if "--workers" in argv else None
    argv = argv[:i] + argv[i + 2 :] if i is not None else [a for a in argv if not a.startswith("--workers=")]
    n = args.workers
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ldmground.cli", *argv, "--shard", f"{k}/{n}", "--quiet", "--no-summary"],
            env=dict(os.environ),
        )
        for k in range(n)
    ]
    return [p.wait() for p in procs]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .runs.evaluation import evaluate, make_grounder, parse_shard

    cfg = _config(args)
    if args.workers > 1:
        if args.shard:
            raise LdmGroundError("--workers splits the data set itself; it cannot be combined with --shard")
        codes = _run_workers(args)
        crashed = [c for c in codes if c not in (0, 1)]
        if crashed:
            print(
                f"warning: {len(crashed)} worker(s) ended with {crashed}; this process computes what is left",
                file=sys.stderr,
            )
    state = None
    if args.shard == "auto":
        from accelerate import PartialState

        state = PartialState(cpu=args.device in (None, "cpu"))
        shard = (state.process_index, state.num_processes)
        device = args.device or str(state.device)
    else:
        shard, device = parse_shard(args.shard), args.device
    grounder = make_grounder(args.model, cfg, device)
    from .datasets.mscxr import read_sample_ids

    ids = read_sample_ids(args.ids) if args.ids else None
    common = dict(
        split=args.split,
        limit=args.limit,
        progress=not args.quiet,
        prompt_column=args.prompt_column,
        sample_ids=ids,
        dataset_format=args.dataset_format,
        prompt_template=args.prompt_template,
        classes=args.classes,
        batch_images=args.batch_images,
    )
    report = evaluate(
        grounder,
        args.dataset,
        args.images,
        args.out,
        cfg,
        shard=shard,
        retry_failed=args.retry_failed,
        finalize=state is None and not args.no_summary,
        **common,
    )
    if state is not None:
        from accelerate.utils import gather_object

        # Every process has committed its shard; the main one merges and summarises, and
        # its final line counts the samples of all processes.
        counts = gather_object([(report.succeeded, report.failed, report.skipped)])
        state.wait_for_everyone()
        if not state.is_main_process:
            return 0
        report = evaluate(grounder, args.dataset, args.images, args.out, cfg, shard=(0, 1), **common)
        report.succeeded, report.failed, report.skipped = (sum(c[i] for c in counts) for i in range(3))
    if not report.summary.empty and not args.quiet:
        cols = ["category", "n", "cnr_mean", "miou_mean", "auc_roc_mean", "pointing_mean"]
        print(report.summary[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(report.line)
    return 1 if report.failed_total else 0


def cmd_make_phantom(args: argparse.Namespace) -> int:
    from .datasets.phantom.render import generate_phantom

    start = time.perf_counter()
    df = generate_phantom(
        args.out, n=args.n, seed=args.seed, split=args.split, size=args.size, findings_per_image=args.findings
    )
    print(
        f"wrote {len(df)} boxes of {df['path'].nunique()} images to {args.out} in {time.perf_counter() - start:.1f} s"
    )
    return 0


def cmd_convert_monai(args: argparse.Namespace) -> int:
    from .models.monai.convert import convert_monai

    out = convert_monai(
        args.bundle_dir,
        args.out_dir,
        text_encoder=args.text_encoder,
        norm_num_groups=args.norm_groups,
        norm_eps=args.norm_eps,
        heads=args.heads,
        num_head_channels=args.num_head_channels,
        scale_factor=args.scale_factor,
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        beta_start=args.beta_start,
        beta_end=args.beta_end,
        prediction_type=args.prediction_type,
    )
    print(f"wrote diffusers model folder {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldmground",
        description="Zero-shot phrase grounding on chest X-rays with latent diffusion models "
        "(DDIM inversion + cross-attention, Vilouras et al.).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ground", help="heatmap of one phrase on one image")
    p.add_argument("--model", required=True, help="tiny | demo | random:<spec> | model folder | Hub repo id")
    p.add_argument("--image", required=True, help="X-ray image (PNG/JPEG, 8/16-bit, or DICOM)")
    p.add_argument("--phrase", required=True, help="report phrase to ground")
    p.add_argument("--out", required=True, help="heatmap PNG to write; the overlay goes to <stem>_overlay.png")
    p.add_argument("--words", help="comma-separated words to restrict tokens to (with --tokens class)")
    p.add_argument(
        "--text-encoder",
        help="text encoder spec overriding the model's own (e.g. a local SD-2.1 copy, random-clip:1024)",
    )
    p.add_argument("--device", help="torch device, e.g. cuda (default: cpu)")
    _add_config_options(p)
    p.set_defaults(func=cmd_ground)

    p = sub.add_parser("evaluate", help="evaluate on MS-CXR, VinDr-CXR or ChestX-ray8 boxes (resumable)")
    p.add_argument(
        "--model",
        required=True,
        help="tiny | demo | centre-prior | biovil | biovil-t (or biovil[-t]:<folder> / :random; baselines) | "
        "random:<spec> | folder | repo id",
    )
    p.add_argument(
        "--dataset",
        required=True,
        help="the boxes: an MS-CXR-format CSV (e.g. data/phantom/test.csv), VinDr-CXR's annotations_test.csv or "
        "ChestX-ray8's BBox_List_2017.csv (docs/datasets.md)",
    )
    p.add_argument(
        "--images",
        help="the images' folder (default: the CSV's folder): MS-CXR's 'path' is relative to it; VinDr-CXR: its "
        "test/ folder of <image_id>.dicom; ChestX-ray8: the unpacked images/ folder",
    )
    p.add_argument(
        "--dataset-format",
        choices=["mscxr", "vindr", "chestxray8"],
        help="the CSV's format (default: detected from its columns)",
    )
    p.add_argument(
        "--prompt-template",
        help="VinDr-CXR / ChestX-ray8: the phrase of a box class, with {class} (as the CSV writes it) or "
        "{class_lower} (default: 'The patient has {class}', the authors')",
    )
    p.add_argument(
        "--classes",
        help="VinDr-CXR / ChestX-ray8: keep only these box classes (comma-separated, as the CSV writes them); "
        "'authors': the authors' VinDr-CXR selection (8 findings, ILD and Infiltration as Pneumonia)",
    )
    p.add_argument("--out", required=True, help="results folder; a rerun resumes in it")
    p.add_argument("--split", help="keep only rows of this 'split'")
    p.add_argument(
        "--ids",
        help="evaluate only the samples listed in this file (CSV with sample_id, or dicom_id + label_text; "
        "or one sample_id per line)",
    )
    p.add_argument("--prompt-column", help="ground this CSV column's text instead of label_text (rewritten prompts)")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    p.add_argument("--shard", help="i/n: take one of n deterministic parts; 'auto' under accelerate launch")
    p.add_argument("--retry-failed", action="store_true", help="recompute samples stored as failed")
    p.add_argument("--device", help="torch device, e.g. cuda (default: cpu)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run N processes, one shard each, on this machine (use it with the default --threads 1 to fill the "
        "cores; results are identical to one process)",
    )
    p.add_argument(
        "--batch-images",
        type=_batch_images,
        default=None,
        metavar="B",
        help="ground B images together, one UNet batch per step (default 'auto': the batch size this --out "
        "folder already uses, else 1 on the CPU and one from the free GPU memory on CUDA); results of another B "
        "differ in their last bits and are stored apart (docs/performance.md)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    p.add_argument("--no-summary", action="store_true", help=argparse.SUPPRESS)  # workers leave it to the caller
    _add_config_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("make-phantom", help="render phantom chest X-rays in MS-CXR's format")
    p.add_argument("--out", required=True, help="output folder (CSV + images/)")
    p.add_argument("--n", type=int, default=200, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--split", default="test", help="split name written to the CSV")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--findings", type=int, default=1, help="findings per image")
    p.set_defaults(func=cmd_make_phantom)

    p = sub.add_parser("convert-monai", help="convert the MONAI CXR LDM bundle to a diffusers folder")
    p.add_argument("bundle_dir", help="bundle folder with models/autoencoder.pth and models/diffusion_model.pth")
    p.add_argument("out_dir", help="output model folder")
    p.add_argument(
        "--text-encoder",
        default="stabilityai/stable-diffusion-2-1-base",
        help="text encoder spec: SD-2.1-base repo id (default), a local copy, tiny, or none",
    )
    g = p.add_argument_group(
        "architecture",
        "values the weights do not store: read from the bundle's configs/inference.json (the scale factor also "
        "from scripts/sampler.py) when present, required when it is absent; a given option must agree with the config",
    )
    g.add_argument("--norm-groups", type=int, help="GroupNorm groups of both networks (the bundle: 32)")
    g.add_argument(
        "--norm-eps", type=float, help="GroupNorm eps of both networks (the bundle: 1e-6, the only one diffusers has)"
    )
    g.add_argument(
        "--heads",
        type=_int_levels,
        help="attention heads: one number for every attention level or one per level (the bundle: 1)",
    )
    g.add_argument(
        "--num-head-channels", type=_int_levels, help="instead of --heads: MONAI's channels per head, e.g. 0,512,768"
    )
    g.add_argument("--scale-factor", type=float, help="latent scale factor (the bundle: 0.3)")
    g.add_argument("--num-train-timesteps", type=int, help="diffusion training steps (the bundle: 1000)")
    g.add_argument(
        "--beta-schedule",
        choices=["linear", "scaled_linear", "linear_beta", "scaled_linear_beta"],
        help="(the bundle: scaled_linear)",
    )
    g.add_argument("--beta-start", type=float, help="(the bundle: 0.0015)")
    g.add_argument("--beta-end", type=float, help="(the bundle: 0.0205)")
    g.add_argument(
        "--prediction-type", choices=["epsilon", "v_prediction", "sample"], help="(the bundle: v_prediction)"
    )
    p.set_defaults(func=cmd_convert_monai)

    try:
        from .demo.command import add_train_parser
    except ImportError:
        pass
    else:
        add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except LdmGroundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
