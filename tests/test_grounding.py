import numpy as np
import pytest

from ldmground.method.aggregate import pool_maps
from ldmground.method.grounding import attention_cache, ground

from .helpers import QUICK


def test_ground_shapes_range_and_cost(tiny_pipe, xray):
    r1, r2 = ground(tiny_pipe, xray, ["Small left pleural effusion", "pneumothorax"], QUICK)
    assert r1.heatmap.shape == xray.shape
    assert np.isnan(r1.heatmap[:, :9]).all() and np.isnan(r1.heatmap[:, -9:]).all()  # 90 wide, 72 crop
    assert np.nanmin(r1.heatmap) == 0.0 and np.nanmax(r1.heatmap) == pytest.approx(1.0)
    # 10 steps, window 4..5: 6 empty-prompt evaluations + 2 steps x (1 + 2 phrases)
    assert r1.unet_evals == 4 + 2 * 3
    assert not np.allclose(r1.raw_map, r2.raw_map)


def test_deterministic(tiny_pipe, xray):
    a = ground(tiny_pipe, xray, "right lower lobe consolidation", QUICK)[0]
    b = ground(tiny_pipe, xray, "right lower lobe consolidation", QUICK)[0]
    assert np.array_equal(a.raw_map, b.raw_map)
    assert np.array_equal(a.heatmap, b.heatmap, equal_nan=True)


def test_batched_phrases_equal_single(tiny_pipe, xray):
    single = ground(tiny_pipe, xray, "pneumothorax", QUICK)[0]
    batched = ground(tiny_pipe, xray, ["cardiomegaly", "pneumothorax"], QUICK)[1]
    assert np.abs(single.raw_map - batched.raw_map).max() < 1e-5


def test_cache_reaggregates_to_the_same_map(tiny_pipe, xray):
    cfg = QUICK.replace(layers=None)
    direct = ground(tiny_pipe, xray, "pneumothorax", cfg)[0]
    cache = attention_cache(tiny_pipe, xray, ["pneumothorax"], cfg)
    assert len(cache.maps[0]) == 11 * 2  # every layer at both window steps
    again = pool_maps(cache.maps[0], cfg, (64, 64))
    assert np.abs(again - direct.raw_map).max() < 1e-5
    sub = pool_maps(cache.maps[0], cfg, (64, 64), layers=[3, 4, 6, 7])
    only = ground(tiny_pipe, xray, "pneumothorax", cfg.replace(layers=(3, 4, 6, 7)))[0]
    assert np.abs(sub - only.raw_map).max() < 1e-5


def test_class_tokens_change_the_map(tiny_pipe, xray):
    cfg = QUICK.replace(tokens="class")
    full = ground(tiny_pipe, xray, "Small left pleural effusion", QUICK)[0]
    cls = ground(tiny_pipe, xray, "Small left pleural effusion", cfg, words=[["Pleural Effusion"]])[0]
    assert len(cls.tokens.positions) == 4 < len(full.tokens.positions)
    assert not np.allclose(full.raw_map, cls.raw_map)


def test_bf16_close_to_fp32(tiny_pipe, xray):
    a = ground(tiny_pipe, xray, "pneumothorax", QUICK)[0]
    b = ground(tiny_pipe, xray, "pneumothorax", QUICK.replace(dtype="bf16"))[0]
    assert np.corrcoef(a.raw_map.ravel(), b.raw_map.ravel())[0, 1] > 0.95


def test_contrast_subtracts_the_reference_phrases_mean_map(tiny_pipe, xray):
    refs = ("cardiomegaly", "pleural effusion")
    plain = ground(tiny_pipe, xray, ["pneumothorax", *refs], QUICK)
    cfg = QUICK.replace(contrast=0.7, reference_phrases=refs)
    [res] = ground(tiny_pipe, xray, "pneumothorax", cfg)
    background = (plain[1].raw_map + plain[2].raw_map) / 2
    assert np.abs(res.background - background).max() < 1e-5
    assert np.abs(res.raw_map - (plain[0].raw_map - 0.7 * background)).max() < 1e-5
    assert plain[0].background is None
    # one inversion serves the phrase and its references: 4 + 2 steps x (1 + 1 + 2 references)
    assert res.unet_evals == 4 + 2 * 4
    # the background is not flat, so the map (and the post-processed heatmap) change
    assert np.abs(res.model_heatmap - plain[0].model_heatmap).max() > 0.05


def test_contrast_with_max_pooling_uses_the_kept_maps(tiny_pipe, xray):
    refs = ("edema",)
    cfg = QUICK.replace(pooling="max", contrast=1.0, reference_phrases=refs)
    [res] = ground(tiny_pipe, xray, "pneumothorax", cfg)
    plain = ground(tiny_pipe, xray, ["pneumothorax", "edema"], cfg.replace(contrast=0.0))
    assert np.abs(res.raw_map - (plain[0].raw_map - plain[1].raw_map)).max() < 1e-5
