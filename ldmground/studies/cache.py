"""Attention caches: each image inverted once with every (layer, step, token) map of its
phrases kept (:func:`cache_samples`); any choice of layers, timesteps, tokens, pooling,
normalisation, blur and Otsu is then a cheap re-aggregation (:func:`heatmap_from_cache`),
scored on the original image against the true boxes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GroundingConfig, get_preset
from ..datasets.loader import load_dataset
from ..datasets.mscxr import Sample
from ..errors import LdmGroundError
from ..method.heatmap import load_image, postprocess
from ..metrics import all_metrics

METRICS = ["cnr", "cnr_signed", "cnr_union", "miou", "auc_roc", "auc_roc_binned", "pointing"]


@dataclass
class CachedSample:
    """One image-phrase pair with all of its recorded attention.

    Attributes:
        sample: the data set row (boxes in original pixels).
        image: (H, W) float32 in [0, 1].
        cache: :class:`~ldmground.method.grounding.AttentionCache` of the image (all its phrases).
        phrase_index: which phrase of ``cache`` this sample is.
        class_tokens: indices into the phrase's recorded tokens that belong to the class
            name; all tokens when the class name does not occur in the phrase; None when
            the cache kept only the mean over tokens.
        config: the config the cache was recorded with (its N and window).
        class_span: indices of the authors' attribution tokens
            (:func:`ldmground.method.tokens.class_span`); empty when the class name does not occur
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
    split: str | None = None,
) -> list[Sample]:
    """Samples of a box data set (MS-CXR, VinDr-CXR or ChestX-ray8, detected from the CSV's
    columns unless ``format`` is given; :func:`ldmground.datasets.loader.load_dataset`),
    ``n`` of them spread over the categories (all if None). Malformed rows are left out.

    ``split``: keep only the rows whose ``split`` column has this value (None: all rows); a
    data set without that column or without any row of that split is an error naming it.
    """
    samples, _ = load_dataset(dataset, images, format, template, crop_size=crop_size, check_files=False)
    samples = [s for s in samples if not s.problem]
    if split is not None:
        found = sorted({s.split for s in samples})
        samples = [s for s in samples if s.split == split]
        if not samples:
            raise LdmGroundError(
                f"{dataset}: no sample of split {split!r} (its 'split' column has {found or 'no values'}); "
                "pass split=None to use every row"
            )
    return samples if n is None else pick_samples(samples, n)


def class_token_indices(tokens, category: str, fallback: bool = True) -> tuple[int, ...]:
    """Indices (into a :class:`~ldmground.method.tokens.TokenSelection`) of the class-name words.

    When no word of ``category`` occurs in the phrase: all indices with ``fallback`` (as
    :func:`ldmground.method.tokens.select_tokens` does), else an empty tuple (no map, as the
    authors' attribution code).
    """
    wanted = {w.lower() for w in category.replace("-", " ").split()}
    keep = tuple(i for i, w in enumerate(tokens.words) if w.lower() in wanted)
    if keep or not fallback:
        return keep
    return tuple(range(len(tokens.positions)))


def token_words(tokens, indices: Sequence[int] | None = None) -> list[str]:
    """The phrase words behind the chosen token pieces, in order, each once.

    Sub-word pieces ("e ##ff ##usion" of a WordPiece tokenizer, "pneum o thorax</w>" of CLIP's
    BPE) belong to one word of the phrase (``TokenSelection.words``, from character offsets);
    consecutive pieces of the same word give that word once.
    """
    chosen = range(len(tokens.words)) if indices is None else sorted(indices)
    out: list[str] = []
    last = None
    for i in chosen:
        if last is None or i != last + 1 or tokens.words[i] != tokens.words[last]:
            out.append(tokens.words[i])
        last = i
    return out


def full_window(config: GroundingConfig | str) -> GroundingConfig:
    """``config`` with the window widened to every step, for per-timestep sweeps."""
    return as_config(config).replace(window=(0.0, 1.0))


