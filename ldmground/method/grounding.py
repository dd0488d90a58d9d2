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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import GroundingConfig, get_preset
from ..errors import LdmGroundError
from ..geometry import Geometry
from ..models.pipeline import GroundingPipeline
from .aggregate import pool_maps
from .attention import AttentionRecorder, AttentionStore, PhraseRow
from .batch_size import default_batch_size
from .heatmap import postprocess, preprocess
from .inversion import DTYPES, ddim_invert, evaluate_phrases, intra_op_threads, inversion_timesteps, make_scheduler
from .tokens import TokenSelection, class_span, select_tokens
from .trajectory import Trajectory, TrajectoryCache


@dataclass
class GroundingResult:
    """The heatmap of one phrase on one image.

    Attributes:
        heatmap: (H, W) float32 in [0, 1] on the original image, NaN outside the crop.
        model_heatmap: (S, S) float32 in [0, 1] in the model frame.
        raw_map: (S, S) float32: aggregated attention before post-processing.
        tokens: the token positions that were read.
        unet_evals: UNet evaluations spent on the image (shared by its phrases): the
            empty-prompt walk (none when a :class:`~ldmground.method.trajectory.TrajectoryCache`
            had it) plus the phrase rows of the window.
        seconds: wall time of the image (shared by its phrases; of a batch of images, the
            batch's time divided by its images).
        warnings: notes to keep with the result (e.g. truncation).
        background: (S, S) mean aggregated map of the reference phrases, before weighting,
            when ``config.contrast > 0`` (``raw_map`` already has it subtracted); else None.
        image_warnings: warnings the image's preprocessing raised (e.g. upsampled), as text.
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
    image_warnings: list[str] = field(default_factory=list)


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
    cache: TrajectoryCache | None = None,
):
    """Invert ``image`` once and record the attention of all ``phrases`` (one batch).

    ``cache``: a :class:`~ldmground.method.trajectory.TrajectoryCache` to reuse the image's
    inversion from (and to keep it in); None inverts afresh.

    Returns (recorder store, token selections, geometry, unet_evals, seconds).
    """
    cfg = resolve_config(config, pipe)
    with intra_op_threads(cfg.threads):
        start = time.perf_counter()
        torch.manual_seed(cfg.seed)
        job = _prepare(pipe, image, list(phrases), words, cfg, cache)
        [store] = _record_batch(pipe, [job], cfg, keep_maps, progress, cache)
        return store, job.selections, job.geo, job.unet_evals, time.perf_counter() - start


@dataclass
class _Job:
    """One image of a batch, ready for the UNet."""

    phrases: list[str]  # the phrases, then the reference phrases of ``contrast``
    selections: list[TokenSelection]
    geo: Geometry
    states: torch.Tensor  # (P, L, D) encoder states of ``phrases``
    mask: torch.Tensor | None
    key: tuple | None  # its TrajectoryCache key
    latent: torch.Tensor | None  # (1, C, h, w), None when the trajectory came from a cache
    trajectory: Trajectory | None = None
    image_warnings: list[str] = field(default_factory=list)
    unet_evals: int = 0
    notes: list[str] = field(default_factory=list)  # kept with each phrase's result
    n_phrases: int = 0  # phrases[:n_phrases] are the caller's, the rest references


def _prepare(pipe, image, phrases: list[str], words, cfg: GroundingConfig, cache: TrajectoryCache | None) -> _Job:
    """Preprocess, select tokens, encode the text and (unless cached) the image.

    The preprocessing's warnings (a small image is upsampled) are kept on the job and
    raised again for the caller.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pixels, geo = preprocess(image, pipe.image_size, cfg.resize)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=4)
    # Class-name words restrict the tokens only when the config asks for it.
    if cfg.tokens == "phrase" or words is None:
        words = [None] * len(phrases)
    selections = [_selection(pipe, p, w, cfg.tokens) for p, w in zip(phrases, words, strict=True)]
    states, mask = pipe.encode_text(list(phrases))
    key = trajectory = latent = None
    if cache is not None:
        key = cache.key(pipe, pixels, cfg)
        trajectory = cache.get(pipe, key)
    if trajectory is None:
        latent = pipe.encode_image(torch.from_numpy(pixels)[None, None].to(pipe.device))
    return _Job(
        phrases,
        selections,
        geo,
        states,
        mask if pipe.use_attention_mask else None,
        key,
        latent,
        trajectory,
        [str(w.message) for w in caught],
        n_phrases=len(phrases),
    )


