"""Building a :class:`GroundingPipeline`: the pipeline type (``pipeline``), model folders on
disk (``folder``: ``load_pipeline``, ``save_pipeline``, the demo folder and its hashes), text
encoders and tokenizers (``text``), seeded random test pipelines (``tiny``), the MONAI bundle
converter (``monai``) and the BioViL networks of the baselines (``biovil``).

May use: :mod:`ldmground.config` and :mod:`ldmground.errors`; never ``method``, ``runs``,
``studies`` or ``demo``.
"""

from .folder import (
    DEMO_DIR,
    MONAI_ARCHITECTURE,
    PIPELINE_FILE,
    apply_architecture,
    apply_monai_architecture,
    default_preset_of,
    demo_dir,
    load_pipeline,
    save_pipeline,
    sha256_file,
    verify_hashes,
    write_hashes,
    write_model_folder,
)
from .pipeline import SD21_BASE, GroundingPipeline, encode_phrases
from .text import clip_tokenizer, load_text_components
from .tiny import PAPER_SCHEDULER, randomize_unet, tiny_pipeline, tiny_unet, tiny_vae

__all__ = [
    "DEMO_DIR",
    "MONAI_ARCHITECTURE",
    "PAPER_SCHEDULER",
    "PIPELINE_FILE",
    "SD21_BASE",
    "GroundingPipeline",
    "apply_architecture",
    "apply_monai_architecture",
    "clip_tokenizer",
    "default_preset_of",
    "demo_dir",
    "encode_phrases",
    "load_pipeline",
    "load_text_components",
    "randomize_unet",
    "save_pipeline",
    "sha256_file",
    "tiny_pipeline",
    "tiny_unet",
    "tiny_vae",
    "verify_hashes",
    "write_hashes",
    "write_model_folder",
]
