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

Training data: phantom images (``ldmground.phantom.render_sample``) rendered at 256 px and
brought to 64 px by the same transform used at inference, with one or two findings per
image and one training pair per (image, finding phrase).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import LdmGroundError

# The committed model folder and its hash checks live with the folder I/O in models.py (the
# loader needs them, and models never imports this module); re-exported for old imports.
from .models import DEMO_DIR, demo_dir, verify_hashes, write_hashes  # noqa: F401
from .tokens import swap_sides

log = logging.getLogger(__name__)

LEVEL_CHANNELS = {16: (48, 96, 96), 32: (32, 64, 96)}  # demo UNet channels by latent size


@dataclass
class DemoTrainConfig:
    """Settings of ``ldmground train-demo``.

    The committed model was trained with ``--text-sink --steps 8000`` (other settings at
    their defaults), then fine-tuned twice, each from the folder before, with ``--text-sink
    --init-from ... --steps 3000 --warmup-steps 100 --ema-decay 0.998``: first with
    ``--category-weights "Pneumothorax=3,Lung Opacity=2,Pneumonia=1.5"``, then with
    ``--n-train 10000 --category-weights "Pneumothorax=6,Lung Opacity=2,Pneumonia=1.5"``
    (the same 5,000 images and 5,000 more). ``text_sink`` stays off by default so
    that runs from before the option, whose saved settings lack it, are read back as they
    were trained.

    ``init_from`` names an exported model folder to fine-tune: its VAE (kept as it is, with
    its latent scaling factor) and its UNet weights start the run, with a new optimizer;
    the training images are rendered from this config as usual, so pass the folder's data
    settings (seed, ``n_train``, finding fractions) to train on the same images.
    ``lr_schedule`` is diffusers' scheduler name (``constant``, ``linear``, ``cosine``, ...)
    over ``steps`` with ``warmup_steps`` of linear warm-up: ``linear`` is a cool-down to 0.
    ``category_weights`` draws the training pairs of some categories more (or less) often,
    e.g. ``"Pneumothorax=3"``; empty: every pair equally often. ``category_mask_weights``
    gives some categories' pairs their own ``mask_weight`` (e.g. ``"Pneumothorax=16"``: a
    thin rim's loss counts more than a large opacity's). ``trainable`` is ``all`` (every UNet
    weight) or ``cross-attention`` (only the cross-attention layers' query, key, value and
    output projections, the weights that tie words to places; the rest of a fine-tuned UNet
    stays as it was). ``device`` is where the VAE and UNet train (``cpu``, ``cuda``,
    ``cuda:1``, ...); the batches are drawn on the CPU from the seed either way, so a run
    draws the same pairs, noise and timesteps on any device."""

    out: str = "runs/demo"
    n_train: int = 5000
    n_val: int = 100
    seed: int = 0
    image_size: int = 64
    render_size: int = 256
    two_finding_fraction: float = 0.6
    three_finding_fraction: float = 0.0
    vae_steps: int = 300
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    steps: int = 12000
    batch: int = 32
    lr: float = 3e-4
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    mask_weight: float = 4.0
    min_snr_gamma: float = 0.0
    text_sink: bool = False
    cross_attention_at: str = "16,8"
    vae_factor: int = 4
    checkpoint_every: int = 500
    snapshot_every: int = 1000
    threads: int = 2
    bf16: bool = False
    max_minutes: float = 0.0
    init_from: str = ""
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    category_weights: str = ""
    category_mask_weights: str = ""
    trainable: str = "all"
    device: str = "cpu"

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_factor


