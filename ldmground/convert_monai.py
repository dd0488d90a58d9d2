"""Convert the paper's MONAI model-zoo bundle into a diffusers folder that ``load_pipeline`` reads.

The bundle ``cxr_image_synthesis_latent_diffusion_model`` stores two state dicts:
``models/autoencoder.pth`` (``AutoencoderKL``) and ``models/diffusion_model.pth``
(``DiffusionModelUNet``), both written by MONAI GenerativeModels 0.2.x. :func:`convert_monai`
maps their keys onto diffusers ``AutoencoderKL`` and ``UNet2DConditionModel`` (strict: every
source key is used or deliberately dropped, every target key is filled) and writes
safetensors, a DDIM scheduler config, ``ldmground.json`` and a ``README.md`` model card.

Where the architecture comes from
---------------------------------
Channels, levels, ResNets per level, attention placement, latent and context sizes are read
from the weights' keys and shapes. What the weights do not store is read from the bundle's
``configs/inference.json`` (never executed: ``@name`` references to other keys and literal
``$`` values are resolved, any other expression is refused with the key named):

- GroupNorm groups and eps (``norm_num_groups``, ``norm_eps``) of both networks;
- attention heads (``num_head_channels`` -> heads per level);
- the scheduler (``num_train_timesteps``, ``beta_start``, ``beta_end``, ``schedule`` or the
  older ``beta_schedule``, ``prediction_type``, ``clip_sample``, ...);
- the latent scale factor: a ``scale_factor`` given in the config, else the default of
  ``scale_factor`` in the bundle's ``scripts/sampler.py`` (where the published bundle keeps
  it; the file is parsed, not imported).

Both published versions of ``inference.json`` are understood: the GenerativeModels one
(``generative.networks.nets.*``, ``num_channels``) and bundle 1.0.x for MONAI core 1.4
(``monai.networks.nets.*``, ``channels``, ``include_fc``, ``use_combined_linear``, and
``load_old``, which makes MONAI translate the original GenerativeModels checkpoints with
``load_old_state_dict``). Checkpoints are accepted in either key layout: GenerativeModels
0.2.x, or MONAI core's (``attn.to_q``/``attn.qkv``/``attn.out_proj`` in the autoencoder,
``attn1.out_proj``/``attn1.qkv`` in the UNet's transformers, ``upsampler.postconv``). Whether
the autoencoder has its non-local (mid) attention is read from the keys; a config that
disagrees is reported as a warning and recorded (the weights decide what the network was).
Values the config states must agree with the weights and with any option given; a missing
config makes every value the weights do not hold a required option (nothing is assumed).
``ldmground.json`` records each value and where it came from (``architecture_source``).

What a diffusers config cannot express, and what is done instead
------------------------------------------------------------------
UNet: nothing. Time embedding (cos first = ``flip_sin_to_cos=True``, ``freq_shift=0``),
ResNet blocks (``time_emb_proj`` after SiLU, 1x1 skip), down (3x3 stride 2, padding 1) and up
(nearest x2 + 3x3 conv) samplers, transformer (GroupNorm eps 1e-6, 1x1 conv ``proj_in``,
LayerNorm eps 1e-5, GEGLU feed-forward with x first and gate second, bias-free q/k/v, no
upcast) and the output head all have a diffusers equivalent; the heads per level go to
``attention_head_dim`` (diffusers' legacy name for the number of heads). diffusers hard-codes
GroupNorm eps 1e-6 in its transformers and VAE, so other ``norm_eps`` values are refused.

AutoencoderKL, four differences, three solved by weights and one by a module swap:

1. MONAI has two 1x1 convs on an ``L``-channel encoder output (``quant_conv_mu``,
   ``quant_conv_log_sigma``); diffusers has one ``2L``-channel encoder output and one
   ``2L -> 2L`` 1x1 ``quant_conv``. Solved by weights: ``conv_out`` repeats the MONAI output
   conv twice and ``quant_conv`` is block diagonal ``[[mu, 0], [0, log_sigma]]`` (adding exact
   zeros: no rounding change beyond summation order). Same log-variance clamp (-30, 20).
2. MONAI's decoder has ``num_res_blocks`` ResNets per level, diffusers' ``layers_per_block + 1``.
   Solved by weights: the extra last ResNet of each diffusers up block gets all-zero ``conv2``
   (and ``conv1``), so it returns its input exactly (``x + 0``).
3. Without non-local attention MONAI has no mid block at all; diffusers always has two mid
   ResNets. They get the same all-zero convs (exact identities); a missing mid attention is
   left out (``mid_block_add_attention=False``), or, when only one of encoder and decoder has
   it, gets an all-zero output projection (returns its residual input exactly).
4. MONAI's encoder and decoder end with GroupNorm -> conv, **without** the SiLU that diffusers
   hard-codes (``Encoder.conv_act`` / ``Decoder.conv_act = nn.SiLU()``). No choice of weights
   removes a SiLU, so :func:`apply_monai_architecture` replaces both ``conv_act`` modules with
   ``nn.Identity``; ``ldmground.json`` records ``"architecture": "monai-generative-0.2"`` and
   the loader must call it (``load_pipeline`` does when that key is present). Plain
   ``AutoencoderKL.from_pretrained`` therefore loads the VAE slightly wrong, without an
   error: the folder's ``README.md`` says so.

Also: GenerativeModels 0.2.x's autoencoder ``AttentionBlock`` defines ``proj_attn`` but never
applies it in ``forward``; its weights are dropped on purpose and diffusers' ``to_out[0]`` is
set to the identity (``eye``, zero bias), which is exact. A MONAI core checkpoint's
``attn.out_proj`` is applied by MONAI core and is mapped as a real weight.

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

import ast
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn

from .errors import LdmGroundError
from .models import MONAI_ARCHITECTURE, PAPER_SCHEDULER, PIPELINE_FILE, SD21_BASE, apply_monai_architecture

log = logging.getLogger(__name__)

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


# --- the bundle's config -------------------------------------------------------------------


class _Unresolvable(Exception):
    def __init__(self, where: str, raw: Any, why: str):
        super().__init__(f"{where} = {raw!r}: {why}")
        self.where, self.raw, self.why = where, raw, why


class _Found:
    """A setting looked up in a bundle file: ``state`` is "value", "unresolved" or "absent"."""

    def __init__(
        self, state: str, where: str, value: Any = None, raw: Any = None, why: str = "", origin: str = CONFIG_FILE
    ):
        self.state, self.where, self.value, self.raw, self.why = state, where, value, raw, why
        self.origin = origin

    @property
    def source(self) -> str:
        return f"{self.origin} {self.where}" if self.origin else self.where


class BundleConfig:
    """A bundle's ``configs/inference.json``, read as data (nothing in it is executed).

    ``@name`` (and ``@a::b`` / ``@a#b``) references are followed; a ``$`` value is accepted
    when it is a Python literal (``"$1e-6"``) or a bare reference (``"$@name"``); anything
    else raises with the key named.
    """

    def __init__(self, data: dict[str, Any], path: Path):
        self.data, self.path = data, path

    @classmethod
    def read(cls, path: str | Path) -> BundleConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise LdmGroundError(f"cannot read {path} as JSON: {err}") from err
        if not isinstance(data, dict):
            raise LdmGroundError(f"{path} does not hold a JSON object")
        return cls(data, path)

    def resolve(self, value: Any, where: str, _seen: tuple[str, ...] = ()) -> Any:
        if isinstance(value, str):
            if value.startswith("@"):
                return self._reference(value[1:], where, _seen)
            if value.startswith("$"):
                expr = value[1:].strip()
                if re.fullmatch(r"@[\w.:#]+", expr):
                    return self._reference(expr[1:], where, _seen)
                try:
                    return ast.literal_eval(expr)
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    raise _Unresolvable(where, value, "an expression that ldmground does not evaluate") from None
            if value.startswith("%"):
                raise _Unresolvable(where, value, "a macro taken from another file")
            return value
        if isinstance(value, list):
            return [self.resolve(v, f"{where}[{i}]", _seen) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.resolve(v, f"{where}.{k}", _seen) for k, v in value.items()}
        return value

    def _reference(self, ref: str, where: str, seen: tuple[str, ...]) -> Any:
        if ref in seen:
            raise _Unresolvable(where, "@" + ref, "a circular reference")
        node: Any = self.data
        for part in re.split(r"::|#", ref):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise _Unresolvable(where, "@" + ref, f"a reference to {ref!r}, which the file does not define")
        return self.resolve(node, where, (*seen, ref))

    def section(self, kind: str, classes: Sequence[str], preferred: str) -> tuple[str, dict, str] | None:
        """(key, definition, target) of the one top-level definition of one of ``classes``."""
        found = []
        for key, val in self.data.items():
            if isinstance(val, dict) and "_target_" in val:
                try:
                    target = self.resolve(val["_target_"], f"{key}._target_")
                except _Unresolvable:
                    continue
                if isinstance(target, str) and target.rsplit(".", 1)[-1] in classes:
                    found.append((key, val, target))
        if len(found) > 1:
            chosen = [f for f in found if f[0] == preferred]
            if len(chosen) != 1:
                raise LdmGroundError(
                    f"{self.path}: several {kind} definitions ({', '.join(f[0] for f in found)}); "
                    "cannot tell which one the checkpoint belongs to"
                )
            found = chosen
        return found[0] if found else None

    def get(self, key: str, section: dict, *names: str) -> _Found:
        """The setting ``names[0]`` (or one of its alternative spellings) of ``section``."""
        present = [n for n in names if n in section]
        if len(present) > 1:
            raise LdmGroundError(f"{self.path}: {key} sets both {' and '.join(present)}")
        if not present:
            return _Found("absent", f"{key}.{names[0]}" if key else names[0])
        where = f"{key}.{present[0]}" if key else present[0]
        try:
            return _Found("value", where, value=self.resolve(section[present[0]], where))
        except _Unresolvable as err:
            return _Found("unresolved", where, raw=section[present[0]], why=f"{err.why} ({err.where} = {err.raw!r})")

    def scale_factors(self) -> list[_Found]:
        """Every ``scale_factor`` the file sets: as a key, or as ``scale_factor=`` in an expression."""
        out: list[_Found] = []

        def walk(node: Any, where: str):
            if isinstance(node, dict):
                for k, v in node.items():
                    w = f"{where}.{k}" if where else k
                    if k == "scale_factor":
                        try:
                            out.append(_Found("value", w, value=self.resolve(v, w)))
                        except _Unresolvable as err:
                            out.append(_Found("unresolved", w, raw=v, why=err.why))
                    else:
                        walk(v, w)
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{where}[{i}]")
            elif isinstance(node, str) and node.startswith("$"):
                for m in re.finditer(r"\bscale_factor\s*=\s*([^,()\s]+)", node):
                    token = m.group(1)
                    try:
                        value = self.resolve(token if token.startswith("@") else "$" + token, where)
                        out.append(_Found("value", f"{where} (scale_factor={token})", value=value))
                    except _Unresolvable as err:
                        out.append(_Found("unresolved", where, raw=node, why=err.why))

        walk(self.data, "")
        return out


def _sampler_scale_factor(path: Path) -> tuple[float, str] | None:
    """The default of a ``scale_factor`` argument in the bundle's sampler script (parsed)."""
    if not path.is_file():
        return None
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError) as err:
        log.warning("cannot parse %s (%s); its scale_factor default is not read", path, err)
        return None
    found: set[tuple[str, float]] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            pos = a.posonlyargs + a.args
            pairs = list(zip(pos, [None] * (len(pos) - len(a.defaults)) + list(a.defaults), strict=True))
            pairs += list(zip(a.kwonlyargs, a.kw_defaults, strict=True))
            for arg, default in pairs:
                if (
                    arg.arg == "scale_factor"
                    and isinstance(default, ast.Constant)
                    and isinstance(default.value, (int, float))
                    and not isinstance(default.value, bool)
                ):
                    found.add((node.name, float(default.value)))
    if not found:
        return None
    if len({v for _, v in found}) > 1:
        raise LdmGroundError(f"{path}: different scale_factor defaults {sorted(found)}; give --scale-factor")
    name, value = sorted(found)[0]
    return value, f"{SAMPLER_FILE} (default of {name}'s scale_factor)"


