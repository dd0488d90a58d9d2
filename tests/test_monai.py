"""The paper's MONAI bundle, converted to diffusers, computes what MONAI computes.

Random seeded weights stand in for the real bundle (no download): the fast tests use a
scaled-down config of the same structure, one slow test the exact bundle config. The
architecture (groups, heads, scheduler, scale factor) comes from the bundle's
``configs/inference.json`` / ``scripts/sampler.py`` or from options, never from assumptions:
a narrow 16-group, multi-head bundle checks that.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("generative", reason="needs PyPI monai-generative 0.2.3 (and monai)")
pytest.importorskip("monai")

from ldmground.config import PRESETS  # noqa: E402
from ldmground.errors import LdmGroundError  # noqa: E402
from ldmground.method.attention import cross_attention_layers  # noqa: E402
from ldmground.models.folder import MONAI_ARCHITECTURE, PIPELINE_FILE, apply_architecture, load_pipeline  # noqa: E402
from ldmground.models.monai.bundle import (  # noqa: E402
    AUTOENCODER_FILE,
    CONFIG_FILE,
    GENERATIVE,
    MODEL_CARD_FILE,
    MONAI_CORE,
    SAMPLER_FILE,
    UNET_FILE,
    bundle_network_configs,
    import_generative,
    monai_bundle_networks,
    write_fake_bundle,
)
from ldmground.models.monai.convert import convert_monai  # noqa: E402
from ldmground.models.monai.unet import _monai_unet_key, _unet_key  # noqa: E402
from ldmground.models.tiny import PAPER_SCHEDULER  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _convert(tmp_path_factory, scale: str):
    root = tmp_path_factory.mktemp(f"monai_{scale}")
    bundle = write_fake_bundle(root / "bundle", scale=scale, seed=0)
    out = convert_monai(bundle, root / "converted", text_encoder="none")
    ae, unet = monai_bundle_networks(scale, seed=0)
    # Load as a user would; "none" recorded no text encoder, so name one here (offline).
    pipe = load_pipeline(str(out), text_encoder="tiny")
    meta = json.loads((out / PIPELINE_FILE).read_text())
    return ae, unet, pipe, meta, out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _convert(tmp_path_factory, "small")


def _hooked_attn2(monai_unet, diff_unet):
    """Forward hooks on every cross-attention module of both UNets, recording call order."""
    calls = {"monai": [], "diffusers": []}
    handles = []
    for name, mod in monai_unet.named_modules():
        if name.endswith(".attn2"):
            handles.append(mod.register_forward_hook(lambda m, i, o, n=name: calls["monai"].append((n, o.detach()))))
    modules = dict(diff_unet.named_modules())
    for name in cross_attention_layers(diff_unet):
        mod = modules[name.removesuffix(".processor")]
        handles.append(mod.register_forward_hook(lambda m, i, o, n=name: calls["diffusers"].append((n, o.detach()))))
    return calls, handles


def _check_equal(ae, unet, pipe, image_side: int, latent_side: int, ctx_dim: int, layer_sizes: bool):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, image_side, image_side, generator=gen) * 2 - 1
    z = torch.randn(2, 3, image_side // 8, image_side // 8, generator=gen)
    lat = torch.randn(2, 3, latent_side, latent_side, generator=gen)
    t = torch.tensor([7, 512])
    ctx = torch.randn(2, 77, ctx_dim, generator=gen)
    diffs = {}
    with torch.no_grad():
        mu, _sigma = ae.encode(x)
        diffs["encoder_mean"] = (mu - pipe.vae.encode(x).latent_dist.mean).abs().max().item()
        diffs["decoder"] = (ae.decode(z) - pipe.vae.decode(z).sample).abs().max().item()
        calls, handles = _hooked_attn2(unet, pipe.unet)
        try:
            ref = unet(lat, t, context=ctx)
            got = pipe.unet(lat, t, encoder_hidden_states=ctx).sample
        finally:
            for h in handles:
                h.remove()
    diffs["unet"] = (ref - got).abs().max().item()
    for k, v in diffs.items():
        assert v <= TOL, (k, v)
    # layer map: 11 cross-attention layers, called in the same order with the same outputs
    names = cross_attention_layers(pipe.unet)
    assert len(names) == 11
    assert [n for n, _ in calls["diffusers"]] == names
    assert len(calls["monai"]) == 11
    sides = []
    for (mn, mo), (dn, do) in zip(calls["monai"], calls["diffusers"], strict=True):
        assert mo.shape == do.shape, (mn, dn)
        assert (mo - do).abs().max().item() <= TOL, (mn, dn)
        sides.append(math.isqrt(do.shape[1]))
    if layer_sizes:
        s = latent_side
        assert sides == [s // 2] * 2 + [s // 4] * 6 + [s // 2] * 3
        assert all(sides[i] == s // 4 for i in PRESETS["paper"].layers)
    diffs["attn2_layers"] = max(
        (m - d).abs().max().item() for (_, m), (_, d) in zip(calls["monai"], calls["diffusers"], strict=True)
    )
    return diffs


def test_converted_folder_layout(small):
    *_, meta, out = small
    assert meta["text_encoder"] is None
    assert meta["image_size"] == 512 and meta["scaling_factor"] == 0.3
    assert meta["architecture"] == MONAI_ARCHITECTURE
    for sub in ("vae", "unet", "scheduler"):
        assert (out / sub).is_dir()
    assert sorted(p.parent.name for p in out.glob("*/*.safetensors")) == ["unet", "vae"]
    assert not (out / "text_encoder").exists()


def test_load_pipeline_applies_monai_architecture(small):
    """GenerativeModels' VAE has no SiLU before its output convs; the loader must drop diffusers' one."""
    _, _, pipe, _, _ = small
    acts = [type(pipe.vae.encoder.conv_act).__name__, type(pipe.vae.decoder.conv_act).__name__]
    assert acts == ["Identity", "Identity"], (
        f"VAE output activations are {acts}: load_pipeline must call "
        "ldmground.models.folder.apply_architecture(vae, ldmground.json contents)"
    )
    assert pipe.image_size == 512 and pipe.scaling_factor == 0.3


def test_small_bundle_equal(small):
    ae, unet, pipe, meta, _ = small
    apply_architecture(pipe.vae, meta)  # idempotent; the loader test above checks the wiring
    diffs = _check_equal(ae, unet, pipe, image_side=64, latent_side=64, ctx_dim=32, layer_sizes=True)
    print("small max abs diffs:", diffs)


def test_paper_layers_are_16x16_small(small):
    _, unet, pipe, _, _ = small
    assert PRESETS["paper"].layers == (3, 4, 6, 7)
    assert list(pipe.unet.config.attention_head_dim) == [1, 1, 1]  # one head per layer, as in the bundle


def test_small_with_tiny_text_encoder_recorded(tmp_path, small):
    """The small config's 32-d context matches the offline "tiny" encoder: the spec is recorded."""
    bundle = write_fake_bundle(tmp_path / "b", "small", seed=3)
    out = convert_monai(bundle, tmp_path / "o", text_encoder="tiny")
    assert json.loads((out / PIPELINE_FILE).read_text())["text_encoder"] == "tiny"