def demo_unet(cross_attention_dim: int = 384, seed: int = 0, cross_attention_at: str = "16,8", latent_size: int = 16):
    """The demo UNet: three levels, at ``latent_size`` and its halves.

    On the default 16x16 latent the levels are 16x16, 8x8 and 4x4 (channels 48/96/96);
    on a 32x32 latent (``vae_factor=2``) they are 32x32, 16x16 and 8x8 (channels 32/64/96).

    ``cross_attention_at`` names the latent sizes whose blocks read the text, among the
    levels of at least 8x8. The default ``"16,8"`` gives 6 cross-attention layers in the
    same order on both latents: down 0 and up 4-5 at 16x16, down 1 and up 2-3 at 8x8;
    ``"16"`` keeps only the 16x16 ones (down 0, up 1-2).

    Small on purpose: on 2 CPU cores training speed, not capacity, limits how well the
    model learns to use the text (see DEMO_TRIALS)."""
    from diffusers import UNet2DConditionModel

    if latent_size not in LEVEL_CHANNELS:
        raise ValueError(f"latent_size must be one of {sorted(LEVEL_CHANNELS)}, got {latent_size}")
    sizes = (latent_size, latent_size // 2, latent_size // 4)
    levels = {int(v) for v in cross_attention_at.split(",") if v.strip()}
    allowed = {size for size in sizes if size >= 8}
    if not levels or not levels <= allowed:
        raise ValueError(
            f"cross_attention_at must name latent sizes among {sorted(allowed)} (latent {latent_size}), "
            f"got {cross_attention_at!r}"
        )
    down = tuple("CrossAttnDownBlock2D" if size in levels else "DownBlock2D" for size in sizes)
    up = tuple("CrossAttnUpBlock2D" if size in levels else "UpBlock2D" for size in reversed(sizes))
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=LEVEL_CHANNELS[latent_size],
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2D",
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=16,
        norm_num_groups=16,
    )


def demo_vae(seed: int = 0, factor: int = 4):
    """The demo autoencoder: 64 px, 1 channel, 3 latent channels, ``factor`` px per latent
    pixel (4: a 16x16 latent, the committed model; 2: a 32x32 latent)."""
    from diffusers import AutoencoderKL

    if factor not in (2, 4):
        raise ValueError(f"vae_factor must be 2 or 4, got {factor}")
    levels = factor.bit_length()  # one more block than downsamplings
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=3,
        block_out_channels=(16, 32, 64)[-levels:],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


# --- data ---------------------------------------------------------------------------------


@dataclass
class TrainingSet:
    """Images (N, 64, 64) float32 in [0, 1]; pairs: (image index, phrase, mask at latent size,
    category). ``pair_category`` is None for a training set cached before it was recorded."""

    images: np.ndarray
    pair_image: np.ndarray
    pair_phrase: list[str]
    pair_mask: np.ndarray
    pair_category: np.ndarray | None = None

    def save(self, path: Path) -> None:
        arrays = {"images": self.images, "pair_image": self.pair_image, "pair_mask": self.pair_mask}
        arrays["pair_phrase"] = np.array(self.pair_phrase)
        if self.pair_category is not None:
            arrays["pair_category"] = self.pair_category
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> TrainingSet:
        with np.load(path) as z:
            category = z["pair_category"].astype(str) if "pair_category" in z.files else None
            return cls(z["images"], z["pair_image"], [str(p) for p in z["pair_phrase"]], z["pair_mask"], category)


def parse_category_weights(spec: str, field: str = "category_weights") -> dict[str, float]:
    """``"Pneumothorax=3,Lung Opacity=2"`` -> {category: factor}; checked before any training.
    ``field`` names the setting in the error messages."""
    from .phantom import CATEGORIES

    factors = {}
    for item in filter(str.strip, spec.split(",")):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in CATEGORIES:
            raise LdmGroundError(
                f"{field}: {item.strip()!r} is not CATEGORY=FACTOR with a category among {list(CATEGORIES)}"
            )
        try:
            factors[name] = float(value)
        except ValueError:
            raise LdmGroundError(f"{field}: {item.strip()!r}: {value!r} is not a number") from None
        if factors[name] < 0:
            raise LdmGroundError(f"{field}: {item.strip()!r}: a weight cannot be negative")
    return factors


