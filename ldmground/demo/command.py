"""The ``ldmground train-demo`` command.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from .export import train_demo
from .training import TRAINABLE, DemoTrainConfig

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