def test_text_encoder_dim_mismatch_refused(tmp_path, monkeypatch):
    """A 32-d text encoder cannot drive a 1024-d UNet (checked on a fake 1024-d small UNet)."""
    import ldmground.models.monai.bundle as cm

    monkeypatch.setitem(cm.SMALL_UNET, "cross_attention_dim", 48)
    bundle = write_fake_bundle(tmp_path / "b", "small", seed=3)
    with pytest.raises(LdmGroundError, match="48-d context"):
        convert_monai(bundle, tmp_path / "o", text_encoder="tiny")


def test_ddim_step_matches_monai():
    from diffusers import DDIMScheduler

    _, schedulers = import_generative()
    ours = DDIMScheduler.from_config(dict(PAPER_SCHEDULER))
    ref = schedulers.DDIMScheduler(
        num_train_timesteps=1000,
        schedule="scaled_linear_beta",
        beta_start=0.0015,
        beta_end=0.0205,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="v_prediction",
    )
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-6)
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 3, 8, 8, generator=gen)
    out = torch.randn(1, 3, 8, 8, generator=gen)
    for t in (int(ours.timesteps[0]), 500, int(ours.timesteps[-1])):
        a = ours.step(out, t, sample).prev_sample
        b, _ = ref.step(out, t, sample)
        assert (a - b).abs().max().item() <= 1e-5, t