def _record_batch(
    pipe, jobs: list[_Job], cfg: GroundingConfig, keep_maps: bool, progress: bool, cache: TrajectoryCache | None
) -> list[AttentionStore]:
    """Invert the jobs' images together and record their phrases; one store per job.

    The images without a trajectory walk the empty-prompt path together (one UNet batch of
    their latents per step), keeping their latents at the window's steps; then at each
    window step one UNet call evaluates the phrase rows of every job on its image's latent.
    Sets each job's ``trajectory`` and ``unet_evals``.
    """
    from tqdm.auto import tqdm

    window = cfg.window_indices()
    scheduler = make_scheduler(pipe.scheduler_config, cfg.timestep_spacing)
    dtype = DTYPES[cfg.dtype]
    use_mask = pipe.use_attention_mask

    def predict(x, t, ctx, m):
        kwargs = {"encoder_attention_mask": m} if (use_mask and m is not None) else {}
        return pipe.unet(x, t, encoder_hidden_states=ctx, **kwargs).sample

    walkers = [j for j in jobs if j.trajectory is None]
    for j in jobs:
        j.unet_evals = 0
    if walkers:
        uncond, uncond_mask = pipe.encode_text([""])
        walk = ddim_invert(
            predict,
            torch.cat([j.latent for j in walkers]),
            scheduler,
            cfg.num_inference_steps,
            uncond,
            uncond_mask if use_mask else None,
            read_steps=window,
            autocast_dtype=dtype,
            progress=progress,
            step=cfg.inversion_step,
            keep_steps=window,
        )
        per_image = walk.unet_evals // len(walkers)
        for k, j in enumerate(walkers):
            latents = torch.cat([walk.kept[i][k : k + 1] for i in window])
            j.trajectory = Trajectory(tuple(window), latents, per_image)
            j.unet_evals = per_image
            if cache is not None and j.key is not None:
                cache.put(pipe, j.key, j.trajectory)
    ts = inversion_timesteps(scheduler, cfg.num_inference_steps)
    states = torch.cat([j.states for j in jobs])
    mask = torch.cat([j.mask for j in jobs]) if use_mask and jobs[0].mask is not None else None
    latent_hw = tuple(jobs[0].trajectory.latents.shape[-2:])
    recorder = AttentionRecorder(pipe.unet, cfg.layers, normalize=cfg.normalize_maps, keep_maps=keep_maps)
    with recorder:
        offset = pipe.sink_length  # keys before the phrase's own tokens
        # A selection left empty (class-span without the class name) records its first
        # token only to keep the batch's shape; ground() returns no map for it.
        sels = [s for j in jobs for s in j.selections]
        recorder.begin(
            [PhraseRow(r, [offset + p for p in (s.positions or (1,))]) for r, s in enumerate(sels)], latent_hw
        )
        for i in tqdm(window, desc="phrases", unit="step", disable=not progress, leave=False):
            x = torch.cat([j.trajectory.at(i).to(pipe.device).expand(len(j.phrases), -1, -1, -1) for j in jobs])
            evaluate_phrases(predict, x, ts[i], states, mask, recorder, i, dtype)
    for j in jobs:
        j.unet_evals += len(j.phrases) * len(window)
    return _split_store(recorder.store, [len(j.phrases) for j in jobs])


