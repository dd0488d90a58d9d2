"""Checkpoint bookkeeping of a training run: save and restore model, optimiser, EMA and
schedule state.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


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
