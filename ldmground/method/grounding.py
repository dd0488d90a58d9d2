"""``ground``: one image, one or more phrases -> heatmaps, as in Vilouras et al.

The whole method in order: preprocess the X-ray, encode it to a latent, DDIM-invert it with
the empty prompt while the phrases' cross-attention is recorded inside the timestep window,
aggregate the maps, post-process, and map the heatmap back to the original image.

With ``config.contrast > 0`` (this project's extension, off in the paper's presets), the
reference phrases are recorded on the same inversion and their mean aggregated map, weighted
by ``contrast``, is subtracted from each phrase's map before post-processing: what every
finding name attends to (the lung fields, say) drops out, what only this phrase attends to
stays.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import GroundingConfig, get_preset
from ..errors import LdmGroundError
from ..models.pipeline import GroundingPipeline
from .attention import AttentionRecorder, PhraseRow
from .heatmap import Geometry, postprocess, preprocess
from .inversion import ddim_invert, make_scheduler
from .tokens import TokenSelection, class_span, select_tokens

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class GroundingResult:
    """The heatmap of one phrase on one image.

    Attributes:
        heatmap: (H, W) float32 in [0, 1] on the original image, NaN outside the crop.
        model_heatmap: (S, S) float32 in [0, 1] in the model frame.
        raw_map: (S, S) float32: aggregated attention before post-processing.
        tokens: the token positions that were read.
        unet_evals: UNet evaluations spent on the image (shared by its phrases).
        seconds: wall time of the image (shared by its phrases).
        warnings: notes to keep with the result (e.g. truncation).
        background: (S, S) mean aggregated map of the reference phrases, before weighting,
            when ``config.contrast > 0`` (``raw_map`` already has it subtracted); else None.
    """

    phrase: str
    heatmap: np.ndarray
    model_heatmap: np.ndarray
    raw_map: np.ndarray
    geometry: Geometry
    tokens: TokenSelection
    unet_evals: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    background: np.ndarray | None = None


@dataclass
class AttentionCache:
    """Every recorded (layer, step) map of one image, for re-aggregation without the UNet.

    ``maps[p][(layer, step)]`` is a (T, h, w) tensor: one map per selected token of phrase p.
    ``reference_maps`` holds the same for each of ``references`` (the phrases whose mean
    map ``contrast`` subtracts), recorded on the same inversion; empty when none were.
    """

    maps: list[dict[tuple[int, int], torch.Tensor]]
    tokens: list[TokenSelection]
    geometry: Geometry
    image_size: int
    reference_maps: list[dict[tuple[int, int], torch.Tensor]] = field(default_factory=list)
    references: tuple[str, ...] = ()


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op CPU thread count at ``n`` (None: unchanged).

    The count decides how some CPU kernels split their sums, so the same count gives the
    same bits in every process (see ``GroundingConfig.threads``).
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _selection(pipe: GroundingPipeline, phrase: str, words, tokens: str) -> TokenSelection:
    """The phrase's tokens, restricted to the class name as ``tokens`` says."""
    if tokens != "class-span" or not words:
        return select_tokens(pipe.tokenizer, phrase, list(words) if words else None, pipe.max_length)
    full = select_tokens(pipe.tokenizer, phrase, None, pipe.max_length)
    span = set(class_span(pipe.tokenizer, phrase, " ".join(words), pipe.max_length))
    keep = [i for i, pos in enumerate(full.positions) if pos in span]
    if not keep:  # the authors' code returns no map: the caller gets an all-NaN heatmap
        note = f"class name {' '.join(words)!r} not in the phrase: no map (the authors' attribution rule)"
        return TokenSelection((), (), (), full.truncated, (*full.warnings, note))
    pick = lambda seq: tuple(seq[i] for i in keep)  # noqa: E731
    return TokenSelection(pick(full.positions), pick(full.words), pick(full.pieces), full.truncated, full.warnings)


def resolve_config(config: GroundingConfig | str | None, pipe: GroundingPipeline | None = None) -> GroundingConfig:
    """The config to use: a preset by name, the model's default preset for None; its layers
    are checked against the UNet before anything is computed."""
    if config is None:
        config = pipe.default_preset if pipe is not None else "paper"
    name = config if isinstance(config, str) else None
    cfg = get_preset(config) if isinstance(config, str) else config
    if pipe is not None and cfg.layers is not None:
        from .attention import cross_attention_layers

        n = len(cross_attention_layers(pipe.unet))
        bad = [i for i in cfg.layers if not 0 <= i < n]
        if bad:
            what = f"preset {name!r}" if name else "the config"
            raise LdmGroundError(
                f"{what} reads cross-attention layers {bad}, but this UNet has {n} (0..{n - 1}); "
                f"the model's default preset is {pipe.default_preset!r} (leave the preset out to use it)"
            )
    return cfg


