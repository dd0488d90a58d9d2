"""MONAI's ``AutoencoderKL`` -> diffusers' ``AutoencoderKL``: layout read from the keys, key
mapping, and the weight constructions that make the two networks compute the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from ...errors import LdmGroundError
from ..folder import apply_monai_architecture
from .bundle import AUTOENCODER_FILE, BUNDLE_IMAGE_SIZE
from .checkpoints import _block_kinds, _first, _strict_load, autoencoder_keys
from .unet import _check_groups


def _vae_layout(state: dict[str, torch.Tensor], path: Path = Path(AUTOENCODER_FILE)) -> dict[str, Any]:
    """The structure of a GenerativeModels AutoencoderKL (0.2.x key names) read from its keys."""

    def fail(msg: str):
        raise LdmGroundError(f"{path}: autoencoder: unexpected block layout: {msg}")

    enc = _block_kinds(state, "encoder")
    dec = _block_kinds(state, "decoder")
    if not enc or not dec:
        fail("no encoder.blocks / decoder.blocks keys (is this a MONAI AutoencoderKL?)")
    ek = [k for _, k in enc]
    dk = [k for _, k in dec]
    if "?" in ek + dk:
        odd = [f"encoder.blocks.{i}" for i, k in enc if k == "?"] + [f"decoder.blocks.{i}" for i, k in dec if k == "?"]
        fail(f"blocks of unknown kind: {', '.join(odd)}")
    # encoder: conv, levels (res... [sample]), [res attn res (non-local attention)], norm, conv
    # decoder: conv, [res attn res], levels (res... [sample]), norm, conv
    if ek[0] != "conv" or ek[-2:] != ["norm", "conv"]:
        fail(f"encoder blocks {ek}: expected conv, levels, [res-attn-res], norm, conv")
    if dk[0] != "conv" or dk[-2:] != ["norm", "conv"]:
        fail(f"decoder blocks {dk}: expected conv, [res-attn-res], levels, norm, conv")
    enc_nonlocal = ek[-5:-2] == ["res", "attn", "res"]
    dec_nonlocal = dk[1:4] == ["res", "attn", "res"]

    def levels(kinds: list[tuple[int, str]]) -> tuple[list[list[int]], list[int]]:
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

    enc_levels, enc_samplers = levels(enc[1:-5] if enc_nonlocal else enc[1:-2])
    dec_levels, dec_samplers = levels(dec[4:-2] if dec_nonlocal else dec[1:-2])
    n = {len(lv) for lv in enc_levels + dec_levels}
    if len(n) != 1 or len(enc_levels) != len(dec_levels) or 0 in n:
        fail(
            f"ResNets per level differ: encoder {[len(x) for x in enc_levels]}, decoder {[len(x) for x in dec_levels]}"
        )
    try:
        ch = [
            int(
                _first(
                    state,
                    *(f"encoder.blocks.{lv[-1]}.{p}" for p in ("norm2.weight", "conv2.conv.weight", "conv2.conv.bias")),
                ).shape[0]
            )
            for lv in enc_levels
        ]
        latent = int(
            _first(state, "quant_conv_mu.conv.weight", "quant_conv_mu.conv.bias", "post_quant_conv.conv.weight").shape[
                0
            ]
        )
        conv_in = _first(state, "encoder.blocks.0.conv.weight")
        conv_out = _first(state, f"decoder.blocks.{dec[-1][0]}.conv.weight")
    except KeyError as err:
        raise LdmGroundError(f"{path}: autoencoder: missing key {err.args[0]}") from None
    return dict(
        enc=enc,
        dec=dec,
        enc_levels=enc_levels,
        dec_levels=dec_levels,
        enc_samplers=enc_samplers,
        dec_samplers=dec_samplers,
        n=n.pop(),
        enc_nonlocal=enc_nonlocal,
        dec_nonlocal=dec_nonlocal,
        config=dict(
            in_channels=int(conv_in.shape[1]),
            out_channels=int(conv_out.shape[0]),
            latent_channels=latent,
            block_out_channels=tuple(ch),
            down_block_types=("DownEncoderBlock2D",) * len(ch),
            up_block_types=("UpDecoderBlock2D",) * len(ch),
            act_fn="silu",
            sample_size=BUNDLE_IMAGE_SIZE,
            mid_block_add_attention=enc_nonlocal or dec_nonlocal,
        ),
    )


class _Mapper:
    """Source -> diffusers keys, remembering which source keys were used or missing."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.mapped: dict[str, torch.Tensor] = {}
        self.used: set[str] = set()
        self.missing: list[str] = []

    def take(self, src: str, dst: str) -> bool:
        if src not in self.state:
            self.missing.append(src)
            return False
        self.mapped[dst] = self.state[src]
        self.used.add(src)
        return True

    def resnet(self, src: str, dst: str):
        for a in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                self.take(f"{src}.{a}.{p}", f"{dst}.{a}.{p}")
        for a, b in (("conv1.conv", "conv1"), ("conv2.conv", "conv2"), ("nin_shortcut.conv", "conv_shortcut")):
            for p in ("weight", "bias"):
                # the 1x1 shortcut exists only where channels change (strict loading checks that)
                if a != "nin_shortcut.conv" or f"{src}.{a}.{p}" in self.state:
                    self.take(f"{src}.{a}.{p}", f"{dst}.{b}.{p}")

    def attention(self, src: str, dst: str):
        for a, b in (("norm", "group_norm"), ("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v")):
            for p in ("weight", "bias"):
                self.take(f"{src}.{a}.{p}", f"{dst}.{b}.{p}")
        if f"{src}.out_proj.weight" in self.state:
            # MONAI core applies its out_proj: a real weight
            for p in ("weight", "bias"):
                self.take(f"{src}.out_proj.{p}", f"{dst}.to_out.0.{p}")
            return
        # GenerativeModels 0.2.x never applies proj_attn in AttentionBlock.forward (and MONAI
        # core without include_fc has none): drop it on purpose, identity output projection.
        for p in ("weight", "bias"):
            if f"{src}.proj_attn.{p}" in self.state:
                self.used.add(f"{src}.proj_attn.{p}")
        ref = self.state.get(f"{src}.to_q.weight", self.state.get(f"{src}.norm.weight"))
        if ref is not None:
            ch = ref.shape[0]
            self.mapped[f"{dst}.to_out.0.weight"] = torch.eye(ch)
            self.mapped[f"{dst}.to_out.0.bias"] = torch.zeros(ch)

    def identity(self, target: dict[str, torch.Tensor], prefix: str):
        """Fill the diffusers module ``prefix`` so that it returns its input exactly: all-zero
        convs / output projection (the residual branch adds 0), unit norms."""
        for k, v in target.items():
            if k.startswith(prefix + "."):
                is_norm_weight = k.endswith("weight") and v.ndim == 1 and ("norm" in k)
                self.mapped[k] = torch.ones_like(v) if is_norm_weight else torch.zeros_like(v)


