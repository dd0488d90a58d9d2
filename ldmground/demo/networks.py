"""The demo model's networks: a small conditional UNet and a 1-channel VAE.
"""

from __future__ import annotations

import torch

LEVEL_CHANNELS = {16: (48, 96, 96), 32: (32, 64, 96)}  # demo UNet channels by latent size


def demo_unet(cross_attention_dim: int = 384, seed: int = 0, cross_attention_at: str = "16,8", latent_size: int = 16):
    """The demo UNet: three levels, at ``latent_size`` and its halves.

    On the default 16x16 latent the levels are 16x16, 8x8 and 4x4 (channels 48/96/96);
    on a 32x32 latent (``vae_factor=2``) they are 32x32, 16x16 and 8x8 (channels 32/64/96).

    ``cross_attention_at`` names the latent sizes whose blocks read the text, among the
    levels of at least 8x8. The default ``"16,8"`` gives 6 cross-attention layers in the
    same order on both latents: down 0 and up 4-5 at 16x16, down 1 and up 2-3 at 8x8;
    ``"16"`` keeps only the 16x16 ones (down 0, up 1-2).

    Small on purpose: on 2 CPU cores training speed, not capacity, limits how well the
    model learns to use the text (see DEMO_TRIALS)."""
    from diffusers import UNet2DConditionModel

    if latent_size not in LEVEL_CHANNELS:
        raise ValueError(f"latent_size must be one of {sorted(LEVEL_CHANNELS)}, got {latent_size}")
    sizes = (latent_size, latent_size // 2, latent_size // 4)
    levels = {int(v) for v in cross_attention_at.split(",") if v.strip()}
    allowed = {size for size in sizes if size >= 8}
    if not levels or not levels <= allowed:
        raise ValueError(
            f"cross_attention_at must name latent sizes among {sorted(allowed)} (latent {latent_size}), "
            f"got {cross_attention_at!r}"
        )
    down = tuple("CrossAttnDownBlock2D" if size in levels else "DownBlock2D" for size in sizes)
    up = tuple("CrossAttnUpBlock2D" if size in levels else "UpBlock2D" for size in reversed(sizes))
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=LEVEL_CHANNELS[latent_size],
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2D",
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=16,
        norm_num_groups=16,
    )


def demo_vae(seed: int = 0, factor: int = 4):
    """The demo autoencoder: 64 px, 1 channel, 3 latent channels, ``factor`` px per latent
    pixel (4: a 16x16 latent, the committed model; 2: a 32x32 latent)."""
    from diffusers import AutoencoderKL

    if factor not in (2, 4):
        raise ValueError(f"vae_factor must be 2 or 4, got {factor}")
    levels = factor.bit_length()  # one more block than downsamplings
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=3,
        block_out_channels=(16, 32, 64)[-levels:],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
