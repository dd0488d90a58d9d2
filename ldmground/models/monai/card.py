"""The ``README.md`` model card written into a converted folder.
"""

from __future__ import annotations

from typing import Any

from ..pipeline import SD21_BASE
from .bundle import BUNDLE_NAME, GENERATIVE, MONAI_CORE

# --- model card ------------------------------------------------------------------------------

_FORMAT_TEXT = {
    GENERATIVE: "inference.json of the GenerativeModels 0.2.x era",
    MONAI_CORE: "inference.json for MONAI core (bundle 1.0.x)",
}


def model_card(meta: dict[str, Any]) -> str:
    """The ``README.md`` written into a converted folder (from its ``ldmground.json``)."""
    from ..._version import __version__

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
(`ldmground.models.folder.apply_architecture`, triggered by `"architecture": "{meta["architecture"]}"`
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
