import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from ldmground.errors import LdmGroundError
from ldmground.method.tokens import swap_sides
from ldmground.models.folder import DEMO_DIR, verify_hashes


def test_swap_sides():
    assert swap_sides("Small left-sided pleural effusion. Right lung clear") == (
        "Small right-sided pleural effusion. Left lung clear"
    )
    assert swap_sides("Enlarged cardiac silhouette") == "Enlarged cardiac silhouette"


def test_shipped_weights_match_their_hashes(tmp_path):
    verify_hashes(DEMO_DIR)
    copy = tmp_path / "demo"
    shutil.copytree(DEMO_DIR, copy)
    target = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(LdmGroundError, match="does not match its SHA-256"):
        verify_hashes(copy)


def test_demo_reads_the_side_word():
    """On lateral findings of the committed split, the true phrase's heatmap is higher in the
    box than the same phrase with left/right swapped (the model uses the text)."""
    from ldmground.datasets.mscxr import load_mscxr
    from ldmground.method.grounding import ground
    from ldmground.method.heatmap import load_image
    from ldmground.metrics import cnr
    from ldmground.models.folder import load_pipeline

    pipe = load_pipeline("demo")
    samples, _ = load_mscxr(DEMO_DIR.parent / "phantom" / "test.csv")
    lateral = [s for s in samples if s.category in ("Pleural Effusion", "Pneumothorax")][:8]
    true_cnr, swapped_cnr = [], []
    for s in lateral:
        image = load_image(DEMO_DIR.parent / "phantom" / s.path)
        a, b = ground(pipe, image, [s.phrase, swap_sides(s.phrase)], "demo")
        true_cnr.append(cnr(a.heatmap, s.boxes, signed=True))
        swapped_cnr.append(cnr(b.heatmap, s.boxes, signed=True))
    assert np.mean(true_cnr) > np.mean(swapped_cnr) + 0.2


