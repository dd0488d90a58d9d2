"""The MONAI bundle's file names, its published network settings, the MONAI networks built
from them (for tests and the oracle) and a random-weight stand-in bundle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import LdmGroundError

BUNDLE_NAME = "cxr_image_synthesis_latent_diffusion_model"
AUTOENCODER_FILE = "models/autoencoder.pth"
UNET_FILE = "models/diffusion_model.pth"
CONFIG_FILE = "configs/inference.json"
METADATA_FILE = "configs/metadata.json"
SAMPLER_FILE = "scripts/sampler.py"
MODEL_CARD_FILE = "README.md"
BUNDLE_IMAGE_SIZE = 512
# The published bundle's value (default of ``scale_factor`` in its scripts/sampler.py). The
# converter reads it from the bundle; this constant only seeds the fake bundles below.
BUNDLE_SCALING_FACTOR = 0.3
INPUT_RANGE = (0.0, 1.0)  # the bundle's autoencoder was trained on [0, 1] images
DEFAULT_PRESET = "paper"
# Names of the two formats (of inference.json and of checkpoint keys).
GENERATIVE = "generative-0.2"  # MONAI GenerativeModels 0.2.x: generative.networks.nets.*
MONAI_CORE = "monai-core"  # MONAI core >= 1.4 (bundle 1.0.x): monai.networks.nets.*
DIFFUSERS_NORM_EPS = 1e-6  # the GroupNorm eps diffusers hard-codes in its VAE and transformers

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
# The bundle's scheduler (MONAI core names; the GenerativeModels-era file says
# beta_schedule="scaled_linear" instead of schedule="scaled_linear_beta").
BUNDLE_SCHEDULER: dict[str, Any] = dict(
    beta_start=0.0015,
    beta_end=0.0205,
    num_train_timesteps=1000,
    schedule="scaled_linear_beta",
    prediction_type="v_prediction",
    clip_sample=False,
)
# Same structure, scaled down for fast tests (one head per attention layer, as in the bundle);
# its 32-d context matches the "tiny" text encoder, so a small converted bundle runs end to
# end offline. Fake bundles carry their inference.json, so other groups/heads convert too.
SMALL_AUTOENCODER: dict[str, Any] = dict(BUNDLE_AUTOENCODER, num_channels=[32, 64, 64, 64])
SMALL_UNET: dict[str, Any] = dict(
    BUNDLE_UNET, num_channels=[32, 64, 64], num_head_channels=[0, 64, 64], cross_attention_dim=32
)

# Options of ``convert_monai`` (and their command-line spelling) for values the weights lack.
OPTION_FLAGS: dict[str, str] = {
    "norm_num_groups": "--norm-groups",
    "norm_eps": "--norm-eps",
    "heads": "--heads",
    "num_head_channels": "--num-head-channels",
    "scale_factor": "--scale-factor",
    "num_train_timesteps": "--num-train-timesteps",
    "beta_schedule": "--beta-schedule",
    "beta_start": "--beta-start",
    "beta_end": "--beta-end",
    "prediction_type": "--prediction-type",
}


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


def bundle_network_configs(
    scale: str = "full", autoencoder: dict | None = None, unet: dict | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(autoencoder, unet) GenerativeModels 0.2.x keyword arguments: the bundle's (``"full"``)
    or the scaled-down ones (``"small"``), updated with ``autoencoder`` / ``unet``."""
    if scale not in ("full", "small"):
        raise LdmGroundError(f"scale must be 'full' or 'small', not {scale!r}")
    ae_cfg, unet_cfg = (BUNDLE_AUTOENCODER, BUNDLE_UNET) if scale == "full" else (SMALL_AUTOENCODER, SMALL_UNET)
    return dict(ae_cfg, **(autoencoder or {})), dict(unet_cfg, **(unet or {}))


def monai_bundle_networks(
    scale: str = "full", seed: int = 0, autoencoder: dict | None = None, unet: dict | None = None
) -> tuple[nn.Module, nn.Module]:
    """(autoencoder, unet): the bundle's MONAI networks with seeded random weights, in eval mode.

    ``scale="full"`` is the exact bundle config; ``"small"`` the same structure scaled down;
    ``autoencoder`` / ``unet`` override keyword arguments (GenerativeModels 0.2.x names).
    Zero-initialised layers (MONAI zeros ``proj_out``, ``conv2`` and the output conv) are
    re-drawn so that every weight matters in an equivalence test.
    """
    nets, _ = import_generative()
    ae_cfg, unet_cfg = bundle_network_configs(scale, autoencoder, unet)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ae = nets.AutoencoderKL(**ae_cfg).eval()
    unet_net = nets.DiffusionModelUNet(**unet_cfg).eval()
    with torch.no_grad():
        for model in (ae, unet_net):
            for name, p in model.named_parameters():
                if name.endswith("bias") or p.ndim == 1:
                    # norms: around 1 (weights) / 0 (biases); biases small and non-zero
                    base = 1.0 if (p.ndim == 1 and name.endswith("weight")) else 0.0
                    p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return ae, unet_net


