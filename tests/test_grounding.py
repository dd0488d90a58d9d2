import numpy as np
import pytest

from ldmground.grounding import attention_cache, ground, pool_maps

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