def test_export_demo_writes_a_loadable_hashed_folder(tmp_path):
    from ldmground.demo.export import export_demo
    from ldmground.demo.networks import demo_unet, demo_vae
    from ldmground.demo.training import DemoTrainConfig
    from ldmground.models.folder import load_pipeline

    unet = demo_unet(384)
    dest = export_demo(demo_vae(), unet, 0.5, DemoTrainConfig(), 123, tmp_path / "model", {"machine": "test"})
    verify_hashes(dest)
    assert sorted(line.split()[1] for line in (dest / "SHA256SUMS").read_text().splitlines()) == [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    meta = json.loads((dest / "ldmground.json").read_text())
    assert meta["training"]["unet_steps_done"] == 123 and meta["training"]["machine"] == "test"
    pipe = load_pipeline(str(dest))
    assert (pipe.scaling_factor, pipe.max_length, pipe.use_attention_mask, pipe.image_size) == (0.5, 16, True, 64)
    assert pipe.scheduler_config["prediction_type"] == "v_prediction"
    loaded = pipe.unet.state_dict()
    for name, value in unet.state_dict().items():
        assert torch.equal(loaded[name], value), name


def test_min_snr_weight_caps_the_clean_timesteps():
    from diffusers import DDIMScheduler

    from ldmground.demo.training import min_snr_weight
    from ldmground.models.tiny import PAPER_SCHEDULER

    sched = DDIMScheduler.from_config(PAPER_SCHEDULER)
    t = torch.arange(0, 1000, 37)
    w = min_snr_weight(sched, t, gamma=5.0)
    alpha_bar = sched.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    noisy = snr < 5.0
    assert noisy.any() and (~noisy).any()
    # below gamma the v-loss keeps its weight SNR/(SNR+1) = alpha_bar; above it is capped
    torch.testing.assert_close(w[noisy], alpha_bar[noisy])
    torch.testing.assert_close(w[~noisy], 5.0 / (snr[~noisy] + 1))
    assert w[~noisy].max() <= 5.0 / 6.0 + 1e-6 and w.min() > 0


def test_training_set_draws_the_configured_number_of_findings():
    from ldmground.demo.training import DemoTrainConfig, make_training_set

    counts = {}
    for three, two in [(1.0, 0.0), (0.0, 0.0)]:
        cfg = DemoTrainConfig(three_finding_fraction=three, two_finding_fraction=two, render_size=64, image_size=32)
        data = make_training_set(4, seed=3, split="train", cfg=cfg, progress=False)
        counts[three] = np.bincount(data.pair_image, minlength=4).tolist()
        assert data.images.shape == (4, 32, 32) and data.pair_mask.shape == (len(data.pair_phrase), 8, 8)
        # per-phrase training pairs: one phrase and one finding mask per finding
        assert all(m.max() > 0 for m in data.pair_mask)
    assert counts == {1.0: [3, 3, 3, 3], 0.0: [1, 1, 1, 1]}


@pytest.mark.parametrize(
    ("latent", "levels", "sizes"),
    [
        (16, "16,8", [16, 8, 8, 8, 16, 16]),
        (16, "16", [16, 16, 16]),
        (16, "8", [8, 8, 8]),
        (32, "16,8", [16, 8, 8, 8, 16, 16]),  # same layer order on the finer latent
        (32, "32", [32, 32, 32]),
    ],
)
def test_demo_unet_reads_the_text_only_at_the_chosen_latent_sizes(latent, levels, sizes):
    from ldmground.demo.networks import demo_unet
    from ldmground.method.attention import AttentionRecorder, PhraseRow

    unet = demo_unet(32, seed=0, cross_attention_at=levels, latent_size=latent).eval()
    with AttentionRecorder(unet, keep_maps=True) as rec:
        rec.begin([PhraseRow(0, [1, 2])], latent_hw=(latent, latent))
        rec.step, rec.active = 0, True
        with torch.no_grad():
            out = unet(torch.randn(1, 3, latent, latent), 500, encoder_hidden_states=torch.randn(1, 4, 32)).sample
    assert out.shape == (1, 3, latent, latent)
    assert [rec.store.maps[0][(i, 0)].shape[-1] for i in range(len(sizes))] == sizes


@pytest.mark.parametrize(("factor", "side"), [(4, 16), (2, 32)])
def test_demo_vae_latent_side_follows_its_factor(factor, side):
    from ldmground.demo.networks import demo_vae

    vae = demo_vae(factor=factor).eval()
    with torch.no_grad():
        z = vae.encode(torch.zeros(2, 1, 64, 64)).latent_dist.mean
        assert z.shape == (2, 3, side, side)
        assert vae.decode(z).sample.shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="vae_factor"):
        demo_vae(factor=8)


def test_demo_unet_rejects_an_unknown_latent_size():
    from ldmground.demo.networks import demo_unet

    with pytest.raises(ValueError, match="cross_attention_at"):
        demo_unet(32, cross_attention_at="16,4")  # the 4x4 level of a 16x16 latent
    with pytest.raises(ValueError, match="cross_attention_at"):
        demo_unet(32, cross_attention_at="32")  # a 16x16 latent has no 32x32 level
    with pytest.raises(ValueError, match="latent_size"):
        demo_unet(32, latent_size=64)