def run_attention(
    pipe: GroundingPipeline,
    image: np.ndarray,
    phrases: Sequence[str],
    config: GroundingConfig | str | None = None,
    words: Sequence[Sequence[str] | None] | None = None,
    keep_maps: bool = False,
    progress: bool = False,
):
    """Invert ``image`` once and record the attention of all ``phrases`` (one batch).

    Returns (recorder store, token selections, geometry, unet_evals, seconds).
    """
    cfg = resolve_config(config, pipe)
    with intra_op_threads(cfg.threads):
        return _run_attention(pipe, image, phrases, cfg, words, keep_maps, progress)


def _run_attention(pipe, image, phrases, cfg: GroundingConfig, words, keep_maps: bool, progress: bool):
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    pixels, geo = preprocess(image, pipe.image_size, cfg.resize)
    # Class-name words restrict the tokens only when the config asks for it.
    if cfg.tokens == "phrase" or words is None:
        words = [None] * len(phrases)
    selections = [_selection(pipe, p, w, cfg.tokens) for p, w in zip(phrases, words, strict=True)]
    device = pipe.device
    latent = pipe.encode_image(torch.from_numpy(pixels)[None, None].to(device))
    uncond, uncond_mask = pipe.encode_text([""])
    states, mask = pipe.encode_text(list(phrases))
    use_mask = pipe.use_attention_mask
    scheduler = make_scheduler(pipe.scheduler_config, cfg.timestep_spacing)

    def predict(x, t, ctx, m):
        kwargs = {"encoder_attention_mask": m} if (use_mask and m is not None) else {}
        return pipe.unet(x, t, encoder_hidden_states=ctx, **kwargs).sample

    recorder = AttentionRecorder(pipe.unet, cfg.layers, normalize=cfg.normalize_maps, keep_maps=keep_maps)
    with recorder:
        offset = pipe.sink_length  # keys before the phrase's own tokens
        # A selection left empty (class-span without the class name) records its first
        # token only to keep the batch's shape; ground() returns no map for it.
        rows = [PhraseRow(1 + i, [offset + p for p in (s.positions or (1,))]) for i, s in enumerate(selections)]
        recorder.begin(rows, tuple(latent.shape[-2:]))
        result = ddim_invert(
            predict,
            latent,
            scheduler,
            cfg.num_inference_steps,
            uncond,
            uncond_mask if use_mask else None,
            states,
            mask if use_mask else None,
            read_steps=cfg.window_indices(),
            recorder=recorder,
            autocast_dtype=_DTYPES[cfg.dtype],
            progress=progress,
            step=cfg.inversion_step,
        )
    return recorder.store, selections, geo, result.unet_evals, time.perf_counter() - start


def ground(
    pipe: GroundingPipeline,
    image: np.ndarray,
    phrases: str | Sequence[str],
    config: GroundingConfig | str | None = None,
    words: Sequence[Sequence[str] | None] | None = None,
    progress: bool = False,
) -> list[GroundingResult]:
    """Heatmaps of ``phrases`` on ``image``; the image is inverted once for all phrases.

    Args:
        pipe: a :class:`~ldmground.models.pipeline.GroundingPipeline`.
        image: (H, W) float in [0, 1] (see :func:`ldmground.method.heatmap.load_image`).
        phrases: one phrase or a list of phrases about this image.
        config: a :class:`GroundingConfig` or a preset name (default: the model's own,
            ``pipe.default_preset``: ``"demo"`` for the demo model, ``"paper"`` for the
            converted MONAI bundle). Layers the UNet does not have are refused up front.
        words: per phrase, words to restrict the tokens to when ``config.tokens == "class"``
            (e.g. the finding's class name).

    With ``config.contrast > 0`` the reference phrases join the batch of the same inversion
    (their maps are not returned; ``GroundingResult.background`` holds their mean).
    """
    cfg = resolve_config(config, pipe)
    if isinstance(phrases, str):
        phrases = [phrases]
    with intra_op_threads(cfg.threads):
        return _ground(pipe, image, list(phrases), cfg, words, progress)


