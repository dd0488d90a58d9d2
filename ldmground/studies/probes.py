"""Probes of a model rather than of the read-out: how much attention falls on the phrase,
how much the text helps denoising, how visible a finding is in the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..datasets.mscxr import Sample
from ..method.heatmap import load_image
from ..metrics import union_mask
from .cache import CachedSample


def phrase_attention_ratio(cs: CachedSample, layers: Sequence[int] | None = None) -> float:
    """Mean attention on the phrase's tokens inside the true boxes over the mean outside them.

    Read from the raw cached maps (before any normalisation), each bilinearly upsampled to
    the model frame and averaged over the cached steps of ``layers`` (default: all). Near 1,
    the text reaches every position alike, and a heatmap grounds only through the small
    differences that min-max normalisation stretches; a model that sends the text to the
    finding scores well above 1.
    """
    import torch

    from ..method.attention import upsample_map

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

    from ..method.heatmap import preprocess
    from ..method.tokens import swap_sides

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