def _metadata(bundle: Path) -> dict[str, Any]:
    path = bundle / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("cannot read %s: %s", path, err)
        return {}
    return data if isinstance(data, dict) else {}


# --- checkpoint key layouts ------------------------------------------------------------------

_AE_CORE = re.compile(r"\.attn\.(to_[qkv]|qkv|out_proj)\.|^decoder\.blocks\.\d+\.postconv\.")
_AE_OLD = re.compile(r"^(en|de)coder\.blocks\.\d+\.(to_[qkv]|proj_attn)\.|^decoder\.blocks\.\d+\.conv\.conv\.")
_UNET_CORE = re.compile(r"\.attn[12]\.out_proj\.|\.attn[12]\.qkv\.|\.upsampler\.postconv\.")
_UNET_OLD = re.compile(r"\.attn[12]\.to_out\.0\.|\.upsampler\.conv\.conv\.")


def _layout(state: dict, core: re.Pattern, old: re.Pattern, what: str, path: Path) -> str:
    new_keys = sorted(k for k in state if core.search(k))
    old_keys = sorted(k for k in state if old.search(k))
    if new_keys and old_keys:
        raise LdmGroundError(
            f"{path}: the {what} mixes GenerativeModels 0.2.x keys ({_fmt(old_keys, 3)}) and MONAI core "
            f"keys ({_fmt(new_keys, 3)})"
        )
    return MONAI_CORE if new_keys else GENERATIVE


