"""How many images to ground in one UNet batch: 1 on the CPU; on CUDA, from the free memory
and the measured memory of one row."""

from __future__ import annotations

import torch

from ..config import GroundingConfig, get_preset
from ..models.pipeline import GroundingPipeline
from .inversion import DTYPES, autocast_context


def batch_from_memory(free_bytes: int, bytes_per_row: int, rows_per_image: int, fraction: float = 0.6, cap: int = 64):
    """The largest power of two B <= ``cap`` whose UNet rows (B x ``rows_per_image``, each
    ``bytes_per_row`` of activations) fit in ``fraction`` of ``free_bytes``; at least 1."""
    if bytes_per_row <= 0:
        return 1
    fits = int(fraction * free_bytes) // (bytes_per_row * max(1, rows_per_image))
    b = 1
    while b * 2 <= min(fits, cap):
        b *= 2
    return b


def default_batch_size(
    pipe: GroundingPipeline, config: GroundingConfig | str | None = None, phrases_per_image: int = 2
):
    """Images per batch when none is asked for: 1 on the CPU (batching gains little there,
    see docs/performance.md); on CUDA, from the free memory and the activation memory of
    one UNet row, measured with one 2-row UNet call (:func:`batch_from_memory`; at most 64).
    ``phrases_per_image``: the phrase rows expected per image (the window's larger call)."""
    device = pipe.device
    if device.type != "cuda":
        return 1
    cfg = config if isinstance(config, GroundingConfig) else get_preset(config or pipe.default_preset)
    refs = len(cfg.reference_phrases) if cfg.contrast else 0
    latent = pipe.encode_image(torch.zeros(1, 1, pipe.image_size, pipe.image_size, device=device))
    ctx, _ = pipe.encode_text(["", ""])
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), autocast_context(device, DTYPES[cfg.dtype]):
        pipe.unet(latent.expand(2, -1, -1, -1), 500, encoder_hidden_states=ctx)
    torch.cuda.synchronize(device)
    per_row = (torch.cuda.max_memory_allocated(device) - base) // 2
    free, _ = torch.cuda.mem_get_info(device)
    return batch_from_memory(free, per_row, phrases_per_image + refs)