def _ground(pipe, image, phrases: list[str], cfg: GroundingConfig, words, progress: bool) -> list[GroundingResult]:
    references = list(cfg.reference_phrases) if cfg.contrast else []
    if words is not None and references:
        words = [*words, *([None] * len(references))]
    keep = cfg.pooling != "mean"
    store, selections, geo, evals, seconds = run_attention(
        pipe, image, [*phrases, *references], cfg, words, keep_maps=keep, progress=progress
    )
    size = pipe.image_size

    def aggregate(row: int) -> np.ndarray:
        if keep:
            return pool_maps(store.maps[row], cfg, (size, size))
        return store.mean_map(row, (size, size)).numpy()

    n = len(phrases)
    background = np.mean([aggregate(n + j) for j in range(len(references))], axis=0) if references else None
    results = []
    for i, (phrase, sel) in enumerate(zip(phrases, selections[:n], strict=True)):
        if not sel.positions:
            nan = np.full((size, size), np.nan, dtype=np.float32)
            results.append(
                GroundingResult(phrase, geo.to_original(nan), nan, nan, geo, sel, evals, seconds, list(sel.warnings))
            )
            continue
        raw = aggregate(i)
        if background is not None:
            raw = raw - cfg.contrast * background
        model_hm = postprocess(raw, cfg)
        results.append(
            GroundingResult(
                phrase=phrase,
                heatmap=geo.to_original(model_hm),
                model_heatmap=model_hm,
                raw_map=raw.astype(np.float32),
                geometry=geo,
                tokens=sel,
                unet_evals=evals,
                seconds=seconds,
                warnings=list(sel.warnings),
                background=None if background is None else background.astype(np.float32),
            )
        )
    return results


def pool_maps(
    maps: dict[tuple[int, int], torch.Tensor],
    cfg: GroundingConfig,
    size: tuple[int, int],
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    token_index: Sequence[int] | None = None,
) -> np.ndarray:
    """Aggregate kept (T, h, w) maps: choose layers/steps/tokens, normalise, upsample, pool.

    Returns an (H, W) float32 map (before post-processing).
    """
    with intra_op_threads(cfg.threads):
        return _pool_maps(maps, cfg, size, layers, steps, token_index)


def _pool_maps(maps, cfg: GroundingConfig, size, layers, steps, token_index) -> np.ndarray:
    from .attention import minmax, upsample_map

    chosen = []
    for (layer, step), tok_maps in sorted(maps.items()):
        if layers is not None and layer not in layers:
            continue
        if steps is not None and step not in steps:
            continue
        m = tok_maps if token_index is None else tok_maps[list(token_index)]
        m = m.mean(dim=0)
        if cfg.normalize_maps:
            m = minmax(m)
        chosen.append(upsample_map(m, size))
    if not chosen:
        raise ValueError("no (layer, step) map matches the selection")
    stack = torch.stack(chosen)
    if cfg.pooling == "mean":
        out = stack.mean(0)
    elif cfg.pooling == "max":
        out = stack.max(0).values
    elif cfg.pooling == "median":
        out = stack.median(0).values
    else:
        raise ValueError(f"unknown pooling {cfg.pooling!r}")
    return out.numpy().astype(np.float32)


def reference_background(
    reference_maps: Sequence[dict[tuple[int, int], torch.Tensor]],
    cfg: GroundingConfig,
    size: tuple[int, int],
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
) -> np.ndarray:
    """Mean over the reference phrases of their aggregated maps (see :func:`pool_maps`)."""
    if not reference_maps:
        raise ValueError("no reference maps were recorded; contrast needs them")
    return np.mean([pool_maps(m, cfg, size, layers=layers, steps=steps) for m in reference_maps], axis=0)


def attention_cache(
    pipe: GroundingPipeline,
    image: np.ndarray,
    phrases: Sequence[str],
    config: GroundingConfig | str | None = None,
    references: Sequence[str] | None = None,
) -> AttentionCache:
    """Record every layer at every step of the window once, for interactive exploration.

    ``references``: phrases recorded alongside (in the same batch) for ``contrast``;
    default: the config's ``reference_phrases`` when its ``contrast`` is > 0, else none.
    """
    cfg = resolve_config(config, pipe).replace(layers=None, tokens="phrase")
    if references is None:
        references = cfg.reference_phrases if cfg.contrast else ()
    references = tuple(references)
    store, selections, geo, _, _ = run_attention(pipe, image, [*phrases, *references], cfg, keep_maps=True)
    n = len(phrases)
    return AttentionCache(store.maps[:n], selections[:n], geo, pipe.image_size, store.maps[n:], references)
