"""Sweeps and ablations from cached attention: one UNet run per image serves every variant.

:func:`cache_samples` inverts each image once and keeps every (layer, step, token) map of
its phrases (:func:`ldmground.grounding.attention_cache`). Any choice of layers, timesteps,
tokens, pooling, normalisation, blur and Otsu is then a cheap re-aggregation
(:func:`heatmap_from_cache`), scored on the original image against the true boxes. The
sweep functions return long tables (one row per sample and variant) that the notebooks
save as CSV and :mod:`ldmground.figures` plots.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import GroundingConfig, get_preset
from .datasets.loader import load_dataset
from .datasets.mscxr import Sample
from .heatmap import load_image, postprocess
from .metrics import all_metrics, miou, union_mask

METRICS = ["cnr", "cnr_signed", "cnr_union", "miou", "auc_roc", "auc_roc_binned", "pointing"]


@dataclass
class CachedSample:
    """One image-phrase pair with all of its recorded attention.

    Attributes:
        sample: the data set row (boxes in original pixels).
        image: (H, W) float32 in [0, 1].
        cache: :class:`~ldmground.grounding.AttentionCache` of the image (all its phrases).
        phrase_index: which phrase of ``cache`` this sample is.
        class_tokens: indices into the phrase's recorded tokens that belong to the class
            name; all tokens when the class name does not occur in the phrase; None when
            the cache kept only the mean over tokens.
        config: the config the cache was recorded with (its N and window).
        class_span: indices of the authors' attribution tokens
            (:func:`ldmground.tokens.class_span`); empty when the class name does not occur
            (then ``tokens="class-span"`` gives no map); None without per-token maps.
    """

    sample: Sample
    image: np.ndarray
    cache: Any
    phrase_index: int
    class_tokens: tuple[int, ...] | None
    config: GroundingConfig
    class_span: tuple[int, ...] | None = None

    @property
    def has_class_name(self) -> bool:
        """Whether the phrase holds a token of the class name (the authors' rule)."""
        return bool(self.class_span)

    @property
    def maps(self) -> dict:
        return self.cache.maps[self.phrase_index]

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.maps})

    @property
    def steps(self) -> list[int]:
        return sorted({step for _, step in self.maps})


def as_config(config: GroundingConfig | str) -> GroundingConfig:
    return get_preset(config) if isinstance(config, str) else config


def pick_samples(samples: Sequence[Sample], n: int) -> list[Sample]:
    """``n`` samples spread round-robin over the categories (in order of appearance)."""
    by_cat: dict[str, list[Sample]] = {}
    for s in samples:
        by_cat.setdefault(s.category, []).append(s)
    picked: list[Sample] = []
    while len(picked) < min(n, len(samples)):
        for cat in by_cat:
            if by_cat[cat] and len(picked) < n:
                picked.append(by_cat[cat].pop(0))
    return picked


def load_samples(
    dataset: str | Path,
    images: str | Path | None,
    n: int | None = None,
    crop_size: int = 512,
    format: str | None = None,
    template: str | None = None,
) -> list[Sample]:
    """Samples of a box data set (MS-CXR, VinDr-CXR or ChestX-ray8, detected from the CSV's
    columns unless ``format`` is given; :func:`ldmground.datasets.loader.load_dataset`),
    ``n`` of them spread over the categories (all if None). Malformed rows are left out."""
    samples, _ = load_dataset(dataset, images, format, template, crop_size=crop_size, check_files=False)
    samples = [s for s in samples if not s.problem]
    return samples if n is None else pick_samples(samples, n)


def class_token_indices(tokens, category: str) -> tuple[int, ...]:
    """Indices (into a :class:`~ldmground.tokens.TokenSelection`) of the class-name words.

    Falls back to all indices when no word of ``category`` occurs in the phrase, as
    :func:`ldmground.tokens.select_tokens` does.
    """
    wanted = {w.lower() for w in category.replace("-", " ").split()}
    keep = tuple(i for i, w in enumerate(tokens.words) if w.lower() in wanted)
    return keep or tuple(range(len(tokens.positions)))


def full_window(config: GroundingConfig | str) -> GroundingConfig:
    """``config`` with the window widened to every step, for per-timestep sweeps."""
    return as_config(config).replace(window=(0.0, 1.0))


