"""Cost of grounding one image-phrase pair: ldmground vs the reference procedure.

Variants, each run in its own subprocess so that peak RSS is its own:
  (a) ldmground     - inversion stops after the window, phrase branch only inside it,
                      only the selected cross-attention layers/tokens recorded, aggregated
                      on the fly;
  (b) reference     - a re-creation of the reference procedure from its description: the
                      full walk t = 0, r, 2r, ... < 1000 (r = 1000 // N; 334 steps for N=300),
                      a batch of [empty, phrase] at every step, the probabilities of every
                      attention layer (self-attention included) kept on the host at every
                      step, aggregated afterwards;
  (c) bare          - the same UNet forwards as (a) (same batches) with nothing recorded.

Prints one line per variant and a final line
  RATIO reference/ldmground=<x> overhead=<(a)/(c)> evals=<n> attn_mb=<a> ref_attn_mb=<b>

Examples:
  python benchmarks/bench_grounding.py --quick                   # tiny model, < 1 min
  python benchmarks/bench_grounding.py --model paper-random --steps 30
  python benchmarks/bench_grounding.py --model paper-random --variants bare,ldmground
  python benchmarks/bench_grounding.py --model paper-random --dtype bf16 --device cuda

With N = 300 on paper-random the reference variant holds ~15 GB of attention probabilities
(peak RSS ~24 GB); --variants leaves it out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_pipeline(model: str, device: str):
    from ldmground.models.folder import load_pipeline

    if model != "paper-random":
        return load_pipeline(model, device=device)
    # The paper model's architecture with seeded random weights: a fake MONAI bundle,
    # converted by our converter, plus a random 1024-d CLIP (the text encoder's size does
    # not change the UNet's cost).
    from ldmground.models.monai.bundle import write_fake_bundle
    from ldmground.models.monai.convert import convert_monai

    tmp = Path(tempfile.mkdtemp(prefix="paper-random-"))
    write_fake_bundle(tmp / "bundle", scale="full", seed=0)
    convert_monai(tmp / "bundle", tmp / "model", text_encoder="none")
    pipe = load_pipeline(str(tmp / "model"), text_encoder="random-clip:1024")
    pipe.spec = "paper-random"
    return pipe.to(device)


def count_calls(unet) -> list[int]:
    """Counts UNet evaluations (batch rows) through a forward pre-hook."""
    counter = [0]

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        counter[0] += sample.shape[0]

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return counter


def test_image(size: int) -> np.ndarray:
    path = Path(__file__).resolve().parents[1] / "data" / "phantom" / "images" / "phantom-test-00005.png"
    from ldmground.method.heatmap import load_image

    img = load_image(path)
    if size != img.shape[0]:
        from PIL import Image

        img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return img


PHRASE = "Right pleural effusion, large"


def run_ldmground(pipe, image, cfg, bare: bool = False) -> dict:
    from ldmground.method.grounding import ground

    counter = count_calls(pipe.unet)
    if bare:
        return run_bare(pipe, image, cfg, counter)
    start = time.perf_counter()
    [res] = ground(pipe, image, PHRASE, cfg)
    seconds = time.perf_counter() - start
    return {
        "evals": counter[0],
        "seconds": seconds,
        "attn_bytes": None,
        "heatmap": res.model_heatmap,
        "raw": res.raw_map,
    }


def run_bare(pipe, image, cfg, counter) -> dict:
    """The UNet forwards of (a), same batches, no recorder, no post-processing."""
    from ldmground.method.heatmap import preprocess
    from ldmground.method.inversion import DTYPES as _DTYPES
    from ldmground.method.inversion import ddim_invert, make_scheduler

    start = time.perf_counter()
    pixels, _ = preprocess(image, pipe.image_size, cfg.resize)
    latent = pipe.encode_image(torch.from_numpy(pixels)[None, None].to(pipe.device))
    uncond, _ = pipe.encode_text([""])
    states, _ = pipe.encode_text([PHRASE])

    def predict(x, t, ctx, m):
        return pipe.unet(x, t, encoder_hidden_states=ctx).sample

    ddim_invert(
        predict,
        latent,
        make_scheduler(pipe.scheduler_config, cfg.timestep_spacing),
        cfg.num_inference_steps,
        uncond,
        None,
        states,
        None,
        read_steps=cfg.window_indices(),
        autocast_dtype=_DTYPES[cfg.dtype],
    )
    return {"evals": counter[0], "seconds": time.perf_counter() - start, "attn_bytes": 0, "heatmap": None, "raw": None}


class KeepEverything:
    """Reference-style processor: attention probabilities of every row, kept on the host."""

    def __init__(self, inner, name, sink):
        self.inner, self.name, self.sink = inner, name, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        x = hidden_states
        if x.ndim == 4:
            b, c, h, w = x.shape
            x = x.view(b, c, h * w).transpose(1, 2)
        ctx = x if encoder_hidden_states is None else encoder_hidden_states
        q, k = attn.head_to_batch_dim(attn.to_q(x)), attn.head_to_batch_dim(attn.to_k(ctx))
        probs = attn.get_attention_scores(q, k, None)
        self.sink.append((self.name, probs.float().cpu()))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)


def run_reference(pipe, image, cfg) -> dict:
    from ldmground.method.attention import cross_attention_layers, minmax, upsample_map
    from ldmground.method.heatmap import postprocess, preprocess
    from ldmground.method.inversion import DTYPES as _DTYPES
    from ldmground.method.inversion import inversion_timesteps, make_scheduler, split_prediction
    from ldmground.method.tokens import select_tokens

    counter = count_calls(pipe.unet)
    start = time.perf_counter()
    pixels, _ = preprocess(image, pipe.image_size, cfg.resize)
    latent = pipe.encode_image(torch.from_numpy(pixels)[None, None].to(pipe.device))
    uncond, _ = pipe.encode_text([""])
    states, _ = pipe.encode_text([PHRASE])
    ctx = torch.cat([uncond, states])
    sched = make_scheduler(pipe.scheduler_config, cfg.timestep_spacing)
    grid = inversion_timesteps(sched, cfg.num_inference_steps)  # the whole walk, as the reference takes it
    alphas = sched.alphas_cumprod.to(pipe.device)
    sink: list = []
    steps: list[list] = []
    original = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor({n: KeepEverything(p, n, sink) for n, p in original.items()})
    amp = (
        torch.autocast(pipe.device.type, dtype=_DTYPES[cfg.dtype])
        if _DTYPES[cfg.dtype]
        else torch.autocast(pipe.device.type, enabled=False)
    )
    x = latent
    try:
        for i, t in enumerate(grid):
            with torch.no_grad(), amp:
                out = pipe.unet(x.expand(2, *x.shape[1:]), t, encoder_hidden_states=ctx).sample
            steps.append(sink[:])
            sink.clear()
            if i + 1 < len(grid):
                x0, eps = split_prediction(out[:1].float(), x, alphas[t], sched.config.prediction_type)
                x = alphas[grid[i + 1]].sqrt() * x0 + (1 - alphas[grid[i + 1]]).sqrt() * eps
    finally:
        pipe.unet.set_attn_processor(original)
    held = sum(p.numel() * p.element_size() for step in steps for _, p in step)
    # aggregate afterwards, as the reference does
    names = cross_attention_layers(pipe.unet)
    chosen = {names[i]: i for i in (cfg.layers if cfg.layers is not None else range(len(names)))}
    positions = list(select_tokens(pipe.tokenizer, PHRASE, None, pipe.max_length).positions)
    lh, lw = latent.shape[-2:]
    size = (pipe.image_size, pipe.image_size)
    maps = []
    for i in cfg.window_indices():
        for name, probs in steps[i]:
            if name not in chosen:
                continue
            heads = probs.shape[0] // 2
            p = probs[heads:].mean(0)[:, positions].mean(-1)  # phrase row, mean over heads, tokens
            f = int(round((lh * lw / p.shape[0]) ** 0.5))
            maps.append(upsample_map(minmax(p.view(lh // f, lw // f)), size))
    raw = torch.stack(maps).mean(0).numpy()
    heat = postprocess(raw, cfg)
    seconds = time.perf_counter() - start
    return {"evals": counter[0], "seconds": seconds, "attn_bytes": held, "heatmap": heat, "raw": raw}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    from ldmground.config import get_preset

    cfg = get_preset("paper").replace(num_inference_steps=args.steps, dtype=args.dtype)
    pipe = build_pipeline(args.model, args.device)
    image = test_image(pipe.image_size)
    if args.variant == "ldmground":
        from ldmground.method import grounding

        store_bytes = {}
        real = grounding.AttentionRecorder.__exit__

        def spy(self, *exc):
            store_bytes["b"] = self.store.bytes_held
            return real(self, *exc)

        grounding.AttentionRecorder.__exit__ = spy
        out = run_ldmground(pipe, image, cfg)
        out["attn_bytes"] = store_bytes["b"]
    elif args.variant == "bare":
        out = run_ldmground(pipe, image, cfg, bare=True)
    else:
        out = run_reference(pipe, image, cfg)
    heat, raw = out.pop("heatmap"), out.pop("raw")
    if heat is not None:
        np.savez(args.heatmap_out, heatmap=heat, raw=raw)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | paper-random | any load_pipeline spec")
    ap.add_argument("--steps", type=int, default=300, help="DDIM steps N (paper: 300)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    ap.add_argument("--quick", action="store_true", help="tiny model, 100 steps: a run under a minute")
    ap.add_argument(
        "--variants",
        default="ldmground,reference,bare",
        help="comma-separated subset, run in this order (the reference needs ~24 GB RAM on paper-random)",
    )
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--heatmap-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    if args.quick:
        args.model, args.steps = "tiny", 100
    results, maps = {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    for variant in args.variants.split(","):
        out_file = tmp / f"{variant}.npz"
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--steps", str(args.steps)]
        cmd += ["--dtype", args.dtype, "--device", args.device, "--threads", str(args.threads)]
        cmd += ["--heatmap-out", str(out_file)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(line[0][7:])
        results[variant] = r
        if out_file.exists():
            maps[variant] = dict(np.load(out_file))
        print(
            f"{variant:10s} evals={r['evals']:4d} wall={r['seconds']:8.2f}s peak_rss={r['peak_rss_mb']:8.0f}MB "
            f"attn_store={r['attn_bytes'] / 2**10:12.1f}KB",
            flush=True,
        )
    setting = f"model={args.model}, steps={args.steps}, dtype={args.dtype}, device={args.device}"
    setting += f", threads={args.threads}"
    a, b, c = (results.get(v) for v in ("ldmground", "reference", "bare"))
    if a and b:
        # The aggregated maps must agree to float precision. After Otsu, a pixel whose value
        # sits on the threshold can land on either side, so the final heatmaps are compared
        # by the share of pixels that differ.
        raw = float(np.abs(maps["ldmground"]["raw"] - maps["reference"]["raw"]).max())
        gap = np.abs(maps["ldmground"]["heatmap"] - maps["reference"]["heatmap"])
        print(
            f"same maps: max |ldmground - reference| aggregated = {raw:.2e}; final heatmaps differ by > 0.01 "
            f"at {(gap > 0.01).mean():.2e} of the pixels (max {gap.max():.2f})  ({setting})"
        )
    else:
        print(f"({setting})")

    def fmt(x: float | None, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    print(
        f"RATIO reference/ldmground={fmt(b and a and b['seconds'] / a['seconds'], '.2f')} "
        f"overhead={fmt(a and c and a['seconds'] / c['seconds'], '.2f')} evals={fmt(a and a['evals'], 'd')} "
        f"attn_mb={fmt(a and a['attn_bytes'] / 2**20, '.3f')} ref_attn_mb={fmt(b and b['attn_bytes'] / 2**20, '.1f')}"
    )


if __name__ == "__main__":
    main()
