"""A plain re-implementation of the authors' released procedure, for the oracle test.

It follows the steps of ``vios-s/ldm-phrase-grounding`` (``eval_ldm.py``, ``sampler.py``,
``data/utils.py``, ``metrics/eval_metrics.py``) on MONAI GenerativeModels' own networks and
scheduler, and shares no code with ldmground's method path: no ``preprocess``, no
``encode_image``, no inversion loop, no attention recorder, no metrics of ours. Slow on
purpose: it walks all 334 steps with a batch of [empty prompt, phrase] and keeps every step's
cross-attention probabilities of the layers it reads, as the authors' code does.
"""

from __future__ import annotations

from math import ceil, floor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai import transforms
from scipy import ndimage
from skimage.filters import threshold_multiotsu

PAPER_LAYERS = (3, 4, 6, 7)
SCALE_FACTOR = 0.3


def load_like_authors(path: Path) -> torch.Tensor:
    """Transform "ddpm" of the authors' ``data/utils.py``: (1, 512, 512) float in [0, 1]."""
    pipeline = transforms.Compose(
        [
            transforms.LoadImage(reader="pilreader", image_only=True),
            transforms.EnsureChannelFirst(),
            transforms.Lambda(lambda x: x[0, :, :][None,]),
            transforms.Rotate90(k=-1, spatial_axes=(0, 1)),  # MONAI's PIL reader transposes
            transforms.Flip(spatial_axis=1),
            transforms.ScaleIntensityRange(a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    image = torch.as_tensor(pipeline(str(path))).float()
    # torchvision 0.16's Resize(512) on a tensor (the authors' pinned version): short side to
    # 512, long side int(512 * long / short), bilinear without antialiasing.
    _, h, w = image.shape
    if w <= h:
        size = (int(512 * h / w), 512)
    else:
        size = (512, int(512 * w / h))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]
    return torch.as_tensor(transforms.CenterSpatialCrop(roi_size=(512, 512))(image))


def prompt_embeds(prompts: list[str], tokenizer, text_encoder) -> torch.Tensor:
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        return text_encoder(ids.input_ids)[0]


def attn2_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module registered as ``attn2``, in registration order (the authors' lookup)."""
    return [m for name, m in unet.named_modules() if name.rsplit(".", 1)[-1] == "attn2"]


def authors_scheduler(schedulers, num_steps: int = 300):
    """MONAI's DDIMScheduler with the grid of the authors' patched ``set_timesteps``
    ("trailing", integer ratio): t = 999, 996, ..., 0 for 300 steps."""
    sched = schedulers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0015,
        beta_end=0.0205,
        schedule="scaled_linear_beta",
        prediction_type="v_prediction",
        clip_sample=False,
    )
    sched.num_inference_steps = num_steps
    sched.timesteps = torch.from_numpy(np.arange(1000, 0, -(1000 // num_steps)).astype(np.int64) - 1)
    return sched


def lagged_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor):
    """The DDIM inverse step that the authors' ``get_models.py`` defines but never binds: the
    output at t is read with the alpha of t - r (1 below 0) and the sample moves to level t.
    Bind it to a MONAI DDIMScheduler (v-prediction only) as ``reversed_step``."""
    if self.prediction_type != "v_prediction":
        raise NotImplementedError("the oracle's lagged step covers v-prediction only")
    before = min(int(timestep) - self.num_train_timesteps // self.num_inference_steps, self.num_train_timesteps - 1)
    alpha = self.alphas_cumprod[before] if before >= 0 else self.final_alpha_cumprod
    alpha_next = self.alphas_cumprod[timestep]
    x0 = alpha**0.5 * sample - (1 - alpha) ** 0.5 * model_output
    eps = alpha**0.5 * model_output + (1 - alpha) ** 0.5 * sample
    return alpha_next**0.5 * x0 + (1 - alpha_next) ** 0.5 * eps, x0


def heatmap_like_authors(image: torch.Tensor, prompt: str, autoencoder, unet, scheduler, tokenizer, text_encoder):
    """``Sampler.sampling_fn`` with guidance 0 and the paper's window.

    Returns a dict: ``heatmap`` (512, 512), the blurred min-max map before the Otsu mask
    (``normalised``) and the Otsu ``threshold``.
    """
    num_steps = scheduler.num_inference_steps
    t_min, t_max = num_steps // 2 - 10 * num_steps // 100, num_steps // 2 + 10 * num_steps // 100
    context = prompt_embeds(["", prompt], tokenizer, text_encoder)
    layers = attn2_layers(unet)
    kept: dict[int, list[torch.Tensor]] = {i: [] for i in PAPER_LAYERS}

    def keeper(index):
        def hook(module, args, kwargs):
            x, ctx = args[0], kwargs.get("context", args[1] if len(args) > 1 else None)
            q = module.reshape_heads_to_batch_dim(module.to_q(x))
            k = module.reshape_heads_to_batch_dim(module.to_k(ctx))
            empty = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype)
            probs = torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=module.scale).softmax(dim=-1)
            kept[index].append(probs[1].clone())  # the phrase's row (one head)

        return hook

    handles = [layers[i].register_forward_pre_hook(keeper(i), with_kwargs=True) for i in PAPER_LAYERS]
    try:
        with torch.no_grad():
            z = autoencoder.encode(image[None])[0] * SCALE_FACTOR
            for t in scheduler.timesteps.flip(0):
                out = unet(torch.cat([z] * 2), timesteps=torch.Tensor((t,)).long(), context=context)
                uncond, text = out.chunk(2)
                z, _ = scheduler.reversed_step(uncond + 0.0 * (text - uncond), t, z)
    finally:
        for h in handles:
            h.remove()

    ids = tokenizer(prompt, max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    first, stop = 1, ids.shape[-1] - 1
    per_layer = []
    for i in PAPER_LAYERS:
        maps = torch.stack(kept[i], -1)  # (HW, 77, steps)
        side = int(np.sqrt(maps.shape[0]))
        maps = maps.reshape(side, side, *maps.shape[1:])[..., first:stop, t_min:t_max].mean(-2)
        low, high = maps.amin(dim=(0, 1)), maps.amax(dim=(0, 1))
        maps = ((maps - low) / (high - low)).permute(2, 0, 1)
        per_layer.append(F.interpolate(maps[None], size=(512, 512), mode="bilinear", align_corners=False)[0])
    heat = torch.stack(per_layer).mean((0, 1))
    heat = torch.tensor(ndimage.gaussian_filter(heat.numpy(), sigma=(2.5, 2.5), order=0))
    heat = (heat - heat.min()) / (heat.max() - heat.min())
    thresholds = torch.from_numpy(threshold_multiotsu(heat.numpy(), classes=2))
    final = heat * (heat[..., None] > thresholds[None, None, :]).any(-1).float()
    return {"normalised": heat, "threshold": float(thresholds[0]), "heatmap": final}


def to_original_like_authors(heat: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Nearest resize to the short side, NaN padding floor/ceil (``eval_ldm.py``)."""
    side = min(width, height)
    heat = F.interpolate(heat[None, None], size=(side, side), mode="nearest")[0, 0]
    mw, mh = width - side, height - side
    return F.pad(heat, (floor(mw / 2), ceil(mw / 2), floor(mh / 2), ceil(mh / 2)), value=float("nan"))


# --- metrics/eval_metrics.py ---------------------------------------------------------------


def _nanvar(x: torch.Tensor) -> torch.Tensor:
    return (x - x.nanmean()).square().nanmean()


def cnr_like_authors(heat: torch.Tensor, boxes, signed: bool = False) -> float:
    heat = heat.clone()
    values = []
    for x, y, w, h in boxes:
        inside = heat[y : y + h, x : x + w]
        mu_in, var_in = inside.nanmean(), _nanvar(inside)
        heat[y : y + h, x : x + w] = float("nan")
        mu_out, var_out = heat.nanmean(), _nanvar(heat)
        diff = mu_in - mu_out if signed else (mu_in - mu_out).abs()
        values.append(torch.nan_to_num(diff / torch.sqrt(var_in + var_out)).item())
    return sum(values) / len(values)


def miou_like_authors(heat: torch.Tensor, boxes, thresholds=(0.1, 0.2, 0.3, 0.4, 0.5)) -> float:
    target = torch.zeros_like(heat, dtype=torch.bool)
    for x, y, w, h in boxes:
        target[y : y + h, x : x + w] = True
    ious = [((heat > t) & target).sum().item() / ((heat > t) | target).sum().item() for t in thresholds]
    return float(np.mean(ious))


def binned_auroc_like_authors(heat: torch.Tensor, boxes) -> float:
    """torcheval's ``binary_binned_auroc(threshold=5)`` written out: counts of score >= t for
    t = 1, .75, .5, .25, 0 after (0, 0), trapezoid, divided by the counts at t = 0."""
    target = torch.zeros_like(heat, dtype=torch.bool)
    for x, y, w, h in boxes:
        target[y : y + h, x : x + w] = True
    score, target = heat.flatten(), target.flatten()
    tp, fp = [0.0], [0.0]
    for t in torch.linspace(0, 1, 5).flip(0):
        predicted = score >= t
        tp.append(float((predicted & target).sum()))
        fp.append(float((predicted & ~target).sum()))
    if tp[-1] * fp[-1] == 0:
        return 0.5
    return float(
        torch.trapz(torch.tensor(tp, dtype=torch.float64), torch.tensor(fp, dtype=torch.float64)) / (tp[-1] * fp[-1])
    )
