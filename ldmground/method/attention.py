"""Record cross-attention probabilities of a diffusers UNet through its processor API.

Layer indices
-------------
A UNet's cross-attention layers are its ``attn2`` modules. Layer *i* is the *i*-th of them in
the order the forward pass calls them: down blocks (shallow to deep), the mid block, then the
up blocks (deep to shallow); inside a block, transformer by transformer. For the paper's
model (11 layers) that is 0-1 down 32x32, 2-3 down 16x16, 4 mid 16x16, 5-7 up 16x16,
8-10 up 32x32 for a 64x64 latent. :func:`cross_attention_layers` lists them by the names
that ``unet.attn_processors`` uses.

Recording
---------
:class:`AttentionRecorder` installs a :class:`RecordingProcessor` on the selected layers only
(the other layers keep their own, usually fused SDPA, processors) and restores the originals
on exit, also after an exception. The recording processor computes the layer's output with
the layer's own processor and, separately, softmax(QK^T / sqrt(d)) for the batch rows that
carry a phrase, so the UNet output is exactly that of the unrecorded UNet. Of those
probabilities only the mean over heads and selected tokens is kept: a (h, w) map per
(layer, step, phrase), optionally min-max normalised and summed into a running total.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import LdmGroundError

_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _forward_order_key(name: str) -> tuple:
    parts = name.split(".")
    key: list = [_BLOCK_ORDER.get(parts[0], 3)]
    key += [int(p) if p.isdigit() else p for p in parts[1:]]
    return tuple((0, k) if isinstance(k, int) else (1, k) for k in key)


def cross_attention_layers(unet) -> list[str]:
    """Processor names of the UNet's cross-attention layers, in forward order.

    ``unet.attn_processors`` lists modules in registration order, which in
    ``UNet2DConditionModel`` puts ``up_blocks`` before ``mid_block``; sorting by block kind
    and then by index gives the order in which the forward pass calls them.
    """
    names = [n for n in unet.attn_processors if re.search(r"(^|\.)attn2\.processor$", n)]
    if not names:
        raise LdmGroundError("this UNet has no cross-attention (attn2) layers; is it text-conditioned?")
    return sorted(names, key=_forward_order_key)


@dataclass
class PhraseRow:
    """Which batch row carries a phrase and which key positions to read for it."""

    row: int
    positions: Sequence[int]


@dataclass
class AttentionStore:
    """Aggregates token-averaged attention maps on the fly.

    Attributes:
        normalize: min-max normalise each (layer, step) map before adding it.
        keep_maps: also keep every (layer, step) map (tiny: h*w floats each); used by the
            explorer to re-aggregate without running the UNet again.
        sums: per phrase, per map shape (h, w): running sum of the maps, float32 on CPU.
        counts: per phrase, per map shape: how many maps were added.
        maps: when ``keep_maps``, ``maps[phrase][(layer, step)]`` = (T, h, w) raw maps, one
            per selected token, so that any token subset can be re-aggregated later.
    """

    normalize: bool = True
    keep_maps: bool = False
    sums: list[dict[tuple[int, int], torch.Tensor]] = field(default_factory=list)
    counts: list[dict[tuple[int, int], int]] = field(default_factory=list)
    maps: list[dict[tuple[int, int], torch.Tensor]] = field(default_factory=list)
    bytes_held: int = 0

    def reset(self, n_phrases: int) -> None:
        self.sums = [{} for _ in range(n_phrases)]
        self.counts = [{} for _ in range(n_phrases)]
        self.maps = [{} for _ in range(n_phrases)]
        self.bytes_held = 0

    def add(self, phrase: int, layer: int, step: int, token_maps: torch.Tensor) -> None:
        """Add the (T, h, w) maps of the selected tokens of one (layer, step)."""
        token_maps = token_maps.detach().float().cpu()
        if self.keep_maps:
            self.maps[phrase][(layer, step)] = token_maps
            self.bytes_held += token_maps.numel() * 4
        amap = token_maps.mean(dim=0)
        shape = tuple(amap.shape)
        if self.normalize:
            amap = minmax(amap)
        if shape not in self.sums[phrase]:
            self.sums[phrase][shape] = torch.zeros(shape)
            self.counts[phrase][shape] = 0
            self.bytes_held += amap.numel() * 4
        self.sums[phrase][shape] += amap
        self.counts[phrase][shape] += 1

    def mean_map(self, phrase: int, size: tuple[int, int]) -> torch.Tensor:
        """Mean of all added maps, each bilinearly upsampled to ``size`` (H, W)."""
        total = torch.zeros(size)
        n = 0
        for shape, s in self.sums[phrase].items():
            # Bilinear upsampling is linear, so upsampling the sum equals summing upsamples.
            total += upsample_map(s, size)
            n += self.counts[phrase][shape]
        if n == 0:
            raise RuntimeError("no attention was recorded; check the layers and the timestep window")
        return total / n


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1]; a constant map becomes all zeros."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def upsample_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of one (h, w) map to ``size`` (the model's input frame)."""
    return F.interpolate(x[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


class RecordingProcessor:
    """Wraps a layer's processor: same output, plus phrase-token attention maps."""

    def __init__(self, inner, layer: int, recorder: AttentionRecorder):
        self.inner = inner
        self.layer = layer
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if self.recorder.active and encoder_hidden_states is not None:
            self._record(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return out

    @torch.no_grad()
    def _record(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb) -> None:
        rec = self.recorder
        rows = [p.row for p in rec.phrase_rows]
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        hs = hidden_states[rows]
        ctx = encoder_hidden_states[rows]
        if attn.group_norm is not None:
            hs = attn.group_norm(hs.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        q = attn.to_q(hs)
        k = attn.to_k(ctx)
        heads = attn.heads
        n, lq, inner = q.shape
        d = inner // heads
        q = q.view(n, lq, heads, d).transpose(1, 2).float()
        k = k.view(n, -1, heads, d).transpose(1, 2).float()
        scores = (q @ k.transpose(-1, -2)) * attn.scale  # (n, heads, Lq, Lk)
        if attention_mask is not None:
            mask = attention_mask[rows].float()
            if mask.ndim == 2:  # (n, Lk) keep-mask from a caller
                mask = (1.0 - mask) * -10000.0
            scores = scores + mask.view(n, 1, -1, mask.shape[-1])
        probs = scores.softmax(dim=-1).mean(dim=1)  # (n, Lq, Lk): mean over heads
        hgt, wid = rec.map_shape(lq)
        for i, phrase in enumerate(rec.phrase_rows):
            token_maps = probs[i][:, list(phrase.positions)].T.reshape(-1, hgt, wid)
            rec.store.add(i, self.layer, rec.step, token_maps)


class AttentionRecorder:
    """Context manager that records selected cross-attention layers of a UNet.

    Example::

        with AttentionRecorder(unet, layers=[3, 4, 6, 7]) as rec:
            rec.begin(phrase_rows=[PhraseRow(1, [1, 2, 3])], latent_hw=(64, 64))
            rec.step, rec.active = 120, True
            unet(latents, t, encoder_hidden_states=ctx)
        maps = rec.store.mean_map(0, (512, 512))
    """

    def __init__(self, unet, layers: Sequence[int] | None = None, normalize: bool = True, keep_maps: bool = False):
        self.unet = unet
        self.names = cross_attention_layers(unet)
        n = len(self.names)
        chosen = list(range(n)) if layers is None else list(layers)
        bad = [i for i in chosen if not 0 <= i < n]
        if bad:
            raise LdmGroundError(
                f"layer indices {bad} out of range: this UNet has {n} cross-attention layers (0..{n - 1})"
            )
        self.layers = chosen
        self.store = AttentionStore(normalize=normalize, keep_maps=keep_maps)
        self.phrase_rows: list[PhraseRow] = []
        self.latent_hw: tuple[int, int] = (0, 0)
        self.active = False
        self.step = -1
        self._original: dict | None = None

    def begin(self, phrase_rows: Sequence[PhraseRow], latent_hw: tuple[int, int]) -> None:
        """Start a new image: clear the store and say which rows carry which phrase."""
        self.phrase_rows = list(phrase_rows)
        self.latent_hw = latent_hw
        self.store.reset(len(self.phrase_rows))

    def map_shape(self, n_queries: int) -> tuple[int, int]:
        """(h, w) of a layer's map from its query count and the latent's aspect ratio."""
        lh, lw = self.latent_hw
        factor = math.sqrt(lh * lw / n_queries)
        h, w = round(lh / factor), round(lw / factor)
        if h * w != n_queries:
            raise RuntimeError(f"cannot infer the map shape of {n_queries} queries for latent {self.latent_hw}")
        return h, w

    def __enter__(self) -> AttentionRecorder:
        self._original = dict(self.unet.attn_processors)
        procs = dict(self._original)
        for i in self.layers:
            name = self.names[i]
            procs[name] = RecordingProcessor(self._original[name], i, self)
        self.unet.set_attn_processor(procs)
        return self

    def __exit__(self, *exc) -> None:
        if self._original is not None:
            self.unet.set_attn_processor(self._original)
            self._original = None
        self.active = False


@contextmanager
def recording(unet, layers: Sequence[int] | None = None, **kwargs) -> Iterator[AttentionRecorder]:
    """Functional form of :class:`AttentionRecorder`."""
    with AttentionRecorder(unet, layers, **kwargs) as rec:
        yield rec
