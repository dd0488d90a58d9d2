"""What the notebook chapters rely on: layers named by place, the paper's layers carried over by
resolution, sweep tables with intervals, paired differences, the split filter and the shared
attention cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ldmground.config import get_preset
from ldmground.errors import LdmGroundError
from ldmground.studies import cache as cache_module
from ldmground.studies.cache import load_samples, shared_cache
from ldmground.studies.layers import PAPER_LAYERS, describe, layer_table, paper_equivalent
from ldmground.studies.report import paired_difference, sweep_with_ci

ROOT = Path(__file__).resolve().parents[1]
PHANTOM = ROOT / "data" / "phantom"


def test_the_tiny_unet_has_the_paper_layout_and_the_paper_layers_are_its_coarsest(tiny_pipe):
    table = layer_table(tiny_pipe)
    assert table["block"].tolist() == [
        "down 1.0", "down 1.1", "down 2.0", "down 2.1", "mid", "up 0.0", "up 0.1", "up 0.2",
        "up 1.0", "up 1.1", "up 1.2",
    ]  # fmt: skip
    coarsest = paper_equivalent(table)
    assert set(PAPER_LAYERS) <= set(coarsest) and coarsest == (2, 3, 4, 5, 6, 7)
    assert set(table.loc[list(PAPER_LAYERS), "resolution"]) == {table["resolution"].min()}
    assert describe(table, (3, 4)).startswith("{3, 4} (down 2.1, mid; ")


def test_the_demo_unets_coarsest_layers_are_its_presets():
    from ldmground.models.folder import load_pipeline

    pipe = load_pipeline("demo")
    table = layer_table(pipe)
    assert table["resolution"].tolist() == [16, 8, 8, 8, 16, 16]
    assert paper_equivalent(table) == get_preset("demo").layers == (1, 2, 3)


def _sweep() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.5, 40)
    rows = [{"sample_id": f"s{i}", "setting": "a", "cnr": base[i] + 0.3} for i in range(40)]
    rows += [{"sample_id": f"s{i}", "setting": "b", "cnr": base[i]} for i in range(40)]
    return pd.DataFrame(rows)


def test_paired_difference_sees_a_shift_that_unpaired_intervals_would_blur():
    d = paired_difference(_sweep(), "setting", "a", "b", "cnr")
    assert d["n"] == 40 and d["difference"] == pytest.approx(0.3)
    assert d["ci_high"] - d["ci_low"] < 1e-9  # every pair moved by exactly 0.3
    table = sweep_with_ci(_sweep(), "setting", ["cnr"])
    assert table["n"].tolist() == [40, 40]
    low, high = (float(v) for v in table.loc[0, "cnr"].split("[")[1].rstrip("]").split(","))
    assert high - low > 0.2  # the per-setting interval carries the between-sample spread


def test_paired_difference_refuses_settings_without_common_samples():
    df = _sweep()
    with pytest.raises(ValueError, match="setting='c'"):
        paired_difference(df, "setting", "a", "c", "cnr")


def test_the_split_filter_keeps_one_split_and_names_what_it_found():
    val = load_samples(PHANTOM / "val.csv", PHANTOM, split="val")
    assert len(val) == 120 and {s.split for s in val} == {"val"}
    with pytest.raises(LdmGroundError, match=r"val\.csv: no sample of split 'test'.*\['val'\]"):
        load_samples(PHANTOM / "val.csv", PHANTOM, split="test")


def test_the_shared_cache_is_computed_once_and_read_back_identical(tiny_pipe, tmp_path, monkeypatch):
    samples = load_samples(PHANTOM / "val.csv", PHANTOM, 3, split="val")
    config = get_preset("demo").replace(num_inference_steps=4, layers=None)
    first = shared_cache(tiny_pipe, samples, PHANTOM, config, tmp_path, progress=False)
    assert len(list(tmp_path.glob("attention-*.pkl"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("inverted again")

    monkeypatch.setattr(cache_module, "cache_samples", fail)
    again = shared_cache(tiny_pipe, samples, PHANTOM, config.replace(sigma=7.0), tmp_path, progress=False)
    assert [c.sample.sample_id for c in again] == [c.sample.sample_id for c in first]
    for a, b in zip(first, again, strict=True):
        assert a.maps.keys() == b.maps.keys()
        assert all(np.array_equal(a.maps[k].numpy(), b.maps[k].numpy()) for k in a.maps)
    with pytest.raises(AssertionError, match="inverted again"):  # another N is another cache
        shared_cache(tiny_pipe, samples, PHANTOM, config.replace(num_inference_steps=5), tmp_path, progress=False)
