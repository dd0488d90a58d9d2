"""Aggregating recorded attention: the (layer, step) maps pooled into one map, and the mean
map of the reference phrases that the background contrast subtracts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..config import GroundingConfig
from .inversion import intra_op_threads


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
