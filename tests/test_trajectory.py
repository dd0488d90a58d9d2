"""A reused inversion: a new phrase on an image seen before costs the window's phrase rows only."""

import numpy as np
import pytest
import torch

from ldmground.config import get_preset
from ldmground.method.aggregate import pool_maps
from ldmground.method.grounding import attention_cache, ground, ground_many
from ldmground.method.trajectory import Trajectory, TrajectoryCache

from .helpers import QUICK, blob_image
from .test_batching import RowCounter


def _equal(a, b) -> bool:
    return (
        np.array_equal(a.heatmap, b.heatmap, equal_nan=True)
        and np.array_equal(a.raw_map, b.raw_map)
        and np.array_equal(a.model_heatmap, b.model_heatmap)
    )


def test_second_phrase_costs_the_window_only_under_the_paper_preset(tiny_pipe, xray):
    paper = get_preset("paper")
    assert len(paper.window_indices()) == 60
    cache = TrajectoryCache()
    with RowCounter(tiny_pipe.unet) as count:
        [first] = ground(tiny_pipe, xray, "Small left pleural effusion", paper, cache=cache)
    assert count.rows == first.unet_evals == 240  # 180 empty-prompt steps + 60 phrase rows
    with RowCounter(tiny_pipe.unet) as count:
        [second] = ground(tiny_pipe, xray, "right lower lobe consolidation", paper, cache=cache)
    assert count.rows == second.unet_evals == 60 and count.calls == [1] * 60
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
    [fresh] = ground(tiny_pipe, xray, "right lower lobe consolidation", paper)  # no cache: inverts again
    assert fresh.unet_evals == 240
    assert _equal(second, fresh)  # bit for bit
    # 60 float32 latents of the tiny model's 3 x 16 x 16 (the paper model's: 3 x 64 x 64, 2.9 MiB)
    assert tiny_pipe.unet.config.in_channels == 3
    assert cache.bytes_held == 60 * 3 * 16 * 16 * 4


def test_reuse_with_several_phrases_and_contrast(tiny_pipe, xray):
    cfg = QUICK.replace(contrast=0.5, reference_phrases=("cardiomegaly", "edema"))
    cache = TrajectoryCache()
    ground(tiny_pipe, xray, "pneumothorax", cfg, cache=cache)
    with RowCounter(tiny_pipe.unet) as count:
        reused = ground(tiny_pipe, xray, ["left effusion", "right effusion"], cfg, cache=cache)
    fresh = ground(tiny_pipe, xray, ["left effusion", "right effusion"], cfg)
    assert count.calls == [2 + 2] * 2  # 2 window steps x (2 phrases + 2 references)
    assert all(_equal(a, b) for a, b in zip(reused, fresh, strict=True))
    assert np.array_equal(reused[0].background, fresh[0].background)


def test_what_the_key_holds(tiny_pipe, xray):
    cache = TrajectoryCache()
    ground(tiny_pipe, xray, "effusion", QUICK, cache=cache)
    # post-processing, layers and tokens do not change the path: hits
    for cfg in (QUICK.replace(sigma=0.0, otsu=False), QUICK.replace(layers=(1, 2)), QUICK.replace(tokens="class")):
        ground(tiny_pipe, xray, "effusion", cfg, cache=cache)
    assert (cache.hits, cache.misses) == (3, 1)
    # the grid, the window, the dtype, the inversion step and the image do: misses
    others = [
        QUICK.replace(num_inference_steps=12),
        QUICK.replace(window=(0.3, 0.6)),
        QUICK.replace(dtype="bf16"),
        QUICK.replace(inversion_step="lagged"),
    ]
    for cfg in others:
        ground(tiny_pipe, xray, "effusion", cfg, cache=cache)
    ground(tiny_pipe, xray[:, :-1], "effusion", QUICK, cache=cache)
    assert (cache.hits, cache.misses, len(cache)) == (3, 6, 6)
    # another pipeline object (even of the same weights) never shares entries
    from ldmground.models.folder import load_pipeline

    other = load_pipeline("tiny")
    with RowCounter(other.unet) as count:
        ground(other, xray, "effusion", QUICK, cache=cache)
    assert count.rows == 6 + 2 and cache.misses == 7