def _per_pair(data: TrainingSet, spec: str, field: str, default: float) -> torch.Tensor | None:
    """Each training pair's category value from ``spec`` (``default`` for the categories not
    named), float64; None for an empty spec."""
    factors = parse_category_weights(spec, field)
    if not factors:
        return None
    if data.pair_category is None:
        raise LdmGroundError(
            f"{field}: the cached train_set.npz has no pair categories (made by an older version); "
            "delete it to render the training set again"
        )
    return torch.tensor([factors.get(c, default) for c in data.pair_category], dtype=torch.float64)


def pair_weights(data: TrainingSet, spec: str) -> torch.Tensor | None:
    """Sampling weight of each training pair from ``spec`` (see :func:`parse_category_weights`;
    categories not named keep weight 1); None for an empty spec (uniform draws)."""
    weights = _per_pair(data, spec, "category_weights", 1.0)
    if weights is not None and not weights.sum() > 0:
        raise LdmGroundError(f"category_weights: {spec!r} leaves no training pair to draw")
    return weights


def pair_mask_weights(data: TrainingSet, cfg: DemoTrainConfig) -> torch.Tensor:
    """Each training pair's finding-mask loss weight: ``cfg.mask_weight``, or its category's
    value in ``cfg.category_mask_weights``."""
    weights = _per_pair(data, cfg.category_mask_weights, "category_mask_weights", cfg.mask_weight)
    if weights is None:
        return torch.full((len(data.pair_image),), float(cfg.mask_weight))
    return weights.float()


def make_training_set(n: int, seed: int, split: str, cfg: DemoTrainConfig, progress: bool = True) -> TrainingSet:
    """Render ``n`` phantom images and their (phrase, finding mask) pairs."""
    from tqdm.auto import tqdm

    from .heatmap import preprocess
    from .phantom import _image_rng, render_sample

    latent = cfg.latent_size
    images, pair_image, pair_phrase, pair_mask, pair_category = [], [], [], [], []
    for i in tqdm(range(n), desc=f"render {split}", disable=not progress):
        rng = _image_rng(seed, i, split)
        r = rng.random()  # number of findings: 3, 2 or 1 by the configured fractions
        multi = cfg.three_finding_fraction + cfg.two_finding_fraction
        k = 3 if r < cfg.three_finding_fraction else 2 if r < multi else 1
        img, findings = render_sample(rng, size=cfg.render_size, findings_per_image=k)
        small, _ = preprocess(img.astype(np.float32) / 255.0, cfg.image_size)
        images.append(small)
        for f in findings:
            m = torch.from_numpy(f.mask.astype(np.float32))[None, None]
            pair_image.append(i)
            pair_phrase.append(f.phrase)
            pair_category.append(f.category)
            pair_mask.append(F.adaptive_avg_pool2d(m, latent)[0, 0].numpy())
    return TrainingSet(
        np.stack(images), np.array(pair_image), pair_phrase, np.stack(pair_mask), np.array(pair_category)
    )


# --- training -----------------------------------------------------------------------------


def _cpu_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _save_state(path: Path, model, opt, ema, step: int, lr_sched=None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    state = {"opt": opt.state_dict(), "step": step}
    if lr_sched is not None:
        state["lr_sched"] = lr_sched.state_dict()
    torch.save(state, tmp)
    save_file(_cpu_weights(model), path.with_suffix(".model.safetensors"))
    if ema is not None:
        save_file(_cpu_weights(ema.module), path.with_suffix(".ema.safetensors"))
    tmp.replace(path)


def _load_state(path: Path, model, opt, ema, lr_sched=None) -> int:
    from safetensors.torch import load_file

    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=True)
    model.load_state_dict(load_file(path.with_suffix(".model.safetensors")))
    opt.load_state_dict(state["opt"])
    if lr_sched is not None and "lr_sched" in state:  # checkpoints before schedules had none
        lr_sched.load_state_dict(state["lr_sched"])
    if ema is not None:
        ema.module.load_state_dict(load_file(path.with_suffix(".ema.safetensors")))
    log.info("resumed %s at step %d", path.name, state["step"])
    return int(state["step"])