def cache_samples(
    pipe,
    samples: Sequence[Sample],
    images: str | Path,
    config: GroundingConfig | str,
    progress: bool = True,
    keep_tokens: bool = True,
    prune: bool = False,
    references: Sequence[str] | None = None,
) -> list[CachedSample]:
    """Invert each image once (all its phrases in one batch) and keep every map.

    Args:
        pipe: a :class:`~ldmground.models.GroundingPipeline`.
        samples: the pairs to cache; pairs that share an image share its inversion.
        images: the folder the samples' ``path`` is relative to.
        config: its ``num_inference_steps`` and ``window`` decide which steps are recorded
            (use :func:`full_window` for per-timestep sweeps); every layer is recorded.
        keep_tokens: keep one map per token (needed for ``tokens="class"``); False keeps
            only their mean, a T-fold saving (a 512-px model at 300 steps holds
            ~130 MB per sample with all tokens, all layers and the full window).
        prune: keep only the config's layers (all when None); the window is the config's.
        references: phrases to record with each image for ``contrast`` (see
            :func:`~ldmground.grounding.attention_cache`; default: the config's reference
            phrases when its contrast is > 0, else none).
    """
    from tqdm.auto import tqdm

    from .grounding import attention_cache
    from .tokens import class_span

    cfg = as_config(config)
    by_image: dict[str, list[Sample]] = {}
    for s in samples:
        by_image.setdefault(s.path, []).append(s)

    def reduce(maps: dict) -> dict:
        return {
            key: m if keep_tokens else m.mean(dim=0, keepdim=True)
            for key, m in maps.items()
            if not prune or cfg.layers is None or key[0] in cfg.layers
        }

    out: dict[str, CachedSample] = {}
    for path, group in tqdm(by_image.items(), desc="invert", unit="image", disable=not progress):
        image = load_image(Path(images) / path)
        cache = attention_cache(pipe, image, [s.phrase for s in group], cfg, references)
        cache.reference_maps = [reduce(m) for m in cache.reference_maps]
        for i, s in enumerate(group):
            cache.maps[i] = reduce(cache.maps[i])
            tokens = class_token_indices(cache.tokens[i], s.category) if keep_tokens else None
            span = None
            if keep_tokens:
                wanted = set(class_span(pipe.tokenizer, s.phrase, s.category, pipe.max_length))
                span = tuple(k for k, pos in enumerate(cache.tokens[i].positions) if pos in wanted)
            out[s.sample_id] = CachedSample(s, image, cache, i, tokens, cfg, span)
    return [out[s.sample_id] for s in samples]