def _split_qkv(out: dict, prefix: str, p: str, v: torch.Tensor):
    for name, part in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0), strict=True):
        out[f"{prefix}.{name}.{p}"] = part.clone()


def _put(out: dict, key: str, v: torch.Tensor, path: Path):
    if key in out:
        raise LdmGroundError(f"{path}: two checkpoint keys stand for {key}")
    out[key] = v


def autoencoder_keys(state: dict[str, torch.Tensor], path: Path = Path(AUTOENCODER_FILE)) -> tuple[dict, str]:
    """(state in GenerativeModels 0.2.x names, layout it came in).

    MONAI core's ``X.attn.to_q`` / ``X.attn.qkv`` become ``X.to_q``... and its
    ``decoder.blocks.N.postconv`` becomes ``decoder.blocks.N.conv``; MONAI core's applied
    ``X.attn.out_proj`` is kept as ``X.out_proj`` (0.2.x's ``proj_attn`` is never applied).
    """
    layout = _layout(state, _AE_CORE, _AE_OLD, "autoencoder", path)
    if layout == GENERATIVE:
        return dict(state), layout
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = re.match(r"^(.*)\.attn\.qkv\.(weight|bias)$", k)
        if m:
            _split_qkv(out, m.group(1), m.group(2), v)
            continue
        k2 = re.sub(r"\.attn\.(to_[qkv]|out_proj)\.", r".\1.", k)
        k2 = re.sub(r"^(decoder\.blocks\.\d+)\.postconv\.", r"\1.conv.", k2)
        _put(out, k2, v, path)
    return out, layout


