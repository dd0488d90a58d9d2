"""From a training run to the committed demo folder: the whole run, resuming, snapshots and
the exported pipeline.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from ..errors import LdmGroundError
from ..models.folder import verify_hashes, write_hashes
from .networks import demo_unet, demo_vae
from .training import (
    DemoTrainConfig,
    TrainingSet,
    check_trainable,
    encode_all,
    machine_description,
    make_training_set,
    parse_category_weights,
    train_unet,
    train_vae,
    training_device,
)


def export_demo(
    vae, unet, scaling_factor: float, cfg: DemoTrainConfig, steps_done: int, dest: Path, notes: dict
) -> Path:
    """Write the demo model folder (safetensors + hashes) that ``load_pipeline`` reads."""
    from ..models.folder import write_model_folder
    from ..models.tiny import PAPER_SCHEDULER

    meta = {
        "image_size": cfg.image_size,
        "scaling_factor": scaling_factor,
        "use_attention_mask": True,
        "max_length": 16,
        "text_sink": cfg.text_sink,
        "input_range": [-1.0, 1.0],  # train_demo feeds the VAE 2x - 1
        "default_preset": "demo",
        "text_encoder": "minilm",
        "training": {**asdict(cfg), "unet_steps_done": steps_done, **notes},
    }
    write_model_folder(dest, unet, vae, PAPER_SCHEDULER, meta)
    write_hashes(dest)
    return dest


def train_demo(cfg: DemoTrainConfig, export_to: Path | None = None, progress: bool = True) -> Path:
    """Everything ``ldmground train-demo`` does: data, VAE, latents, UNet, export.

    The export's ``training`` block records the settings, the machine, this call's minutes
    and the total over every call on ``cfg.out`` (a run resumed in chunks), and for a
    fine-tune the ``training`` block of the folder it started from."""
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train_demo(cfg, export_to, progress)
    finally:
        torch.set_num_threads(before)  # the caller's setting, e.g. a test session's or a notebook's


def _train_demo(cfg: DemoTrainConfig, export_to: Path | None, progress: bool) -> Path:
    parse_category_weights(cfg.category_weights)  # a bad spec fails before hours of rendering and training
    parse_category_weights(cfg.category_mask_weights, "category_mask_weights")
    check_trainable(cfg.trainable)
    device = training_device(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    start = time.time()
    cache = out / "train_set.npz"
    if cache.is_file():
        data = TrainingSet.load(cache)
    else:
        data = make_training_set(cfg.n_train, cfg.seed, "train", cfg, progress)
        data.save(cache)
    notes = {}
    if cfg.init_from:
        vae, scaling, init, start_record = _init_from(Path(cfg.init_from), cfg)
        notes["init_unet_steps_done"] = int(start_record.get("unet_steps_done", 0))
        notes["init_from_model"] = {"training": start_record}
    else:
        vae, scaling, init = train_vae(data, cfg, out, progress), None, None
    latents = encode_all(vae.to(device), data.images)
    vae.cpu()
    if scaling is None:  # a new VAE: scale its latents to unit variance
        scaling = float(1.0 / latents.std())
    unet, done = train_unet(data, latents * scaling, cfg, out, progress, init=init)
    notes["machine"] = machine_description(device)
    notes.update(_add_wall_minutes(out, (time.time() - start) / 60))
    return export_demo(vae, unet, scaling, cfg, done, export_to or out / "model", notes)


def _add_wall_minutes(out: Path, minutes: float) -> dict[str, float]:
    """Add one call's minutes to the run folder's ledger; this call's and the total."""
    ledger = out / "wall_minutes.json"
    calls = json.loads(ledger.read_text()) if ledger.is_file() else []
    calls.append(round(minutes, 2))
    ledger.write_text(json.dumps(calls) + "\n")
    return {"wall_minutes_this_call": round(minutes, 1), "wall_minutes_total": round(sum(calls), 1)}


def _folder_meta(folder: Path) -> dict:
    from ..models.folder import PIPELINE_FILE

    meta_file = folder / PIPELINE_FILE
    if not meta_file.is_file():
        raise LdmGroundError(f"--init-from {folder}: no {PIPELINE_FILE}; expected a folder written by train-demo")
    return json.loads(meta_file.read_text())


def _init_from(folder: Path, cfg: DemoTrainConfig):
    """VAE, latent scaling factor, UNet weights and ``training`` record of an exported model folder."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    meta = _folder_meta(folder)
    if (folder / "SHA256SUMS").is_file():
        verify_hashes(folder)
    for key, value in {"image_size": cfg.image_size, "text_sink": cfg.text_sink}.items():
        if meta.get(key) != value:
            raise LdmGroundError(f"--init-from {folder}: its {key} is {meta.get(key)!r}, this run's is {value!r}")
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    weights = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    return vae, float(meta["scaling_factor"]), weights, meta.get("training", {})


def snapshot_pipeline(run_dir: str | Path, snapshot: str | Path, scaling_factor: float):
    """A :class:`GroundingPipeline` from a training run's VAE and an EMA UNet snapshot."""
    from safetensors.torch import load_file

    from ..models.pipeline import GroundingPipeline
    from ..models.text import load_text_components
    from ..models.tiny import PAPER_SCHEDULER

    cfg = _run_config(run_dir)
    tok, enc, info = load_text_components("minilm")
    unet = demo_unet(enc.config.hidden_size, 0, cfg.cross_attention_at, cfg.latent_size)
    unet.load_state_dict(load_file(snapshot))
    return GroundingPipeline(
        vae=_run_vae(run_dir, cfg),
        unet=unet.eval(),
        text_encoder=enc,
        tokenizer=tok,
        scheduler_config=dict(PAPER_SCHEDULER),
        image_size=cfg.image_size,
        scaling_factor=scaling_factor,
        text_sink=cfg.text_sink,
        spec=f"snapshot:{Path(snapshot).stem}",
        **info,
    )


def run_scaling_factor(run_dir: str | Path) -> float:
    """The latent scaling factor of a run: 1 / std of its training latents (as at export),
    or that of the folder a fine-tune started from (``init_from``)."""
    cfg = _run_config(run_dir)
    if cfg.init_from:
        return float(_folder_meta(Path(cfg.init_from))["scaling_factor"])
    with np.load(Path(run_dir) / "train_set.npz") as z:
        images = z["images"]
    return float(1.0 / encode_all(_run_vae(run_dir, _run_config(run_dir)), images).std())


def _run_config(run_dir: str | Path) -> DemoTrainConfig:
    """A run's saved settings; runs from before an option lack its key and get the default."""
    saved = Path(run_dir) / "train_config.json"
    settings = json.loads(saved.read_text()) if saved.is_file() else {}
    known = {f.name for f in fields(DemoTrainConfig)}
    return DemoTrainConfig(**{k: v for k, v in settings.items() if k in known})


def _run_vae(run_dir: str | Path, cfg: DemoTrainConfig):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    if cfg.init_from:  # a fine-tune keeps its start folder's VAE
        return AutoencoderKL.from_pretrained(Path(cfg.init_from) / "vae").eval()
    vae = demo_vae(factor=cfg.vae_factor)
    vae.load_state_dict(load_file(Path(run_dir) / "vae.model.safetensors"))
    return vae.eval()