def heatmap_from_cache(
    cs: CachedSample,
    config: GroundingConfig | str,
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    tokens: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-aggregate a cached sample as :func:`~ldmground.grounding.ground` would.

    Args:
        config: pooling, normalisation, contrast, post-processing; its ``layers`` (None =
            all) and ``window`` pick the maps unless ``layers`` / ``steps`` are given. Its
            ``num_inference_steps`` must be the one the cache was recorded with; a
            ``contrast`` > 0 needs a cache that recorded its reference phrases.
        layers, steps: explicit layer indices / step indices (override the config).
        tokens: ``"phrase"``, ``"class"`` or ``"class-span"`` (default: ``config.tokens``);
            ``"class-span"`` without the class name in the phrase gives all-NaN maps.

    Returns:
        ((S, S) model-frame heatmap, (H, W) original-frame heatmap with NaN outside the crop).
    """
    from .grounding import pool_maps, reference_background

    cfg = as_config(config)
    if cfg.num_inference_steps != cs.config.num_inference_steps:
        raise ValueError(
            f"the cache has N={cs.config.num_inference_steps} steps, the config N={cfg.num_inference_steps}"
        )
    layers = cfg.layers if layers is None else layers
    steps = list(cfg.window_indices()) if steps is None else steps
    token_index = None
    choice = tokens or cfg.tokens
    if choice in ("class", "class-span"):
        if cs.class_tokens is None:
            raise ValueError(f"this cache kept only the mean over tokens; cache with keep_tokens=True for {choice!r}")
        token_index = cs.class_tokens if choice == "class" else cs.class_span
        if not token_index:  # class-span without the class name: the authors' all-NaN map
            nan = np.full((cs.cache.image_size,) * 2, np.nan, dtype=np.float32)
            return nan, cs.cache.geometry.to_original(nan)
    size = cs.cache.image_size
    raw = pool_maps(cs.maps, cfg, (size, size), layers=layers, steps=steps, token_index=token_index)
    if cfg.contrast:
        if tuple(cs.cache.references) != cfg.reference_phrases:
            raise ValueError(
                f"contrast needs the maps of the reference phrases {list(cfg.reference_phrases)}; this cache "
                f"recorded {list(cs.cache.references)} (cache with references=config.reference_phrases)"
            )
        background = reference_background(cs.cache.reference_maps, cfg, (size, size), layers=layers, steps=steps)
        raw = raw - cfg.contrast * background
    model_hm = postprocess(raw, cfg)
    return model_hm, cs.cache.geometry.to_original(model_hm)


def score(cs: CachedSample, heatmap: np.ndarray) -> dict[str, float]:
    """All metrics of an original-frame heatmap against the sample's boxes."""
    return all_metrics(heatmap, cs.sample.boxes)


def phrase_attention_ratio(cs: CachedSample, layers: Sequence[int] | None = None) -> float:
    """Mean attention on the phrase's tokens inside the true boxes over the mean outside them.

    Read from the raw cached maps (before any normalisation), each bilinearly upsampled to
    the model frame and averaged over the cached steps of ``layers`` (default: all). Near 1,
    the text reaches every position alike, and a heatmap grounds only through the small
    differences that min-max normalisation stretches; a model that sends the text to the
    finding scores well above 1.
    """
    import torch

    from .attention import upsample_map

    size = cs.cache.image_size
    geo = cs.cache.geometry
    boxes = geo.boxes_to_model(cs.sample.boxes)
    inside = union_mask((size, size), boxes)
    chosen = [m for (layer, _), m in cs.maps.items() if layers is None or layer in layers]
    if not chosen or not inside.any() or inside.all():
        raise ValueError(f"{cs.sample.sample_id}: no maps of layers {layers} or no box inside the model frame")
    share = torch.stack([upsample_map(m.float().mean(dim=0), (size, size)) for m in chosen]).mean(dim=0).numpy()
    return float(share[inside].mean() / share[~inside].mean())


def text_denoising_gain(
    pipe,
    sample: Sample,
    images_root: str | Path,
    timesteps: Sequence[int] = (200, 400, 600, 800),
    draws: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """How much the phrase helps the UNet denoise the finding: does the model use the text?

    The image is noised at each of ``timesteps`` (``draws`` seeded noises each) and the
    UNet's prediction error (against its own target: noise, velocity or sample) is averaged
    inside the true boxes (weighted by each latent cell's box coverage) and outside them, for
    the phrase, the empty phrase and the phrase with left and right swapped. Returns

    * ``gain_in``: 1 - error(phrase) / error(empty phrase) inside the boxes;
    * ``gain_out``: the same outside them;
    * ``swap_in``: 1 - error(phrase) / error(side-swapped phrase) inside the boxes, NaN
      when the phrase names no side.

    A model that draws the finding from the phrase has ``gain_in`` well above ``gain_out``;
    its cross-attention then has something to ground.
    """
    import torch
    import torch.nn.functional as F
    from diffusers import DDIMScheduler

    from .heatmap import preprocess
    from .tokens import swap_sides

    size = pipe.image_size
    image, geo = preprocess(load_image(sample.image_path(images_root)), size)
    boxes = geo.boxes_to_model(sample.boxes)
    if not boxes:
        raise ValueError(f"{sample.sample_id}: no box inside the model frame")
    z0 = pipe.encode_image(torch.from_numpy(image)[None, None])
    inside = torch.from_numpy(union_mask((size, size), boxes)).float()[None, None]
    inside = F.adaptive_avg_pool2d(inside, z0.shape[-2:])[0, 0].to(z0.device)  # box coverage per cell
    swapped = swap_sides(sample.phrase)
    phrases = [sample.phrase, "", swapped]
    ctx, keep = pipe.encode_text(phrases)
    mask = keep if pipe.use_attention_mask else None
    sched = DDIMScheduler.from_config(pipe.scheduler_config)
    gen = torch.Generator().manual_seed(seed)
    err = torch.zeros(len(phrases), 2)  # (phrase, inside / outside)
    for t in timesteps:
        tt = torch.tensor([t], device=z0.device)
        for _ in range(draws):
            noise = torch.randn(z0.shape, generator=gen).to(z0.device)
            target = {
                "epsilon": noise,
                "v_prediction": sched.get_velocity(z0, noise, tt),
                "sample": z0,
            }[sched.config.prediction_type]
            zt = sched.add_noise(z0, noise, tt)
            with torch.no_grad():
                pred = pipe.unet(
                    zt.expand(len(phrases), -1, -1, -1),
                    tt.expand(len(phrases)),
                    encoder_hidden_states=ctx,
                    encoder_attention_mask=mask,
                ).sample
            e = ((pred.float() - target.float()) ** 2).mean(dim=1)  # (phrases, h, w)
            err[:, 0] += ((e * inside).sum((1, 2)) / inside.sum()).cpu()
            err[:, 1] += ((e * (1 - inside)).sum((1, 2)) / (1 - inside).sum().clamp(min=1e-8)).cpu()
    return {
        "gain_in": float(1 - err[0, 0] / err[1, 0]),
        "gain_out": float(1 - err[0, 1] / err[1, 1]),
        "swap_in": float(1 - err[0, 0] / err[2, 0]) if swapped != sample.phrase else float("nan"),
    }


def finding_visibility(pipe, image: np.ndarray, mask: np.ndarray, ring: int = 2) -> dict[str, float]:
    """How visible a finding is to the model, in its input and after the VAE round trip.

    ``image``: (S, S) in [0, 1] at the model's input size; ``mask``: (S, S) bool, the
    finding's pixels. The contrast is |mean inside the mask - mean over a ``ring``-pixel band
    around it|. Returns ``area`` (pixels), ``contrast`` (input), ``recon`` (the same on the
    VAE's reconstruction of the image) and ``kept`` (recon / contrast, signed: a negative
    value means the reconstruction inverts the finding). A finding the VAE smooths away is one
    the UNet cannot learn to draw, nor its cross-attention to ground.
    """
    import torch
    from scipy import ndimage as ndi

    mask = np.asarray(mask, dtype=bool)
    if image.shape != mask.shape or not mask.any():
        raise ValueError(f"finding_visibility: image {image.shape} and a non-empty mask of that shape expected")
    band = ndi.binary_dilation(mask, iterations=ring) & ~mask
    latent = pipe.encode_image(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None])
    with torch.no_grad():
        decoded = pipe.vae.decode(latent / pipe.scaling_factor).sample
    recon = ((decoded.float().mean(dim=1)[0].cpu().numpy() + 1) / 2).clip(0, 1)
    signed = float(image[mask].mean() - image[band].mean())
    signed_recon = float(recon[mask].mean() - recon[band].mean())
    return {
        "area": float(mask.sum()),
        "contrast": abs(signed),
        "recon": abs(signed_recon),
        "kept": signed_recon / signed if signed else float("nan"),
    }


def _row(cs: CachedSample, metrics: Mapping[str, float], **variant: Any) -> dict[str, Any]:
    return {"sample_id": cs.sample.sample_id, "category": cs.sample.category, **variant, **metrics}


def sweep(
    cached: Sequence[CachedSample],
    variants: Iterable[tuple[dict[str, Any], dict[str, Any]]],
    config: GroundingConfig | str,
    progress: bool = True,
    desc: str = "sweep",
) -> pd.DataFrame:
    """Score every variant on every cached sample.

    Args:
        variants: ``(labels, options)`` pairs: ``labels`` become columns of the table;
            ``options`` may hold ``config`` changes (any :class:`GroundingConfig` field)
            and the selection keys ``layers``, ``steps``, ``tokens``.
        config: the base config the options change.

    Returns:
        one row per (sample, variant): sample_id, category, the labels, the metrics.
    """
    from tqdm.auto import tqdm

    base = as_config(config)
    variants = list(variants)
    rows = []
    for cs in tqdm(cached, desc=desc, unit="sample", disable=not progress):
        for labels, options in variants:
            opts = dict(options)
            sel = {k: opts.pop(k) for k in ("layers", "steps", "tokens") if k in opts}
            cfg = base.replace(**opts) if opts else base
            _, hm = heatmap_from_cache(cs, cfg, **sel)
            rows.append(_row(cs, score(cs, hm), **labels))
    return pd.DataFrame(rows)


def layer_sweep(
    cached: Sequence[CachedSample],
    config: GroundingConfig | str,
    extra: Mapping[str, Sequence[int]] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Each cross-attention layer alone, then named layer sets: the config's, ``extra``, all.

    Args:
        extra: more named layer sets, e.g. ``{"paper": (3, 4, 6, 7)}``; indices the model
            lacks are dropped (a set left empty is skipped).

    Columns ``layer`` (the layer index as text, ``"config"``, an ``extra`` name or ``"all"``)
    and ``layers`` (the set used, e.g. ``"3,4,6,7"``).
    """
    cfg = as_config(config)
    all_layers = cached[0].layers
    sets = {str(i): [i] for i in all_layers}
    if cfg.layers is not None:
        sets["config"] = list(cfg.layers)
    for name, layers in (extra or {}).items():
        sets[name] = [i for i in layers if i in all_layers]
    sets["all"] = list(all_layers)
    variants = [({"layer": name, "layers": _join(ls)}, {"layers": ls}) for name, ls in sets.items() if ls]
    return sweep(cached, variants, cfg, progress, "layers")


def step_sweep(
    cached: Sequence[CachedSample], config: GroundingConfig | str, pipe=None, progress: bool = True
) -> pd.DataFrame:
    """Each recorded timestep alone (the config's layers), over the steps the cache holds.

    Columns ``step`` (index in the ascending inversion order), ``fraction`` (step / N),
    ``in_window`` (inside the config's window) and, when ``pipe`` is given, ``t`` (train step).
    """
    cfg = as_config(config)
    n = cached[0].config.num_inference_steps
    window = set(cfg.window_indices())
    ts = timesteps(pipe, cfg) if pipe is not None else None
    variants = []
    for step in cached[0].steps:
        labels = {"step": step, "fraction": step / n, "in_window": step in window}
        if ts is not None:
            labels["t"] = ts[step]
        variants.append((labels, {"steps": [step]}))
    return sweep(cached, variants, cfg, progress, "timesteps")


def window_sweep(
    cached: Sequence[CachedSample],
    config: GroundingConfig | str,
    windows: Sequence[tuple[float, float]],
    progress: bool = True,
) -> pd.DataFrame:
    """Each timestep window (fractions of N) with the config's layers; column ``window``."""
    cfg = as_config(config)
    variants = [({"window": f"{a:.2f}-{b:.2f}"}, {"window": (a, b)}) for a, b in windows]
    return sweep(cached, variants, cfg, progress, "windows")


def aggregation_sweep(
    cached: Sequence[CachedSample], config: GroundingConfig | str, progress: bool = True
) -> pd.DataFrame:
    """Per-map normalisation x pooling x tokens; columns ``normalize``, ``pooling``, ``tokens``."""
    variants = [
        ({"normalize": norm, "pooling": pool, "tokens": tok}, {"normalize_maps": norm, "pooling": pool, "tokens": tok})
        for norm in (True, False)
        for pool in ("mean", "max", "median")
        for tok in ("phrase", "class")
    ]
    return sweep(cached, variants, config, progress, "aggregation")


def attribution_experiment(
    cached: Sequence[CachedSample], config: GroundingConfig | str, progress: bool = True
) -> pd.DataFrame:
    """The paper's attribution experiment: all phrase tokens against the class name's tokens
    as the authors select them (``tokens="class-span"``), on the same inversions.

    Returns one row per (sample, ``tokens``) with ``has_class_name``; a phrase without its
    class name has an all-NaN ``class-span`` map, which the metrics score as the authors'
    code does (CNR 0, mIoU 0, binned AUC 0.5, exact AUC NaN, pointing 0).
    """
    table = sweep(cached, [({"tokens": t}, {"tokens": t}) for t in ("phrase", "class-span")], config, progress)
    has = {cs.sample.sample_id: cs.has_class_name for cs in cached}
    return table.assign(has_class_name=table["sample_id"].map(has))


def attribution_table(rows: pd.DataFrame, metrics: Sequence[str] = ("cnr", "miou", "auc_roc_binned")) -> pd.DataFrame:
    """Macro means with 95 % bootstrap intervals of :func:`attribution_experiment` under both
    treatments of phrases that lack their class name: left out, or scored as no map."""
    from .report import summary_with_ci

    with_name = rows["has_class_name"]
    variants = {
        "all phrase tokens (every pair)": rows["tokens"] == "phrase",
        "all phrase tokens (pairs naming their class)": (rows["tokens"] == "phrase") & with_name,
        "class-name tokens, pairs without the name left out": (rows["tokens"] == "class-span") & with_name,
        "class-name tokens, no map scored as the authors do": rows["tokens"] == "class-span",
    }
    out = []
    for label, pick in variants.items():
        summary = summary_with_ci(rows[pick].assign(status="ok"), metrics).query("category == 'macro'")
        for _, r in summary.iterrows():
            out.append(
                {
                    "variant": label,
                    "metric": r["metric"],
                    "n": r["n"],
                    "mean": r["mean"],
                    "ci_low": r["ci_low"],
                    "ci_high": r["ci_high"],
                }
            )
    return pd.DataFrame(out)


def postprocess_sweep(
    cached: Sequence[CachedSample],
    config: GroundingConfig | str,
    sigmas: Sequence[float] = (0.0, 2.5, 5.0, 10.0, 20.0, 40.0),
    progress: bool = True,
) -> pd.DataFrame:
    """Gaussian sigma (px at 512) x Otsu on/off; columns ``sigma``, ``otsu``."""
    variants = [({"sigma": s, "otsu": o}, {"sigma": float(s), "otsu": o}) for s in sigmas for o in (False, True)]
    return sweep(cached, variants, config, progress, "post-processing")


def contrast_sweep(
    cached: Sequence[CachedSample],
    config: GroundingConfig | str,
    weights: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    progress: bool = True,
) -> pd.DataFrame:
    """Background weight (``contrast``) x Otsu on/off; columns ``contrast``, ``otsu``.

    The cache must hold the maps of the config's reference phrases
    (``cache_samples(..., references=config.reference_phrases)``).
    """
    variants = [({"contrast": w, "otsu": o}, {"contrast": float(w), "otsu": o}) for w in weights for o in (False, True)]
    return sweep(cached, variants, config, progress, "contrast")


def threshold_sweep(
    cached: Sequence[CachedSample],
    config: GroundingConfig | str,
    thresholds: Sequence[float] = tuple(np.round(np.arange(0.1, 1.0, 0.1), 2)),
    progress: bool = True,
) -> pd.DataFrame:
    """IoU of ``heatmap > threshold`` with the union of the boxes, per threshold and Otsu.

    Columns ``otsu``, ``threshold``, ``iou``.
    """
    from tqdm.auto import tqdm

    base = as_config(config)
    rows = []
    for cs in tqdm(cached, desc="thresholds", unit="sample", disable=not progress):
        for otsu in (False, True):
            _, hm = heatmap_from_cache(cs, base.replace(otsu=otsu))
            for t in thresholds:
                rows.append(_row(cs, {"iou": miou(hm, cs.sample.boxes, (float(t),))}, otsu=otsu, threshold=float(t)))
    return pd.DataFrame(rows)


def timesteps(pipe, config: GroundingConfig | str) -> list[int]:
    """Train-step t of every step index of the config's grid (ascending)."""
    from .inversion import inversion_timesteps, make_scheduler

    cfg = as_config(config)
    return inversion_timesteps(make_scheduler(pipe.scheduler_config, cfg.timestep_spacing), cfg.num_inference_steps)


def inversion_steps_sweep(
    pipe,
    samples: Sequence[Sample],
    images: str | Path,
    config: GroundingConfig | str,
    step_counts: Sequence[int] = (10, 25, 50),
    progress: bool = True,
) -> pd.DataFrame:
    """The config at several numbers of inversion steps N (same window fractions).

    Every N needs its own inversion. Column ``num_inference_steps``.
    """
    cfg = as_config(config)
    frames = []
    for n in step_counts:
        cfg_n = cfg.replace(num_inference_steps=int(n))
        cached = cache_samples(pipe, samples, images, cfg_n, progress=progress, prune=True)
        frames.append(sweep(cached, [({"num_inference_steps": int(n)}, {})], cfg_n, progress, f"N={n}"))
    return pd.concat(frames, ignore_index=True)


def summarize_sweep(df: pd.DataFrame, by: str | Sequence[str], metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean, std and standard error over samples of each metric, per variant.

    Returns one row per value of ``by`` with columns ``n``, ``<metric>_mean``,
    ``<metric>_std``, ``<metric>_sem``; NaN metrics (e.g. AUC on one class) are skipped.
    """
    by = [by] if isinstance(by, str) else list(by)
    metrics = [m for m in (metrics or METRICS + ["iou"]) if m in df.columns]
    g = df.groupby(by, sort=False)[metrics]
    mean, std, count = g.mean(), g.std(ddof=0), g.count()
    sem = std / np.sqrt(count.clip(lower=1))
    out = mean.add_suffix("_mean").join(std.add_suffix("_std")).join(sem.add_suffix("_sem"))
    out.insert(0, "n", df.groupby(by, sort=False).size())
    return out.reset_index()


def map_panels(
    cs: CachedSample, config: GroundingConfig | str, by: str, values: Sequence[int]
) -> list[tuple[str, np.ndarray]]:
    """(title, original-frame heatmap) of one sample for each layer or step in ``values``.

    Args:
        by: ``"layer"`` (each layer alone, the config's window) or ``"step"`` (each step
            alone, the config's layers).
    """
    cfg = as_config(config)
    panels = []
    for v in values:
        sel = {"layers": [v]} if by == "layer" else {"steps": [v]}
        _, hm = heatmap_from_cache(cs, cfg, **sel)
        panels.append((f"{by} {v}", hm))
    return panels


def save_panels(path: str | Path, cs: CachedSample, panels: Sequence[tuple[str, np.ndarray]]) -> Path:
    """Store map panels of one sample (with its image and boxes) as ``.npz`` for re-plotting."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        image=cs.image,
        boxes=np.asarray(cs.sample.boxes, dtype=np.float64).reshape(-1, 4),
        titles=np.asarray([t for t, _ in panels]),
        maps=np.stack([m for _, m in panels]),
        phrase=np.asarray(cs.sample.phrase),
    )
    return path


def load_panels(path: str | Path) -> dict[str, Any]:
    """What :func:`save_panels` wrote: ``panels``, ``image``, ``boxes``, ``phrase``."""
    with np.load(path) as z:
        return {
            "panels": list(zip([str(t) for t in z["titles"]], list(z["maps"]), strict=True)),
            "image": z["image"],
            "boxes": [tuple(b) for b in z["boxes"]],
            "phrase": str(z["phrase"]),
        }


def _join(values: Iterable[int]) -> str:
    return ",".join(str(v) for v in values)


# --- evaluation tables -----------------------------------------------------------------------


def to_markdown(table: pd.DataFrame, digits: int = 2) -> str:
    """A GitHub markdown table (no extra dependency); NaN shows as an empty cell."""
    index = table.index.name or ""
    header = [index, *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for idx, row in table.iterrows():
        cells = [str(idx)]
        for v in row:
            if v is None or v is pd.NA:
                cells.append("")
            elif isinstance(v, float | np.floating):
                cells.append("" if not np.isfinite(v) else f"{v:.{digits}f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- qualitative examples --------------------------------------------------------------------


def save_examples(
    pipe,
    samples: Sequence[Sample],
    images: str | Path,
    config: GroundingConfig | str,
    out_dir: str | Path,
) -> pd.DataFrame:
    """Ground ``samples`` and store their heatmaps for the qualitative figure.

    Writes ``out_dir/heatmaps/<sample_id>.npy`` ((H, W) float32, NaN outside the crop) and
    ``out_dir/examples.csv`` (sample_id, category, phrase, image path, boxes, metrics).
    """
    from .grounding import ground

    out = Path(out_dir)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in samples:
        path = Path(images) / s.path
        image = load_image(path)
        words = [[s.category]] if as_config(config).tokens == "class" else None
        [res] = ground(pipe, image, [s.phrase], config, words)
        np.save(out / "heatmaps" / f"{s.sample_id}.npy", res.heatmap)
        rows.append(
            {
                "sample_id": s.sample_id,
                "category": s.category,
                "phrase": s.phrase,
                "image": str(path.resolve()),
                "boxes": ";".join(" ".join(f"{v:g}" for v in b) for b in s.boxes),
                **all_metrics(res.heatmap, s.boxes),
            }
        )
    df = pd.DataFrame(rows)
    df.to_csv(out / "examples.csv", index=False)
    return df


def load_examples(out_dir: str | Path) -> list[dict[str, Any]]:
    """What :func:`save_examples` wrote, as dicts for :func:`ldmground.figures.qualitative_grid`."""
    out = Path(out_dir)
    df = pd.read_csv(out / "examples.csv", keep_default_na=False)
    items = []
    for r in df.to_dict("records"):
        boxes = [tuple(float(v) for v in b.split()) for b in str(r["boxes"]).split(";") if b.strip()]
        items.append(
            {
                **r,
                "image": load_image(r["image"]),
                "heatmap": np.load(out / "heatmaps" / f"{r['sample_id']}.npy"),
                "boxes": boxes,
            }
        )
    return items