def _autocast(cfg: DemoTrainConfig):
    from contextlib import nullcontext

    return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()


def training_device(cfg: DemoTrainConfig) -> torch.device:
    """``cfg.device`` as a torch device, refused with the field named when it is not usable here."""
    try:
        device = torch.device(cfg.device)
    except RuntimeError as err:
        raise LdmGroundError(f"device: {cfg.device!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LdmGroundError(f"device: {cfg.device!r} asked for, but this torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise LdmGroundError(f"device: {cfg.device!r}; train-demo trains on 'cpu' or 'cuda[:N]'")
    return device


def machine_description(device: torch.device) -> str:
    """What trained the weights, for ``ldmground.json``: the GPU's name, else the CPU's."""
    import os
    import platform

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} GPU"
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        model = names[0] if names else model
    cores = f"{os.cpu_count()}-core " if os.cpu_count() else ""
    return f"{cores}{platform.machine()} CPU ({model or 'unknown model'}), {torch.get_num_threads()} threads, no GPU"


def train_vae(data: TrainingSet, cfg: DemoTrainConfig, out: Path, progress: bool = True):
    """Train the autoencoder (L1 + small KL); returns it with its latent scaling factor."""
    from tqdm.auto import tqdm

    device = training_device(cfg)
    vae = demo_vae(cfg.seed, cfg.vae_factor).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    ckpt = out / "vae.ckpt"
    start = _load_state(ckpt, vae, opt, None)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    images = torch.from_numpy(data.images)[:, None]
    vae.train()
    for step in tqdm(
        range(start, cfg.vae_steps), desc="train VAE", initial=start, total=cfg.vae_steps, disable=not progress
    ):
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=gen)
        x = (images[idx] * 2 - 1).to(device)
        with _autocast(cfg):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=gen)).sample
        loss = (rec.float() - x).abs().mean() + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            _save_state(ckpt, vae, opt, None, step + 1)
            log.info("VAE step %d loss %.4f", step + 1, loss.item())
    return vae.cpu().eval()


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Latent means of (N, S, S) images in [0, 1], on the CPU, encoded on the VAE's device."""
    device = next(vae.parameters()).device
    x = torch.from_numpy(images)[:, None] * 2 - 1
    return torch.cat([vae.encode(x[i : i + batch].to(device)).latent_dist.mean.cpu() for i in range(0, len(x), batch)])


