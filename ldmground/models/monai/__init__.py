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
``text_encoder`` may be any spec :func:`ldmground.models.text.load_text_components` knows; it is
then saved into the folder when it loads, and otherwise (offline) only recorded as a spec
in ``ldmground.json``. A text encoder whose hidden size differs from the UNet's
``cross_attention_dim`` is refused (e.g. ``"tiny"``, 32-d, with the 1024-d bundle), except
``"none"``: write VAE, UNet and scheduler only and record ``text_encoder: null``; pass
``text_encoder=`` to ``load_pipeline`` then.

Modules, in the order a conversion uses them: ``bundle`` (file names, published settings,
MONAI networks for tests), ``bundle_config`` (reading ``inference.json``), ``checkpoints``
(key layouts, strict loading), ``autoencoder`` and ``unet`` (key mapping), ``architecture``
(what the weights do not say), ``card`` (the model card), ``convert`` (``convert_monai``).
"""

from .architecture import read_architecture
from .bundle import (
    BUNDLE_NAME,
    DEFAULT_PRESET,
    INPUT_RANGE,
    SMALL_AUTOENCODER,
    SMALL_UNET,
    bundle_inference_config,
    bundle_network_configs,
    monai_bundle_networks,
    write_fake_bundle,
)
from .bundle_config import BundleConfig
from .card import model_card
from .convert import convert_monai

__all__ = [
    "BUNDLE_NAME",
    "DEFAULT_PRESET",
    "INPUT_RANGE",
    "SMALL_AUTOENCODER",
    "SMALL_UNET",
    "BundleConfig",
    "bundle_inference_config",
    "bundle_network_configs",
    "convert_monai",
    "model_card",
    "monai_bundle_networks",
    "read_architecture",
    "write_fake_bundle",
]
