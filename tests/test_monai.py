"""The paper's MONAI bundle, converted to diffusers, computes what MONAI computes.

Random seeded weights stand in for the real bundle (no download): the fast tests use a
scaled-down config of the same structure, one slow test the exact bundle config.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

pytest.importorskip("generative", reason="needs PyPI monai-generative 0.2.3 (and monai)")
pytest.importorskip("monai")

from ldmground.attention import cross_attention_layers  # noqa: E402
from ldmground.config import PRESETS  # noqa: E402
from ldmground.convert_monai import (  # noqa: E402
    AUTOENCODER_FILE,
    MONAI_ARCHITECTURE,
    UNET_FILE,
    apply_architecture,
    convert_monai,
    import_generative,
    monai_bundle_networks,
    write_fake_bundle,
)
from ldmground.errors import LdmGroundError  # noqa: E402
from ldmground.models import PAPER_SCHEDULER, PIPELINE_FILE, load_pipeline  # noqa: E402

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
        "ldmground.convert_monai.apply_architecture(vae, ldmground.json contents)"
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
    import ldmground.convert_monai as cm

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
    with pytest.raises(LdmGroundError, match=r"unknown keys.*surprise\.weight"):
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