# --- bad bundles ---------------------------------------------------------------------------


def _small_bundle(tmp_path):
    return write_fake_bundle(tmp_path / "bundle", "small", seed=0)


def test_missing_file(tmp_path):
    bundle = _small_bundle(tmp_path)
    (bundle / UNET_FILE).unlink()
    with pytest.raises(LdmGroundError, match="diffusion_model.pth"):
        convert_monai(bundle, tmp_path / "out", text_encoder="none")
    with pytest.raises(LdmGroundError, match="not found"):
        convert_monai(tmp_path / "nowhere", tmp_path / "out", text_encoder="none")


@pytest.mark.parametrize("file", [AUTOENCODER_FILE, UNET_FILE])
def test_unknown_key(tmp_path, file):
    bundle = _small_bundle(tmp_path)
    state = torch.load(bundle / file, weights_only=True)
    state["surprise.weight"] = torch.zeros(3)
    torch.save(state, bundle / file)
    with pytest.raises(LdmGroundError, match=r"unexpected keys.*surprise\.weight"):
        convert_monai(bundle, tmp_path / "out", text_encoder="none")
    assert not (tmp_path / "out" / "unet").exists()


@pytest.mark.parametrize(
    "file,key",
    [
        (AUTOENCODER_FILE, "encoder.blocks.1.conv1.conv.weight"),
        (AUTOENCODER_FILE, "quant_conv_log_sigma.conv.bias"),
        (AUTOENCODER_FILE, "encoder.blocks.1.norm2.weight"),
        (UNET_FILE, "down_blocks.1.resnets.0.conv1.conv.weight"),
        (UNET_FILE, "middle_block.attention.proj_in.conv.weight"),
    ],
)
def test_missing_key(tmp_path, file, key):
    bundle = _small_bundle(tmp_path)
    state = torch.load(bundle / file, weights_only=True)
    del state[key]
    torch.save(state, bundle / file)
    with pytest.raises(LdmGroundError, match="missing"):
        convert_monai(bundle, tmp_path / "out", text_encoder="none")


def test_not_a_state_dict(tmp_path):
    bundle = _small_bundle(tmp_path)
    torch.save([1, 2, 3], bundle / AUTOENCODER_FILE)
    with pytest.raises(LdmGroundError, match="state dict"):
        convert_monai(bundle, tmp_path / "out", text_encoder="none")


# --- the exact bundle config ---------------------------------------------------------------


@pytest.mark.slow
def test_full_bundle_equal(tmp_path_factory):
    """The bundle's exact architecture with random weights: conversion, equality, layer map.

    Image side 128 for the VAE (the convolutional maps do not depend on size; 512 would only
    be slower), UNet at the paper's 64x64 latent so the 16x16 layers are checked for real.
    """
    start = time.perf_counter()
    ae, unet, pipe, meta, out = _convert(tmp_path_factory, "full")
    assert pipe.unet.config.cross_attention_dim == 1024
    assert tuple(pipe.unet.config.block_out_channels) == (256, 512, 768)
    apply_architecture(pipe.vae, meta)
    diffs = _check_equal(ae, unet, pipe, image_side=128, latent_side=64, ctx_dim=1024, layer_sizes=True)
    print(f"full max abs diffs: {diffs}; {time.perf_counter() - start:.1f} s")


# --- the architecture is read, not assumed -------------------------------------------------

# A narrow bundle whose GroupNorm groups (16) and heads (1, 4, 2 per level; MONAI's
# num_head_channels 0/16/32) differ from the published bundle's 32 groups and one head per
# layer: none of it is stored in the weights.
NARROW_AE = dict(num_channels=[32, 32, 32, 32], norm_num_groups=16)
NARROW_UNET = dict(num_channels=[32, 64, 64], norm_num_groups=16, num_head_channels=[0, 16, 32])
NARROW_HEADS = (1, 4, 2)
EXACT = 2e-5  # float32 summation-order differences only
# Everything the bundle's files say and the weights do not: the options that replace them.
NARROW_OPTIONS = dict(
    norm_num_groups=16,
    norm_eps=1e-6,
    heads=NARROW_HEADS,
    scale_factor=0.3,
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.0015,
    beta_end=0.0205,
    prediction_type="v_prediction",
)