def phrase_attention(
    pipe,
    image: np.ndarray,
    phrases: Sequence[str],
    config: GroundingConfig | str,
    references: Sequence[str] = (),
    on_step: Callable[[int, int], None] | None = None,
    trajectories=None,
):
    """Every (layer, step) map of ``phrases`` on ``image`` over ``config``'s window.

    The one road from the explorer to the UNet, for the first phrases of an image and for
    every phrase typed later on an image already inverted. The empty-prompt trajectory does
    not depend on the phrases (they are read beside it, never steer it), so recording a
    phrase alone gives the maps a joint inversion with the others would. With
    ``trajectories`` (a :class:`~ldmground.method.trajectory.TrajectoryCache`) that walk is
    kept, and a new phrase on a seen image costs only the window's phrase evaluations.

    Args:
        pipe: a :class:`~ldmground.models.pipeline.GroundingPipeline`.
        image: (H, W) float in [0, 1].
        phrases: recorded with every selected token kept.
        config: its ``num_inference_steps`` and ``window`` decide the recorded steps (all
            layers are recorded).
        references: phrases recorded alongside for ``contrast`` (none by default).
        on_step: ``on_step(done, total)`` after each UNet evaluation, for a progress bar
            (``total``: the walk's steps plus one phrase call per window step, or only the
            latter when ``trajectories`` holds the image's walk).
        trajectories: the caller's :class:`~ldmground.method.trajectory.TrajectoryCache`, or
            None to walk every time.

    Returns:
        an :class:`~ldmground.method.grounding.AttentionCache` of ``phrases`` (and ``references``).
    """
    from ..method.grounding import attention_cache

    cfg = as_config(config)
    handle = None
    if on_step is not None:
        hits = trajectories.hits if trajectories is not None else 0
        window = list(cfg.window_indices())
        total = max(window) + 1 + len(window)  # the empty-prompt walk, then one phrase call per window step
        done = [0]

        def count(*_):
            nonlocal total
            if trajectories is not None and trajectories.hits > hits:
                total = len(window)  # the walk was kept: only the window's phrase calls run
            done[0] += 1
            on_step(min(done[0], total), total)

        handle = pipe.unet.register_forward_pre_hook(count)
    try:
        return attention_cache(pipe, image, list(phrases), cfg, tuple(references), cache=trajectories)
    finally:
        if handle is not None:
            handle.remove()


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
        pipe: a :class:`~ldmground.models.pipeline.GroundingPipeline`.
        samples: the pairs to cache; pairs that share an image share its inversion.
        images: the folder the samples' ``path`` is relative to.
        config: its ``num_inference_steps`` and ``window`` decide which steps are recorded
            (use :func:`full_window` for per-timestep sweeps); every layer is recorded.
        keep_tokens: keep one map per token (needed for ``tokens="class"``); False keeps
            only their mean, a T-fold saving (a 512-px model at 300 steps holds
            ~130 MB per sample with all tokens, all layers and the full window).
        prune: keep only the config's layers (all when None); the window is the config's.
        references: phrases to record with each image for ``contrast`` (see
            :func:`~ldmground.method.grounding.attention_cache`; default: the config's reference
            phrases when its contrast is > 0, else none).
    """
    from tqdm.auto import tqdm

    from ..method.grounding import attention_cache
    from ..method.tokens import class_span

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
    """Re-aggregate a cached sample as :func:`~ldmground.method.grounding.ground` would.

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
    from ..method.aggregate import pool_maps, reference_background

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


# Settings that only change how cached maps are read, not the cache itself.
_READ_OUT_FIELDS = {
    "window", "layers", "tokens", "normalize_maps", "pooling", "sigma", "blur_mode", "otsu", "contrast",
}  # fmt: skip


def shared_cache(
    pipe,
    samples: Sequence[Sample],
    images: str | Path,
    config: GroundingConfig | str,
    folder: str | Path,
    progress: bool = True,
    references: Sequence[str] = (),
) -> list[CachedSample]:
    """The one attention cache that notebooks 01-03 share.

    Every layer at every one of the config's N steps, one map per token, for ``samples``
    (and ``references``, phrases recorded alongside, none by default: each adds a batch row
    at every step). Written to ``folder`` under a key of the model (its spec and the SHA-256
    of its weights files), the settings that change the recording (N, timestep spacing,
    resize, dtype, threads, ...), the references and the sample ids; a later call with the
    same key reads it back instead of inverting again. The file is a pickle this function
    wrote: read only caches you made.
    """
    import hashlib
    import json
    import pickle

    from ..models.folder import sha256_file

    cfg = full_window(config)
    key = {
        "model": pipe.spec,
        "weights": [sha256_file(f) for f in pipe.weight_files],
        "config": {k: v for k, v in cfg.to_dict().items() if k not in _READ_OUT_FIELDS},
        "references": list(references),
        "samples": [s.sample_id for s in samples],
        "images": str(Path(images).resolve()),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(folder) / f"attention-{digest}.pkl"
    if path.is_file():
        with path.open("rb") as f:
            return pickle.load(f)
    cached = cache_samples(pipe, samples, images, cfg.replace(layers=None), progress=progress, references=references)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        pickle.dump(cached, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
    return cached