def bundle_inference_config(
    autoencoder: dict[str, Any],
    unet: dict[str, Any],
    fmt: str = GENERATIVE,
    scheduler: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``configs/inference.json`` laid out like the published bundle's (for fake bundles).

    ``autoencoder`` / ``unet`` are GenerativeModels 0.2.x keyword arguments. ``fmt``
    :data:`GENERATIVE`: the GenerativeModels-era file (``generative.networks.*`` targets,
    ``num_channels``, scheduler ``beta_schedule``); :data:`MONAI_CORE`: bundle 1.0.x for MONAI
    core 1.4 (``monai.networks.*`` targets, ``channels``, ``load_old``, ``schedule``).
    """
    sched = dict(BUNDLE_SCHEDULER, **(scheduler or {}))
    if fmt == GENERATIVE:
        pkg = "generative.networks"
        ae, un = dict(autoencoder), dict(unet)
        schedule = sched.pop("schedule")
        sched["beta_schedule"] = {"scaled_linear_beta": "scaled_linear", "linear_beta": "linear"}.get(
            schedule, schedule
        )
        loading = {
            "load_autoencoder": "$@autoencoder_def.load_state_dict(torch.load(@load_autoencoder_path))",
            "load_diffusion": "$@diffusion_def.load_state_dict(torch.load(@load_diffusion_path))",
        }
        head: dict[str, Any] = {}
    elif fmt == MONAI_CORE:
        pkg = "monai.networks"
        ae = {("channels" if k == "num_channels" else k): v for k, v in autoencoder.items()}
        un = {("channels" if k == "num_channels" else k): v for k, v in unet.items()}
        loading = {
            "load_autoencoder_func": "$@autoencoder_def.load_old_state_dict if bool(@load_old) "
            "else @autoencoder_def.load_state_dict",
            "load_autoencoder": "$@load_autoencoder_func(torch.load(@load_autoencoder_path))",
            "load_diffusion_func": "$@diffusion_def.load_old_state_dict if bool(@load_old) "
            "else @diffusion_def.load_state_dict",
            "load_diffusion": "$@load_diffusion_func(torch.load(@load_diffusion_path))",
        }
        head = {"load_old": 1}
    else:
        raise LdmGroundError(f"fmt must be {GENERATIVE!r} or {MONAI_CORE!r}, not {fmt!r}")
    return {
        "imports": ["$import torch", "$from pathlib import Path"],
        "bundle_root": ".",
        **head,
        "model_dir": "$@bundle_root + '/models'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "autoencoder_def": {"_target_": f"{pkg}.nets.AutoencoderKL", **ae},
        "load_autoencoder_path": "$@model_dir + '/autoencoder.pth'",
        **{k: v for k, v in loading.items() if "autoencoder" in k},
        "autoencoder": "$@autoencoder_def.to(@device)",
        "diffusion_def": {"_target_": f"{pkg}.nets.DiffusionModelUNet", **un},
        "load_diffusion_path": "$@model_dir + '/diffusion_model.pth'",
        **{k: v for k, v in loading.items() if "diffusion" in k},
        "diffusion": "$@diffusion_def.to(@device)",
        "scheduler": {
            "_target_": f"{pkg}.schedulers.DDIMScheduler",
            "_requires_": ["@load_diffusion", "@load_autoencoder"],
            **sched,
        },
        "noise": "$torch.randn((1, 3, 64, 64)).to(@device)",
        "sampler": {"_target_": "scripts.sampler.Sampler"},
        "sample": "$@sampler.sampling_fn(@noise, @autoencoder, @diffusion, @scheduler, @prompt_embeds)",
    }


_FAKE_SAMPLER = '''"""Stand-in for the bundle's scripts/sampler.py, written with a random-weight test bundle.

The converter only reads the default of ``scale_factor`` (it parses this file, never runs it).
"""


class Sampler:
    def sampling_fn(
        self,
        noise,
        autoencoder_model,
        diffusion_model,
        scheduler,
        prompt_embeds,
        guidance_scale: float = 7.0,
        scale_factor: float = {scale_factor!r},
    ):
        raise NotImplementedError("random weights: nothing worth sampling")
'''


def write_fake_bundle(
    bundle_dir: str | Path,
    scale: str = "small",
    seed: int = 0,
    *,
    config: str | None = GENERATIVE,
    autoencoder: dict | None = None,
    unet: dict | None = None,
    scheduler: dict | None = None,
    scale_factor: float | None = BUNDLE_SCALING_FACTOR,
) -> Path:
    """Save seeded random MONAI state dicts in the bundle's layout; returns ``bundle_dir``.

    Also writes what the real bundle carries beside the weights: ``configs/inference.json``
    in the format ``config`` (:data:`GENERATIVE` or :data:`MONAI_CORE`; ``None``: no config),
    ``configs/metadata.json`` and a ``scripts/sampler.py`` whose ``scale_factor`` default is
    ``scale_factor`` (``None``: no sampler script). ``autoencoder`` / ``unet`` / ``scheduler``
    override the network and scheduler settings (GenerativeModels 0.2.x names).
    """
    ae, unet_net = monai_bundle_networks(scale, seed, autoencoder, unet)
    out = Path(bundle_dir)
    (out / "models").mkdir(parents=True, exist_ok=True)
    torch.save(ae.state_dict(), out / AUTOENCODER_FILE)
    torch.save(unet_net.state_dict(), out / UNET_FILE)
    if config is not None:
        ae_cfg, unet_cfg = bundle_network_configs(scale, autoencoder, unet)
        (out / "configs").mkdir(exist_ok=True)
        cfg = bundle_inference_config(ae_cfg, unet_cfg, config, scheduler)
        (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=4) + "\n")
        meta = {
            "version": f"0.0.0+random-{scale}-seed{seed}",
            "monai_version": "1.4.0" if config == MONAI_CORE else "1.1.0",
            "description": "random weights in the layout of " + BUNDLE_NAME + " (ldmground write_fake_bundle)",
        }
        (out / METADATA_FILE).write_text(json.dumps(meta, indent=4) + "\n")
    if scale_factor is not None:
        (out / "scripts").mkdir(exist_ok=True)
        (out / SAMPLER_FILE).write_text(_FAKE_SAMPLER.format(scale_factor=float(scale_factor)))
    return out
