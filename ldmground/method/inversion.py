"""Deterministic DDIM inversion that reads cross-attention on the way up.

The inversion walks the clean latent z_0 up the noise levels t_0 < t_1 < ... of a diffusers
DDIM grid (the sampling grid, ascending). The path follows the prediction for the empty
prompt (guidance 0): from the prediction at (x_i, t_i) it takes the clean estimate x0 and
noise estimate eps, then x_{i+1} = sqrt(a_{i+1}) x0 + sqrt(1 - a_{i+1}) eps. The phrases are
evaluated only at the steps whose attention is read, and the loop ends after the last such
step, so for the paper's settings an image costs 180 + 60 = 240 UNet evaluations per phrase
set instead of 334 x 2.

The phrase rows are a UNet call of their own, after the empty-prompt call of the same step:
the path then never depends on the phrases, not even in the last bit (a batch's size can
change a kernel's rounding), so the latents at the read steps can be kept
(``keep_steps``) and a new phrase grounded later on them alone
(:class:`ldmground.method.trajectory.TrajectoryCache`). Several images walk together when
``latent`` has several rows (one empty-prompt batch per step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler

from .attention import AttentionRecorder

PredictFn = Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor | None], torch.Tensor]


class IntegerTrailingDDIMScheduler(DDIMScheduler):
    """DDIM with the grid of the authors' patched ``set_timesteps`` ("trailing" spacing with
    an integer step ratio): t = T - 1 - k r, r = T // N, every k with t >= 0. For T = 1000
    and N = 300 that is 334 steps, 999, 996, ..., 0; for N = 100, 999, 989, ..., 9."""

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        total = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= total:
            raise ValueError(f"num_inference_steps must be in 1..{total}, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        grid = torch.arange(total - 1, -1, -(total // num_inference_steps), dtype=torch.int64)
        self.timesteps = grid.to(device)


DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``GroundingConfig.dtype`` -> the autocast dtype (None: fp32, no autocast)."""


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op CPU thread count at ``n`` (None: unchanged).

    The count decides how some CPU kernels split their sums, so the same count gives the
    same bits in every process (see ``GroundingConfig.threads``).
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)



def make_scheduler(scheduler_config: dict, spacing: str | None = None) -> DDIMScheduler:
    """A DDIMScheduler from any diffusers scheduler config (DDPM, DDIM, PNDM, ... keys).

    ``spacing``: diffusers' ``timestep_spacing`` names, or ``"trailing-integer"`` for
    :class:`IntegerTrailingDDIMScheduler`; None keeps the config's own.
    """
    if spacing == "trailing-integer":
        return IntegerTrailingDDIMScheduler.from_config(dict(scheduler_config), timestep_spacing="trailing")
    overrides = {"timestep_spacing": spacing} if spacing else {}
    return DDIMScheduler.from_config(dict(scheduler_config), **overrides)


def inversion_timesteps(scheduler: DDIMScheduler, num_steps: int) -> list[int]:
    """The sampling grid of ``num_steps`` steps in ascending (inversion) order."""
    scheduler.set_timesteps(num_steps)
    return sorted(int(t) for t in scheduler.timesteps)


def split_prediction(pred: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, prediction_type: str):
    """(x0, eps) from a model output at noise level ``alpha`` (= alphas_cumprod[t])."""
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction_type == "epsilon":
        return (x - s * pred) / a, pred
    if prediction_type == "v_prediction":
        return a * x - s * pred, a * pred + s * x
    if prediction_type == "sample":
        return pred, (x - a * pred) / s
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


@dataclass
class InversionResult:
    """What the inversion produced.

    Attributes:
        latent: the last latent reached, (B, C, h, w).
        timesteps: the train-step t of every evaluated step, ascending.
        unet_evals: number of UNet evaluations (batch rows), empty prompt and phrases.
        trajectory: latents x_0..x_k when ``keep_trajectory`` was set, else empty.
        kept: step index -> latent (B, C, h, w) at that step (the UNet's input there), for
            every index of ``keep_steps`` that the walk reached.
    """

    latent: torch.Tensor
    timesteps: list[int]
    unet_evals: int
    trajectory: list[torch.Tensor]
    kept: dict[int, torch.Tensor] = field(default_factory=dict)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device`` in ``dtype``; a no-op context for None (fp32)."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def evaluate_phrases(
    predict: PredictFn,
    x: torch.Tensor,
    t: int,
    phrases: torch.Tensor,
    phrase_mask: torch.Tensor | None,
    recorder: AttentionRecorder | None,
    step: int,
    autocast_dtype: torch.dtype | None = None,
) -> int:
    """One UNet call of the phrase rows at step ``step`` (timestep ``t``), recorded.

    ``x``: (P, C, h, w), the latent of each phrase's image at this step, row by row with
    ``phrases`` (P, L, D). Returns the number of evaluations (P).
    """
    if recorder is not None:
        recorder.active, recorder.step = True, step
    try:
        with torch.no_grad(), autocast_context(x.device, autocast_dtype):
            predict(x.to(phrases.dtype), t, phrases, phrase_mask)
    finally:
        if recorder is not None:
            recorder.active = False
    return x.shape[0]


