"""Sweeps from cached attention reproduce ``ground``; the explorer re-aggregates without the UNet."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ldmground.config import GroundingConfig
from ldmground.method.grounding import ground
from ldmground.studies.cache import (
    CachedSample,
    cache_samples,
    class_token_indices,
    full_window,
    heatmap_from_cache,
    load_samples,
    score,
)
from ldmground.studies.panels import load_examples, save_examples, to_markdown
from ldmground.studies.probes import finding_visibility, phrase_attention_ratio, text_denoising_gain
from ldmground.studies.sweeps import (
    aggregation_sweep,
    attribution_experiment,
    attribution_table,
    contrast_sweep,
    layer_sweep,
    postprocess_sweep,
    step_sweep,
    summarize_sweep,
    sweep,
    threshold_sweep,
    timesteps,
)

ROOT = Path(__file__).resolve().parents[1]
PHANTOM = ROOT / "data" / "phantom"
CFG = GroundingConfig(num_inference_steps=10, window=(0.4, 0.6), layers=(3, 4, 6, 7), sigma=2.5, otsu=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def samples():
    return load_samples(PHANTOM / "test.csv", PHANTOM, 3)


@pytest.fixture(scope="module")
def cached(tiny_pipe, samples):
    return cache_samples(tiny_pipe, samples, PHANTOM, full_window(CFG), progress=False)


def test_pick_samples_spreads_over_categories(samples):
    assert len({s.category for s in samples}) == 3


def test_cache_holds_every_layer_and_step(tiny_pipe, cached):
    from ldmground.method.attention import cross_attention_layers

    assert cached[0].layers == list(range(len(cross_attention_layers(tiny_pipe.unet))))
    assert cached[0].steps == list(range(CFG.num_inference_steps))


@pytest.mark.parametrize(
    "cfg",
    [
        CFG,
        CFG.replace(pooling="max", otsu=False, sigma=0.0),
        CFG.replace(tokens="class"),
        CFG.replace(contrast=0.6, reference_phrases=("Edema", "Pneumothorax")),
    ],
)
def test_cache_reproduces_ground(tiny_pipe, samples, cfg):
    s = samples[0]
    [cs] = cache_samples(tiny_pipe, [s], PHANTOM, cfg, progress=False)
    words = [[s.category]] if cfg.tokens == "class" else None
    [res] = ground(tiny_pipe, cs.image, [s.phrase], cfg, words)
    model_hm, hm = heatmap_from_cache(cs, cfg)
    np.testing.assert_allclose(model_hm, res.model_heatmap, atol=1e-5)
    np.testing.assert_array_equal(np.isnan(hm), np.isnan(res.heatmap))
    np.testing.assert_allclose(hm, res.heatmap, atol=1e-5)


def test_layer_sweep_config_row_equals_ground_metrics(tiny_pipe, cached):
    table = layer_sweep(cached, CFG, progress=False)
    assert list(table["layer"].unique()) == [*map(str, cached[0].layers), "config", "all"]
    for cs in cached:
        [res] = ground(tiny_pipe, cs.image, [cs.sample.phrase], CFG.replace(otsu=False))
        row = table[(table["sample_id"] == cs.sample.sample_id) & (table["layer"] == "config")].iloc[0]
        _, hm = heatmap_from_cache(cs, CFG.replace(otsu=False))
        # the full-window cache runs the UNet in another batch layout: equal to float noise
        np.testing.assert_allclose(hm, res.heatmap, atol=1e-4)
        _, hm_otsu = heatmap_from_cache(cs, CFG)
        assert row["cnr"] == pytest.approx(score(cs, hm_otsu)["cnr"])


def test_reduced_and_pruned_caches_give_the_same_heatmaps(tiny_pipe, samples, cached):
    [mean_only] = cache_samples(
        tiny_pipe, samples[:1], PHANTOM, full_window(CFG), progress=False, keep_tokens=False
    )
    assert all(m.shape[0] == 1 for m in mean_only.maps.values())
    for layers in ([3], None):
        np.testing.assert_allclose(
            heatmap_from_cache(mean_only, CFG, layers=layers)[0],
            heatmap_from_cache(cached[0], CFG, layers=layers)[0],
            atol=1e-5,
        )
    with pytest.raises(ValueError, match="keep_tokens"):
        heatmap_from_cache(mean_only, CFG.replace(tokens="class"))
    [pruned] = cache_samples(tiny_pipe, samples[:1], PHANTOM, CFG, progress=False, prune=True)
    assert pruned.layers == list(CFG.layers) and pruned.steps == list(CFG.window_indices())
    np.testing.assert_allclose(
        heatmap_from_cache(pruned, CFG.replace(tokens="class", otsu=False))[0],
        heatmap_from_cache(cached[0], CFG.replace(tokens="class", otsu=False))[0],
        atol=1e-4,
    )


def test_contrast_needs_a_cache_with_the_reference_phrases(tiny_pipe, samples, cached):
    cfg = CFG.replace(contrast=0.5, reference_phrases=("Edema",))
    with pytest.raises(ValueError, match="reference phrases"):
        heatmap_from_cache(cached[0], cfg)  # recorded without references
    [cs] = cache_samples(tiny_pipe, samples[:1], PHANTOM, CFG, progress=False, references=("Edema",))
    assert len(cs.cache.reference_maps) == 1
    with pytest.raises(ValueError, match="reference phrases"):
        heatmap_from_cache(cs, cfg.replace(reference_phrases=("Pneumonia",)))
    # contrast 0 ignores the references; a sweep varies the weight from one cache
    np.testing.assert_allclose(
        heatmap_from_cache(cs, CFG)[0], heatmap_from_cache(cached[0], CFG)[0], atol=1e-4
    )
    table = sweep(
        [cs], [({"w": w}, {"contrast": w, "reference_phrases": ("Edema",)}) for w in (0.0, 0.5)], CFG, progress=False
    )
    assert table["cnr"].nunique() == 2


def test_single_layer_differs_from_pooled(cached):
    cs = cached[0]
    _, one = heatmap_from_cache(cs, CFG, layers=[3])
    _, pooled = heatmap_from_cache(cs, CFG)
    assert np.nanmax(np.abs(one - pooled)) > 1e-3


def test_step_sweep_marks_the_window(tiny_pipe, cached):
    table = step_sweep(cached, CFG, tiny_pipe, progress=False)
    assert len(table) == len(cached) * CFG.num_inference_steps
    inside = sorted(table.loc[table["in_window"], "step"].unique())
    assert inside == list(CFG.window_indices())
    ts = timesteps(tiny_pipe, CFG)
    assert table.groupby("step")["t"].first().tolist() == ts
    assert ts == sorted(ts)


def test_aggregation_and_postprocess_sweeps(cached):
    agg = aggregation_sweep(cached, CFG, progress=False)
    assert len(agg) == len(cached) * 12
    assert agg.groupby(["normalize", "pooling", "tokens"]).ngroups == 12
    pp = postprocess_sweep(cached, CFG, sigmas=(0.0, 4.0), progress=False)
    assert set(pp["sigma"]) == {0.0, 4.0} and set(pp["otsu"]) == {False, True}
    s = summarize_sweep(pp, ["sigma", "otsu"], ["cnr", "miou"])
    assert {"n", "cnr_mean", "cnr_std", "cnr_sem"} <= set(s.columns)
    assert (s["n"] == len(cached)).all()


def test_contrast_sweep_rows_equal_single_heatmaps(tiny_pipe, samples):
    cfg = CFG.replace(reference_phrases=("Edema", "Pneumonia"))
    cached = cache_samples(
        tiny_pipe, samples[:2], PHANTOM, cfg, progress=False, references=cfg.reference_phrases
    )
    table = contrast_sweep(cached, cfg, (0.0, 0.5), progress=False)
    assert len(table) == 2 * 2 * 2 and set(table["contrast"]) == {0.0, 0.5}
    cs = cached[1]
    _, hm = heatmap_from_cache(cs, cfg.replace(contrast=0.5))
    row = table[(table["sample_id"] == cs.sample.sample_id) & table["otsu"] & (table["contrast"] == 0.5)].iloc[0]
    assert row["cnr"] == pytest.approx(score(cs, hm)["cnr"])


def test_threshold_sweep_iou_is_the_miou_of_one_threshold(cached):
    from ldmground.metrics import miou

    table = threshold_sweep(cached, CFG, thresholds=(0.1, 0.5), progress=False)
    cs = cached[1]
    _, hm = heatmap_from_cache(cs, CFG.replace(otsu=False))
    row = table[(table["sample_id"] == cs.sample.sample_id) & (~table["otsu"]) & (table["threshold"] == 0.5)].iloc[0]
    assert row["iou"] == pytest.approx(miou(hm, cs.sample.boxes, (0.5,)))


def test_class_tokens_pick_the_class_words(tiny_pipe):
    from ldmground.method.tokens import select_tokens

    sel = select_tokens(tiny_pipe.tokenizer, "Small right pleural effusion")
    idx = class_token_indices(sel, "Pleural Effusion")
    assert {sel.words[i].lower() for i in idx} == {"pleural", "effusion"}
    assert class_token_indices(sel, "Pneumothorax") == tuple(range(len(sel.positions)))


def test_markdown_of_the_comparison_table():
    from ldmground.studies.report import comparison_table, summary_with_ci

    results = pd.DataFrame(
        {"category": ["Edema"] * 3 + ["Pneumonia"] * 2, "status": "ok", "cnr": [1.0, 2.0, 3.0, 0.5, 0.7]}
    )
    table = comparison_table({"m": summary_with_ci(results, ["cnr"])}, metrics=["cnr"], reference=None)
    md = to_markdown(table)
    assert md.splitlines()[0] == "| category | m: n | m: CNR (abs) |"
    assert md.splitlines()[2].startswith("| Edema | 3 | 2.00 [")


def test_reference_average_is_the_mean_of_categories():
    from ldmground.studies.reference import PAPER_TABLE

    for _, g in PAPER_TABLE.groupby("method"):
        cats = g[g["category"] != "macro"]
        macro = g[g["category"] == "macro"].iloc[0]
        assert cats["cnr"].mean() == pytest.approx(macro["cnr"], abs=0.006)
        assert cats["miou"].mean() == pytest.approx(macro["miou"], abs=0.006)
        assert cats["n"].sum() == 1043


def test_examples_round_trip(tiny_pipe, samples, tmp_path):
    df = save_examples(tiny_pipe, samples[:2], PHANTOM, CFG, tmp_path)
    items = load_examples(tmp_path)
    assert [it["sample_id"] for it in items] == list(df["sample_id"])
    assert items[0]["heatmap"].shape == items[0]["image"].shape
    assert items[0]["boxes"] == [tuple(map(float, b)) for b in samples[0].boxes]


def test_figures_return_figures(cached, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from ldmground.studies import figures

    layers = layer_sweep(cached, CFG, progress=False)
    fig = figures.ablation_curve(layers, "layer", highlight=["config"])
    assert len(fig.axes) == 3
    path = figures.save(fig, tmp_path, "layers")
    assert path.stat().st_size > 1000


def test_explorer_reaggregates_without_the_unet(tiny_pipe, samples):
    pytest.importorskip("ipywidgets")
    from ldmground.studies.explorer import Explorer

    calls = []
    handle = tiny_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        ex = Explorer(tiny_pipe, samples, PHANTOM, CFG)
        first_calls = len(calls)
        assert first_calls > 0 and ex.unet_runs == 1
        hm0, m0 = ex.last_heatmap.copy(), dict(ex.last_metrics)
        ex.widgets["sigma"].value = 8.0
        assert not np.allclose(np.nan_to_num(ex.last_heatmap), np.nan_to_num(hm0))
        ex.widgets["otsu"].value = False
        ex.widgets["layers"].value = (0, 1)
        ex.widgets["steps"].value = (0, 9)
        ex.widgets["pooling"].value = "max"
        ex.widgets["tokens"].value = "class"
        assert ex.last_metrics != m0
        before = ex.last_heatmap.copy()
        ex.widgets["contrast"].value = 0.5  # the reference phrases were recorded with the phrase
        assert not np.allclose(np.nan_to_num(ex.last_heatmap), np.nan_to_num(before))
        assert len(calls) == first_calls, "a slider must not run the UNet"
        assert ex.last_seconds < 1.0
        ex.widgets["phrase"].value = "Heart is enlarged"  # a new phrase: one more inversion
        assert ex.unet_runs == 2 and len(calls) > first_calls
        ex.widgets["sample"].value = 1
        assert ex.unet_runs == 3
        n = len(calls)
        ex.widgets["sample"].value = 0  # cached again: back to the first phrase, no UNet
        assert ex.unet_runs == 3 and len(calls) == n
        assert ex.widgets["phrase"].value == samples[0].phrase
    finally:
        handle.remove()


def test_phrase_attention_ratio_compares_the_raw_maps_inside_and_outside_the_boxes():
    import torch

    from ldmground.datasets.mscxr import Sample
    from ldmground.geometry import Geometry
    from ldmground.method.grounding import AttentionCache

    # a 128-px image seen by a 64-px model; the box is the left half of the image
    sample = Sample(
        "s", "d", "Pneumothorax", "left pneumothorax", "x.png", ((0.0, 0.0, 64.0, 128.0),), 128, 128, "test"
    )
    left = torch.ones(2, 8, 8)  # two tokens, an 8x8 layer
    left[:, :, :4] = 3.0  # three times the attention over the left half
    flat = torch.full((2, 4, 4), 0.25)
    maps = {(0, 1): left, (0, 2): left, (1, 1): flat}
    cache = AttentionCache([maps], [None], Geometry(128, 128, 64), 64)
    cs = CachedSample(sample, np.zeros((128, 128), np.float32), cache, 0, None, CFG)
    assert phrase_attention_ratio(cs, [1]) == pytest.approx(1.0)
    ratio = phrase_attention_ratio(cs, [0])
    # bilinear upsampling blends the two halves over one 8-px cell on each side of the edge
    assert 2.5 < ratio < 3.0
    assert 1.0 < phrase_attention_ratio(cs) < ratio  # all layers: the flat one dilutes it
    with pytest.raises(ValueError, match="no maps of layers"):
        phrase_attention_ratio(cs, [5])


def test_text_denoising_gain_compares_the_phrase_with_the_empty_and_swapped_ones(tiny_pipe, samples):
    from dataclasses import replace

    lateral = next(s for s in samples if " left " in f" {s.phrase.lower()} ")
    gain = text_denoising_gain(tiny_pipe, lateral, PHANTOM, timesteps=(300, 600), draws=1)
    assert np.isfinite(list(gain.values())).all() and gain["gain_in"] != gain["gain_out"]
    # the same call again: seeded noise, the same numbers
    assert text_denoising_gain(tiny_pipe, lateral, PHANTOM, timesteps=(300, 600), draws=1) == gain
    # the empty phrase against itself gains nothing anywhere, and names no side to swap
    empty = text_denoising_gain(tiny_pipe, replace(lateral, phrase=""), PHANTOM, (300, 600), 1)
    assert empty["gain_in"] == 0.0 and empty["gain_out"] == 0.0 and np.isnan(empty["swap_in"])


def test_finding_visibility_measures_the_finding_against_its_surroundings(tiny_pipe):
    size = tiny_pipe.image_size
    image = np.full((size, size), 0.3, dtype=np.float32)
    mask = np.zeros((size, size), dtype=bool)
    mask[4:12, 6:14] = True
    image[mask] = 0.7
    out = finding_visibility(tiny_pipe, image, mask, ring=2)
    assert out["area"] == 64
    assert out["contrast"] == pytest.approx(0.4, abs=1e-6)
    # the random tiny VAE reconstructs something, measured the same way
    assert 0 <= out["recon"] <= 1 and np.isfinite(out["kept"])
    with pytest.raises(ValueError, match="non-empty mask"):
        finding_visibility(tiny_pipe, image, np.zeros_like(mask))


def test_the_demo_vae_keeps_a_finding_sized_patch_and_loses_a_speck():
    from ldmground.models.folder import load_pipeline

    pipe = load_pipeline("demo")
    yy, xx = np.mgrid[0:64, 0:64]
    image = (0.35 + 0.1 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.float32)  # some texture
    patch = (abs(yy - 24) < 6) & (abs(xx - 40) < 6)
    speck = (yy == 50) & (xx == 12)
    image[patch] += 0.2
    image[speck] += 0.2
    kept_patch = finding_visibility(pipe, image, patch)["kept"]
    kept_speck = finding_visibility(pipe, image, speck)["kept"]
    # measured with the shipped VAE (64 px -> 16 x 16 latent): an 11 x 11 patch keeps its
    # contrast (1.06), a one-pixel speck loses it (0.02)
    assert kept_patch > 0.8
    assert kept_speck < 0.3


def test_attribution_experiment_both_treatments(cached):
    rows = attribution_experiment(cached, full_window(CFG), progress=False)
    assert set(rows["tokens"]) == {"phrase", "class-span"} and len(rows) == 2 * len(cached)
    missing = rows[(rows["tokens"] == "class-span") & ~rows["has_class_name"]]
    assert len(missing) > 0  # the phantom phrases do not all name their class
    assert (missing["cnr"] == 0).all() and (missing["miou"] == 0).all() and (missing["auc_roc_binned"] == 0.5).all()
    table = attribution_table(rows).set_index(["variant", "metric"])
    n_named = int(rows.query("tokens == 'phrase'")["has_class_name"].sum())
    left_out = table.loc[("class-name tokens, pairs without the name left out", "cnr")]
    scored = table.loc[("class-name tokens, no map scored as the authors do", "cnr")]
    assert left_out["n"] == n_named and scored["n"] == len(cached)
    named = rows[(rows["tokens"] == "class-span") & rows["has_class_name"]]
    assert left_out["mean"] == pytest.approx(named.groupby("category")["cnr"].mean().mean())
