"""Seeded random pipelines for tests: the tiny UNet (the paper model's layout at a quarter
of its size), the tiny VAE, and a UNet re-initialised as a baseline.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from .pipeline import GroundingPipeline
from .text import load_text_components

# --- the tiny test fixture -----------------------------------------------------------------

PAPER_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0015,
    "beta_end": 0.0205,
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "leading",
}


def tiny_unet(cross_attention_dim: int = 32, seed: int = 0) -> UNet2DConditionModel:
    """The paper UNet's structure at small size: 3 levels, attention on the lower two,
    2 res blocks per level -> 11 cross-attention layers."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """1-channel AutoencoderKL with 3 latent channels and a 4x downsampling."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    ).eval()


def tiny_pipeline(seed: int = 0) -> GroundingPipeline:
    tok, enc, info = load_text_components("tiny", seed)
    return GroundingPipeline(
        vae=tiny_vae(seed),
        unet=tiny_unet(enc.config.hidden_size, seed),
        text_encoder=enc,
        tokenizer=tok,
        scheduler_config=dict(PAPER_SCHEDULER),
        image_size=64,
        image_channels=1,
        scaling_factor=0.3,
        spec="tiny",
        **info,
    )


# --- loading -------------------------------------------------------------------------------


def randomize_unet(pipe: GroundingPipeline, seed: int = 1) -> GroundingPipeline:
    """Re-initialise the UNet from its config with a fixed seed (the random-weight baseline)."""
    torch.manual_seed(seed)
    pipe.unet = UNet2DConditionModel.from_config(pipe.unet.config).eval()
    pipe.spec = f"random:{pipe.spec}"
    return pipe
