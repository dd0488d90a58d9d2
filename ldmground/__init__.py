"""ldmground: zero-shot phrase grounding on chest X-rays with off-the-shelf latent diffusion
models (Vilouras et al., IEEE JBHI), as a small, tested package.

Typical use::

    from ldmground import load_pipeline, ground, load_image
    pipe = load_pipeline("tiny")
    [result] = ground(pipe, load_image("xray.png"), "Small left pleural effusion", "paper")
    result.heatmap  # (H, W) in [0, 1], NaN outside the model's field of view
"""

from . import _compat  # noqa: E402
from ._version import __version__  # noqa: E402
from .config import PRESETS, GroundingConfig, get_preset  # noqa: E402
from .errors import LdmGroundError  # noqa: E402
from .method.heatmap import load_image  # noqa: E402

__all__ = [
    "PRESETS",
    "GroundingConfig",
    "LdmGroundError",
    "get_preset",
    "ground",
    "load_image",
    "load_pipeline",
    "__version__",
]


def __getattr__(name: str):
    # torch and diffusers load only when a model-facing name is used.
    if name == "ground":
        from .method.grounding import ground

        return ground
    if name == "load_pipeline":
        from .models.folder import load_pipeline

        return load_pipeline
    raise AttributeError(name)


_compat.install()
