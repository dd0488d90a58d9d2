"""MONAI's ``DiffusionModelUNet`` -> diffusers' ``UNet2DConditionModel``: structure read from
the keys, the diffusers config, and the key mapping.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from ...errors import LdmGroundError
from .bundle import BUNDLE_IMAGE_SIZE, DIFFUSERS_NORM_EPS, UNET_FILE
from .checkpoints import _first, _strict_load, unet_keys

# UNet: regex rewrites, applied in order, from GenerativeModels names to diffusers names, and
# back (the inverse names missing keys in the checkpoint's terms).
_UNET_RULES: list[tuple[str, str]] = [
    (r"^conv_in\.conv\.", "conv_in."),
    (r"^time_embed\.0\.", "time_embedding.linear_1."),
    (r"^time_embed\.2\.", "time_embedding.linear_2."),
    (r"^out\.0\.", "conv_norm_out."),
    (r"^out\.2\.conv\.", "conv_out."),
    (r"^middle_block\.resnet_1\.", "mid_block.resnets.0."),
    (r"^middle_block\.resnet_2\.", "mid_block.resnets.1."),
    (r"^middle_block\.attention\.", "mid_block.attentions.0."),
    (r"\.downsampler\.op\.conv\.", ".downsamplers.0.conv."),
    (r"\.upsampler\.conv\.conv\.", ".upsamplers.0.conv."),
    (r"\.(conv1|conv2)\.conv\.", r".\1."),
    (r"\.skip_connection\.conv\.", ".conv_shortcut."),
    (r"\.(proj_in|proj_out)\.conv\.", r".\1."),
    (r"\.ff\.linear1\.", ".ff.net.0.proj."),
    (r"\.ff\.linear2\.", ".ff.net.2."),
]
_UNET_INVERSE: list[tuple[str, str]] = [
    (r"^conv_in\.", "conv_in.conv."),
    (r"^time_embedding\.linear_1\.", "time_embed.0."),
    (r"^time_embedding\.linear_2\.", "time_embed.2."),
    (r"^conv_norm_out\.", "out.0."),
    (r"^conv_out\.", "out.2.conv."),
    (r"^mid_block\.resnets\.0\.", "middle_block.resnet_1."),
    (r"^mid_block\.resnets\.1\.", "middle_block.resnet_2."),
    (r"^mid_block\.attentions\.0\.", "middle_block.attention."),
    (r"\.downsamplers\.0\.conv\.", ".downsampler.op.conv."),
    (r"\.upsamplers\.0\.conv\.", ".upsampler.conv.conv."),
    (r"\.(conv1|conv2)\.", r".\1.conv."),
    (r"\.conv_shortcut\.", ".skip_connection.conv."),
    (r"\.(proj_in|proj_out)\.", r".\1.conv."),
    (r"\.ff\.net\.0\.proj\.", ".ff.linear1."),
    (r"\.ff\.net\.2\.", ".ff.linear2."),
]


def _unet_key(key: str) -> str:
    for pat, rep in _UNET_RULES:
        key = re.sub(pat, rep, key)
    return key


def _monai_unet_key(key: str) -> str:
    """Inverse of :func:`_unet_key` (diffusers name -> GenerativeModels 0.2.x name)."""
    for pat, rep in _UNET_INVERSE:
        key = re.sub(pat, rep, key)
    return key


def _check_groups(groups: Any, channels: Sequence[int], what: str) -> int:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or any(c % groups for c in channels):
        raise LdmGroundError(f"{what}: norm_num_groups {groups!r} does not divide the channels {list(channels)}")
    return int(groups)


def _unet_structure(state: dict[str, torch.Tensor], path: Path = Path(UNET_FILE)) -> dict[str, Any]:
    """What a GenerativeModels DiffusionModelUNet state dict (0.2.x names) says about its shape."""
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"down_blocks\.(\d+)\.", k))})
    if not levels or "conv_in.conv.weight" not in state:
        raise LdmGroundError(
            f"{path}: diffusion model: no conv_in / down_blocks keys (is this a MONAI DiffusionModelUNet?)"
        )
    if levels != list(range(len(levels))):
        raise LdmGroundError(f"{path}: down_blocks are not numbered 0..{len(levels) - 1}: {levels}")
    try:
        ch = [
            int(
                _first(
                    state,
                    *(
                        f"down_blocks.{i}.resnets.0.{p}"
                        for p in ("conv1.conv.weight", "norm2.weight", "conv2.conv.weight")
                    ),
                ).shape[0]
            )
            for i in levels
        ]
    except KeyError as err:
        raise LdmGroundError(f"{path}: diffusion model: missing key {err.args[0]}") from None
    n_res = {
        len({m.group(1) for k in state if (m := re.match(rf"down_blocks\.{i}\.resnets\.(\d+)\.", k))}) for i in levels
    }
    if len(n_res) != 1:
        raise LdmGroundError(
            f"{path}: diffusion model: different ResNet counts per level {sorted(n_res)} are not supported"
        )
    attn = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in state) for i in levels]
    n_layers = {int(m.group(1)) for k in state if (m := re.search(r"\.transformer_blocks\.(\d+)\.", k))}
    ctx = [v for k, v in state.items() if k.endswith("attn2.to_k.weight")]
    if not ctx:
        raise LdmGroundError(
            f"{path}: diffusion model: no cross-attention (attn2) weights; the bundle's UNet is text-conditioned"
        )
    if not attn[-1]:
        raise LdmGroundError(
            f"{path}: diffusion model: the deepest level has no attention; only the bundle's layout is supported"
        )
    out_w = state.get("out.2.conv.weight")
    return dict(
        channels=ch,
        num_res_blocks=n_res.pop(),
        attention_levels=attn,
        transformer_num_layers=max(n_layers) + 1 if n_layers else 1,
        cross_attention_dim=int(ctx[0].shape[1]),
        in_channels=int(state["conv_in.conv.weight"].shape[1]),
        out_channels=int(out_w.shape[0]) if out_w is not None else int(state["conv_in.conv.weight"].shape[1]),
    )


def _unet_config(
    struct: dict[str, Any], heads: Sequence[int], norm_num_groups: int, upcast_attention: bool = False
) -> dict[str, Any]:
    ch, attn = struct["channels"], struct["attention_levels"]
    if len(heads) != len(ch) or any(a and (not isinstance(h, int) or h < 1) for h, a in zip(heads, attn, strict=True)):
        raise LdmGroundError(f"diffusion model: heads {list(heads)} do not fit the levels {ch} / attention {attn}")
    return dict(
        sample_size=BUNDLE_IMAGE_SIZE // 8,
        in_channels=struct["in_channels"],
        out_channels=struct["out_channels"],
        block_out_channels=tuple(ch),
        layers_per_block=struct["num_res_blocks"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=tuple(int(h) if a else 1 for h, a in zip(heads, attn, strict=True)),  # = heads
        cross_attention_dim=struct["cross_attention_dim"],
        transformer_layers_per_block=struct["transformer_num_layers"],
        norm_num_groups=_check_groups(norm_num_groups, ch, "diffusion model"),
        norm_eps=DIFFUSERS_NORM_EPS,
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
        use_linear_projection=False,
        upcast_attention=bool(upcast_attention),
    )


def heads_from_head_channels(num_head_channels: int | Sequence[int], struct: dict[str, Any]) -> tuple[int, ...]:
    """Heads per level from MONAI's ``num_head_channels`` (an int is used on every level).

    Levels without attention get 1 (ignored). Each attention level's channels must be a
    multiple of its head channels.
    """
    ch, attn = struct["channels"], struct["attention_levels"]
    nhc = [num_head_channels] * len(ch) if isinstance(num_head_channels, int) else list(num_head_channels)
    if len(nhc) != len(ch):
        raise LdmGroundError(f"num_head_channels needs {len(ch)} entries (one per level), got {nhc}")
    heads = []
    for c, h, a in zip(ch, nhc, attn, strict=True):
        if not a:
            heads.append(1)
            continue
        if isinstance(h, bool) or not isinstance(h, int) or h <= 0 or c % h:
            raise LdmGroundError(f"num_head_channels {nhc} do not divide the channels {ch} of the attention levels")
        heads.append(c // h)
    return tuple(heads)


def map_unet(
    state: dict[str, torch.Tensor],
    path: Path = Path(UNET_FILE),
    *,
    heads: Sequence[int],
    norm_num_groups: int,
    upcast_attention: bool = False,
) -> UNet2DConditionModel:
    """A diffusers UNet2DConditionModel holding a MONAI DiffusionModelUNet state dict (either
    key layout); ``heads`` (per level) and ``norm_num_groups`` are not in the weights."""
    state, key_layout = unet_keys(state, path)
    cfg = _unet_config(_unet_structure(state, path), heads, norm_num_groups, upcast_attention)
    unet = UNet2DConditionModel(**cfg).eval()
    target = unet.state_dict()
    names = {k: _unet_key(k) for k in state}
    unexpected = [k for k, v in names.items() if v not in target]
    mapped = {v: state[k] for k, v in names.items() if v in target}
    if len(mapped) + len(unexpected) != len(state):
        raise LdmGroundError(f"{path}: two source keys map to the same diffusers key")
    missing = [_monai_unet_key(k) for k in target if k not in mapped]
    _strict_load(unet, mapped, unexpected, missing, "MONAI DiffusionModelUNet", path, key_layout)
    return unet