def map_autoencoder(
    state: dict[str, torch.Tensor],
    path: Path = Path(AUTOENCODER_FILE),
    *,
    norm_num_groups: int,
    layout: dict[str, Any] | None = None,
    scaling_factor: float | None = None,
) -> AutoencoderKL:
    """A diffusers AutoencoderKL holding a MONAI AutoencoderKL state dict (either key layout).

    ``norm_num_groups`` is not stored in the weights and must be given. The returned model
    already has :func:`apply_monai_architecture` applied.
    """
    state, key_layout = autoencoder_keys(state, path)
    lay = layout or _vae_layout(state, path)
    cfg = dict(lay["config"])
    cfg["norm_num_groups"] = _check_groups(norm_num_groups, cfg["block_out_channels"], "autoencoder")
    if scaling_factor is not None:
        cfg["scaling_factor"] = float(scaling_factor)
    vae = AutoencoderKL(layers_per_block=lay["n"], **cfg).eval()
    target = vae.state_dict()
    m = _Mapper(state)
    # encoder
    enc = lay["enc"]
    for p in ("weight", "bias"):
        m.take(f"encoder.blocks.0.conv.{p}", f"encoder.conv_in.{p}")
    for li, lv in enumerate(lay["enc_levels"]):
        for j, bi in enumerate(lv):
            m.resnet(f"encoder.blocks.{bi}", f"encoder.down_blocks.{li}.resnets.{j}")
        if li < len(lay["enc_samplers"]):
            si = lay["enc_samplers"][li]
            for p in ("weight", "bias"):
                m.take(f"encoder.blocks.{si}.conv.conv.{p}", f"encoder.down_blocks.{li}.downsamplers.0.conv.{p}")
    if lay["enc_nonlocal"]:
        r1, a, r2 = (i for i, _ in enc[-5:-2])
        m.resnet(f"encoder.blocks.{r1}", "encoder.mid_block.resnets.0")
        m.attention(f"encoder.blocks.{a}", "encoder.mid_block.attentions.0")
        m.resnet(f"encoder.blocks.{r2}", "encoder.mid_block.resnets.1")
    else:
        m.identity(target, "encoder.mid_block")
    nrm, cv = enc[-2][0], enc[-1][0]
    for p in ("weight", "bias"):
        m.take(f"encoder.blocks.{nrm}.{p}", f"encoder.conv_norm_out.{p}")
        # diffusers' encoder emits [mean, logvar] from one conv; MONAI emits one h for both
        # quant convs: repeat the conv, then a block-diagonal quant_conv.
        if m.take(f"encoder.blocks.{cv}.conv.{p}", f"encoder.conv_out.{p}"):
            m.mapped[f"encoder.conv_out.{p}"] = torch.cat([m.mapped[f"encoder.conv_out.{p}"]] * 2, 0)
    lat = cfg["latent_channels"]
    q = _Mapper(state)
    for s in ("mu", "log_sigma"):
        for p in ("weight", "bias"):
            q.take(f"quant_conv_{s}.conv.{p}", f"{s}.{p}")
    m.used |= q.used
    m.missing += q.missing
    if not q.missing:
        qw = torch.zeros(2 * lat, 2 * lat, 1, 1)
        qw[:lat, :lat] = q.mapped["mu.weight"]
        qw[lat:, lat:] = q.mapped["log_sigma.weight"]
        m.mapped["quant_conv.weight"] = qw
        m.mapped["quant_conv.bias"] = torch.cat([q.mapped["mu.bias"], q.mapped["log_sigma.bias"]])
    for p in ("weight", "bias"):
        m.take(f"post_quant_conv.conv.{p}", f"post_quant_conv.{p}")
    # decoder
    dec = lay["dec"]
    for p in ("weight", "bias"):
        m.take(f"decoder.blocks.0.conv.{p}", f"decoder.conv_in.{p}")
    if lay["dec_nonlocal"]:
        m.resnet(f"decoder.blocks.{dec[1][0]}", "decoder.mid_block.resnets.0")
        m.attention(f"decoder.blocks.{dec[2][0]}", "decoder.mid_block.attentions.0")
        m.resnet(f"decoder.blocks.{dec[3][0]}", "decoder.mid_block.resnets.1")
    else:
        m.identity(target, "decoder.mid_block")
    for li, lv in enumerate(lay["dec_levels"]):
        for j, bi in enumerate(lv):
            m.resnet(f"decoder.blocks.{bi}", f"decoder.up_blocks.{li}.resnets.{j}")
        # diffusers has one ResNet more per decoder level: make it an exact identity
        m.identity(target, f"decoder.up_blocks.{li}.resnets.{len(lv)}")
        if li < len(lay["dec_samplers"]):
            si = lay["dec_samplers"][li]
            for p in ("weight", "bias"):
                m.take(f"decoder.blocks.{si}.conv.conv.{p}", f"decoder.up_blocks.{li}.upsamplers.0.conv.{p}")
    nrm, cv = dec[-2][0], dec[-1][0]
    for p in ("weight", "bias"):
        m.take(f"decoder.blocks.{nrm}.{p}", f"decoder.conv_norm_out.{p}")
        m.take(f"decoder.blocks.{cv}.conv.{p}", f"decoder.conv_out.{p}")
    unexpected = [k for k in state if k not in m.used]
    _strict_load(vae, m.mapped, unexpected, m.missing, "MONAI AutoencoderKL", path, key_layout)
    return apply_monai_architecture(vae)