def test_lru_keeps_the_most_recent_within_the_byte_limit():
    class Owner:  # stands for a pipeline: entries are tied to the object
        pass

    pipe = Owner()
    entry = Trajectory((4, 5), torch.zeros(2, 4, 8, 8), 6)
    assert entry.nbytes == 2 * 4 * 8 * 8 * 4
    cache = TrajectoryCache(max_bytes=2 * entry.nbytes)
    keys = [(id(pipe), f"image{i}", ()) for i in range(3)]
    cache.put(pipe, keys[0], entry)
    cache.put(pipe, keys[1], entry)
    assert cache.get(pipe, keys[0]) is entry  # 0 is now the most recent
    cache.put(pipe, keys[2], entry)  # over the limit: 1, the least recent, leaves
    assert cache.get(pipe, keys[1]) is None and cache.get(pipe, keys[0]) is entry
    assert len(cache) == 2 and cache.bytes_held == 2 * entry.nbytes
    assert torch.equal(entry.at(5), entry.latents[1:2])
    big = Trajectory((4,), torch.zeros(3, 4, 8, 8), 6)
    small = TrajectoryCache(max_bytes=entry.nbytes)
    small.put(pipe, keys[0], big)  # larger than the whole limit: not kept
    assert len(small) == 0 and small.bytes_held == 0
    assert len(TrajectoryCache(max_bytes=0)) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        TrajectoryCache(max_bytes=-1)
    cache.clear()
    assert len(cache) == 0 and cache.bytes_held == 0 and "0 images" in repr(cache)


def test_attention_cache_reuses_the_inversion(tiny_pipe, xray):
    """The explorer's path: every layer and step of a typed phrase on a seen image."""
    cfg = QUICK.replace(layers=None)
    cache = TrajectoryCache()
    attention_cache(tiny_pipe, xray, ["pneumothorax"], cfg, cache=cache)
    with RowCounter(tiny_pipe.unet) as count:
        again = attention_cache(tiny_pipe, xray, ["left effusion"], cfg, cache=cache)
    fresh = attention_cache(tiny_pipe, xray, ["left effusion"], cfg)
    assert count.rows == 2  # 2 window steps x 1 phrase
    assert again.maps[0].keys() == fresh.maps[0].keys() and len(again.maps[0]) == 11 * 2
    assert all(torch.equal(again.maps[0][k], fresh.maps[0][k]) for k in fresh.maps[0])
    assert np.array_equal(pool_maps(again.maps[0], cfg, (64, 64)), pool_maps(fresh.maps[0], cfg, (64, 64)))


def test_a_batch_mixing_seen_and_new_images(tiny_pipe, xray):
    other = blob_image(100, 80, 60, 30)
    cache = TrajectoryCache()
    ground(tiny_pipe, xray, "effusion", QUICK, cache=cache)
    items = [(xray, ["pneumothorax"]), (other, ["edema", "consolidation"])]
    with RowCounter(tiny_pipe.unet) as count:
        mixed = ground_many(tiny_pipe, items, QUICK, batch_size=2, cache=cache)
    # only the new image walks (6 empty-prompt rows); both images' 3 phrases join each window step
    assert count.calls == [1] * 6 + [3] * 2
    assert mixed[0][0].unet_evals == 2 and mixed[1][0].unet_evals == 6 + 2 * 2
    alone = [ground(tiny_pipe, img, phrases, QUICK) for img, phrases in items]
    for m, a in zip(mixed, alone, strict=True):
        for x, y in zip(m, a, strict=True):
            assert np.abs(x.raw_map - y.raw_map).max() <= 1e-5
    assert len(cache) == 2  # the new image's trajectory is kept too
