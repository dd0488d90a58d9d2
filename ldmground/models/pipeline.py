"""The pipeline type: the networks, tokenizer and scheduler a grounding run needs, and the
text encoding of phrases. Folder I/O is in :mod:`ldmground.models.folder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"


@dataclass
class GroundingPipeline:
    """Frozen components of a text-conditioned latent diffusion model.

    Attributes:
        image_size: side S of the square model input in pixels.
        image_channels: channels the VAE expects (1 for X-ray models, 3 for SD: the
            grayscale image is repeated).
        scaling_factor: latent = scaling_factor * VAE posterior mean.
        use_attention_mask: pass the text padding mask to the UNet (no attention to pads).
        text_sink: prepend the empty phrase's token states to every phrase (see
            :func:`encode_phrases`); the model must have been trained that way.
        input_range: (low, high): the intensities the VAE was trained on, to which the
            [0, 1] image is mapped linearly: ``(0, 1)`` for the MONAI chest X-ray bundle,
            ``(-1, 1)`` for Stable Diffusion and the demo model. Part of the model's contract,
            recorded in its folder's ``ldmground.json``.
        default_preset: the preset ``ground`` uses when none is given (``ldmground.json``'s
            ``default_preset``; ``"paper"`` for folders without one).
        spec: how the pipeline was named (recorded with results).
        weight_files: weights files read, for provenance hashes.
    """

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_config: dict
    image_size: int
    image_channels: int = 1
    scaling_factor: float = 0.18215
    use_attention_mask: bool = False
    max_length: int = 77
    text_sink: bool = False
    input_range: tuple[float, float] = (-1.0, 1.0)
    default_preset: str = "paper"
    spec: str = ""
    weight_files: list[Path] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device) -> GroundingPipeline:
        for m in (self.vae, self.unet, self.text_encoder):
            m.to(device)
        return self

    def encode_text(self, phrases: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states (P, L, D) and keep-mask (P, L) of phrases padded to ``max_length``
        (L = ``sink_length`` + ``max_length``)."""
        return encode_phrases(
            self.tokenizer, self.text_encoder, phrases, self.max_length, self.use_attention_mask, self.text_sink
        )

    @property
    def sink_length(self) -> int:
        """Key positions before a phrase's own tokens: the text sink's, or 0."""
        return int(sum(self.tokenizer("")["attention_mask"])) if self.text_sink else 0

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 1, S, S) image in [0, 1] -> scaled latent (posterior mean); the image is
        mapped to the model's ``input_range`` first."""
        low, high = self.input_range
        x = image.to(self.device)
        if (low, high) != (0.0, 1.0):
            x = x * (high - low) + low
        if self.image_channels != x.shape[1]:
            x = x.repeat(1, self.image_channels, 1, 1)
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor


@torch.no_grad()
def encode_phrases(
    tokenizer, encoder, phrases: list[str], max_length: int, use_attention_mask: bool = True, text_sink: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states (P, L, D) and keep-mask (P, L) of phrases padded to ``max_length``.

    With ``text_sink`` the states of the empty phrase's own tokens (start and end, no
    padding) come first, the same for every phrase. A bidirectional encoder such as MiniLM
    mixes the whole phrase into every token, so without them attention has nowhere to go
    that carries no text; SD's causal CLIP encoder has such a key built in, its start token.
    """
    device = next(encoder.parameters()).device
    enc = tokenizer(phrases, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    kwargs = {"attention_mask": mask} if use_attention_mask else {}
    states = encoder(ids, **kwargs).last_hidden_state
    if text_sink:
        null_states, null_mask = encode_phrases(tokenizer, encoder, [""], max_length, use_attention_mask)
        sink = null_states[:, null_mask[0].bool()].expand(len(phrases), -1, -1)
        states = torch.cat([sink, states], dim=1)
        mask = torch.cat([torch.ones(len(phrases), sink.shape[1], dtype=mask.dtype, device=device), mask], dim=1)
    return states, mask
