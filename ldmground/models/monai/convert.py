"""``convert_monai``: the bundle -> a diffusers folder that ``load_pipeline`` reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffusers import DDIMScheduler

from ...errors import LdmGroundError
from ..folder import MONAI_ARCHITECTURE, PIPELINE_FILE
from ..pipeline import SD21_BASE
from ..tiny import PAPER_SCHEDULER
from .architecture import read_architecture
from .autoencoder import _vae_layout, map_autoencoder
from .bundle import (
    AUTOENCODER_FILE,
    BUNDLE_IMAGE_SIZE,
    BUNDLE_NAME,
    CONFIG_FILE,
    DEFAULT_PRESET,
    GENERATIVE,
    INPUT_RANGE,
    MODEL_CARD_FILE,
    MONAI_CORE,
    UNET_FILE,
)
from .bundle_config import _metadata
from .card import model_card
from .checkpoints import _load_state, autoencoder_keys, unet_keys
from .unet import _unet_structure, map_unet

log = logging.getLogger(__name__)


# --- the converter -------------------------------------------------------------------------


def convert_monai(
    bundle_dir: str | Path,
    out_dir: str | Path,
    text_encoder: str | None = SD21_BASE,
    num_head_channels: int | Sequence[int] | None = None,
    norm_num_groups: int | None = None,
    *,
    heads: int | Sequence[int] | None = None,
    norm_eps: float | None = None,
    scale_factor: float | None = None,
    num_train_timesteps: int | None = None,
    beta_schedule: str | None = None,
    beta_start: float | None = None,
    beta_end: float | None = None,
    prediction_type: str | None = None,
) -> Path:
    """Convert the bundle at ``bundle_dir`` into a diffusers folder ``out_dir``; returns it.

    Values the weights do not hold are read from the bundle's ``configs/inference.json`` (and
    the latent scale factor, failing that, from ``scripts/sampler.py``). The keyword options
    give them when the bundle lacks them (a missing config makes them all required: nothing is
    assumed), or when the config holds an expression that is not evaluated; an option that
    contradicts the config is an error. ``None`` means "not given".

    Args:
        bundle_dir: the bundle root (``models/autoencoder.pth``, ``models/diffusion_model.pth``,
            usually ``configs/inference.json`` and ``scripts/sampler.py``).
        out_dir: created if needed; ``vae/``, ``unet/``, ``scheduler/`` (+ ``text_encoder/``,
            ``tokenizer/``), ``ldmground.json`` and ``README.md``.
        text_encoder: a :func:`ldmground.models.text.load_text_components` spec, or ``"none"``
            (``None`` too) to write no text encoder and record ``null``.
        num_head_channels: MONAI's channels per head, per level (or one int for all levels).
        norm_num_groups: GroupNorm groups of both networks.
        heads: attention heads per level (or one int for all attention levels); an
            alternative to ``num_head_channels``.
        norm_eps: GroupNorm eps of both networks (only 1e-6 is supported by diffusers).
        scale_factor: latent scale factor.
        num_train_timesteps, beta_schedule (``linear``/``scaled_linear``, or MONAI's
            ``linear_beta``/``scaled_linear_beta``), beta_start, beta_end, prediction_type:
            the noise schedule the UNet was trained with.
    """
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise LdmGroundError(f"bundle folder not found: {bundle}")
    ae_path, unet_path = bundle / AUTOENCODER_FILE, bundle / UNET_FILE
    ae_state, ae_keys = autoencoder_keys(_load_state(ae_path), ae_path)
    unet_state, unet_keys_layout = unet_keys(_load_state(unet_path), unet_path)
    ae_layout = _vae_layout(ae_state, ae_path)
    unet_struct = _unet_structure(unet_state, unet_path)
    options = dict(
        norm_num_groups=norm_num_groups,
        norm_eps=norm_eps,
        heads=heads,
        num_head_channels=num_head_channels,
        scale_factor=scale_factor,
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
    )
    arch = read_architecture(bundle, ae_layout, unet_struct, options)
    v = arch.values
    sf = float(v["scale_factor"])
    vae = map_autoencoder(
        ae_state, ae_path, norm_num_groups=v["autoencoder.norm_num_groups"], layout=ae_layout, scaling_factor=sf
    )
    unet = map_unet(
        unet_state,
        unet_path,
        heads=v["diffusion_model.heads"],
        norm_num_groups=v["diffusion_model.norm_num_groups"],
        upcast_attention=v["diffusion_model.upcast_attention"],
    )
    latent_side = BUNDLE_IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)
    te_spec = None if text_encoder in (None, "none", "") else str(text_encoder)
    tok = enc = None
    if te_spec is not None:
        from ..text import load_text_components

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
    scheduler = dict(PAPER_SCHEDULER)
    for key in (
        "num_train_timesteps",
        "beta_schedule",
        "beta_start",
        "beta_end",
        "prediction_type",
        "clip_sample",
        "set_alpha_to_one",
        "steps_offset",
    ):
        scheduler[key] = v[f"scheduler.{key}"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet.register_to_config(sample_size=latent_side)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    DDIMScheduler.from_config(scheduler).save_config(out / "scheduler")
    recorded = te_spec
    saved = False
    if enc is not None and te_spec not in ("tiny", "minilm"):
        # a real encoder (the SD-2.1-base CLIP): keep a copy, so the folder is self-contained
        enc.save_pretrained(out / "text_encoder", safe_serialization=True)
        tok.save_pretrained(out / "tokenizer")
        recorded = None
        saved = True
    md = _metadata(bundle)
    fmt = arch.config_format
    version = md.get("version")
    fmt_text = {GENERATIVE: "GenerativeModels 0.2.x config", MONAI_CORE: "MONAI core config"}.get(
        fmt, "no inference.json" if arch.cfg is None else "config of unknown format"
    )
    values = {k: (list(x) if isinstance(x, tuple) else x) for k, x in v.items()}
    sources = dict(arch.sources)
    values["image_size"] = BUNDLE_IMAGE_SIZE
    sources["image_size"] = "fixed: the bundle was trained on 512 x 512 images"
    meta: dict[str, Any] = {
        "image_size": BUNDLE_IMAGE_SIZE,
        "scaling_factor": sf,
        "input_range": list(INPUT_RANGE),
        "default_preset": DEFAULT_PRESET,
        "use_attention_mask": False,
        "max_length": 77,
        "text_encoder": recorded,
        "architecture": MONAI_ARCHITECTURE,
        "source": f"MONAI bundle {BUNDLE_NAME} {version or '(version unknown)'} ({fmt_text}; "
        f"checkpoints in {ae_keys} / {unet_keys_layout} key layout)",
        "bundle": {
            "name": BUNDLE_NAME,
            "folder": bundle.name,
            "version": version,
            "monai_version": md.get("monai_version"),
            "config": CONFIG_FILE if arch.cfg is not None else None,
            "config_format": fmt,
            "load_old": arch.load_old,
            "checkpoint_layout": {"autoencoder": ae_keys, "diffusion_model": unet_keys_layout},
        },
        "architecture_values": values,
        "architecture_source": sources,
    }
    if arch.warnings:
        meta["warnings"] = list(arch.warnings)
    (out / PIPELINE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (out / MODEL_CARD_FILE).write_text(model_card(dict(meta, text_encoder_saved=saved)))
    return out
