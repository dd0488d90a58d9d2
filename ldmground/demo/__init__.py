"""The demo model: a small latent diffusion model trained here on phantom X-rays.

It exists so that the method can be shown working offline. It is trained only to
*generate* phantom X-rays from report phrases (plain v-prediction denoising loss, with a
higher weight on the named finding's pixels); grounding is then read zero-shot from its
cross-attention exactly as for the paper's model.

Architecture (mirrors the paper's model where cheap):
* ``AutoencoderKL``: 1-channel 64 x 64 image -> 3 x 16 x 16 latent (trained first);
* ``UNet2DConditionModel``: v-prediction, cross-attention at the 16 x 16 and 8 x 8 levels,
  conditioned on the frozen MiniLM-L6 token states (384-d, 16 tokens, padding masked);
* the paper's DDIM scheduler config (scaled_linear 0.0015 -> 0.0205, 1000 steps).

Training data: phantom images (``ldmground.datasets.phantom.render_sample``) rendered at
256 px and brought to 64 px by the same transform used at inference, with one or two findings per
image and one training pair per (image, finding phrase).

Modules: ``networks`` (the UNet and VAE), ``training`` (configuration, training set, loops),
``checkpoints`` (saving and resuming a run), ``export`` (run -> committed folder), ``selection``
(choosing the preset on validation phantoms), ``command`` (``ldmground train-demo``).

May use every layer (``studies`` for the preset selection); only ``cli`` imports it. The
committed model folder is read by :func:`ldmground.models.load_pipeline` (``"demo"``), which
needs nothing from here.
"""

import importlib
import warnings

_MODULES = ("networks", "training", "checkpoints", "export", "selection", "command")
_MOVED = {"DEMO_DIR", "demo_dir", "verify_hashes", "write_hashes"}  # now in ldmground.models


def __getattr__(name: str):
    # Names load on first use so that `import ldmground.demo` stays cheap.
    if name in _MOVED:
        warnings.warn(f"ldmground.demo.{name} moved to ldmground.models.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("ldmground.models.folder"), name)
    for module in _MODULES:
        mod = importlib.import_module(f"{__name__}.{module}")
        if name in vars(mod) and not name.startswith("__"):
            return vars(mod)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