def min_snr_weight(sched, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weight for v-prediction: min(SNR, gamma) / (SNR + 1) (Hang et al. 2023).

    It caps the weight of the nearly clean timesteps, where the text barely matters, so more
    of the loss falls on the noisy ones, where the phrase decides what is drawn where."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(sched, t)
    return snr.clamp(max=gamma) / (snr + 1)


TRAINABLE = ("all", "cross-attention")


def check_trainable(trainable: str) -> None:
    """Refuse an unknown ``trainable`` before any rendering or training."""
    if trainable not in TRAINABLE:
        raise LdmGroundError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")


def trainable_parameters(unet, trainable: str) -> list[torch.nn.Parameter]:
    """The UNet weights a run trains (``DemoTrainConfig.trainable``); the others are frozen."""
    check_trainable(trainable)
    unet.requires_grad_(trainable == "all")
    if trainable == "cross-attention":
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.requires_grad_(True)
    return [p for p in unet.parameters() if p.requires_grad]


def train_unet(
    data: TrainingSet,
    latents: torch.Tensor,
    cfg: DemoTrainConfig,
    out: Path,
    progress: bool = True,
    init: dict[str, torch.Tensor] | None = None,
):
    """Train the UNet with mask-weighted v-prediction loss and classifier-free dropout.

    ``init``: UNet weights to start from (a fine-tune) instead of the seeded initialisation."""
    from diffusers import DDIMScheduler
    from diffusers.optimization import get_scheduler
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from tqdm.auto import tqdm

    from .models import PAPER_SCHEDULER, encode_phrases, load_text_components

    tok, enc, info = load_text_components("minilm")
    unique = sorted(set(data.pair_phrase))
    states, masks = encode_phrases(tok, enc, [""] + unique, info["max_length"], text_sink=cfg.text_sink)
    phrase_index = torch.tensor([1 + unique.index(p) for p in data.pair_phrase])
    device = training_device(cfg)
    states, masks = states.to(device), masks.to(device)
    sched = DDIMScheduler.from_config(PAPER_SCHEDULER)
    unet = demo_unet(states.shape[-1], cfg.seed, cfg.cross_attention_at, cfg.latent_size)
    if init is not None:
        try:
            unet.load_state_dict(init)
        except RuntimeError as err:
            raise LdmGroundError(
                f"--init-from {cfg.init_from}: its UNet does not match this run's architecture "
                f"(cross_attention_at={cfg.cross_attention_at!r}, vae_factor={cfg.vae_factor}): {err}"
            ) from None
    unet.to(device)
    opt = torch.optim.AdamW(trainable_parameters(unet, cfg.trainable), lr=cfg.lr, weight_decay=1e-2)
    name = "constant_with_warmup" if cfg.lr_schedule == "constant" and cfg.warmup_steps else cfg.lr_schedule
    lr_sched = get_scheduler(name, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
    ckpt = out / "unet.ckpt"
    try:
        start = _load_state(ckpt, unet, opt, ema, lr_sched)
    except ValueError as err:  # the optimizer holds another parameter list: another --trainable
        raise LdmGroundError(
            f"{ckpt}: its optimizer state does not match the weights this run trains "
            f"(resume with the --trainable it was started with): {err}"
        ) from None
    gen = torch.Generator().manual_seed(cfg.seed + 2 + start)  # a resumed run draws new batches
    pair_image = torch.from_numpy(data.pair_image)
    pair_mask = torch.from_numpy(data.pair_mask)
    draw_weights = pair_weights(data, cfg.category_weights)
    mask_weights = pair_mask_weights(data, cfg)
    t0 = time.time()
    unet.train()
    bar = tqdm(range(start, cfg.steps), desc="train UNet", initial=start, total=cfg.steps, disable=not progress)
    for step in bar:
        if draw_weights is None:
            idx = torch.randint(len(pair_image), (cfg.batch,), generator=gen)
        else:
            idx = torch.multinomial(draw_weights, cfg.batch, replacement=True, generator=gen)
        z0 = latents[pair_image[idx]]
        pidx = phrase_index[idx].clone()
        drop = torch.rand(cfg.batch, generator=gen) < cfg.cfg_dropout
        pidx[drop] = 0
        finding = mask_weights[idx] * (~drop).float()  # no finding weight for an empty prompt
        weight = 1 + finding[:, None, None, None] * pair_mask[idx][:, None]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch,), generator=gen)
        if cfg.min_snr_gamma:
            weight = weight * min_snr_weight(sched, t, cfg.min_snr_gamma)[:, None, None, None]
        z0, noise, t, weight, pidx = (v.to(device) for v in (z0, noise, t, weight, pidx))
        zt = sched.add_noise(z0, noise, t)
        target = sched.get_velocity(z0, noise, t)
        with _autocast(cfg):
            pred = unet(zt, t, encoder_hidden_states=states[pidx], encoder_attention_mask=masks[pidx]).sample
        loss = (weight * (pred.float() - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.update_parameters(unet)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_sched.get_last_lr()[0]:.1e}")
        done = step + 1
        if done % cfg.snapshot_every == 0:
            from safetensors.torch import save_file

            # EMA snapshots let the grounding-vs-steps curve be measured afterwards.
            save_file(_cpu_weights(ema.module), out / f"unet-ema-{done:06d}.safetensors")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _save_state(ckpt, unet, opt, ema, done, lr_sched)
            log.info("UNet step %d loss %.4f (%.1f min)", done, loss.item(), (time.time() - t0) / 60)
        if cfg.max_minutes and time.time() - t0 > cfg.max_minutes * 60:
            _save_state(ckpt, unet, opt, ema, done, lr_sched)
            log.info("time budget reached at step %d; rerun the same command to continue", done)
            return ema.module.cpu().eval(), done
    return ema.module.cpu().eval(), cfg.steps


def export_demo(
    vae, unet, scaling_factor: float, cfg: DemoTrainConfig, steps_done: int, dest: Path, notes: dict
) -> Path:
    """Write the demo model folder (safetensors + hashes) that ``load_pipeline`` reads."""
    from .models import PAPER_SCHEDULER, write_model_folder

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
    from .models import PIPELINE_FILE

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


_HELP = {
    "init_from": "model folder to fine-tune (its VAE and UNet; new optimizer)",
    "warmup_steps": "linear learning-rate warm-up steps",
    "max_minutes": "stop after this many minutes (0: no limit); rerun to continue",
    "category_weights": "draw some categories' pairs more often, e.g. 'Pneumothorax=3,Lung Opacity=2'",
    "category_mask_weights": "give some categories' pairs their own --mask-weight, e.g. 'Pneumothorax=16'",
    "trainable": "UNet weights to train: all, or cross-attention (only the text's query/key/value/output)",
    "device": "where the VAE and UNet train: cpu, cuda, cuda:N (the batches are drawn on the CPU either way)",
}


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train-demo", help="train the phantom demo LDM from scratch, or fine-tune one (--init-from); resumable"
    )
    from diffusers.optimization import SchedulerType

    defaults = DemoTrainConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif name == "lr_schedule":
            choices = [t.value for t in SchedulerType if t.value != "piecewise_constant"]  # it needs step rules
            p.add_argument(flag, choices=choices, default=value, help=f"diffusers LR schedule (default: {value})")
        elif name == "trainable":
            p.add_argument(flag, choices=TRAINABLE, default=value, help=f"{_HELP[name]} (default: {value})")
        else:
            p.add_argument(flag, type=type(value), default=value, help=f"{_HELP.get(name, '')} (default: {value})")
    p.add_argument("--export", help="model folder to write at the end (default: OUT/model)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    fields = {k: getattr(args, k) for k in asdict(DemoTrainConfig())}
    cfg = DemoTrainConfig(**fields)
    dest = train_demo(cfg, Path(args.export) if args.export else None)
    print(f"wrote demo model {dest}")
    return 0


# --- checking the demo model ------------------------------------------------------------


def swapped_side_csv(csv: str | Path, out_csv: str | Path) -> Path:
    """A copy of an MS-CXR-format CSV keeping only lateralised phrases, with sides swapped.

    Boxes stay on the true finding, so a model that reads the side word points elsewhere.
    """
    import pandas as pd

    df = pd.read_csv(csv)
    lateral = df["label_text"].str.contains(r"\b(?:left|right)\b", case=False, regex=True)
    out = df[lateral].copy()
    out["label_text"] = out["label_text"].map(swap_sides)
    out_csv = Path(out_csv)
    out.to_csv(out_csv, index=False)
    return out_csv


def lateral_csv(csv: str | Path, out_csv: str | Path) -> Path:
    """The lateralised rows of a CSV, unchanged (the partner of :func:`swapped_side_csv`)."""
    import pandas as pd

    df = pd.read_csv(csv)
    df[df["label_text"].str.contains(r"\b(?:left|right)\b", case=False, regex=True)].to_csv(out_csv, index=False)
    return Path(out_csv)


def snapshot_pipeline(run_dir: str | Path, snapshot: str | Path, scaling_factor: float):
    """A :class:`GroundingPipeline` from a training run's VAE and an EMA UNet snapshot."""
    from safetensors.torch import load_file

    from .models import PAPER_SCHEDULER, GroundingPipeline, load_text_components

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


# Gaussian sigmas (px at 512) that select_demo_preset tries; 32 px at 512 is 4 px of a
# 64-px model input, half a cell of its 8 x 8 maps.
SIGMAS = (0.0, 4.0, 8.0, 16.0, 32.0)


def select_demo_preset(
    pipe,
    val_csv: str | Path,
    images: str | Path | None = None,
    n_steps: int = 25,
    contrasts: Sequence[float] = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9),
    top: int = 6,
):
    """Score grounding settings on a validation split (never the test split).

    One inversion per image records every layer at every step, and the maps of the eight
    finding names (the ``contrast`` references); each candidate is then a re-aggregation.
    First every timestep window x layer group x blur x Otsu without contrast; then the
    ``top`` best of those with Otsu and the ``top`` best without, each with every weight in
    ``contrasts``. Returns the per-candidate
    macro means (over categories) sorted best first by pointing + CNR, with columns
    ``window``, ``layers``, ``sigma``, ``otsu``, ``contrast`` and the metrics.
    """
    import itertools

    import pandas as pd

    from .analysis import cache_samples, sweep
    from .config import GroundingConfig
    from .datasets.mscxr import load_mscxr

    samples, _ = load_mscxr(val_csv, images)
    base = GroundingConfig(num_inference_steps=n_steps, window=(0.0, 1.0), layers=None, otsu=False)
    folder = images or Path(val_csv).parent
    cached = cache_samples(pipe, samples, folder, base, keep_tokens=False, references=base.reference_phrases)
    first = cached[0].maps
    sizes = {layer: tuple(m.shape[-2:]) for (layer, _), m in first.items()}
    groups: dict[str, list[int] | None] = {"all": None}
    for shape in sorted(set(sizes.values()), reverse=True):
        groups[f"{shape[0]}x{shape[1]}"] = sorted(i for i, s in sizes.items() if s == shape)
    windows = [(0.0, 1.0), (0.2, 0.8), (0.4, 0.6), (0.1, 0.5), (0.5, 0.9)]
    options = {}
    for win, (gname, layers), sigma, otsu in itertools.product(windows, groups.items(), SIGMAS, [False, True]):
        steps = list(base.replace(window=win).window_indices())
        labels = (f"{win[0]:.1f}-{win[1]:.1f}", gname, sigma, otsu)
        options[labels] = {"layers": layers, "steps": steps, "sigma": sigma, "otsu": otsu}
    keys, metrics = ["window", "layers", "sigma", "otsu", "contrast"], ["pointing", "cnr", "cnr_signed", "miou"]

    def candidates(labels_list, weight):
        for labels in labels_list:
            yield dict(zip(keys, (*labels, weight), strict=True)), {**options[labels], "contrast": weight}

    plain = rank_settings(sweep(cached, candidates(options, 0.0), base, desc="candidates"), keys, metrics)
    best = list(plain.groupby("otsu").head(top)[keys[:-1]].itertuples(index=False, name=None))
    variants = [v for w in contrasts for v in candidates(best, w)]
    contrasted = rank_settings(sweep(cached, variants, base, desc="contrast"), keys, metrics)
    table = pd.concat([plain, contrasted], ignore_index=True)
    return table.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def rank_settings(table, keys: list[str], metrics: list[str]):
    """Macro means (over categories) of a sweep's per-sample rows, one row per setting
    (``keys``), best first by ``score`` = pointing + CNR."""
    per_category = table.groupby(keys + ["category"])[metrics].mean()
    macro = per_category.groupby(keys).mean().reset_index()
    macro["score"] = macro["pointing"] + macro["cnr"]
    return macro.sort_values("score", ascending=False).reset_index(drop=True)
