"""What the weights do not say (GroupNorm groups and eps, heads, scheduler, scale factor):
read from the bundle's config or required as options, each value with its source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import LdmGroundError
from ..tiny import PAPER_SCHEDULER
from .bundle import CONFIG_FILE, DIFFUSERS_NORM_EPS, GENERATIVE, MONAI_CORE, OPTION_FLAGS, SAMPLER_FILE
from .bundle_config import BundleConfig, _Found, _sampler_scale_factor
from .unet import _check_groups, heads_from_head_channels

log = logging.getLogger(__name__)


# --- what the weights do not say ------------------------------------------------------------

_ABSENT = object()
_SCHEDULES = {
    "linear_beta": "linear",
    "linear": "linear",
    "scaled_linear_beta": "scaled_linear",
    "scaled_linear": "scaled_linear",
}
_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _schedule_name(value: Any, where: str) -> str:
    if value not in _SCHEDULES:
        raise LdmGroundError(
            f"{where}: beta schedule {value!r} is not supported (known: {', '.join(sorted(_SCHEDULES))})"
        )
    return _SCHEDULES[value]


class _Architecture:
    """Collects each value the conversion needs with where it came from."""

    def __init__(self, cfg: BundleConfig | None):
        self.cfg = cfg
        self.values: dict[str, Any] = {}
        self.sources: dict[str, str] = {}
        self.missing: dict[str, list[str]] = {}  # option -> values it would give
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.config_format: str | None = None
        self.load_old: Any = None

    def set(self, name: str, value: Any, source: str) -> Any:
        self.values[name] = value
        self.sources[name] = source
        return value

    def choose(
        self,
        name: str,
        found: _Found | None,
        option: Any,
        arg: str,
        *,
        default: Any = _ABSENT,
        default_owner: str = "",
        normalize: Callable[[Any, str], Any] = lambda v, where: v,
        fallback: tuple[Any, str] | None = None,
    ) -> Any:
        """The value of ``name`` from the config (``found``; ``None``: no config section),
        the option ``arg`` (``None``: not given), a MONAI default for a key the config leaves
        out, or ``fallback`` (value, source); else it is recorded as missing."""
        flag = OPTION_FLAGS.get(arg, arg)
        try:
            if option is not None:
                option = normalize(option, f"{flag}")
            if found is not None and found.state == "value":
                value = normalize(found.value, found.source)
                if option is not None and option != value:
                    self.problems.append(
                        f"{name}: {found.source} = {found.value!r} but {flag} is {option!r} "
                        "(they must agree: edit the bundle's file or drop the option)"
                    )
                    return None
                agree = f" (agrees with {flag})" if option is not None else ""
                return self.set(name, value, f"{found.source}{agree}")
            if option is not None:
                unresolved = found is not None and found.state == "unresolved"
                note = f" ({found.source} not evaluated)" if unresolved else ""
                return self.set(name, option, f"option {flag}{note}")
            if found is not None and found.state == "unresolved":
                self.problems.append(
                    f"{name}: {found.source} = {found.raw!r} is {found.why}; give {flag} ({arg}=) instead"
                )
                return None
            if found is not None and found.state == "absent" and default is not _ABSENT:
                value = normalize(default, f"{default_owner} default of {found.where}")
                return self.set(name, value, f"{CONFIG_FILE}: {found.where} not set, {default_owner} default")
        except LdmGroundError as err:
            self.problems.append(str(err))
            return None
        if fallback is not None:
            return self.set(name, *fallback)
        self.missing.setdefault(f"{flag} ({arg}=)", []).append(name)
        return None

    def cross_check(
        self, name: str, found: _Found | None, from_keys: Any, same: Callable[[Any, Any], bool] | None = None
    ):
        """A value the weights hold: the keys decide; a config value must agree."""
        same = same or (lambda c, k: c == k)

        def agrees(c, k) -> bool:
            try:
                return bool(same(c, k))
            except (TypeError, ValueError):
                return False

        if found is None or found.state == "absent":
            return self.set(name, from_keys, "checkpoint keys")
        if found.state == "unresolved":
            return self.set(name, from_keys, f"checkpoint keys ({CONFIG_FILE} {found.where} not evaluated)")
        if not agrees(found.value, from_keys):
            self.problems.append(
                f"{name}: {CONFIG_FILE} sets {found.where} = {found.value!r} but the checkpoint has {from_keys!r}"
            )
            return None
        return self.set(name, from_keys, f"checkpoint keys (agrees with {CONFIG_FILE} {found.where})")


def _as_levels(value: Any, n: int) -> list:
    return (
        [value] * n if isinstance(value, (int, bool)) else list(value) if isinstance(value, (list, tuple)) else [value]
    )


def read_architecture(
    bundle: Path,
    ae_layout: dict[str, Any],
    unet_struct: dict[str, Any],
    options: dict[str, Any],
) -> _Architecture:
    """Every value the conversion needs, from the weights (``ae_layout``, ``unet_struct``),
    ``configs/inference.json``, ``scripts/sampler.py`` and ``options``; raises naming every
    value that is missing, cannot be evaluated or disagrees."""
    cfg_path = bundle / CONFIG_FILE
    cfg = BundleConfig.read(cfg_path) if cfg_path.is_file() else None
    arch = _Architecture(cfg)
    ae_sec = unet_sec = sch_sec = None
    fmt = None
    if cfg is not None:
        ae_sec = cfg.section("AutoencoderKL", ("AutoencoderKL",), "autoencoder_def")
        unet_sec = cfg.section("DiffusionModelUNet", ("DiffusionModelUNet",), "diffusion_def")
        sch_sec = cfg.section("scheduler", ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler"), "scheduler")
        targets = [s[2] for s in (ae_sec, unet_sec) if s is not None]
        if any(t.startswith("monai.") for t in targets):
            fmt = MONAI_CORE
        elif any(t.startswith("generative.") for t in targets):
            fmt = GENERATIVE
        if ae_sec is None or unet_sec is None:
            arch.warnings.append(
                f"{CONFIG_FILE} defines no {'AutoencoderKL' if ae_sec is None else 'DiffusionModelUNet'}: "
                "its values must come from options"
            )

    def get(sec, *names) -> _Found | None:
        if cfg is None or sec is None:
            return None
        return cfg.get(sec[0], sec[1], *names)

    def owner(sec) -> str:
        return f"MONAI {sec[2].rsplit('.', 1)[-1]}" if sec is not None else "MONAI"

    # -- autoencoder: what the keys hold, checked against the config
    aec = ae_layout["config"]
    n_levels = len(aec["block_out_channels"])
    arch.cross_check(
        "autoencoder.channels",
        get(ae_sec, "num_channels", "channels"),
        list(aec["block_out_channels"]),
        lambda c, k: list(c) == k,
    )
    arch.cross_check("autoencoder.latent_channels", get(ae_sec, "latent_channels"), aec["latent_channels"])
    arch.cross_check("autoencoder.in_channels", get(ae_sec, "in_channels"), aec["in_channels"])
    arch.cross_check("autoencoder.out_channels", get(ae_sec, "out_channels"), aec["out_channels"])
    arch.cross_check(
        "autoencoder.num_res_blocks",
        get(ae_sec, "num_res_blocks"),
        ae_layout["n"],
        lambda c, k: _as_levels(c, n_levels) == [k] * n_levels,
    )
    arch.cross_check(
        "autoencoder.attention_levels",
        get(ae_sec, "attention_levels"),
        [False] * n_levels,
        lambda c, k: [bool(x) for x in _as_levels(c, n_levels)] == k,
    )
    arch.cross_check("autoencoder.spatial_dims", get(ae_sec, "spatial_dims"), 2)
    for side in ("encoder", "decoder"):
        name = f"with_{side}_nonlocal_attn"
        has = bool(ae_layout[f"{side[:3]}_nonlocal"])
        found = get(ae_sec, name)
        if found is not None and found.state == "value" and bool(found.value) != has:
            msg = (
                f"{CONFIG_FILE} sets autoencoder {name} = {found.value!r}, but the checkpoint "
                f"{'has' if has else 'has no'} {side} non-local attention; converted as the weights are "
                "(MONAI would build the other network from this config)"
            )
            log.warning(msg)
            arch.warnings.append(msg)
            arch.set(f"autoencoder.{name}", has, f"checkpoint keys ({CONFIG_FILE} {found.where} disagrees)")
        else:
            arch.cross_check(f"autoencoder.{name}", found, has)
    # -- diffusion model: what the keys hold, checked against the config
    ch = unet_struct["channels"]
    arch.cross_check(
        "diffusion_model.channels", get(unet_sec, "num_channels", "channels"), ch, lambda c, k: list(c) == k
    )
    arch.cross_check(
        "diffusion_model.attention_levels",
        get(unet_sec, "attention_levels"),
        unet_struct["attention_levels"],
        lambda c, k: [bool(x) for x in _as_levels(c, len(ch))] == k,
    )
    arch.cross_check(
        "diffusion_model.num_res_blocks",
        get(unet_sec, "num_res_blocks"),
        unet_struct["num_res_blocks"],
        lambda c, k: _as_levels(c, len(ch)) == [k] * len(ch),
    )
    for key in ("in_channels", "out_channels", "cross_attention_dim", "transformer_num_layers"):
        arch.cross_check(f"diffusion_model.{key}", get(unet_sec, key), unet_struct[key])
    arch.cross_check("diffusion_model.spatial_dims", get(unet_sec, "spatial_dims"), 2)
    arch.cross_check(
        "diffusion_model.with_conditioning", get(unet_sec, "with_conditioning"), True, lambda c, k: bool(c) == k
    )
    arch.cross_check(
        "diffusion_model.resblock_updown", get(unet_sec, "resblock_updown"), False, lambda c, k: bool(c) == k
    )
    arch.cross_check("diffusion_model.num_class_embeds", get(unet_sec, "num_class_embeds"), None)
    up = get(unet_sec, "upcast_attention")
    arch.set(
        "diffusion_model.upcast_attention",
        bool(up.value) if up is not None and up.state == "value" else False,
        f"{CONFIG_FILE} {up.where}" if up is not None and up.state == "value" else "MONAI default (False)",
    )
    for key in ("include_fc", "use_combined_linear"):  # MONAI core only; the keys show their effect
        for sec, net in ((ae_sec, "autoencoder"), (unet_sec, "diffusion_model")):
            f = get(sec, key)
            if f is not None and f.state == "value":
                arch.set(f"{net}.{key}", f.value, f"{CONFIG_FILE} {f.where} (informative: the key layout decides)")

    # -- not in the weights: GroupNorm groups and eps, heads
    groups, eps = options.get("norm_num_groups"), options.get("norm_eps")

    def check_eps(v, where):
        v = float(v)
        if abs(v - DIFFUSERS_NORM_EPS) > 1e-12:
            raise LdmGroundError(
                f"{where}: norm_eps {v} is not supported: diffusers hard-codes GroupNorm eps "
                f"{DIFFUSERS_NORM_EPS} in its VAE and transformer blocks (the bundle's value)"
            )
        return v

    def check_groups(v, where):
        if isinstance(v, bool) or not isinstance(v, int):
            raise LdmGroundError(f"{where}: norm_num_groups must be an integer, not {v!r}")
        return v

    for sec, net in ((ae_sec, "autoencoder"), (unet_sec, "diffusion_model")):
        arch.choose(
            f"{net}.norm_num_groups",
            get(sec, "norm_num_groups"),
            groups,
            "norm_num_groups",
            default=32,
            default_owner=owner(sec),
            normalize=check_groups,
        )
        arch.choose(
            f"{net}.norm_eps",
            get(sec, "norm_eps"),
            eps,
            "norm_eps",
            default=1e-6,
            default_owner=owner(sec),
            normalize=check_eps,
        )
    for net, channels in (("autoencoder", aec["block_out_channels"]), ("diffusion_model", ch)):
        g = arch.values.get(f"{net}.norm_num_groups")
        if g is not None:
            try:
                _check_groups(g, channels, net)
            except LdmGroundError as err:
                arch.problems.append(str(err))

    heads_opt = options.get("heads")
    nhc_opt = options.get("num_head_channels")
    attn = unet_struct["attention_levels"]

    def heads_norm(v, where):
        if isinstance(v, dict) and "num_head_channels" in v:
            return heads_from_head_channels(v["num_head_channels"], unet_struct)
        levels = _as_levels(v, len(ch))
        if len(levels) != len(ch) or any(
            a and (isinstance(h, bool) or not isinstance(h, int) or h < 1 or c % h)
            for c, h, a in zip(ch, levels, attn, strict=True)
        ):
            raise LdmGroundError(f"{where}: heads {v!r} do not fit the levels {ch} (attention {attn})")
        return tuple(int(h) if a else 1 for h, a in zip(levels, attn, strict=True))

    if heads_opt is not None and nhc_opt is not None:
        h1 = heads_norm(heads_opt, "--heads")
        h2 = heads_from_head_channels(nhc_opt, unet_struct)
        if h1 != h2:
            arch.problems.append(f"--heads {heads_opt!r} and --num-head-channels {nhc_opt!r} disagree ({h1} != {h2})")
        nhc_opt = None
    head_option, head_arg = (
        (heads_opt, "heads")
        if heads_opt is not None or nhc_opt is None
        else ({"num_head_channels": nhc_opt}, "num_head_channels")
    )
    found = get(unet_sec, "num_head_channels")
    if found is not None and found.state == "value":
        found = _Found("value", found.where, value={"num_head_channels": found.value})
    arch.choose(
        "diffusion_model.heads",
        found,
        head_option,
        head_arg,
        default={"num_head_channels": 8},
        default_owner=owner(unet_sec),
        normalize=heads_norm,
    )

    # -- latent scale factor: config, else the sampler script's default
    sf_opt = options.get("scale_factor")

    def check_sf(v, where):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise LdmGroundError(f"{where}: scale factor must be a positive number, not {v!r}")
        return float(v)

    # A scale_factor the config passes to the sampler overrides the script's default.
    occurrences = cfg.scale_factors() if cfg is not None else []
    resolved = [o for o in occurrences if o.state == "value"]
    unresolved = [o for o in occurrences if o.state == "unresolved"]
    sf_found: _Found | None = None
    if len({repr(o.value) for o in resolved}) > 1:
        arch.problems.append(
            f"scale_factor: {CONFIG_FILE} sets different values: "
            + ", ".join(f"{o.where} = {o.value!r}" for o in resolved)
        )
    elif unresolved:
        sf_found = unresolved[0]
    elif resolved:
        sf_found = resolved[0]
    else:
        sampler = _sampler_scale_factor(bundle / SAMPLER_FILE)
        if sampler is not None:
            sf_found = _Found("value", sampler[1], value=sampler[0], origin="")
    if len({repr(o.value) for o in resolved}) <= 1:
        arch.choose("scale_factor", sf_found, sf_opt, "scale_factor", normalize=check_sf)

    # -- scheduler
    def check_positive_int(v, where):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LdmGroundError(f"{where}: num_train_timesteps must be a positive integer, not {v!r}")
        return v

    def check_beta(v, where):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise LdmGroundError(f"{where}: a beta must be a number in (0, 1), not {v!r}")
        return float(v)

    def check_prediction(v, where):
        if v not in _PREDICTIONS:
            raise LdmGroundError(f"{where}: prediction_type {v!r} is not one of {', '.join(_PREDICTIONS)}")
        return v

    sch_owner = owner(sch_sec)
    arch.choose(
        "scheduler.num_train_timesteps",
        get(sch_sec, "num_train_timesteps"),
        options.get("num_train_timesteps"),
        "num_train_timesteps",
        default=1000,
        default_owner=sch_owner,
        normalize=check_positive_int,
    )
    arch.choose(
        "scheduler.beta_schedule",
        get(sch_sec, "schedule", "beta_schedule"),
        options.get("beta_schedule"),
        "beta_schedule",
        default="linear",
        default_owner=sch_owner,
        normalize=_schedule_name,
    )
    arch.choose(
        "scheduler.beta_start",
        get(sch_sec, "beta_start"),
        options.get("beta_start"),
        "beta_start",
        default=1e-4,
        default_owner=sch_owner,
        normalize=check_beta,
    )
    arch.choose(
        "scheduler.beta_end",
        get(sch_sec, "beta_end"),
        options.get("beta_end"),
        "beta_end",
        default=2e-2,
        default_owner=sch_owner,
        normalize=check_beta,
    )
    arch.choose(
        "scheduler.prediction_type",
        get(sch_sec, "prediction_type"),
        options.get("prediction_type"),
        "prediction_type",
        default="epsilon",
        default_owner=sch_owner,
        normalize=check_prediction,
    )
    # DDIM details without an option: the config (or MONAI's defaults for keys it leaves
    # out); without a scheduler in the config, the paper's values, recorded as such.
    for key, monai_default in (("clip_sample", True), ("set_alpha_to_one", True), ("steps_offset", 0)):
        arch.choose(
            f"scheduler.{key}",
            get(sch_sec, key),
            None,
            key,
            default=monai_default,
            default_owner=sch_owner,
            fallback=(PAPER_SCHEDULER[key], "ldmground's paper scheduler (no scheduler in the bundle config)"),
        )

    if arch.values.get("scheduler.beta_end") is not None and arch.values.get("scheduler.beta_start") is not None:
        if arch.values["scheduler.beta_end"] < arch.values["scheduler.beta_start"]:
            arch.problems.append("scheduler: beta_end is smaller than beta_start")

    arch.config_format = fmt
    lo = cfg.get("", cfg.data, "load_old") if cfg is not None else None
    arch.load_old = lo.value if lo is not None and lo.state == "value" else None

    if arch.missing or arch.problems:
        lines = []
        if arch.missing:
            why = f"{CONFIG_FILE} is missing from {bundle}" if cfg is None else f"{CONFIG_FILE} does not define them"
            lines.append(
                "these values are not stored in the weights and "
                + why
                + "; give them as options (command line / convert_monai argument): "
                + "; ".join(f"{opt} for {', '.join(names)}" for opt, names in arch.missing.items())
            )
        lines += arch.problems
        raise LdmGroundError(f"cannot convert {bundle}: " + " | ".join(lines))
    return arch