def _max_diffs(ae, unet, out, image_side=32, latent_side=16, ctx_dim=32, what=("encoder_mean", "decoder", "unet")):
    """Max abs differences between MONAI's networks and the converted folder, loaded as a user would."""
    pipe = load_pipeline(str(out), text_encoder="tiny")
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, image_side, image_side, generator=gen)  # the bundle's [0, 1] input range
    z = torch.randn(2, 3, image_side // 8, image_side // 8, generator=gen)
    lat = torch.randn(2, 3, latent_side, latent_side, generator=gen)
    t = torch.tensor([7, 512])
    ctx = torch.randn(2, 77, ctx_dim, generator=gen)
    diffs = {}
    with torch.no_grad():
        if "encoder_mean" in what:
            mu, _ = ae.encode(x)
            diffs["encoder_mean"] = (mu - pipe.vae.encode(x).latent_dist.mean).abs().max().item()
        if "decoder" in what:
            diffs["decoder"] = (ae.decode(z) - pipe.vae.decode(z).sample).abs().max().item()
        if "unet" in what:
            ref = unet(lat, t, context=ctx)
            diffs["unet"] = (ref - pipe.unet(lat, t, encoder_hidden_states=ctx).sample).abs().max().item()
    return diffs, pipe


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """(bundle folder with its GenerativeModels-era inference.json, MONAI autoencoder, MONAI UNet)."""
    root = tmp_path_factory.mktemp("narrow")
    bundle = write_fake_bundle(root / "bundle", "small", seed=5, autoencoder=NARROW_AE, unet=NARROW_UNET)
    ae, unet = monai_bundle_networks("small", seed=5, autoencoder=NARROW_AE, unet=NARROW_UNET)
    return bundle, ae, unet


def _copy(bundle, tmp_path, name="bundle"):
    return Path(shutil.copytree(bundle, tmp_path / name))


def test_narrow_bundle_with_config_matches_monai(narrow, tmp_path):
    """(a) 16 groups and 4/2 heads are read from inference.json; the result equals MONAI's networks."""
    bundle, ae, unet = narrow
    out = convert_monai(bundle, tmp_path / "out", text_encoder="none")
    diffs, pipe = _max_diffs(ae, unet, out)
    print("narrow, from inference.json:", diffs)
    assert max(diffs.values()) <= EXACT, diffs
    assert pipe.vae.config.norm_num_groups == 16 and pipe.unet.config.norm_num_groups == 16
    assert tuple(pipe.unet.config.attention_head_dim) == NARROW_HEADS
    src = json.loads((out / PIPELINE_FILE).read_text())["architecture_source"]
    assert src["autoencoder.norm_num_groups"] == f"{CONFIG_FILE} autoencoder_def.norm_num_groups"
    assert src["diffusion_model.heads"] == f"{CONFIG_FILE} diffusion_def.num_head_channels"


def test_narrow_bundle_without_config_needs_options(narrow, tmp_path):
    """(b) No inference.json (and no sampler script): every value the weights lack is required,
    all named in one error; with the options the result equals MONAI's networks, and the
    published bundle's defaults (32 groups, one head) would have converted silently and wrongly."""
    bundle, ae, unet = narrow
    bare = _copy(bundle, tmp_path)
    (bare / CONFIG_FILE).unlink()
    (bare / SAMPLER_FILE).unlink()
    with pytest.raises(LdmGroundError) as err:
        convert_monai(bare, tmp_path / "refused", text_encoder="none")
    msg = str(err.value)
    assert "configs/inference.json is missing" in msg
    for flag in (
        "--norm-groups",
        "--norm-eps",
        "--heads",
        "--scale-factor",
        "--num-train-timesteps",
        "--beta-schedule",
        "--beta-start",
        "--beta-end",
        "--prediction-type",
    ):
        assert flag in msg, (flag, msg)
    assert not (tmp_path / "refused").exists()
    # one option short: only that one is named
    partial = {k: v for k, v in NARROW_OPTIONS.items() if k != "scale_factor"}
    with pytest.raises(LdmGroundError, match=r"--scale-factor") as err:
        convert_monai(bare, tmp_path / "refused", text_encoder="none", **partial)
    assert "--norm-groups" not in str(err.value)

    out = convert_monai(bare, tmp_path / "out", text_encoder="none", **NARROW_OPTIONS)
    diffs, _ = _max_diffs(ae, unet, out)
    print("narrow, from options:", diffs)
    assert max(diffs.values()) <= EXACT, diffs
    meta = json.loads((out / PIPELINE_FILE).read_text())
    assert meta["architecture_source"]["autoencoder.norm_num_groups"] == "option --norm-groups"
    assert meta["architecture_source"]["diffusion_model.heads"] == "option --heads"
    assert meta["architecture_source"]["scale_factor"] == "option --scale-factor"
    assert meta["bundle"]["config"] is None

    # What the converter used to assume: it loads without complaint and is far off.
    wrong = dict(NARROW_OPTIONS, norm_num_groups=32, heads=1)
    out = convert_monai(bare, tmp_path / "wrong", text_encoder="none", **wrong)
    bad, _ = _max_diffs(ae, unet, out)
    print("narrow, converted with 32 groups / one head:", bad)
    assert bad["decoder"] > 0.1 and bad["unet"] > 0.01, bad


def test_sampler_script_gives_the_scale_factor(narrow, tmp_path):
    """The published bundle keeps 0.3 only as the default of Sampler.sampling_fn's scale_factor."""
    bundle, _, _ = narrow
    bare = _copy(bundle, tmp_path)
    (bare / CONFIG_FILE).unlink()
    text = (bare / SAMPLER_FILE).read_text().replace("scale_factor: float = 0.3", "scale_factor: float = 0.25")
    (bare / SAMPLER_FILE).write_text(text)
    opts = {k: v for k, v in NARROW_OPTIONS.items() if k != "scale_factor"}
    out = convert_monai(bare, tmp_path / "out", text_encoder="none", **opts)
    meta = json.loads((out / PIPELINE_FILE).read_text())
    assert meta["scaling_factor"] == 0.25
    assert meta["architecture_source"]["scale_factor"].startswith(SAMPLER_FILE)
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == 0.25
    # a sampler call in inference.json passing scale_factor= overrides the script's default
    cfg_bundle = _copy(bundle, tmp_path, "called")
    cfg = json.loads((cfg_bundle / CONFIG_FILE).read_text())
    cfg["sample"] = cfg["sample"].replace("@prompt_embeds)", "@prompt_embeds, scale_factor=0.5)")
    (cfg_bundle / CONFIG_FILE).write_text(json.dumps(cfg))
    out = convert_monai(cfg_bundle, tmp_path / "out2", text_encoder="none")
    meta = json.loads((out / PIPELINE_FILE).read_text())
    assert meta["scaling_factor"] == 0.5
    assert meta["architecture_source"]["scale_factor"] == f"{CONFIG_FILE} sample (scale_factor=0.5)"


def _core_config(bundle):
    """Rewrite the narrow bundle's config as bundle 1.0.x (MONAI core) writes it, with references."""
    cfg = json.loads((bundle / CONFIG_FILE).read_text())
    cfg["norm_groups"] = 16
    cfg["autoencoder_def"]["norm_num_groups"] = "@norm_groups"
    cfg["diffusion_def"]["norm_num_groups"] = "$@norm_groups"
    cfg["diffusion_def"]["norm_eps"] = "$1e-6"
    cfg["latent_channels"] = 3
    cfg["autoencoder_def"]["latent_channels"] = "@latent_channels"
    (bundle / CONFIG_FILE).write_text(json.dumps(cfg, indent=4))
    return cfg


def test_monai_core_config_converts(tmp_path):
    """(c) inference.json of bundle 1.0.x (monai.networks.nets.*, ``channels``, load_old,
    schedule=scaled_linear_beta), with @references and $literals, converts and matches."""
    bundle = write_fake_bundle(
        tmp_path / "bundle", "small", seed=6, config=MONAI_CORE, autoencoder=NARROW_AE, unet=NARROW_UNET
    )
    cfg = _core_config(bundle)
    assert cfg["autoencoder_def"]["_target_"] == "monai.networks.nets.AutoencoderKL"
    assert "channels" in cfg["diffusion_def"] and "num_channels" not in cfg["diffusion_def"]
    assert cfg["scheduler"]["schedule"] == "scaled_linear_beta" and cfg["load_old"] == 1
    out = convert_monai(bundle, tmp_path / "out", text_encoder="none")
    ae, unet = monai_bundle_networks("small", seed=6, autoencoder=NARROW_AE, unet=NARROW_UNET)
    diffs, pipe = _max_diffs(ae, unet, out)
    print("MONAI core config:", diffs)
    assert max(diffs.values()) <= EXACT, diffs
    meta = json.loads((out / PIPELINE_FILE).read_text())
    assert meta["bundle"]["config_format"] == MONAI_CORE and meta["bundle"]["load_old"] == 1
    assert meta["architecture_source"]["diffusion_model.norm_num_groups"] == (
        f"{CONFIG_FILE} diffusion_def.norm_num_groups"
    )
    assert meta["architecture_source"]["diffusion_model.channels"].endswith("diffusion_def.channels)")
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear" and sched["prediction_type"] == "v_prediction"
    assert (sched["beta_start"], sched["beta_end"], sched["clip_sample"]) == (0.0015, 0.0205, False)


def test_config_expression_refused_or_overridden(narrow, tmp_path):
    """A value ldmground does not evaluate is refused with its key named; an option replaces
    it; an option contradicting the config is refused."""
    bundle, ae, unet = narrow
    b = _copy(bundle, tmp_path)
    cfg = json.loads((b / CONFIG_FILE).read_text())
    cfg["diffusion_def"]["norm_num_groups"] = "$int(os.environ['GROUPS'])"
    (b / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(LdmGroundError, match=r"diffusion_def\.norm_num_groups.*--norm-groups"):
        convert_monai(b, tmp_path / "refused", text_encoder="none")
    out = convert_monai(b, tmp_path / "out", text_encoder="none", norm_num_groups=16)
    src = json.loads((out / PIPELINE_FILE).read_text())["architecture_source"]
    assert src["diffusion_model.norm_num_groups"].startswith("option --norm-groups")
    assert (
        src["autoencoder.norm_num_groups"]
        == f"{CONFIG_FILE} autoencoder_def.norm_num_groups (agrees with --norm-groups)"
    )
    diffs, _ = _max_diffs(ae, unet, out, what=("unet",))
    assert diffs["unet"] <= EXACT, diffs
    with pytest.raises(LdmGroundError, match=r"num_head_channels.*--heads.*must agree"):
        convert_monai(bundle, tmp_path / "conflict", text_encoder="none", heads=1)


@pytest.mark.parametrize("encoder,decoder", [(False, False), (True, False)])
def test_autoencoder_without_nonlocal_attention(tmp_path, encoder, decoder):
    """(d) The authors' own autoencoder config has no non-local attention: detected from the
    keys, converted (identity mid ResNets, no or an identity mid attention), and equal."""
    cfg = dict(NARROW_AE, with_encoder_nonlocal_attn=encoder, with_decoder_nonlocal_attn=decoder)
    bundle = write_fake_bundle(tmp_path / "bundle", "small", seed=7, autoencoder=cfg, unet=NARROW_UNET)
    out = convert_monai(bundle, tmp_path / "out", text_encoder="none")
    ae, unet = monai_bundle_networks("small", seed=7, autoencoder=cfg, unet=NARROW_UNET)
    diffs, pipe = _max_diffs(ae, unet, out, what=("encoder_mean", "decoder"))
    print(f"no non-local attention (encoder {encoder}, decoder {decoder}):", diffs)
    assert max(diffs.values()) <= EXACT, diffs
    assert pipe.vae.config.mid_block_add_attention == (encoder or decoder)
    vals = json.loads((out / PIPELINE_FILE).read_text())["architecture_values"]
    assert vals["autoencoder.with_encoder_nonlocal_attn"] is encoder
    assert vals["autoencoder.with_decoder_nonlocal_attn"] is decoder


def test_nonlocal_attention_config_disagreeing_with_weights(narrow, tmp_path):
    """Weights without non-local attention under a config that claims it: converted as the
    weights are, with the disagreement recorded (MONAI would build another network)."""
    cfg = dict(NARROW_AE, with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
    bundle = write_fake_bundle(tmp_path / "bundle", "small", seed=7, autoencoder=cfg, unet=NARROW_UNET)
    shutil.copy(narrow[0] / CONFIG_FILE, bundle / CONFIG_FILE)  # says True for both
    out = convert_monai(bundle, tmp_path / "out", text_encoder="none")
    meta = json.loads((out / PIPELINE_FILE).read_text())
    assert len(meta["warnings"]) == 2 and all("non-local attention" in w for w in meta["warnings"])
    assert "disagrees" in meta["architecture_source"]["autoencoder.with_encoder_nonlocal_attn"]
    assert "Conversion warnings" in (out / MODEL_CARD_FILE).read_text()


@pytest.mark.parametrize(
    "file,removed,renamed",
    [
        (AUTOENCODER_FILE, "encoder.blocks.4.conv1.conv.weight", "decoder.blocks.2.to_v.bias"),
        (
            UNET_FILE,
            "up_blocks.1.resnets.2.skip_connection.conv.weight",
            "down_blocks.2.attentions.0.proj_out.conv.bias",
        ),
    ],
)
def test_corrupted_checkpoint_names_missing_and_unexpected(narrow, tmp_path, file, removed, renamed):
    """(e) A key removed and one renamed: one error naming both missing keys and the unexpected one."""
    bundle = _copy(narrow[0], tmp_path)
    state = torch.load(bundle / file, weights_only=True)
    del state[removed]
    state[renamed + "_old"] = state.pop(renamed)
    torch.save(state, bundle / file)
    with pytest.raises(LdmGroundError) as err:
        convert_monai(bundle, tmp_path / "out", text_encoder="none")
    msg = str(err.value)
    missing = re.search(r"missing keys \([^)]*\): ([^;]*)", msg).group(1).split(", ")
    unexpected = re.search(r"unexpected keys \([^)]*\): ([^;]*)", msg).group(1).split(", ")
    assert sorted(missing) == sorted([removed, renamed]), msg
    assert unexpected == [renamed + "_old"], msg
    assert not (tmp_path / "out" / "unet").exists()


def test_unet_key_names_round_trip():
    """Missing UNet keys are reported in MONAI's names: the inverse rename is exact."""
    _, unet = monai_bundle_networks("small", seed=0, unet=NARROW_UNET)
    keys = list(unet.state_dict())
    assert [_monai_unet_key(_unet_key(k)) for k in keys] == keys


def _monai_core_state(ae, unet, combined: bool):
    """The state dicts MONAI core's networks (include_fc=True) hold after ``load_old_state_dict``
    of these GenerativeModels networks: attention under ``attn.``, an identity ``out_proj`` in
    the autoencoder (0.2.x never applied proj_attn), ``out_proj`` for ``to_out.0``, ``postconv``
    upsamplers; ``combined``: ``use_combined_linear`` (one ``qkv``)."""
    a, u = {}, {}
    for k, v in ae.state_dict().items():
        m = re.match(r"^((?:en|de)coder\.blocks\.\d+)\.(to_[qkv]|proj_attn|norm)\.(weight|bias)$", k)
        if m and m.group(2) == "proj_attn":
            a[f"{m.group(1)}.attn.out_proj.{m.group(3)}"] = (
                torch.eye(v.shape[0]) if v.ndim == 2 else torch.zeros_like(v)
            )
        elif m and m.group(2) != "norm":
            a[f"{m.group(1)}.attn.{m.group(2)}.{m.group(3)}"] = v
        else:
            a[re.sub(r"^(decoder\.blocks\.\d+)\.conv\.conv\.", r"\1.postconv.conv.", k)] = v
    for k, v in unet.state_dict().items():
        k = re.sub(r"\.(attn[12])\.to_out\.0\.", r".\1.out_proj.", k)
        u[re.sub(r"\.upsampler\.conv\.conv\.", ".upsampler.postconv.conv.", k)] = v
    if combined:
        for d, pat in ((a, r"^(.*\.attn)\.to_q\.(weight|bias)$"), (u, r"^(.*\.attn1)\.to_q\.(weight)$")):
            for k in [k for k in d if re.match(pat, k)]:
                base, p = re.match(pat, k).groups()
                d[f"{base}.qkv.{p}"] = torch.cat([d.pop(f"{base}.to_{x}.{p}") for x in "qkv"])
    return a, u


@pytest.mark.parametrize("combined", [False, True])
def test_monai_core_checkpoint_keys(narrow, tmp_path, combined):
    """Checkpoints saved from MONAI core's networks (their key layout) convert to the same model."""
    bundle, ae, unet = narrow
    b = _copy(bundle, tmp_path)
    a, u = _monai_core_state(ae, unet, combined)
    torch.save(a, b / AUTOENCODER_FILE)
    torch.save(u, b / UNET_FILE)
    out = convert_monai(b, tmp_path / "out", text_encoder="none")
    diffs, _ = _max_diffs(ae, unet, out)
    print(f"MONAI core checkpoint keys (combined={combined}):", diffs)
    assert max(diffs.values()) <= EXACT, diffs
    assert json.loads((out / PIPELINE_FILE).read_text())["bundle"]["checkpoint_layout"] == {
        "autoencoder": MONAI_CORE,
        "diffusion_model": MONAI_CORE,
    }
    # a checkpoint mixing both layouts is refused
    u["up_blocks.0.upsampler.conv.conv.weight"] = u.pop("up_blocks.0.upsampler.postconv.conv.weight")
    torch.save(u, b / UNET_FILE)
    with pytest.raises(LdmGroundError, match="mixes GenerativeModels 0.2.x keys"):
        convert_monai(b, tmp_path / "mixed", text_encoder="none")


@pytest.mark.parametrize("combined", [False, True])
def test_monai_core_networks_agree(narrow, tmp_path, combined):
    """MONAI core's own networks (``monai.networks.nets``, needs einops) with these keys compute
    what the converted folder computes."""
    pytest.importorskip("einops", reason="MONAI core's attention blocks need einops")
    import monai.networks.nets as core

    bundle, ae, unet = narrow
    a, u = _monai_core_state(ae, unet, combined)
    kw = dict(include_fc=True, use_combined_linear=combined)
    ae_cfg, unet_cfg = (
        {("channels" if k == "num_channels" else k): v for k, v in cfg.items()}
        for cfg in bundle_network_configs("small", NARROW_AE, NARROW_UNET)
    )
    core_ae = core.AutoencoderKL(**ae_cfg, **kw).eval()
    core_unet = core.DiffusionModelUNet(**unet_cfg, **kw).eval()
    core_ae.load_state_dict(a, strict=True)  # the key layout is MONAI core's, exactly
    core_unet.load_state_dict(u, strict=True)
    b = _copy(bundle, tmp_path)
    torch.save(a, b / AUTOENCODER_FILE)
    torch.save(u, b / UNET_FILE)
    out = convert_monai(b, tmp_path / "out", text_encoder="none")
    diffs, _ = _max_diffs(core_ae, core_unet, out)
    print(f"MONAI core networks (combined={combined}):", diffs)
    assert max(diffs.values()) <= EXACT, diffs


def test_recorded_sources_input_range_and_model_card(small):
    """(f) ldmground.json says where each value came from, the input range and the default
    preset; README.md warns that plain diffusers computes another VAE, which it does."""
    from diffusers import AutoencoderKL

    *_, pipe, meta, out = small
    assert meta["input_range"] == [0.0, 1.0] and meta["default_preset"] == "paper"
    src = meta["architecture_source"]
    for name in (
        "autoencoder.norm_num_groups",
        "autoencoder.norm_eps",
        "diffusion_model.norm_num_groups",
        "diffusion_model.heads",
        "scheduler.num_train_timesteps",
        "scheduler.beta_schedule",
        "scheduler.beta_start",
        "scheduler.beta_end",
        "scheduler.prediction_type",
    ):
        assert src[name].startswith(CONFIG_FILE), (name, src[name])
    assert src["scale_factor"].startswith(SAMPLER_FILE)
    assert src["autoencoder.with_encoder_nonlocal_attn"].startswith("checkpoint keys")
    assert meta["bundle"]["config_format"] == GENERATIVE
    card = (out / MODEL_CARD_FILE).read_text()
    for needle in ("load_pipeline", "[0, 1]", "512 x 512", "0.3", "SiLU", "AutoencoderKL.from_pretrained", "licence"):
        assert needle in card, needle
    # what the card warns about: plain diffusers loads the VAE without error and decodes otherwise
    plain = AutoencoderKL.from_pretrained(out, subfolder="vae").eval()
    z = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (plain.decode(z).sample - pipe.vae.decode(z).sample).abs().max().item()
    print("plain diffusers vs load_pipeline, decoder max abs diff:", gap)
    assert gap > 1e-2
