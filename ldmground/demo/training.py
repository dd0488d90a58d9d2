"""Training the demo model: its configuration, the phantom training set, and the VAE and
UNet training loops.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LdmGroundError
from .checkpoints import _cpu_weights, _load_state, _save_state
from .networks import demo_unet, demo_vae

log = logging.getLogger(__name__)


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
    from ..datasets.phantom.anatomy import CATEGORIES

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

    from ..datasets.phantom.render import _image_rng, render_sample
    from ..method.heatmap import preprocess

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

    from ..models.pipeline import encode_phrases
    from ..models.text import load_text_components
    from ..models.tiny import PAPER_SCHEDULER

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