def unet_keys(state: dict[str, torch.Tensor], path: Path = Path(UNET_FILE)) -> tuple[dict, str]:
    """(state in GenerativeModels 0.2.x names, layout it came in).

    MONAI core's ``attnN.out_proj`` becomes ``attnN.to_out.0``, ``attn1.qkv`` is split into
    ``to_q/to_k/to_v`` and ``upsampler.postconv`` becomes ``upsampler.conv``. A MONAI core
    attention without ``out_proj`` (``include_fc=False``) has an identity output projection.
    """
    layout = _layout(state, _UNET_CORE, _UNET_OLD, "diffusion model", path)
    if layout == GENERATIVE:
        return dict(state), layout
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = re.match(r"^(.*\.attn[12])\.qkv\.(weight|bias)$", k)
        if m:
            _split_qkv(out, m.group(1), m.group(2), v)
            continue
        k2 = re.sub(r"\.(attn[12])\.out_proj\.", r".\1.to_out.0.", k)
        k2 = re.sub(r"\.upsampler\.postconv\.", ".upsampler.conv.", k2)
        _put(out, k2, v, path)
    for k in [k for k in out if re.search(r"\.attn[12]\.to_q\.weight$", k)]:
        block = k.removesuffix(".to_q.weight")
        w = out[k]
        if f"{block}.to_out.0.weight" not in out and w.shape[0] == w.shape[1]:
            out[f"{block}.to_out.0.weight"] = torch.eye(w.shape[0], dtype=w.dtype)
            out[f"{block}.to_out.0.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    return out, layout


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


def _strict_load(
    model: nn.Module,
    mapped: dict[str, torch.Tensor],
    unexpected: list[str],
    missing: list[str],
    what: str,
    path: Path,
    layout: str = GENERATIVE,
):
    """Load ``mapped`` into ``model``; unexpected or missing source keys, unfilled or
    mis-shaped targets are one error naming them all."""
    target = model.state_dict()
    problems = []
    named = "" if layout == GENERATIVE else ", named as GenerativeModels 0.2.x keys"
    if missing:
        problems.append(f"missing keys (expected in the checkpoint{named}): {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (not part of the bundle's {what}): {_fmt(unexpected)}")
    unfilled = [k for k in target if k not in mapped]
    if unfilled and not missing:
        problems.append(f"diffusers parameters left unfilled: {_fmt(unfilled)}")
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
        raise LdmGroundError(f"{path} is not a {what} of the shape its keys suggest: " + "; ".join(problems))
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in mapped.items()}, strict=True)


def _block_kinds(state: dict[str, torch.Tensor], prefix: str) -> list[tuple[int, str]]:
    """[(index, kind)] of ``prefix.blocks.N`` in order; kind in res/attn/sample/norm/conv/?."""
    idx: dict[int, set[str]] = {}
    pat = re.compile(re.escape(prefix) + r"\.blocks\.(\d+)\.(.+)$")
    for k in state:
        m = pat.match(k)
        if m:
            idx.setdefault(int(m.group(1)), set()).add(m.group(2))
    kinds = []
    for i in sorted(idx):
        rest = idx[i]
        heads = {r.split(".", 1)[0] for r in rest}
        if heads & {"norm1", "conv1", "norm2", "conv2", "nin_shortcut"}:
            kinds.append((i, "res"))
        elif heads & {"to_q", "to_k", "to_v", "proj_attn", "out_proj"}:
            kinds.append((i, "attn"))
        elif any(r.startswith("conv.conv.") for r in rest):
            kinds.append((i, "sample"))
        elif any(r.startswith("conv.") for r in rest):
            kinds.append((i, "conv"))
        elif rest <= {"weight", "bias"}:
            kinds.append((i, "norm"))
        else:
            kinds.append((i, "?"))
    if sorted(idx) != list(range(len(idx))):
        raise LdmGroundError(f"{prefix}.blocks are not numbered 0..{len(idx) - 1}: {sorted(idx)}")
    return kinds


def _first(state: dict[str, torch.Tensor], *keys: str) -> torch.Tensor:
    for k in keys:
        if k in state:
            return state[k]
    raise KeyError(keys[0])


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


# --- what the weights do not say ------------------------------------------------------------

_ABSENT = object()
_SCHEDULES = {
    "linear_beta": "linear",
    "linear": "linear",
    "scaled_linear_beta": "scaled_linear",
    "scaled_linear": "scaled_linear",
}
_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _schedule_name(value: Any, where: str) -> str:
    if value not in _SCHEDULES:
        raise LdmGroundError(
            f"{where}: beta schedule {value!r} is not supported (known: {', '.join(sorted(_SCHEDULES))})"
        )
    return _SCHEDULES[value]


