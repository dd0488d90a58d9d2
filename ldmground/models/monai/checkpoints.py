"""The bundle's checkpoints: which key layout they use (GenerativeModels 0.2.x or MONAI core),
loading with ``weights_only=True`` and strict loading that names missing or unexpected keys.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ...errors import LdmGroundError
from .bundle import AUTOENCODER_FILE, GENERATIVE, MONAI_CORE, UNET_FILE

# --- checkpoint key layouts ------------------------------------------------------------------

_AE_CORE = re.compile(r"\.attn\.(to_[qkv]|qkv|out_proj)\.|^decoder\.blocks\.\d+\.postconv\.")
_AE_OLD = re.compile(r"^(en|de)coder\.blocks\.\d+\.(to_[qkv]|proj_attn)\.|^decoder\.blocks\.\d+\.conv\.conv\.")
_UNET_CORE = re.compile(r"\.attn[12]\.out_proj\.|\.attn[12]\.qkv\.|\.upsampler\.postconv\.")
_UNET_OLD = re.compile(r"\.attn[12]\.to_out\.0\.|\.upsampler\.conv\.conv\.")


def _layout(state: dict, core: re.Pattern, old: re.Pattern, what: str, path: Path) -> str:
    new_keys = sorted(k for k in state if core.search(k))
    old_keys = sorted(k for k in state if old.search(k))
    if new_keys and old_keys:
        raise LdmGroundError(
            f"{path}: the {what} mixes GenerativeModels 0.2.x keys ({_fmt(old_keys, 3)}) and MONAI core "
            f"keys ({_fmt(new_keys, 3)})"
        )
    return MONAI_CORE if new_keys else GENERATIVE


def _split_qkv(out: dict, prefix: str, p: str, v: torch.Tensor):
    for name, part in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0), strict=True):
        out[f"{prefix}.{name}.{p}"] = part.clone()


def _put(out: dict, key: str, v: torch.Tensor, path: Path):
    if key in out:
        raise LdmGroundError(f"{path}: two checkpoint keys stand for {key}")
    out[key] = v


def autoencoder_keys(state: dict[str, torch.Tensor], path: Path = Path(AUTOENCODER_FILE)) -> tuple[dict, str]:
    """(state in GenerativeModels 0.2.x names, layout it came in).

    MONAI core's ``X.attn.to_q`` / ``X.attn.qkv`` become ``X.to_q``... and its
    ``decoder.blocks.N.postconv`` becomes ``decoder.blocks.N.conv``; MONAI core's applied
    ``X.attn.out_proj`` is kept as ``X.out_proj`` (0.2.x's ``proj_attn`` is never applied).
    """
    layout = _layout(state, _AE_CORE, _AE_OLD, "autoencoder", path)
    if layout == GENERATIVE:
        return dict(state), layout
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = re.match(r"^(.*)\.attn\.qkv\.(weight|bias)$", k)
        if m:
            _split_qkv(out, m.group(1), m.group(2), v)
            continue
        k2 = re.sub(r"\.attn\.(to_[qkv]|out_proj)\.", r".\1.", k)
        k2 = re.sub(r"^(decoder\.blocks\.\d+)\.postconv\.", r"\1.conv.", k2)
        _put(out, k2, v, path)
    return out, layout


def unet_keys(state: dict[str, torch.Tensor], path: Path = Path(UNET_FILE)) -> tuple[dict, str]:
    """(state in GenerativeModels 0.2.x names, layout it came in).

    MONAI core's ``attnN.out_proj`` becomes ``attnN.to_out.0``, ``attn1.qkv`` is split into
    ``to_q/to_k/to_v`` and ``upsampler.postconv`` becomes ``upsampler.conv``. A MONAI core
    attention without ``out_proj`` (``include_fc=False``) has an identity output projection.
    """
    layout = _layout(state, _UNET_CORE, _UNET_OLD, "diffusion model", path)
    if layout == GENERATIVE:
        return dict(state), layout
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = re.match(r"^(.*\.attn[12])\.qkv\.(weight|bias)$", k)
        if m:
            _split_qkv(out, m.group(1), m.group(2), v)
            continue
        k2 = re.sub(r"\.(attn[12])\.out_proj\.", r".\1.to_out.0.", k)
        k2 = re.sub(r"\.upsampler\.postconv\.", ".upsampler.conv.", k2)
        _put(out, k2, v, path)
    for k in [k for k in out if re.search(r"\.attn[12]\.to_q\.weight$", k)]:
        block = k.removesuffix(".to_q.weight")
        w = out[k]
        if f"{block}.to_out.0.weight" not in out and w.shape[0] == w.shape[1]:
            out[f"{block}.to_out.0.weight"] = torch.eye(w.shape[0], dtype=w.dtype)
            out[f"{block}.to_out.0.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    return out, layout


# --- key mapping ---------------------------------------------------------------------------


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LdmGroundError(f"bundle file missing: {path} (download it via the bundle's large_files.yml)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling problem is a bad file
        raise LdmGroundError(f"cannot read {path} as a PyTorch state dict: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LdmGroundError(f"{path} does not hold a state dict of tensors")
    return {str(k): v for k, v in state.items()}


def _fmt(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _strict_load(
    model: nn.Module,
    mapped: dict[str, torch.Tensor],
    unexpected: list[str],
    missing: list[str],
    what: str,
    path: Path,
    layout: str = GENERATIVE,
):
    """Load ``mapped`` into ``model``; unexpected or missing source keys, unfilled or
    mis-shaped targets are one error naming them all."""
    target = model.state_dict()
    problems = []
    named = "" if layout == GENERATIVE else ", named as GenerativeModels 0.2.x keys"
    if missing:
        problems.append(f"missing keys (expected in the checkpoint{named}): {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (not part of the bundle's {what}): {_fmt(unexpected)}")
    unfilled = [k for k in target if k not in mapped]
    if unfilled and not missing:
        problems.append(f"diffusers parameters left unfilled: {_fmt(unfilled)}")
    extra = [k for k in mapped if k not in target]
    if extra:
        problems.append(f"keys mapped to no parameter: {_fmt(extra)}")
    shapes = [
        f"{k} {tuple(v.shape)} != {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if k in target and v.shape != target[k].shape
    ]
    if shapes:
        problems.append(f"shape mismatches: {_fmt(shapes)}")
    if problems:
        raise LdmGroundError(f"{path} is not a {what} of the shape its keys suggest: " + "; ".join(problems))
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in mapped.items()}, strict=True)


def _block_kinds(state: dict[str, torch.Tensor], prefix: str) -> list[tuple[int, str]]:
    """[(index, kind)] of ``prefix.blocks.N`` in order; kind in res/attn/sample/norm/conv/?."""
    idx: dict[int, set[str]] = {}
    pat = re.compile(re.escape(prefix) + r"\.blocks\.(\d+)\.(.+)$")
    for k in state:
        m = pat.match(k)
        if m:
            idx.setdefault(int(m.group(1)), set()).add(m.group(2))
    kinds = []
    for i in sorted(idx):
        rest = idx[i]
        heads = {r.split(".", 1)[0] for r in rest}
        if heads & {"norm1", "conv1", "norm2", "conv2", "nin_shortcut"}:
            kinds.append((i, "res"))
        elif heads & {"to_q", "to_k", "to_v", "proj_attn", "out_proj"}:
            kinds.append((i, "attn"))
        elif any(r.startswith("conv.conv.") for r in rest):
            kinds.append((i, "sample"))
        elif any(r.startswith("conv.") for r in rest):
            kinds.append((i, "conv"))
        elif rest <= {"weight", "bias"}:
            kinds.append((i, "norm"))
        else:
            kinds.append((i, "?"))
    if sorted(idx) != list(range(len(idx))):
        raise LdmGroundError(f"{prefix}.blocks are not numbered 0..{len(idx) - 1}: {sorted(idx)}")
    return kinds


def _first(state: dict[str, torch.Tensor], *keys: str) -> torch.Tensor:
    for k in keys:
        if k in state:
            return state[k]
    raise KeyError(keys[0])
