"""Reusable inversions: the empty-prompt latents of an image at the window's steps, in an LRU.

The DDIM inversion follows the empty prompt only; the phrases are a UNet call of their own
at each step of the window (:mod:`ldmground.method.inversion`) and never change the path. So once
an image has been inverted, the latents it reached at the window's steps are all that a new
phrase needs: grounding it costs the window's phrase evaluations alone (60 instead of 240
under the paper preset), and gives the same heatmap, bit for bit, as a fresh run.

A :class:`TrajectoryCache` keeps those latents for the images seen last, up to a size limit
in bytes (default 256 MiB: ~85 images of the paper model, whose 60 latents of 3 x 64 x 64
float32 take 2.9 MiB; ~8,000 of the demo model, 32 KiB each). Pass one to
:func:`ldmground.method.grounding.ground`, :func:`~ldmground.method.grounding.ground_many` or
:func:`~ldmground.method.grounding.attention_cache`; it is never used unless given (a result
must not depend on what the process computed before). Example::

    from ldmground.method.trajectory import TrajectoryCache
    cache = TrajectoryCache(max_bytes=64 * 2**20)
    ground(pipe, image, "left effusion", cfg, cache=cache)   # inverts: 240 evaluations
    ground(pipe, image, "cardiomegaly", cfg, cache=cache)    # reuses: 60
    cache.hits, cache.misses, cache.bytes_held, len(cache)

An entry is keyed by the pipeline object (the same loaded model), the model input's pixels
(after crop and resize) and every setting the path depends on: the step grid, the window,
the inversion step, the dtype and the thread count. The latents stay on the device they were
computed on (GPU memory counts towards the limit like host memory).
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..config import GroundingConfig

DEFAULT_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Trajectory:
    """The empty-prompt latents of one image at the window's steps.

    Attributes:
        steps: the step indices (ascending), those of ``GroundingConfig.window_indices``.
        latents: (K, C, h, w) float32, the UNet's input at each of ``steps``.
        unet_evals: empty-prompt evaluations that the walk cost when it was computed.
    """

    steps: tuple[int, ...]
    latents: torch.Tensor
    unet_evals: int

    @property
    def nbytes(self) -> int:
        return self.latents.numel() * self.latents.element_size()

    def at(self, step: int) -> torch.Tensor:
        """The (1, C, h, w) latent at step index ``step``."""
        k = self.steps.index(step)
        return self.latents[k : k + 1]


def path_settings(cfg: GroundingConfig) -> tuple:
    """The config fields the empty-prompt path and its kept steps depend on."""
    w = cfg.window_indices()
    return (
        cfg.num_inference_steps,
        cfg.timestep_spacing,
        (w.start, w.stop),
        cfg.inversion_step,
        cfg.dtype,
        cfg.threads,
        cfg.resize,
    )


def pixels_digest(pixels: np.ndarray) -> str:
    """SHA-256 of the model input (S x S float32 after crop and resize)."""
    arr = np.ascontiguousarray(pixels, dtype=np.float32)
    return hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()


class TrajectoryCache:
    """LRU of :class:`Trajectory` entries with a limit on the bytes of latents held.

    Args:
        max_bytes: the most bytes of latents kept (least recently used entries leave first;
            an entry larger than the limit is not kept). 0 keeps nothing.

    Attributes:
        hits, misses: lookups that found an entry, and that did not.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, Trajectory] = OrderedDict()
        self._pipes: dict[int, weakref.ref] = {}
        self.bytes_held = 0
        self.hits = 0
        self.misses = 0

    def key(self, pipe, pixels: np.ndarray, cfg: GroundingConfig) -> tuple:
        """The entry key of an image (its model input ``pixels``) under ``cfg`` on ``pipe``."""
        return (id(pipe), pixels_digest(pixels), path_settings(cfg))

    def get(self, pipe, key: tuple) -> Trajectory | None:
        """The entry under ``key`` (marked as recently used), or None."""
        ref = self._pipes.get(key[0])
        entry = self._entries.get(key) if ref is not None and ref() is pipe else None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, pipe, key: tuple, entry: Trajectory) -> None:
        """Keep ``entry`` under ``key``, dropping the least recently used past the limit."""
        ref = self._pipes.get(key[0])
        if ref is None or ref() is not pipe:  # a new pipeline (or a reused id): forget the old one's
            for old in [k for k in self._entries if k[0] == key[0]]:
                self._drop(old)
            self._pipes[key[0]] = weakref.ref(pipe)
        if key in self._entries:
            self._drop(key)
        if entry.nbytes > self.max_bytes:
            return
        self._entries[key] = entry
        self.bytes_held += entry.nbytes
        while self.bytes_held > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple) -> None:
        self.bytes_held -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        """Forget every entry (the counters stay)."""
        self._entries.clear()
        self._pipes.clear()
        self.bytes_held = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (
            f"TrajectoryCache({len(self)} images, {self.bytes_held / 2**20:.1f} of {self.max_bytes / 2**20:.1f} MiB, "
            f"{self.hits} hits, {self.misses} misses)"
        )