def _split_store(store: AttentionStore, counts: list[int]) -> list[AttentionStore]:
    """The per-image parts of a batch's store (its phrases are consecutive, image by image)."""
    if len(counts) == 1:
        return [store]
    parts, o = [], 0
    for n in counts:
        part = AttentionStore(
            normalize=store.normalize,
            keep_maps=store.keep_maps,
            sums=store.sums[o : o + n],
            counts=store.counts[o : o + n],
            maps=store.maps[o : o + n],
        )
        tensors = [t for d in part.sums + part.maps for t in d.values()]
        part.bytes_held = sum(t.numel() * t.element_size() for t in tensors)
        parts.append(part)
        o += n
    return parts


def ground(
    pipe: GroundingPipeline,
    image: np.ndarray,
    phrases: str | Sequence[str],
    config: GroundingConfig | str | None = None,
    words: Sequence[Sequence[str] | None] | None = None,
    progress: bool = False,
    cache: TrajectoryCache | None = None,
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
        cache: a :class:`~ldmground.method.trajectory.TrajectoryCache`: an image inverted before
            under the same model and inversion settings is not inverted again (only the
            window's phrase evaluations run; the heatmaps are bitwise those of a fresh run),
            and a new one is kept. None (the default) inverts afresh and keeps nothing.

    With ``config.contrast > 0`` the reference phrases join the batch of the same inversion
    (their maps are not returned; ``GroundingResult.background`` holds their mean).
    Several images at once: :func:`ground_many`.
    """
    if isinstance(phrases, str):
        phrases = [phrases]
    [results] = ground_many(pipe, [(image, list(phrases), words)], config, batch_size=1, cache=cache, progress=progress)
    return results


GroundingItem = tuple  # (image, phrases) or (image, phrases, words), as ``ground`` takes them


def ground_many(
    pipe: GroundingPipeline,
    items: Sequence[GroundingItem],
    config: GroundingConfig | str | None = None,
    batch_size: int | None = None,
    cache: TrajectoryCache | None = None,
    progress: bool = False,
    return_exceptions: bool = False,
) -> list[list[GroundingResult] | Exception]:
    """Heatmaps of several images, ``batch_size`` images inverted together.

    Args:
        items: ``(image, phrases)`` or ``(image, phrases, words)`` per image, each as
            :func:`ground` takes them.
        batch_size: images per UNet batch: their empty-prompt rows share one UNet call per
            step, and their phrase rows one call per window step. None: :func:`default_batch_size`
            (1 on the CPU, from free memory on CUDA).
        cache: as in :func:`ground`.
        return_exceptions: put an image's exception in its place in the returned list
            instead of raising it; when the UNet call of a batch raises, each of its images
            is then grounded alone, so a bad image fails alone.

    Returns:
        per item, its list of :class:`GroundingResult` (or its exception).

    Each image's heatmaps are those of :func:`ground` on it alone up to float rounding: a
    UNet batch's size changes which kernels run, which can move the last bits (measured:
    <= 1e-6 on the aggregated maps; see docs/performance.md). With ``batch_size=1`` they are
    bitwise equal. ``GroundingResult.seconds`` is the batch's wall time shared by its images.
    """
    cfg = resolve_config(config, pipe)
    if batch_size is None:
        batch_size = default_batch_size(pipe, cfg)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list = []
    with intra_op_threads(cfg.threads):
        for k in range(0, len(items), batch_size):
            out.extend(_ground_batch(pipe, list(items[k : k + batch_size]), cfg, cache, progress, return_exceptions))
    return out


def _unpack(item) -> tuple[np.ndarray, list[str], Sequence | None]:
    if not isinstance(item, tuple | list) or len(item) not in (2, 3):
        raise TypeError(f"an item is (image, phrases) or (image, phrases, words), got {type(item).__name__}")
    image, phrases, *rest = item
    phrases = [phrases] if isinstance(phrases, str) else list(phrases)
    return image, phrases, rest[0] if rest else None


def _ground_batch(pipe, items: list, cfg: GroundingConfig, cache, progress: bool, return_exceptions: bool) -> list:
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    references = list(cfg.reference_phrases) if cfg.contrast else []
    out: list = [None] * len(items)
    jobs: dict[int, _Job] = {}
    for k, item in enumerate(items):
        try:
            image, phrases, words = _unpack(item)
            if words is not None and references:
                words = [*words, *([None] * len(references))]
            jobs[k] = _prepare(pipe, image, [*phrases, *references], words, cfg, cache)
            jobs[k].n_phrases = len(phrases)
        except Exception as err:
            if not return_exceptions:
                raise
            out[k] = err
    keep = cfg.pooling != "mean"
    stores: dict[int, AttentionStore] = {}
    if jobs:
        try:
            stores = dict(zip(jobs, _record_batch(pipe, list(jobs.values()), cfg, keep, progress, cache), strict=True))
        except Exception as err:
            if not return_exceptions:
                raise
            if len(jobs) == 1:
                out[next(iter(jobs))] = err
            else:  # find the image at fault: each one alone
                note = f"its batch of {len(jobs)} images failed ({type(err).__name__}: {err}); grounded alone"
                for k, job in jobs.items():
                    try:
                        torch.manual_seed(cfg.seed)
                        [stores[k]] = _record_batch(pipe, [job], cfg, keep, progress, cache)
                        job.notes.append(note)
                    except Exception as alone:
                        out[k] = alone
    seconds = (time.perf_counter() - start) / max(1, len(items))
    for k, store in stores.items():
        try:
            out[k] = _results(pipe, jobs[k], store, cfg, seconds)
        except Exception as err:
            if not return_exceptions:
                raise
            out[k] = err
    return out


def _results(pipe, job: _Job, store: AttentionStore, cfg: GroundingConfig, seconds: float) -> list[GroundingResult]:
    """Aggregate and post-process the recorded maps of one image."""
    keep = cfg.pooling != "mean"
    size = pipe.image_size
    geo, evals = job.geo, job.unet_evals

    def aggregate(row: int) -> np.ndarray:
        if keep:
            return pool_maps(store.maps[row], cfg, (size, size))
        return store.mean_map(row, (size, size)).numpy()

    n = job.n_phrases
    n_refs = len(job.phrases) - n
    background = np.mean([aggregate(n + j) for j in range(n_refs)], axis=0) if n_refs else None
    results = []
    for i, (phrase, sel) in enumerate(zip(job.phrases[:n], job.selections[:n], strict=True)):
        notes = [*sel.warnings, *job.notes]
        if not sel.positions:
            nan = np.full((size, size), np.nan, dtype=np.float32)
            results.append(
                GroundingResult(
                    phrase, geo.to_original(nan), nan, nan, geo, sel, evals, seconds, notes, None, job.image_warnings
                )
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
                warnings=notes,
                background=None if background is None else background.astype(np.float32),
                image_warnings=list(job.image_warnings),
            )
        )
    return results


def attention_cache(
    pipe: GroundingPipeline,
    image: np.ndarray,
    phrases: Sequence[str],
    config: GroundingConfig | str | None = None,
    references: Sequence[str] | None = None,
    cache: TrajectoryCache | None = None,
) -> AttentionCache:
    """Record every layer at every step of the window once, for interactive exploration.

    ``references``: phrases recorded alongside (in the same batch) for ``contrast``;
    default: the config's ``reference_phrases`` when its ``contrast`` is > 0, else none.
    ``cache``: a :class:`~ldmground.method.trajectory.TrajectoryCache` (e.g. the explorer's): a
    typed phrase on an image seen before costs only the window's phrase evaluations.
    """
    cfg = resolve_config(config, pipe).replace(layers=None, tokens="phrase")
    if references is None:
        references = cfg.reference_phrases if cfg.contrast else ()
    references = tuple(references)
    store, selections, geo, _, _ = run_attention(pipe, image, [*phrases, *references], cfg, keep_maps=True, cache=cache)
    n = len(phrases)
    return AttentionCache(store.maps[:n], selections[:n], geo, pipe.image_size, store.maps[n:], references)
