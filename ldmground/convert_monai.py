"""Convert the paper's MONAI model-zoo bundle into a diffusers folder that ``load_pipeline`` reads.

The bundle ``cxr_image_synthesis_latent_diffusion_model`` stores two state dicts written by
MONAI GenerativeModels 0.2.x: ``models/autoencoder.pth`` (``AutoencoderKL``) and
``models/diffusion_model.pth`` (``DiffusionModelUNet``). :func:`convert_monai` maps their keys
onto diffusers ``AutoencoderKL`` and ``UNet2DConditionModel`` (strict: every source key is
used or deliberately dropped, every target key is filled) and writes safetensors plus the
paper's DDIM scheduler config and ``ldmground.json``.

What a diffusers config cannot express, and what is done instead
------------------------------------------------------------------
UNet: nothing. Time embedding (cos first = ``flip_sin_to_cos=True``, ``freq_shift=0``),
ResNet blocks (``time_emb_proj`` after SiLU, 1x1 skip), down (3x3 stride 2, padding 1) and up
(nearest x2 + 3x3 conv) samplers, transformer (GroupNorm eps 1e-6, 1x1 conv ``proj_in``,
LayerNorm eps 1e-5, GEGLU feed-forward with x first and gate second, bias-free q/k/v, no
upcast) and the output head all have a diffusers equivalent; one head per attention layer is
``attention_head_dim=(1, 1, 1)`` (diffusers' name for the number of heads).

AutoencoderKL, three differences, two solved by weights and one by a module swap:

1. MONAI has two 1x1 convs on an ``L``-channel encoder output (``quant_conv_mu``,
   ``quant_conv_log_sigma``); diffusers has one ``2L``-channel encoder output and one
   ``2L -> 2L`` 1x1 ``quant_conv``. Solved by weights: ``conv_out`` repeats the MONAI output
   conv twice and ``quant_conv`` is block diagonal ``[[mu, 0], [0, log_sigma]]`` (adding exact
   zeros: no rounding change beyond summation order). Same log-variance clamp (-30, 20).
2. MONAI's decoder has ``num_res_blocks`` ResNets per level, diffusers' ``layers_per_block + 1``.
   Solved by weights: the extra last ResNet of each diffusers up block gets all-zero ``conv2``
   (and ``conv1``), so it returns its input exactly (``x + 0``). Costs a little decode time
   (decoding is not on the grounding path).
3. MONAI's encoder and decoder end with GroupNorm -> conv, **without** the SiLU that diffusers
   hard-codes (``Encoder.conv_act`` / ``Decoder.conv_act = nn.SiLU()``). No choice of weights
   removes a SiLU, so :func:`apply_monai_architecture` replaces both ``conv_act`` modules with
   ``nn.Identity``; ``ldmground.json`` records ``"architecture": "monai-generative-0.2"`` and
   the loader must call it (``load_pipeline`` does when that key is present).

Also: MONAI 0.2.x's autoencoder ``AttentionBlock`` defines ``proj_attn`` but never applies
it in ``forward``; its weights are dropped on purpose and diffusers' ``to_out[0]`` is set to
the identity (``eye``, zero bias), which is exact.

Text encoder
------------
The bundle has no text encoder: the paper uses the frozen CLIP of SD-2.1-base (1024-d).
``text_encoder`` may be any spec :func:`ldmground.models.load_text_components` knows; it is
then saved into the folder when it loads, and otherwise (offline) only recorded as a spec
in ``ldmground.json``. A text encoder whose hidden size differs from the UNet's
``cross_attention_dim`` is refused (e.g. ``"tiny"``, 32-d, with the 1024-d bundle), except
``"none"``: write VAE, UNet and scheduler only and record ``text_encoder: null``; pass
``text_encoder=`` to ``load_pipeline`` then.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn

from .errors import LdmGroundError
from .models import PAPER_SCHEDULER, PIPELINE_FILE, SD21_BASE

log = logging.getLogger(__name__)

MONAI_ARCHITECTURE = "monai-generative-0.2"
AUTOENCODER_FILE = "models/autoencoder.pth"
UNET_FILE = "models/diffusion_model.pth"
BUNDLE_IMAGE_SIZE = 512
BUNDLE_SCALING_FACTOR = 0.3

# The bundle's network definitions (MONAI GenerativeModels 0.2.x keyword arguments).
BUNDLE_AUTOENCODER: dict[str, Any] = dict(
    spatial_dims=2,
    in_channels=1,
    out_channels=1,
    latent_channels=3,
    num_channels=[64, 128, 128, 128],
    num_res_blocks=2,
    norm_num_groups=32,
    norm_eps=1e-6,
    attention_levels=[False, False, False, False],
    with_encoder_nonlocal_attn=True,
    with_decoder_nonlocal_attn=True,
)
BUNDLE_UNET: dict[str, Any] = dict(
    spatial_dims=2,
    in_channels=3,
    out_channels=3,
    num_res_blocks=2,
    num_channels=[256, 512, 768],
    attention_levels=[False, True, True],
    norm_num_groups=32,
    norm_eps=1e-6,
    resblock_updown=False,
    num_head_channels=[0, 512, 768],
    with_conditioning=True,
    transformer_num_layers=1,
    cross_attention_dim=1024,
)
# Same structure, scaled down for fast tests (one head per attention layer, as in the bundle).
# GroupNorm groups (32) and heads are not in the weights: the small config keeps the bundle's
# 32 groups and one head per layer so the converter's defaults fit both; its 32-d context
# matches the "tiny" text encoder, so a small converted bundle runs end to end offline.
SMALL_AUTOENCODER: dict[str, Any] = dict(BUNDLE_AUTOENCODER, num_channels=[32, 64, 64, 64])
SMALL_UNET: dict[str, Any] = dict(
    BUNDLE_UNET, num_channels=[32, 64, 64], num_head_channels=[0, 64, 64], cross_attention_dim=32
)


# --- MONAI side ------------------------------------------------------------------------------


def import_generative():
    """Import ``generative`` (PyPI ``monai-generative``) on any MONAI >= 1.2.

    GenerativeModels 0.2.3 imports ``monai.config.IgniteInfo``, which MONAI >= 1.5 moved to
    ``monai.utils.enums``; alias it back so the schedulers import.
    """
    try:
        import monai.config
        import monai.utils.enums

        if not hasattr(monai.config, "IgniteInfo") and hasattr(monai.utils.enums, "IgniteInfo"):
            monai.config.IgniteInfo = monai.utils.enums.IgniteInfo
        import generative.networks.nets as nets
        import generative.networks.schedulers as schedulers
    except ImportError as err:
        raise LdmGroundError(
            f"the MONAI networks need PyPI monai-generative 0.2.3 and monai ({err}): "
            "pip install monai && pip install --no-deps monai-generative==0.2.3"
        ) from err
    return nets, schedulers


def monai_bundle_networks(scale: str = "full", seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(autoencoder, unet): the bundle's MONAI networks with seeded random weights, in eval mode.

    ``scale="full"`` is the exact bundle config; ``"small"`` the same structure scaled down.
    Zero-initialised layers (MONAI zeros ``proj_out``, ``conv2`` and the output conv) are
    re-drawn so that every weight matters in an equivalence test.
    """
    if scale not in ("full", "small"):
        raise LdmGroundError(f"scale must be 'full' or 'small', not {scale!r}")
    nets, _ = import_generative()
    ae_cfg, unet_cfg = (BUNDLE_AUTOENCODER, BUNDLE_UNET) if scale == "full" else (SMALL_AUTOENCODER, SMALL_UNET)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ae = nets.AutoencoderKL(**ae_cfg).eval()
    unet = nets.DiffusionModelUNet(**unet_cfg).eval()
    with torch.no_grad():
        for model in (ae, unet):
            for name, p in model.named_parameters():
                if name.endswith("bias") or p.ndim == 1:
                    # norms: around 1 (weights) / 0 (biases); biases small and non-zero
                    base = 1.0 if (p.ndim == 1 and name.endswith("weight")) else 0.0
                    p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return ae, unet


