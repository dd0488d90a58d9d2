"""The paper's method on any diffusers UNet, in the order it runs.

``heatmap`` (image geometry, pre- and post-processing) -> ``inversion`` (DDIM inversion with
the empty prompt) -> ``attention`` (recording the phrases' cross-attention inside the window)
-> ``tokens`` (which token positions are read) -> ``grounding`` (``ground``: all of it for one
image and its phrases).

May use: :mod:`ldmground.config`, :mod:`ldmground.errors` and the pipeline type
(:mod:`ldmground.models.pipeline`); nothing else of ldmground.
"""

import importlib

# name -> module; loaded on first use, so that `from ldmground import load_image` does not
# pull in torch and diffusers.
_NAMES = {
    "AttentionRecorder": "attention",
    "cross_attention_layers": "attention",
    "GroundingResult": "grounding",
    "attention_cache": "grounding",
    "ground": "grounding",
    "Geometry": "heatmap",
    "load_image": "heatmap",
    "postprocess": "heatmap",
    "preprocess": "heatmap",
    "ddim_invert": "inversion",
    "inversion_timesteps": "inversion",
    "make_scheduler": "inversion",
    "TokenSelection": "tokens",
    "class_span": "tokens",
    "select_tokens": "tokens",
    "swap_sides": "tokens",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