class _Architecture:
    """Collects each value the conversion needs with where it came from."""

    def __init__(self, cfg: BundleConfig | None):
        self.cfg = cfg
        self.values: dict[str, Any] = {}
        self.sources: dict[str, str] = {}
        self.missing: dict[str, list[str]] = {}  # option -> values it would give
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.config_format: str | None = None
        self.load_old: Any = None

    def set(self, name: str, value: Any, source: str) -> Any:
        self.values[name] = value
        self.sources[name] = source
        return value

    def choose(
        self,
        name: str,
        found: _Found | None,
        option: Any,
        arg: str,
        *,
        default: Any = _ABSENT,
        default_owner: str = "",
        normalize: Callable[[Any, str], Any] = lambda v, where: v,
        fallback: tuple[Any, str] | None = None,
    ) -> Any:
        """The value of ``name`` from the config (``found``; ``None``: no config section),
        the option ``arg`` (``None``: not given), a MONAI default for a key the config leaves
        out, or ``fallback`` (value, source); else it is recorded as missing."""
        flag = OPTION_FLAGS.get(arg, arg)
        try:
            if option is not None:
                option = normalize(option, f"{flag}")
            if found is not None and found.state == "value":
                value = normalize(found.value, found.source)
                if option is not None and option != value:
                    self.problems.append(
                        f"{name}: {found.source} = {found.value!r} but {flag} is {option!r} "
                        "(they must agree: edit the bundle's file or drop the option)"
                    )
                    return None
                agree = f" (agrees with {flag})" if option is not None else ""
                return self.set(name, value, f"{found.source}{agree}")
            if option is not None:
                unresolved = found is not None and found.state == "unresolved"
                note = f" ({found.source} not evaluated)" if unresolved else ""
                return self.set(name, option, f"option {flag}{note}")
            if found is not None and found.state == "unresolved":
                self.problems.append(
                    f"{name}: {found.source} = {found.raw!r} is {found.why}; give {flag} ({arg}=) instead"
                )
                return None
            if found is not None and found.state == "absent" and default is not _ABSENT:
                value = normalize(default, f"{default_owner} default of {found.where}")
                return self.set(name, value, f"{CONFIG_FILE}: {found.where} not set, {default_owner} default")
        except LdmGroundError as err:
            self.problems.append(str(err))
            return None
        if fallback is not None:
            return self.set(name, *fallback)
        self.missing.setdefault(f"{flag} ({arg}=)", []).append(name)
        return None

    def cross_check(
        self, name: str, found: _Found | None, from_keys: Any, same: Callable[[Any, Any], bool] | None = None
    ):
        """A value the weights hold: the keys decide; a config value must agree."""
        same = same or (lambda c, k: c == k)

        def agrees(c, k) -> bool:
            try:
                return bool(same(c, k))
            except (TypeError, ValueError):
                return False

        if found is None or found.state == "absent":
            return self.set(name, from_keys, "checkpoint keys")
        if found.state == "unresolved":
            return self.set(name, from_keys, f"checkpoint keys ({CONFIG_FILE} {found.where} not evaluated)")
        if not agrees(found.value, from_keys):
            self.problems.append(
                f"{name}: {CONFIG_FILE} sets {found.where} = {found.value!r} but the checkpoint has {from_keys!r}"
            )
            return None
        return self.set(name, from_keys, f"checkpoint keys (agrees with {CONFIG_FILE} {found.where})")


def _as_levels(value: Any, n: int) -> list:
    return (
        [value] * n if isinstance(value, (int, bool)) else list(value) if isinstance(value, (list, tuple)) else [value]
    )