def ddim_invert(
    predict: PredictFn,
    latent: torch.Tensor,
    scheduler: DDIMScheduler,
    num_steps: int,
    uncond: torch.Tensor,
    uncond_mask: torch.Tensor | None = None,
    phrases: torch.Tensor | None = None,
    phrase_mask: torch.Tensor | None = None,
    read_steps: Sequence[int] | range = (),
    recorder: AttentionRecorder | None = None,
    stop_after_last_read: bool = True,
    autocast_dtype: torch.dtype | None = None,
    keep_trajectory: bool = False,
    progress: bool = False,
    step: str = "ddim",
    phrase_latents: Sequence[int] | None = None,
    keep_steps: Sequence[int] | range = (),
) -> InversionResult:
    """Invert ``latent`` with DDIM, evaluating the phrases only at ``read_steps``.

    Args:
        predict: ``predict(x, t, context, mask) -> model output`` (a UNet call).
        latent: scaled clean latents z_0, (B, C, h, w): B images walk together, their
            empty-prompt rows in one UNet batch per step.
        scheduler: a DDIMScheduler (its config gives betas, prediction type and spacing).
        num_steps: N, the number of steps of the grid.
        uncond: empty-prompt encoder states (1, L, D), shared by the B images.
        phrases: phrase encoder states (P, L, D), or None.
        read_steps: step indices (0..N-1, ascending order) at which the phrases run and
            ``recorder`` (if any) records. The phrases are a second UNet call of the step
            (see the module's docstring); they never change the path.
        stop_after_last_read: end the walk at the last read step (what grounding needs);
            False walks all N steps (a full inversion).
        autocast_dtype: run the UNet under CPU/GPU autocast in this dtype.
        progress: show a progress bar over the steps (for slow, full-size models).
        step: ``"ddim"``: from the prediction at (x, t_i), the DDIM inverse step to t_{i+1}.
            ``"lagged"``: the step the authors define but do not bind (see
            ``GroundingConfig.inversion_step``): the prediction at t_i is read as if x were
            at level t_i - r (r = T // N; alpha 1 below 0), and x moves to level t_i.
        phrase_latents: for each phrase row, the index (0..B-1) of the image it reads;
            default: all 0 (one image).
        keep_steps: step indices whose latents to return in ``InversionResult.kept``.
    """
    from tqdm.auto import tqdm

    if step not in ("ddim", "lagged"):
        raise ValueError(f"unknown inversion step {step!r}; use 'ddim' or 'lagged'")
    ts = inversion_timesteps(scheduler, num_steps)
    read = set(read_steps)
    keep = set(keep_steps)
    last = max(read) if (read and stop_after_last_read) else len(ts) - 1
    alphas = scheduler.alphas_cumprod.to(latent.device)
    ptype = scheduler.config.prediction_type
    n_phr = 0 if phrases is None else phrases.shape[0]
    n_img = latent.shape[0]
    rows = [0] * n_phr if phrase_latents is None else list(phrase_latents)
    if len(rows) != n_phr or any(not 0 <= r < n_img for r in rows):
        raise ValueError(f"phrase_latents must give one image index in 0..{n_img - 1} per phrase row, got {rows}")
    x = latent.float()
    ctx = uncond.expand(n_img, *uncond.shape[1:])
    mask = None if uncond_mask is None else uncond_mask.expand(n_img, *uncond_mask.shape[1:])
    evals = 0
    trajectory = [x] if keep_trajectory else []
    kept: dict[int, torch.Tensor] = {}
    for i in tqdm(range(last + 1), desc="DDIM inversion", unit="step", disable=not progress, leave=False):
        t = ts[i]
        if i in keep:
            kept[i] = x
        with torch.no_grad(), autocast_context(latent.device, autocast_dtype):
            out = predict(x.to(ctx.dtype), t, ctx, mask)
        evals += n_img
        if i in read and n_phr > 0:
            evals += evaluate_phrases(predict, x[rows], t, phrases, phrase_mask, recorder, i, autocast_dtype)
        if i == len(ts) - 1 or (stop_after_last_read and i == last and read):
            break
        if step == "lagged":
            before = t - scheduler.config.num_train_timesteps // num_steps
            a_here = alphas[before] if before >= 0 else torch.ones((), device=alphas.device)
            x0, eps = split_prediction(out.float(), x, a_here, ptype)
            a_next = alphas[t]
        else:
            x0, eps = split_prediction(out.float(), x, alphas[t], ptype)
            a_next = alphas[ts[i + 1]]
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        if keep_trajectory:
            trajectory.append(x)
    return InversionResult(latent=x, timesteps=ts[: last + 1], unet_evals=evals, trajectory=trajectory, kept=kept)