def write_fake_bundle(bundle_dir: str | Path, scale: str = "small", seed: int = 0) -> Path:
    """Save seeded random MONAI state dicts in the bundle's layout; returns ``bundle_dir``."""
    ae, unet = monai_bundle_networks(scale, seed)
    out = Path(bundle_dir)
    (out / "models").mkdir(parents=True, exist_ok=True)
    torch.save(ae.state_dict(), out / AUTOENCODER_FILE)
    torch.save(unet.state_dict(), out / UNET_FILE)
    return out


# --- key mapping ---------------------------------------------------------------------------


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LdmGroundError(f"bundle file missing: {path} (download it via the bundle's large_files.yml)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling problem is a bad file
        raise LdmGroundError(f"cannot read {path} as a PyTorch state dict: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LdmGroundError(f"{path} does not hold a state dict of tensors")
    return {str(k): v for k, v in state.items()}


def _fmt(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _strict_load(model: nn.Module, mapped: dict[str, torch.Tensor], unmapped: list[str], what: str, path: Path):
    """Load ``mapped`` into ``model``; any unmapped source key, missing or mis-shaped target is an error."""
    target = model.state_dict()
    problems = []
    if unmapped:
        problems.append(f"unknown keys (not part of the bundle's {what}): {_fmt(unmapped)}")
    missing = [k for k in target if k not in mapped]
    if missing:
        problems.append(f"missing keys: {_fmt(missing)}")
    extra = [k for k in mapped if k not in target]
    if extra:
        problems.append(f"keys mapped to no parameter: {_fmt(extra)}")
    shapes = [
        f"{k} {tuple(v.shape)} != {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if k in target and v.shape != target[k].shape
    ]
    if shapes:
        problems.append(f"shape mismatches: {_fmt(shapes)}")
    if problems:
        raise LdmGroundError(f"{path} is not a GenerativeModels 0.2.x {what}: " + "; ".join(problems))
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in mapped.items()}, strict=True)


def _block_kinds(state: dict[str, torch.Tensor], prefix: str) -> list[tuple[int, str]]:
    """[(index, kind)] of ``prefix.blocks.N`` in order; kind in res/attn/sample/norm/conv."""
    idx: dict[int, set[str]] = {}
    pat = re.compile(re.escape(prefix) + r"\.blocks\.(\d+)\.(.+)$")
    for k in state:
        m = pat.match(k)
        if m:
            idx.setdefault(int(m.group(1)), set()).add(m.group(2))
    kinds = []
    for i in sorted(idx):
        rest = idx[i]
        if "norm1.weight" in rest:
            kinds.append((i, "res"))
        elif "to_q.weight" in rest:
            kinds.append((i, "attn"))
        elif "conv.conv.weight" in rest:
            kinds.append((i, "sample"))
        elif "conv.weight" in rest:
            kinds.append((i, "conv"))
        elif "weight" in rest:
            kinds.append((i, "norm"))
        else:
            kinds.append((i, "?"))
    if sorted(idx) != list(range(len(idx))):
        raise LdmGroundError(f"{prefix}.blocks are not numbered 0..{len(idx) - 1}: {sorted(idx)}")
    return kinds


def _vae_layout(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Infer the diffusers AutoencoderKL config and the MONAI block indices from the keys."""

    def fail(msg: str):
        raise LdmGroundError(f"autoencoder: unexpected block layout: {msg}")

    enc = _block_kinds(state, "encoder")
    dec = _block_kinds(state, "decoder")
    if not enc or not dec:
        fail("no encoder.blocks / decoder.blocks keys (is this a GenerativeModels AutoencoderKL?)")
    ek = [k for _, k in enc]
    dk = [k for _, k in dec]
    # encoder: conv, levels (res... [sample]), res attn res, norm, conv
    if ek[0] != "conv" or ek[-2:] != ["norm", "conv"] or ek[-5:-2] != ["res", "attn", "res"]:
        fail(f"encoder blocks {ek}: expected conv, levels, res-attn-res (non-local attention), norm, conv")
    if dk[0] != "conv" or dk[-2:] != ["norm", "conv"] or dk[1:4] != ["res", "attn", "res"]:
        fail(f"decoder blocks {dk}: expected conv, res-attn-res (non-local attention), levels, norm, conv")

    def levels(kinds: list[tuple[int, str]]) -> list[list[int]]:
        out: list[list[int]] = [[]]
        samplers = []
        for i, k in kinds:
            if k == "res":
                out[-1].append(i)
            elif k == "sample":
                samplers.append(i)
                out.append([])
            else:
                fail(f"block {i} is {k!r} inside a level (attention inside levels is not supported)")
        return out, samplers

    enc_levels, enc_samplers = levels(enc[1:-5])
    dec_levels, dec_samplers = levels(dec[4:-2])
    n = {len(lv) for lv in enc_levels + dec_levels}
    if len(n) != 1 or len(enc_levels) != len(dec_levels):
        fail(
            f"ResNets per level differ: encoder {[len(x) for x in enc_levels]}, decoder {[len(x) for x in dec_levels]}"
        )
    ch = [int(state[f"encoder.blocks.{lv[0]}.norm2.weight"].shape[0]) for lv in enc_levels]
    for key in (
        "quant_conv_mu.conv.weight",
        "encoder.blocks.0.conv.weight",
        f"decoder.blocks.{dec[-1][0]}.conv.weight",
    ):
        if key not in state:
            raise LdmGroundError(f"autoencoder: missing key {key}")
    latent = int(state["quant_conv_mu.conv.weight"].shape[0])
    conv_in = state["encoder.blocks.0.conv.weight"]
    conv_out = state[f"decoder.blocks.{dec[-1][0]}.conv.weight"]
    return dict(
        enc=enc,
        dec=dec,
        enc_levels=enc_levels,
        dec_levels=dec_levels,
        enc_samplers=enc_samplers,
        dec_samplers=dec_samplers,
        n=n.pop(),
        config=dict(
            in_channels=int(conv_in.shape[1]),
            out_channels=int(conv_out.shape[0]),
            latent_channels=latent,
            block_out_channels=tuple(ch),
            down_block_types=("DownEncoderBlock2D",) * len(ch),
            up_block_types=("UpDecoderBlock2D",) * len(ch),
            act_fn="silu",
            sample_size=BUNDLE_IMAGE_SIZE,
            scaling_factor=BUNDLE_SCALING_FACTOR,
            mid_block_add_attention=True,
        ),
    )


def _resnet(src: str, dst: str, state, mapped, used, pairs=(("norm1", "norm1"), ("norm2", "norm2"))):
    for a, b in pairs:
        for p in ("weight", "bias"):
            _take(state, mapped, used, f"{src}.{a}.{p}", f"{dst}.{b}.{p}")
    for a, b in (("conv1.conv", "conv1"), ("conv2.conv", "conv2"), ("nin_shortcut.conv", "conv_shortcut")):
        for p in ("weight", "bias"):
            # the 1x1 shortcut exists only where channels change (strict loading checks that)
            if a != "nin_shortcut.conv" or f"{src}.{a}.{p}" in state:
                _take(state, mapped, used, f"{src}.{a}.{p}", f"{dst}.{b}.{p}")


def _take(state, mapped, used, src: str, dst: str):
    if src not in state:
        raise LdmGroundError(f"autoencoder: missing key {src}")
    mapped[dst] = state[src]
    used.add(src)


def _vae_attention(src: str, dst: str, state, mapped, used):
    for a, b in (("norm", "group_norm"), ("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v")):
        for p in ("weight", "bias"):
            _take(state, mapped, used, f"{src}.{a}.{p}", f"{dst}.{b}.{p}")
    # GenerativeModels 0.2.x never applies proj_attn in AttentionBlock.forward: drop it on
    # purpose and make diffusers' output projection the identity (exact).
    ch = state[f"{src}.to_q.weight"].shape[0]
    for p in ("weight", "bias"):
        if f"{src}.proj_attn.{p}" in state:
            used.add(f"{src}.proj_attn.{p}")
    mapped[f"{dst}.to_out.0.weight"] = torch.eye(ch)
    mapped[f"{dst}.to_out.0.bias"] = torch.zeros(ch)


def map_autoencoder(
    state: dict[str, torch.Tensor], path: Path = Path(AUTOENCODER_FILE), norm_num_groups: int = 32
) -> AutoencoderKL:
    """A diffusers AutoencoderKL holding a GenerativeModels AutoencoderKL state dict.

    The returned model already has :func:`apply_monai_architecture` applied.
    """
    try:
        lay = _vae_layout(state)
    except KeyError as err:
        raise LdmGroundError(f"{path}: autoencoder: missing key {err}") from None
    cfg = dict(lay["config"])
    cfg["norm_num_groups"] = _check_groups(norm_num_groups, cfg["block_out_channels"])
    vae = AutoencoderKL(layers_per_block=lay["n"], **cfg).eval()
    mapped: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    # encoder
    enc = lay["enc"]
    for p in ("weight", "bias"):
        _take(state, mapped, used, f"encoder.blocks.0.conv.{p}", f"encoder.conv_in.{p}")
    for li, lv in enumerate(lay["enc_levels"]):
        for j, bi in enumerate(lv):
            _resnet(f"encoder.blocks.{bi}", f"encoder.down_blocks.{li}.resnets.{j}", state, mapped, used)
        if li < len(lay["enc_samplers"]):
            si = lay["enc_samplers"][li]
            for p in ("weight", "bias"):
                _take(
                    state,
                    mapped,
                    used,
                    f"encoder.blocks.{si}.conv.conv.{p}",
                    f"encoder.down_blocks.{li}.downsamplers.0.conv.{p}",
                )
    r1, a, r2, nrm, cv = (i for i, _ in enc[-5:])
    _resnet(f"encoder.blocks.{r1}", "encoder.mid_block.resnets.0", state, mapped, used)
    _vae_attention(f"encoder.blocks.{a}", "encoder.mid_block.attentions.0", state, mapped, used)
    _resnet(f"encoder.blocks.{r2}", "encoder.mid_block.resnets.1", state, mapped, used)
    for p in ("weight", "bias"):
        _take(state, mapped, used, f"encoder.blocks.{nrm}.{p}", f"encoder.conv_norm_out.{p}")
        # diffusers' encoder emits [mean, logvar] from one conv; MONAI emits one h for both
        # quant convs: repeat the conv, then a block-diagonal quant_conv.
        _take(state, mapped, used, f"encoder.blocks.{cv}.conv.{p}", f"encoder.conv_out.{p}")
        mapped[f"encoder.conv_out.{p}"] = torch.cat([mapped[f"encoder.conv_out.{p}"]] * 2, 0)
    lat = cfg["latent_channels"]
    q: dict[str, torch.Tensor] = {}
    for s in ("mu", "log_sigma"):
        for p in ("weight", "bias"):
            _take(state, q, used, f"quant_conv_{s}.conv.{p}", f"{s}.{p}")
    qw = torch.zeros(2 * lat, 2 * lat, 1, 1)
    qw[:lat, :lat] = q["mu.weight"]
    qw[lat:, lat:] = q["log_sigma.weight"]
    mapped["quant_conv.weight"] = qw
    mapped["quant_conv.bias"] = torch.cat([q["mu.bias"], q["log_sigma.bias"]])
    for p in ("weight", "bias"):
        _take(state, mapped, used, f"post_quant_conv.conv.{p}", f"post_quant_conv.{p}")
    # decoder
    dec = lay["dec"]
    for p in ("weight", "bias"):
        _take(state, mapped, used, f"decoder.blocks.0.conv.{p}", f"decoder.conv_in.{p}")
    _resnet(f"decoder.blocks.{dec[1][0]}", "decoder.mid_block.resnets.0", state, mapped, used)
    _vae_attention(f"decoder.blocks.{dec[2][0]}", "decoder.mid_block.attentions.0", state, mapped, used)
    _resnet(f"decoder.blocks.{dec[3][0]}", "decoder.mid_block.resnets.1", state, mapped, used)
    target = vae.state_dict()
    for li, lv in enumerate(lay["dec_levels"]):
        for j, bi in enumerate(lv):
            _resnet(f"decoder.blocks.{bi}", f"decoder.up_blocks.{li}.resnets.{j}", state, mapped, used)
        # diffusers has one ResNet more per decoder level: make it an exact identity
        # (zero conv1/conv2 -> residual branch is 0, output = input).
        extra = f"decoder.up_blocks.{li}.resnets.{len(lv)}"
        for k, v in target.items():
            if k.startswith(extra + "."):
                if ".norm" in k:
                    mapped[k] = torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v)
                else:
                    mapped[k] = torch.zeros_like(v)
        if li < len(lay["dec_samplers"]):
            si = lay["dec_samplers"][li]
            for p in ("weight", "bias"):
                _take(
                    state,
                    mapped,
                    used,
                    f"decoder.blocks.{si}.conv.conv.{p}",
                    f"decoder.up_blocks.{li}.upsamplers.0.conv.{p}",
                )
    nrm, cv = dec[-2][0], dec[-1][0]
    for p in ("weight", "bias"):
        _take(state, mapped, used, f"decoder.blocks.{nrm}.{p}", f"decoder.conv_norm_out.{p}")
        _take(state, mapped, used, f"decoder.blocks.{cv}.conv.{p}", f"decoder.conv_out.{p}")
    _strict_load(vae, mapped, [k for k in state if k not in used], "AutoencoderKL", path)
    return apply_monai_architecture(vae)


# UNet: regex rewrites, applied in order, from GenerativeModels names to diffusers names.
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


def _unet_key(key: str) -> str:
    for pat, rep in _UNET_RULES:
        key = re.sub(pat, rep, key)
    return key


def _check_groups(groups: int, channels: Sequence[int]) -> int:
    if groups < 1 or any(c % groups for c in channels):
        raise LdmGroundError(f"norm_num_groups {groups} does not divide the channels {list(channels)}")
    return int(groups)


def _unet_config(
    state: dict[str, torch.Tensor], num_head_channels: Sequence[int] | None, norm_num_groups: int = 32
) -> dict[str, Any]:
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"down_blocks\.(\d+)\.", k))})
    if not levels or "conv_in.conv.weight" not in state:
        raise LdmGroundError(
            "diffusion model: no conv_in / down_blocks keys (is this a GenerativeModels DiffusionModelUNet?)"
        )
    ch = [int(state[f"down_blocks.{i}.resnets.0.conv1.conv.weight"].shape[0]) for i in levels]
    n_res = {
        len({m.group(1) for k in state if (m := re.match(rf"down_blocks\.{i}\.resnets\.(\d+)\.", k))}) for i in levels
    }
    if len(n_res) != 1:
        raise LdmGroundError(f"diffusion model: different ResNet counts per level {sorted(n_res)} are not supported")
    attn = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in state) for i in levels]
    n_layers = {int(m.group(1)) for k in state if (m := re.search(r"\.transformer_blocks\.(\d+)\.", k))}
    ctx = [v for k, v in state.items() if k.endswith("attn2.to_k.weight")]
    if not ctx:
        raise LdmGroundError(
            "diffusion model: no cross-attention (attn2) weights; the bundle's UNet is text-conditioned"
        )
    if num_head_channels is None:
        num_head_channels = ch  # the bundle: one head per attention layer
    if len(num_head_channels) != len(ch):
        raise LdmGroundError(f"num_head_channels needs {len(ch)} entries, got {list(num_head_channels)}")
    if any(a and (h <= 0 or c % h) for c, h, a in zip(ch, num_head_channels, attn, strict=True)):
        raise LdmGroundError(f"num_head_channels {list(num_head_channels)} do not divide the channels {ch}")
    heads = tuple(c // h if a else 1 for c, h, a in zip(ch, num_head_channels, attn, strict=True))
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    if not attn[-1]:
        raise LdmGroundError(
            "diffusion model: the deepest level has no attention; only the bundle's layout is supported"
        )
    return dict(
        sample_size=BUNDLE_IMAGE_SIZE // 8,
        in_channels=int(state["conv_in.conv.weight"].shape[1]),
        out_channels=int(state["out.2.conv.weight"].shape[0]) if "out.2.conv.weight" in state else 3,
        block_out_channels=tuple(ch),
        layers_per_block=n_res.pop(),
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=heads,  # diffusers' legacy name: the number of heads
        cross_attention_dim=int(ctx[0].shape[1]),
        transformer_layers_per_block=max(n_layers) + 1 if n_layers else 1,
        norm_num_groups=_check_groups(norm_num_groups, ch),
        norm_eps=1e-6,
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
        use_linear_projection=False,
        upcast_attention=False,
    )


def map_unet(
    state: dict[str, torch.Tensor],
    path: Path = Path(UNET_FILE),
    num_head_channels: Sequence[int] | None = None,
    norm_num_groups: int = 32,
) -> UNet2DConditionModel:
    """A diffusers UNet2DConditionModel holding a GenerativeModels DiffusionModelUNet state dict."""
    try:
        cfg = _unet_config(state, num_head_channels, norm_num_groups)
    except KeyError as err:
        raise LdmGroundError(f"{path}: diffusion model: missing key {err}") from None
    unet = UNet2DConditionModel(**cfg).eval()
    target = unet.state_dict()
    names = {k: _unet_key(k) for k in state}
    unknown = [k for k, v in names.items() if v not in target]
    mapped = {v: state[k] for k, v in names.items() if v in target}
    if len(mapped) + len(unknown) != len(state):
        raise LdmGroundError(f"{path}: two source keys map to the same diffusers key")
    _strict_load(unet, mapped, unknown, "DiffusionModelUNet", path)
    return unet


def apply_monai_architecture(vae: AutoencoderKL) -> AutoencoderKL:
    """Make a diffusers AutoencoderKL compute what GenerativeModels' AutoencoderKL computes.

    GenerativeModels' Encoder and Decoder end with GroupNorm -> conv; diffusers hard-codes a
    SiLU between them (``conv_act``) that no config or weight can remove. Idempotent.
    """
    vae.encoder.conv_act = nn.Identity()
    vae.decoder.conv_act = nn.Identity()
    return vae


def apply_architecture(vae: AutoencoderKL, meta: dict) -> AutoencoderKL:
    """Apply what ``ldmground.json``'s ``architecture`` entry asks for (for the loader)."""
    arch = meta.get("architecture")
    if arch is None:
        return vae
    if arch == MONAI_ARCHITECTURE:
        return apply_monai_architecture(vae)
    raise LdmGroundError(f"unknown architecture {arch!r} in {PIPELINE_FILE}; known: {MONAI_ARCHITECTURE}")


# --- the converter -------------------------------------------------------------------------


def convert_monai(
    bundle_dir: str | Path,
    out_dir: str | Path,
    text_encoder: str | None = SD21_BASE,
    num_head_channels: Sequence[int] | None = None,
    norm_num_groups: int = 32,
) -> Path:
    """Convert the bundle at ``bundle_dir`` into a diffusers folder ``out_dir``; returns it.

    Args:
        bundle_dir: the bundle root (``models/autoencoder.pth``, ``models/diffusion_model.pth``).
        out_dir: created if needed; ``vae/``, ``unet/``, ``scheduler/`` (+ ``text_encoder/``,
            ``tokenizer/``) and ``ldmground.json``.
        text_encoder: a :func:`ldmground.models.load_text_components` spec, or ``"none"``
            (``None`` too) to write no text encoder and record ``null``.
        num_head_channels: per-level channels per head (not stored in the weights); default
            one head per attention layer, as in the bundle.
        norm_num_groups: GroupNorm groups (not stored in the weights either); the bundle's 32.
    """
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise LdmGroundError(f"bundle folder not found: {bundle}")
    vae = map_autoencoder(_load_state(bundle / AUTOENCODER_FILE), bundle / AUTOENCODER_FILE, norm_num_groups)
    unet = map_unet(_load_state(bundle / UNET_FILE), bundle / UNET_FILE, num_head_channels, norm_num_groups)
    latent_side = BUNDLE_IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)
    te_spec = None if text_encoder in (None, "none", "") else str(text_encoder)
    tok = enc = None
    if te_spec is not None:
        from .models import load_text_components

        try:
            tok, enc, _info = load_text_components(te_spec)
        except LdmGroundError as err:
            log.warning("text encoder %r not available now (%s); recording the spec only", te_spec, err)
        if enc is not None:
            dim = int(enc.config.hidden_size)
            if dim != unet.config.cross_attention_dim:
                raise LdmGroundError(
                    f"text encoder {te_spec!r} gives {dim}-d states but the UNet attends to "
                    f"{unet.config.cross_attention_dim}-d context; use the SD-2.1-base CLIP "
                    f"({SD21_BASE}) or --text-encoder none"
                )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet.register_to_config(sample_size=latent_side)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    DDIMScheduler.from_config(dict(PAPER_SCHEDULER)).save_config(out / "scheduler")
    recorded = te_spec
    if enc is not None and te_spec not in ("tiny", "minilm"):
        # a real encoder (the SD-2.1-base CLIP): keep a copy, so the folder is self-contained
        enc.save_pretrained(out / "text_encoder", safe_serialization=True)
        tok.save_pretrained(out / "tokenizer")
        recorded = None
    meta = {
        "image_size": BUNDLE_IMAGE_SIZE,
        "scaling_factor": BUNDLE_SCALING_FACTOR,
        "use_attention_mask": False,
        "max_length": 77,
        "text_encoder": recorded,
        "architecture": MONAI_ARCHITECTURE,
        "source": "MONAI bundle cxr_image_synthesis_latent_diffusion_model (GenerativeModels 0.2.x)",
    }
    (out / PIPELINE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out