def read_architecture(
    bundle: Path,
    ae_layout: dict[str, Any],
    unet_struct: dict[str, Any],
    options: dict[str, Any],
) -> _Architecture:
    """Every value the conversion needs, from the weights (``ae_layout``, ``unet_struct``),
    ``configs/inference.json``, ``scripts/sampler.py`` and ``options``; raises naming every
    value that is missing, cannot be evaluated or disagrees."""
    cfg_path = bundle / CONFIG_FILE
    cfg = BundleConfig.read(cfg_path) if cfg_path.is_file() else None
    arch = _Architecture(cfg)
    ae_sec = unet_sec = sch_sec = None
    fmt = None
    if cfg is not None:
        ae_sec = cfg.section("AutoencoderKL", ("AutoencoderKL",), "autoencoder_def")
        unet_sec = cfg.section("DiffusionModelUNet", ("DiffusionModelUNet",), "diffusion_def")
        sch_sec = cfg.section("scheduler", ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler"), "scheduler")
        targets = [s[2] for s in (ae_sec, unet_sec) if s is not None]
        if any(t.startswith("monai.") for t in targets):
            fmt = MONAI_CORE
        elif any(t.startswith("generative.") for t in targets):
            fmt = GENERATIVE
        if ae_sec is None or unet_sec is None:
            arch.warnings.append(
                f"{CONFIG_FILE} defines no {'AutoencoderKL' if ae_sec is None else 'DiffusionModelUNet'}: "
                "its values must come from options"
            )

    def get(sec, *names) -> _Found | None:
        if cfg is None or sec is None:
            return None
        return cfg.get(sec[0], sec[1], *names)

    def owner(sec) -> str:
        return f"MONAI {sec[2].rsplit('.', 1)[-1]}" if sec is not None else "MONAI"

    # -- autoencoder: what the keys hold, checked against the config
    aec = ae_layout["config"]
    n_levels = len(aec["block_out_channels"])
    arch.cross_check(
        "autoencoder.channels",
        get(ae_sec, "num_channels", "channels"),
        list(aec["block_out_channels"]),
        lambda c, k: list(c) == k,
    )
    arch.cross_check("autoencoder.latent_channels", get(ae_sec, "latent_channels"), aec["latent_channels"])
    arch.cross_check("autoencoder.in_channels", get(ae_sec, "in_channels"), aec["in_channels"])
    arch.cross_check("autoencoder.out_channels", get(ae_sec, "out_channels"), aec["out_channels"])
    arch.cross_check(
        "autoencoder.num_res_blocks",
        get(ae_sec, "num_res_blocks"),
        ae_layout["n"],
        lambda c, k: _as_levels(c, n_levels) == [k] * n_levels,
    )
    arch.cross_check(
        "autoencoder.attention_levels",
        get(ae_sec, "attention_levels"),
        [False] * n_levels,
        lambda c, k: [bool(x) for x in _as_levels(c, n_levels)] == k,
    )
    arch.cross_check("autoencoder.spatial_dims", get(ae_sec, "spatial_dims"), 2)
    for side in ("encoder", "decoder"):
        name = f"with_{side}_nonlocal_attn"
        has = bool(ae_layout[f"{side[:3]}_nonlocal"])
        found = get(ae_sec, name)
        if found is not None and found.state == "value" and bool(found.value) != has:
            msg = (
                f"{CONFIG_FILE} sets autoencoder {name} = {found.value!r}, but the checkpoint "
                f"{'has' if has else 'has no'} {side} non-local attention; converted as the weights are "
                "(MONAI would build the other network from this config)"
            )
            log.warning(msg)
            arch.warnings.append(msg)
            arch.set(f"autoencoder.{name}", has, f"checkpoint keys ({CONFIG_FILE} {found.where} disagrees)")
        else:
            arch.cross_check(f"autoencoder.{name}", found, has)
    # -- diffusion model: what the keys hold, checked against the config
    ch = unet_struct["channels"]
    arch.cross_check(
        "diffusion_model.channels", get(unet_sec, "num_channels", "channels"), ch, lambda c, k: list(c) == k
    )
    arch.cross_check(
        "diffusion_model.attention_levels",
        get(unet_sec, "attention_levels"),
        unet_struct["attention_levels"],
        lambda c, k: [bool(x) for x in _as_levels(c, len(ch))] == k,
    )
    arch.cross_check(
        "diffusion_model.num_res_blocks",
        get(unet_sec, "num_res_blocks"),
        unet_struct["num_res_blocks"],
        lambda c, k: _as_levels(c, len(ch)) == [k] * len(ch),
    )
    for key in ("in_channels", "out_channels", "cross_attention_dim", "transformer_num_layers"):
        arch.cross_check(f"diffusion_model.{key}", get(unet_sec, key), unet_struct[key])
    arch.cross_check("diffusion_model.spatial_dims", get(unet_sec, "spatial_dims"), 2)
    arch.cross_check(
        "diffusion_model.with_conditioning", get(unet_sec, "with_conditioning"), True, lambda c, k: bool(c) == k
    )
    arch.cross_check(
        "diffusion_model.resblock_updown", get(unet_sec, "resblock_updown"), False, lambda c, k: bool(c) == k
    )
    arch.cross_check("diffusion_model.num_class_embeds", get(unet_sec, "num_class_embeds"), None)
    up = get(unet_sec, "upcast_attention")
    arch.set(
        "diffusion_model.upcast_attention",
        bool(up.value) if up is not None and up.state == "value" else False,
        f"{CONFIG_FILE} {up.where}" if up is not None and up.state == "value" else "MONAI default (False)",
    )
    for key in ("include_fc", "use_combined_linear"):  # MONAI core only; the keys show their effect
        for sec, net in ((ae_sec, "autoencoder"), (unet_sec, "diffusion_model")):
            f = get(sec, key)
            if f is not None and f.state == "value":
                arch.set(f"{net}.{key}", f.value, f"{CONFIG_FILE} {f.where} (informative: the key layout decides)")

    # -- not in the weights: GroupNorm groups and eps, heads
    groups, eps = options.get("norm_num_groups"), options.get("norm_eps")

    def check_eps(v, where):
        v = float(v)
        if abs(v - DIFFUSERS_NORM_EPS) > 1e-12:
            raise LdmGroundError(
                f"{where}: norm_eps {v} is not supported: diffusers hard-codes GroupNorm eps "
                f"{DIFFUSERS_NORM_EPS} in its VAE and transformer blocks (the bundle's value)"
            )
        return v

    def check_groups(v, where):
        if isinstance(v, bool) or not isinstance(v, int):
            raise LdmGroundError(f"{where}: norm_num_groups must be an integer, not {v!r}")
        return v

    for sec, net in ((ae_sec, "autoencoder"), (unet_sec, "diffusion_model")):
        arch.choose(
            f"{net}.norm_num_groups",
            get(sec, "norm_num_groups"),
            groups,
            "norm_num_groups",
            default=32,
            default_owner=owner(sec),
            normalize=check_groups,
        )
        arch.choose(
            f"{net}.norm_eps",
            get(sec, "norm_eps"),
            eps,
            "norm_eps",
            default=1e-6,
            default_owner=owner(sec),
            normalize=check_eps,
        )
    for net, channels in (("autoencoder", aec["block_out_channels"]), ("diffusion_model", ch)):
        g = arch.values.get(f"{net}.norm_num_groups")
        if g is not None:
            try:
                _check_groups(g, channels, net)
            except LdmGroundError as err:
                arch.problems.append(str(err))

    heads_opt = options.get("heads")
    nhc_opt = options.get("num_head_channels")
    attn = unet_struct["attention_levels"]

    def heads_norm(v, where):
        if isinstance(v, dict) and "num_head_channels" in v:
            return heads_from_head_channels(v["num_head_channels"], unet_struct)
        levels = _as_levels(v, len(ch))
        if len(levels) != len(ch) or any(
            a and (isinstance(h, bool) or not isinstance(h, int) or h < 1 or c % h)
            for c, h, a in zip(ch, levels, attn, strict=True)
        ):
            raise LdmGroundError(f"{where}: heads {v!r} do not fit the levels {ch} (attention {attn})")
        return tuple(int(h) if a else 1 for h, a in zip(levels, attn, strict=True))

    if heads_opt is not None and nhc_opt is not None:
        h1 = heads_norm(heads_opt, "--heads")
        h2 = heads_from_head_channels(nhc_opt, unet_struct)
        if h1 != h2:
            arch.problems.append(f"--heads {heads_opt!r} and --num-head-channels {nhc_opt!r} disagree ({h1} != {h2})")
        nhc_opt = None
    head_option, head_arg = (
        (heads_opt, "heads")
        if heads_opt is not None or nhc_opt is None
        else ({"num_head_channels": nhc_opt}, "num_head_channels")
    )
    found = get(unet_sec, "num_head_channels")
    if found is not None and found.state == "value":
        found = _Found("value", found.where, value={"num_head_channels": found.value})
    arch.choose(
        "diffusion_model.heads",
        found,
        head_option,
        head_arg,
        default={"num_head_channels": 8},
        default_owner=owner(unet_sec),
        normalize=heads_norm,
    )

    # -- latent scale factor: config, else the sampler script's default
    sf_opt = options.get("scale_factor")

    def check_sf(v, where):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise LdmGroundError(f"{where}: scale factor must be a positive number, not {v!r}")
        return float(v)

    # A scale_factor the config passes to the sampler overrides the script's default.
    occurrences = cfg.scale_factors() if cfg is not None else []
    resolved = [o for o in occurrences if o.state == "value"]
    unresolved = [o for o in occurrences if o.state == "unresolved"]
    sf_found: _Found | None = None
    if len({repr(o.value) for o in resolved}) > 1:
        arch.problems.append(
            f"scale_factor: {CONFIG_FILE} sets different values: "
            + ", ".join(f"{o.where} = {o.value!r}" for o in resolved)
        )
    elif unresolved:
        sf_found = unresolved[0]
    elif resolved:
        sf_found = resolved[0]
    else:
        sampler = _sampler_scale_factor(bundle / SAMPLER_FILE)
        if sampler is not None:
            sf_found = _Found("value", sampler[1], value=sampler[0], origin="")
    if len({repr(o.value) for o in resolved}) <= 1:
        arch.choose("scale_factor", sf_found, sf_opt, "scale_factor", normalize=check_sf)

    # -- scheduler
    def check_positive_int(v, where):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LdmGroundError(f"{where}: num_train_timesteps must be a positive integer, not {v!r}")
        return v

    def check_beta(v, where):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise LdmGroundError(f"{where}: a beta must be a number in (0, 1), not {v!r}")
        return float(v)

    def check_prediction(v, where):
        if v not in _PREDICTIONS:
            raise LdmGroundError(f"{where}: prediction_type {v!r} is not one of {', '.join(_PREDICTIONS)}")
        return v

    sch_owner = owner(sch_sec)
    arch.choose(
        "scheduler.num_train_timesteps",
        get(sch_sec, "num_train_timesteps"),
        options.get("num_train_timesteps"),
        "num_train_timesteps",
        default=1000,
        default_owner=sch_owner,
        normalize=check_positive_int,
    )
    arch.choose(
        "scheduler.beta_schedule",
        get(sch_sec, "schedule", "beta_schedule"),
        options.get("beta_schedule"),
        "beta_schedule",
        default="linear",
        default_owner=sch_owner,
        normalize=_schedule_name,
    )
    arch.choose(
        "scheduler.beta_start",
        get(sch_sec, "beta_start"),
        options.get("beta_start"),
        "beta_start",
        default=1e-4,
        default_owner=sch_owner,
        normalize=check_beta,
    )
    arch.choose(
        "scheduler.beta_end",
        get(sch_sec, "beta_end"),
        options.get("beta_end"),
        "beta_end",
        default=2e-2,
        default_owner=sch_owner,
        normalize=check_beta,
    )
    arch.choose(
        "scheduler.prediction_type",
        get(sch_sec, "prediction_type"),
        options.get("prediction_type"),
        "prediction_type",
        default="epsilon",
        default_owner=sch_owner,
        normalize=check_prediction,
    )
    # DDIM details without an option: the config (or MONAI's defaults for keys it leaves
    # out); without a scheduler in the config, the paper's values, recorded as such.
    for key, monai_default in (("clip_sample", True), ("set_alpha_to_one", True), ("steps_offset", 0)):
        arch.choose(
            f"scheduler.{key}",
            get(sch_sec, key),
            None,
            key,
            default=monai_default,
            default_owner=sch_owner,
            fallback=(PAPER_SCHEDULER[key], "ldmground's paper scheduler (no scheduler in the bundle config)"),
        )

    if arch.values.get("scheduler.beta_end") is not None and arch.values.get("scheduler.beta_start") is not None:
        if arch.values["scheduler.beta_end"] < arch.values["scheduler.beta_start"]:
            arch.problems.append("scheduler: beta_end is smaller than beta_start")

    arch.config_format = fmt
    lo = cfg.get("", cfg.data, "load_old") if cfg is not None else None
    arch.load_old = lo.value if lo is not None and lo.state == "value" else None

    if arch.missing or arch.problems:
        lines = []
        if arch.missing:
            why = f"{CONFIG_FILE} is missing from {bundle}" if cfg is None else f"{CONFIG_FILE} does not define them"
            lines.append(
                "these values are not stored in the weights and "
                + why
                + "; give them as options (command line / convert_monai argument): "
                + "; ".join(f"{opt} for {', '.join(names)}" for opt, names in arch.missing.items())
            )
        lines += arch.problems
        raise LdmGroundError(f"cannot convert {bundle}: " + " | ".join(lines))
    return arch


# --- model card ------------------------------------------------------------------------------

_FORMAT_TEXT = {
    GENERATIVE: "inference.json of the GenerativeModels 0.2.x era",
    MONAI_CORE: "inference.json for MONAI core (bundle 1.0.x)",
}


def model_card(meta: dict[str, Any]) -> str:
    """The ``README.md`` written into a converted folder (from its ``ldmground.json``)."""
    from . import __version__

    vals = meta["architecture_values"]
    bundle = meta["bundle"]
    sf = meta["scaling_factor"]
    lat = vals.get("autoencoder.latent_channels")
    side = meta["image_size"] // 2 ** (len(vals.get("autoencoder.channels", [0, 0, 0, 0])) - 1)
    te = meta.get("text_encoder")
    if te is None and meta.get("text_encoder_saved"):
        te_line = "the text encoder and tokenizer in `text_encoder/` and `tokenizer/`"
    elif te is None:
        te_line = (
            "no text encoder (pass `text_encoder=` to `load_pipeline`; the bundle was trained with "
            f"the CLIP of `{SD21_BASE}`)"
        )
    else:
        te_line = f"no text encoder files: `ldmground.json` names the spec `{te}`, loaded at load time"
    sched = ", ".join(f"{k.split('.', 1)[1]}={vals[k]!r}" for k in sorted(vals) if k.startswith("scheduler."))
    version = bundle.get("version") or "unknown version"
    warn = ""
    if meta.get("warnings"):
        warn = "\n## Conversion warnings\n\n" + "\n".join(f"- {w}" for w in meta["warnings"]) + "\n"
    return f"""# MONAI chest X-ray latent diffusion model, converted for ldmground

This folder holds the networks of the MONAI model-zoo bundle `{bundle.get("name") or BUNDLE_NAME}`
({version}; {_FORMAT_TEXT.get(bundle.get("config_format"), "no inference.json: values from options")};
checkpoint key layout: autoencoder {bundle["checkpoint_layout"]["autoencoder"]}, diffusion model
{bundle["checkpoint_layout"]["diffusion_model"]}), rewritten by `ldmground convert-monai`
(ldmground {__version__}) into diffusers' folder layout: the autoencoder in `vae/`, the
text-conditioned UNet in `unet/` (safetensors), a DDIM scheduler config in `scheduler/`,
{te_line}, and `ldmground.json` with the settings and, under `architecture_source`, where each
architecture value was read (checkpoint keys, the bundle's `configs/inference.json` or
`scripts/sampler.py`, or a command-line option).

## Load it with ldmground, not with plain diffusers

```python
import ldmground

pipe = ldmground.load_pipeline("path/to/this/folder")
```

`diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae")` loads without any error and
still computes the wrong function: diffusers puts a SiLU between the last GroupNorm and the
output convolution of both its encoder and its decoder, and MONAI's autoencoder has no
activation there. `ldmground.load_pipeline` replaces both with the identity
(`ldmground.models.apply_architecture`, triggered by `"architecture": "{meta["architecture"]}"`
in `ldmground.json`). If you must use diffusers directly, set `vae.encoder.conv_act` and
`vae.decoder.conv_act` to `torch.nn.Identity()` after loading. The UNet and the scheduler load
correctly with plain diffusers. Some VAE ResNets hold all-zero convolutions on purpose: they
stand in for blocks MONAI does not have and pass their input through unchanged.

## Inputs the model expects

- Images: one channel, {meta["image_size"]} x {meta["image_size"]} pixels, intensities in
  [{meta["input_range"][0]}, {meta["input_range"][1]}] (the bundle was trained on [0, 1] images, not
  [-1, 1]): the authors resize the short side to {meta["image_size"]} and centre-crop.
- Latents: the encoder's posterior mean times the scale factor {sf}, giving {lat} x {side} x {side}.
- Text: {vals.get("diffusion_model.cross_attention_dim")}-d token states of 77 tokens (the CLIP text
  encoder of `{SD21_BASE}` for the published bundle).
- Scheduler: DDIM with {sched}.
- ldmground's default grounding settings for this model: the `{meta["default_preset"]}` preset.
{warn}
## Licence

The weights in this folder are the MONAI bundle's, only re-arranged: they remain under the
bundle's own licence and terms of use (see the bundle's LICENSE and documentation in the MONAI
model zoo), and the model was trained on MIMIC-CXR, whose data use agreement may apply to what
you do with it. The licence of ldmground (MIT) covers the conversion code, not these weights.
The bundle is meant for research, not for clinical use.
"""


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
        text_encoder: a :func:`ldmground.models.load_text_components` spec, or ``"none"``
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