def test_train_demo_checkpoints_resumes_and_exports_a_finer_latent(tmp_path):
    from safetensors.torch import load_file

    from ldmground.demo.export import train_demo
    from ldmground.demo.training import DemoTrainConfig
    from ldmground.models.folder import load_pipeline

    cfg = DemoTrainConfig(
        out=str(tmp_path / "run"), n_train=6, render_size=64, vae_steps=2, vae_batch=2, steps=4, batch=2,
        checkpoint_every=2, snapshot_every=2, vae_factor=2, threads=torch.get_num_threads() + 1,
    )  # fmt: skip
    before = torch.get_num_threads()
    model = train_demo(cfg, progress=False)
    assert torch.get_num_threads() == before  # the caller's thread count is restored
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("unet-ema-*.safetensors")) == [
        "unet-ema-000002.safetensors",
        "unet-ema-000004.safetensors",
    ]
    pipe = load_pipeline(str(model))
    with torch.no_grad():
        assert pipe.encode_image(torch.zeros(1, 1, 64, 64)).shape == (1, 3, 32, 32)
    assert pipe.unet.config.sample_size == 32
    first = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    # the same command again resumes at the last step: nothing is retrained, the export is unchanged
    again = train_demo(cfg, progress=False)
    second = load_file(again / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    # more steps continue from the checkpoint
    longer = train_demo(replace(cfg, steps=6), progress=False)
    training = json.loads((longer / "ldmground.json").read_text())["training"]
    assert training["unet_steps_done"] == 6
    # the run folder's ledger adds up the minutes of all three calls
    calls = json.loads((run / "wall_minutes.json").read_text())
    assert len(calls) == 3 and training["wall_minutes_total"] == round(sum(calls), 1)
    assert training["wall_minutes_this_call"] == round(calls[-1], 1)
    assert "CPU" in training["machine"] and training["device"] == "cpu"
    third = load_file(longer / "unet" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_train_demo_fine_tunes_a_model_folder_with_a_cool_down(tmp_path):
    from safetensors.torch import load_file

    from ldmground.demo.export import run_scaling_factor, snapshot_pipeline, train_demo
    from ldmground.demo.training import DemoTrainConfig

    base = DemoTrainConfig(
        out=str(tmp_path / "base"), n_train=6, render_size=64, vae_steps=2, vae_batch=2, steps=2, batch=2,
        checkpoint_every=2, snapshot_every=2, threads=torch.get_num_threads(),
    )  # fmt: skip
    start = train_demo(base, progress=False)
    weights = "unet/diffusion_pytorch_model.safetensors"
    # lr 0: the fine-tune's export is the start folder's UNet, not a fresh seeded one (seed 1)
    frozen = replace(base, out=str(tmp_path / "frozen"), init_from=str(start), seed=1, lr=0.0)
    same = train_demo(frozen, progress=False)
    before, after = load_file(start / weights), load_file(same / weights)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "frozen" / "vae.ckpt").exists()  # the VAE is taken, not trained
    vae = load_file(start / "vae/diffusion_pytorch_model.safetensors")
    kept = load_file(same / "vae/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(vae[k], kept[k]) for k in vae)
    meta = json.loads((same / "ldmground.json").read_text())
    assert meta["scaling_factor"] == json.loads((start / "ldmground.json").read_text())["scaling_factor"]
    assert meta["training"]["init_unet_steps_done"] == 2
    # the start folder's own training record travels with the fine-tune
    assert meta["training"]["init_from_model"]["training"]["out"] == base.out
    assert meta["training"]["init_from_model"]["training"]["unet_steps_done"] == 2
    # the run's snapshots are read back with the start folder's VAE and scaling (the curve tools)
    assert run_scaling_factor(tmp_path / "frozen") == meta["scaling_factor"]
    snap = snapshot_pipeline(tmp_path / "frozen", tmp_path / "frozen" / "unet-ema-000002.safetensors", 1.0)
    assert all(torch.equal(before[k], snap.unet.state_dict()[k]) for k in before)
    assert all(torch.equal(vae[k], snap.vae.state_dict()[k]) for k in vae)
    # a linear cool-down ends at lr 0, and the checkpoint keeps the schedule for a resume
    cool = replace(
        base, out=str(tmp_path / "cool"), init_from=str(start), steps=4, lr_schedule="linear", warmup_steps=1,
        category_weights="Edema=2,Pneumothorax=3",  # the weighted draws train too
        category_mask_weights="Pneumothorax=16",  # and so do per-category mask weights
    )  # fmt: skip
    moved = load_file(train_demo(cool, progress=False) / weights)
    assert not all(torch.equal(before[k], moved[k]) for k in before)
    state = torch.load(tmp_path / "cool" / "unet.ckpt", weights_only=True)
    assert state["lr_sched"]["last_epoch"] == 4
    assert [g["lr"] for g in state["opt"]["param_groups"]] == [0.0]
    # only the cross-attention projections train: every other weight stays the start folder's
    xattn = replace(base, out=str(tmp_path / "xattn"), init_from=str(start), steps=3, trainable="cross-attention")
    tuned = load_file(train_demo(xattn, progress=False) / weights)
    changed = {k for k in before if not torch.equal(before[k], tuned[k])}
    assert changed and all(".attn2." in k for k in changed)
    assert any(".attn2.to_k." in k for k in changed) and any(".attn2.to_q." in k for k in changed)
    # resuming that run with every weight trainable is refused, naming the option
    with pytest.raises(LdmGroundError, match="--trainable"):
        train_demo(replace(xattn, steps=4, trainable="all"), progress=False)
    # a folder made for another text layout is refused with the field named
    with pytest.raises(LdmGroundError, match="text_sink"):
        train_demo(replace(cool, out=str(tmp_path / "bad"), text_sink=True), progress=False)
    # an unknown trainable set is refused before the run folder exists
    with pytest.raises(LdmGroundError, match="trainable must be one of all, cross-attention, got 'attn'"):
        train_demo(replace(xattn, out=str(tmp_path / "none"), trainable="attn"), progress=False)
    assert not (tmp_path / "none").exists()


def test_text_sink_puts_the_empty_phrase_before_every_phrase():
    from ldmground.models.pipeline import encode_phrases
    from ldmground.models.text import load_text_components

    tok, enc, info = load_text_components("minilm")
    phrases = ["Small left pleural effusion", "Cardiomegaly"]
    plain, plain_mask = encode_phrases(tok, enc, phrases, info["max_length"])
    sunk, sunk_mask = encode_phrases(tok, enc, phrases, info["max_length"], text_sink=True)
    empty, _ = encode_phrases(tok, enc, [""], info["max_length"])
    assert sunk.shape == (2, 2 + info["max_length"], plain.shape[-1])  # MiniLM's "" is [CLS] [SEP]
    assert torch.equal(sunk[:, 2:], plain) and torch.equal(sunk_mask[:, 2:], plain_mask)
    assert torch.equal(sunk[0, :2], empty[0, :2]) and torch.equal(sunk[1, :2], empty[0, :2])
    assert sunk_mask[:, :2].eq(1).all()


class _KeepProbs:
    """A plain attention processor that also keeps every cross-attention probability map."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor

        self.inner, self.probs = AttnProcessor(), []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None:
            b, lk = hidden_states.shape[0], encoder_hidden_states.shape[1]
            mask = attn.prepare_attention_mask(attention_mask, lk, b)
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            self.probs.append(attn.get_attention_scores(q, k, mask).view(b, attn.heads, -1, lk).mean(1))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def test_grounding_a_text_sink_model_reads_the_phrase_keys_after_the_sink(tmp_path):
    from ldmground.config import get_preset
    from ldmground.demo.export import export_demo
    from ldmground.demo.networks import demo_unet, demo_vae
    from ldmground.demo.training import DemoTrainConfig
    from ldmground.method.grounding import run_attention
    from ldmground.models.folder import load_pipeline

    cfg = DemoTrainConfig(text_sink=True)
    dest = export_demo(demo_vae(), demo_unet(384, seed=3), 0.5, cfg, 1, tmp_path / "model", {})
    pipe = load_pipeline(str(dest))
    assert pipe.text_sink and pipe.sink_length == 2
    layer = pipe.unet.attn_processors
    name = sorted(n for n in layer if "attn2" in n)[0]
    keeper = _KeepProbs()
    pipe.unet.set_attn_processor({**layer, name: keeper})
    from ldmground.method.attention import cross_attention_layers

    index = cross_attention_layers(pipe.unet).index(name)
    config = get_preset("demo").replace(layers=[index], num_inference_steps=3, window=(0.0, 1.0), normalize_maps=False)
    image = np.random.default_rng(0).random((64, 64))
    store, (sel,), _, _, _ = run_attention(pipe, image, ["left pleural effusion"], config, keep_maps=True)
    recorded = [m.flatten(1) for m in store.maps[0].values()]  # (T, h*w) per step
    keys = [2 + p for p in sel.positions]  # the sink's 2 keys come first
    # the empty-prompt walk's 3 calls come first, then the window's 3 calls of the phrase alone
    phrase_calls = keeper.probs[3:]
    truth = [p[0][:, keys].T for p in phrase_calls]
    unshifted = [p[0][:, list(sel.positions)].T for p in phrase_calls]
    assert len(recorded) == 3 and len(truth) == 3
    for got, want, wrong in zip(recorded, truth, unshifted, strict=True):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-6)
        assert not torch.allclose(got, wrong.float(), atol=1e-4)


def test_train_demo_command_line_reads_the_fine_tune_options():
    from ldmground.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(
        ["train-demo", "--init-from", "data/demo", "--lr-schedule", "cosine", "--warmup-steps", "5"]
    )
    assert (args.init_from, args.lr_schedule, args.warmup_steps) == ("data/demo", "cosine", 5)
    with pytest.raises(SystemExit):  # not a diffusers schedule, or one that needs extra rules
        parser.parse_args(["train-demo", "--lr-schedule", "piecewise_constant"])
    assert parser.parse_args(["train-demo", "--trainable", "cross-attention"]).trainable == "cross-attention"
    with pytest.raises(SystemExit):
        parser.parse_args(["train-demo", "--trainable", "attn2"])


def test_category_weights_draw_the_named_categories_more_often(tmp_path):
    from ldmground.demo.export import train_demo
    from ldmground.demo.training import DemoTrainConfig, TrainingSet, make_training_set, pair_mask_weights, pair_weights

    cfg = DemoTrainConfig(render_size=64, image_size=32, two_finding_fraction=1.0)
    data = make_training_set(12, seed=5, split="train", cfg=cfg, progress=False)
    assert len(data.pair_category) == len(data.pair_phrase) == 24
    assert pair_weights(data, "") is None
    first, second = data.pair_category[0], data.pair_category[1]
    weights = pair_weights(data, f"{first}=3, {second}=0")
    assert weights[0] == 3 and weights[1] == 0
    assert sorted(set(weights[data.pair_category == first].tolist())) == [3.0]
    others = ~np.isin(data.pair_category, [first, second])
    assert set(weights[others].tolist()) == {1.0}
    # the draws follow the weights: a zero-weight category is never drawn
    idx = torch.multinomial(weights, 2000, replacement=True, generator=torch.Generator().manual_seed(0))
    drawn = data.pair_category[idx.numpy()]
    assert second not in drawn
    share = (drawn == first).mean()
    expected = float(weights[data.pair_category == first].sum() / weights.sum())
    assert abs(share - expected) < 0.04
    # the categories survive the training-set cache
    data.save(tmp_path / "set.npz")
    back = TrainingSet.load(tmp_path / "set.npz")
    assert back.pair_category.tolist() == data.pair_category.tolist()
    bad_specs = [("Pneumothorax", "CATEGORY=FACTOR"), ("Pneumothorax=x", "not a number"), ("Edema=-1", "negative")]
    bad_specs.append((",".join(f"{c}=0" for c in set(data.pair_category)), "no training pair"))
    for bad, message in bad_specs:
        with pytest.raises(LdmGroundError, match=message):
            pair_weights(data, bad)
    old = TrainingSet(data.images, data.pair_image, data.pair_phrase, data.pair_mask)
    with pytest.raises(LdmGroundError, match="delete it"):
        pair_weights(old, "Edema=2")
    # train-demo refuses a misspelt spec before it renders or trains anything
    with pytest.raises(LdmGroundError, match="Pneumothorx"):
        train_demo(replace(cfg, out=str(tmp_path / "run"), category_weights="Pneumothorx=3"), progress=False)
    assert not (tmp_path / "run").exists()

    # per-category mask weights: the named category's pairs get theirs, the rest mask_weight
    assert pair_mask_weights(data, cfg).tolist() == [cfg.mask_weight] * 24
    masked = pair_mask_weights(data, replace(cfg, mask_weight=2.0, category_mask_weights=f"{first}=16"))
    assert set(masked[data.pair_category == first].tolist()) == {16.0}
    assert set(masked[data.pair_category != first].tolist()) == {2.0}
    with pytest.raises(LdmGroundError, match="delete it"):
        pair_mask_weights(old, replace(cfg, category_mask_weights="Edema=8"))
    with pytest.raises(LdmGroundError, match="category_mask_weights: 'Edema=-2'"):
        train_demo(replace(cfg, out=str(tmp_path / "run"), category_mask_weights="Edema=-2"), progress=False)
    assert not (tmp_path / "run").exists()


def test_select_demo_preset_adds_contrast_to_the_best_settings(tiny_pipe, tmp_path):
    import pandas as pd

    from ldmground.demo.selection import select_demo_preset

    phantom = DEMO_DIR.parent / "phantom"
    csv = tmp_path / "val.csv"
    pd.read_csv(phantom / "test.csv").head(3).to_csv(csv, index=False)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table = select_demo_preset(tiny_pipe, csv, phantom, n_steps=5, contrasts=(0.5, 1.0), top=2)
    finally:
        torch.set_num_threads(old)
    groups = table["layers"].nunique()  # "all" and one per map size of the tiny UNet
    plain = table[table["contrast"] == 0]
    assert groups == 3 and len(plain) == 5 * groups * 5 * 2  # windows x groups x sigmas x Otsu
    assert len(table) == len(plain) + 2 * 2 * 2  # the top 2 with Otsu and without, 2 weights
    assert list(table["score"]) == sorted(table["score"], reverse=True)
    assert np.allclose(table["score"], table["pointing"] + table["cnr"])
    keys = ["window", "layers", "sigma", "otsu"]
    top2 = {
        tuple(r) for otsu in (True, False) for r in plain[plain["otsu"] == otsu][keys].head(2).itertuples(index=False)
    }
    for w in (0.5, 1.0):
        assert {tuple(r) for r in table[table["contrast"] == w][keys].itertuples(index=False)} == top2
    # the background moves the scores: contrast rows are not copies of their plain rows
    merged = table[table["contrast"] == 1.0].merge(plain, on=keys, suffixes=("", "_plain"))
    assert (merged["cnr"] != merged["cnr_plain"]).any()


def test_train_demo_refuses_a_device_it_cannot_use(tmp_path):
    from ldmground.demo.export import train_demo
    from ldmground.demo.training import DemoTrainConfig, machine_description, training_device

    assert training_device(DemoTrainConfig()) == torch.device("cpu")
    bad = ["tpu", "mps"] + ([] if torch.cuda.is_available() else ["cuda"])
    for name in bad:
        cfg = DemoTrainConfig(out=str(tmp_path / name), device=name)
        with pytest.raises(LdmGroundError, match=f"device: '{name}'"):
            train_demo(cfg, progress=False)
        assert not (tmp_path / name).exists()  # refused before anything is rendered or trained
    described = machine_description(torch.device("cpu"))
    assert "CPU" in described and "no GPU" in described


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_demo_on_cuda_draws_the_cpu_run_batches(tmp_path):
    from safetensors.torch import load_file

    from ldmground.demo.export import train_demo
    from ldmground.demo.networks import demo_unet
    from ldmground.demo.training import DemoTrainConfig

    cfg = DemoTrainConfig(
        out=str(tmp_path / "cpu"), n_train=6, render_size=64, vae_steps=2, vae_batch=2, steps=3, batch=2,
        checkpoint_every=3, snapshot_every=3, threads=torch.get_num_threads(),
    )  # fmt: skip
    weights = "unet/diffusion_pytorch_model.safetensors"
    on_cpu = load_file(train_demo(cfg, progress=False) / weights)
    gpu = train_demo(replace(cfg, out=str(tmp_path / "gpu"), device="cuda"), progress=False)
    on_gpu = load_file(gpu / weights)
    assert "GPU" in json.loads((gpu / "ldmground.json").read_text())["training"]["machine"]
    # the same pairs, noise and timesteps: the two runs move the seeded UNet the same way, up
    # to GPU rounding (TF32 convolutions), far less apart than either is from the start
    start = demo_unet(384, cfg.seed).state_dict()
    apart = sum((on_cpu[k] - on_gpu[k]).abs().sum().item() for k in on_cpu)
    moved = sum((on_cpu[k] - start[k]).abs().sum().item() for k in on_cpu)
    assert apart < 0.25 * moved
