"""Images grounded together (``ground_many``, ``evaluate --batch-images``) equal each image alone."""

import json
import os
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ldmground.cli import main
from ldmground.errors import LdmGroundError
from ldmground.method.batch_size import batch_from_memory, default_batch_size
from ldmground.method.grounding import ground, ground_many
from ldmground.method.heatmap import load_image
from ldmground.runs.evaluation import evaluate, image_batches, in_shard, make_grounder, sample_key

from .helpers import QUICK, blob_image, kill_after_rows, write_dataset

ROOT = Path(__file__).resolve().parents[1]
PHANTOM = ROOT / "data" / "phantom"


class RowCounter:
    """The batch size of every UNet call, through a forward pre-hook (removed on exit)."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __enter__(self):
        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            self.calls.append(sample.shape[0])

        self.handle = self.unet.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    @property
    def rows(self) -> int:
        return sum(self.calls)


def _max_diff(batched, single) -> dict[str, float]:
    """Largest |batched - single| over an image's phrases, per output (NaN where both are)."""
    out = {}
    for name in ("raw_map", "model_heatmap", "heatmap"):
        diffs = []
        for b, s in zip(batched, single, strict=True):
            a, c = getattr(b, name), getattr(s, name)
            assert np.array_equal(np.isnan(a), np.isnan(c))
            diffs.append(float(np.nanmax(np.abs(a - c))))
        out[name] = max(diffs)
    return out


def _items_of_mixed_sizes():
    """Three images of different sizes (one smaller than the tiny model's 64-px input) with
    1, 3 and 2 phrases."""
    return [
        (blob_image(90, 72, 25, 40), ["Small left pleural effusion"]),
        (blob_image(120, 150, 80, 60), ["right lower lobe consolidation", "cardiomegaly", "pneumothorax"]),
        (blob_image(60, 50, 30, 25), ["bilateral haze", "left apical pneumothorax"]),
    ]


def test_batched_equals_single_on_the_tiny_model(tiny_pipe, capsys):
    items = _items_of_mixed_sizes()
    with pytest.warns(UserWarning, match="smaller than the model input"):
        single = [ground(tiny_pipe, img, phrases, QUICK) for img, phrases in items]
    with pytest.warns(UserWarning, match="smaller than the model input"), RowCounter(tiny_pipe.unet) as count:
        batched = ground_many(tiny_pipe, items, QUICK, batch_size=3)
    worst = {}
    for b, s, (img, phrases) in zip(batched, single, items, strict=True):
        assert [r.phrase for r in b] == phrases and b[0].heatmap.shape == img.shape
        assert b[0].unet_evals == s[0].unet_evals  # each image's own cost, as if alone
        for name, d in _max_diff(b, s).items():
            worst[name] = max(worst.get(name, 0.0), d)
    assert max(worst.values()) <= 1e-5, worst
    # 10 steps, window 4..5: 6 empty-prompt calls of the 3 images, then 2 calls of their 6 phrases
    assert count.calls == [3] * 6 + [6] * 2
    assert batched[2][0].image_warnings == ["image 60x50 is smaller than the model input 64; it is upsampled"]
    with capsys.disabled():
        print(f"\ntiny, 3 images batched vs alone, max abs diff: {worst}")


@pytest.fixture(scope="module")
def demo_pipe():
    from ldmground.models.folder import load_pipeline

    return load_pipeline("demo")


def test_batched_equals_single_on_the_demo_model(demo_pipe, capsys):
    """The demo preset (contrast against 8 reference phrases, so every image carries 8 more
    phrase rows) on committed phantom images cut to different sizes."""
    paths = sorted((PHANTOM / "images").glob("*.png"))[:3]
    imgs = [load_image(p) for p in paths]
    imgs = [imgs[0], imgs[1][:200, 16:], imgs[2][30:, :]]
    items = [
        (imgs[0], ["Right pleural effusion"]),
        (imgs[1], ["left lower lobe consolidation", "cardiomegaly"]),
        (imgs[2], ["small right pneumothorax", "bilateral edema", "left basal atelectasis"]),
    ]
    single = [ground(demo_pipe, img, phrases) for img, phrases in items]
    batched = ground_many(demo_pipe, items, batch_size=3)
    worst = {}
    for b, s in zip(batched, single, strict=True):
        assert b[0].background is not None and b[0].unet_evals == s[0].unet_evals
        for name, d in _max_diff(b, s).items():
            worst[name] = max(worst.get(name, 0.0), d)
        assert np.abs(b[0].background - s[0].background).max() <= 1e-5
    assert max(worst.values()) <= 1e-5, worst
    with capsys.disabled():
        print(f"\ndemo, 3 images batched vs alone, max abs diff: {worst}")


def test_batch_size_one_is_bitwise_the_single_run_and_batches_are_chunks(tiny_pipe):
    items = _items_of_mixed_sizes()[:2] + [(blob_image(80, 80, 40, 40), ["edema"])]
    with RowCounter(tiny_pipe.unet) as count:
        alone = ground_many(tiny_pipe, items, QUICK, batch_size=1)
    single = [ground(tiny_pipe, img, phrases, QUICK) for img, phrases in items]
    for a, s in zip(alone, single, strict=True):
        for x, y in zip(a, s, strict=True):
            assert np.array_equal(x.heatmap, y.heatmap, equal_nan=True) and np.array_equal(x.raw_map, y.raw_map)
    assert count.calls == ([1] * 6 + [1] * 2) + ([1] * 6 + [3] * 2) + ([1] * 6 + [1] * 2)
    with RowCounter(tiny_pipe.unet) as count:
        ground_many(tiny_pipe, items, QUICK, batch_size=2)
    assert count.calls == ([2] * 6 + [4] * 2) + ([1] * 6 + [1] * 2)  # images 0-1, then image 2


def test_a_bad_image_fails_alone(tiny_pipe):
    good = _items_of_mixed_sizes()[:2]
    items = [good[0], (np.zeros((4, 5, 3)), ["effusion"]), good[1]]
    with pytest.raises(LdmGroundError, match="2-D grayscale"):
        ground_many(tiny_pipe, items, QUICK, batch_size=3)
    out = ground_many(tiny_pipe, items, QUICK, batch_size=3, return_exceptions=True)
    assert isinstance(out[1], LdmGroundError)
    pair = ground_many(tiny_pipe, good, QUICK, batch_size=2)  # the same batch without the bad image
    for got, want in ((out[0], pair[0]), (out[2], pair[1])):
        assert all(np.array_equal(a.raw_map, b.raw_map) for a, b in zip(got, want, strict=True))


def test_a_crash_inside_the_batch_grounds_each_image_alone(tiny_pipe, monkeypatch):
    import ldmground.method.grounding as g

    real = g._record_batch

    def fragile(pipe, jobs, *args):
        if any("boom" in j.phrases for j in jobs):
            raise RuntimeError("model exploded")
        return real(pipe, jobs, *args)

    monkeypatch.setattr(g, "_record_batch", fragile)
    good = _items_of_mixed_sizes()[:2]
    out = ground_many(tiny_pipe, [good[0], (good[1][0], ["boom"]), good[1]], QUICK, 3, return_exceptions=True)
    assert isinstance(out[1], RuntimeError) and "exploded" in str(out[1])
    for got, (img, phrases) in ((out[0], good[0]), (out[2], good[1])):
        alone = ground(tiny_pipe, img, phrases, QUICK)
        assert all(np.array_equal(a.raw_map, b.raw_map) for a, b in zip(got, alone, strict=True))
        assert "its batch of 3 images failed (RuntimeError: model exploded); grounded alone" in got[0].warnings


def test_default_batch_size():
    from ldmground.models.folder import load_pipeline

    assert default_batch_size(load_pipeline("tiny")) == 1  # the CPU
    gib = 2**30
    assert batch_from_memory(80 * gib, gib // 2, 3) == 32  # 0.6 * 80 GiB / 1.5 GiB = 32
    assert batch_from_memory(80 * gib, gib // 2, 2) == 32  # 48 fit; the largest power of two
    assert batch_from_memory(80 * gib, gib // 64, 2, cap=64) == 64
    assert batch_from_memory(gib, gib, 3) == 1


# --- evaluate --batch-images ---------------------------------------------------------------------

STEPS = ["--steps", "10"]


def _env() -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=path, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    """(CSV of 5 images / 6 samples, folder of an uninterrupted batch-2 tiny run)."""
    root = tmp_path_factory.mktemp("five")
    csv = write_dataset(root / "data", n_images=5)
    ref = root / "ref"
    args = ["evaluate", "--model", "tiny", "--dataset", str(csv), "--out", str(ref), *STEPS, "--quiet"]
    assert main([*args, "--batch-images", "2"]) == 0
    return csv, ref


def _same(out: Path, ref: Path) -> None:
    a, b = (pd.read_csv(d / "results.csv").drop(columns="seconds") for d in (out, ref))
    assert len(a) == 6
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_evaluate_batched_records_the_batch_and_matches_batch_one(five, tmp_path):
    csv, ref = five
    run = json.loads((ref / "run.json").read_text())
    assert run["compute"]["batch_images"] == 2
    one = evaluate(make_grounder("tiny", QUICK), csv, None, tmp_path / "one", QUICK, progress=False, batch_images=1)
    two = pd.read_csv(ref / "results.csv")
    assert (two["status"] == "ok").all() and list(one.results["sample_id"]) == list(two["sample_id"])
    metrics = ["cnr", "auc_roc", "miou", "pointing"]
    assert np.abs(one.results[metrics].to_numpy(float) - two[metrics].to_numpy(float)).max() < 1e-4
    assert (one.results["unet_evals"].to_numpy() == two["unet_evals"].to_numpy()).all()
    assert json.loads((tmp_path / "one" / "run.json").read_text())["compute"]["batch_images"] == 1


def test_batch_sizes_are_stored_apart_and_auto_continues_the_stored_one(five, tmp_path, capsys):
    csv, _ = five
    out = tmp_path / "out"
    base = ["evaluate", "--model", "tiny", "--dataset", str(csv), "--out", str(out), *STEPS, "--quiet"]
    assert main([*base, "--batch-images", "2", "--limit", "3"]) == 0
    capsys.readouterr()
    assert main(base) == 0  # auto: the folder's batch size, 2, so the first 3 are skipped
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("3 succeeded, 0 failed, 3 skipped")
    assert main([*base, "--batch-images", "1"]) == 0  # another batch size: nothing is reused
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("6 succeeded, 0 failed, 0 skipped")
    con = sqlite3.connect(out / "results.sqlite")
    assert con.execute("SELECT count(*) FROM results").fetchone()[0] == 12
    con.close()
    assert sample_key("a", "c", "m", "w", 2) != sample_key("a", "c", "m", "w") == sample_key("a", "c", "m", "w", 1)


def test_cli_refuses_a_bad_batch_size(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--model", "tiny", "--dataset", "x.csv", "--out", "o", "--batch-images", "0"])
    assert exit_.value.code == 2 and "--batch-images takes a number >= 1 or 'auto', got '0'" in capsys.readouterr().err


def test_batches_are_fixed_by_the_data_set_and_shards_take_whole_batches(five, tmp_path, capsys):
    csv, ref = five
    samples = pd.read_csv(csv)
    paths = list(dict.fromkeys(samples["path"]))
    from ldmground.datasets.mscxr import load_mscxr

    loaded, _ = load_mscxr(csv)
    assert image_batches(loaded, 2) == [paths[0:2], paths[2:4], paths[4:5]]
    assert all(any(in_shard(b[0], (i, 2)) for b in image_batches(loaded, 2)) for i in range(2))
    out = tmp_path / "out"
    base = ["evaluate", "--model", "tiny", "--dataset", str(csv), "--out", str(out), *STEPS, "--quiet"]
    for shard in ("0/2", "1/2"):
        assert main([*base, "--batch-images", "2", "--shard", shard]) == 0
    assert main(base) == 0  # merges; auto continues with 2
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("0 succeeded, 0 failed, 6 skipped")
    _same(out, ref)  # bit for bit: every image was batched with the same others


def test_a_bad_image_in_a_batch_fails_alone(five, tmp_path):
    csv, ref = five
    data = tmp_path / "data"
    df = pd.read_csv(csv)
    (data / "images").mkdir(parents=True)
    for p in df["path"].unique():
        Image.open(csv.parent / p).save(data / p)
    bad = df["path"].unique()[1]  # in the first batch, with image 0
    (data / bad).write_bytes(b"not an image")
    df.to_csv(data / "test.csv", index=False)
    rep = evaluate(
        make_grounder("tiny", QUICK), data / "test.csv", None, tmp_path / "out", QUICK, progress=False, batch_images=2
    )
    res = rep.results.set_index("dicom_id")
    assert (rep.succeeded, rep.failed) == (5, 1)
    assert res.loc["d1", "status"] == "failed" and "cannot read image" in res.loc["d1", "message"]
    # the others are committed with the values of the run without a bad image, but for image
    # 0, batched alone this time (its batch-mate failed before the UNet): close, not bitwise
    want = pd.read_csv(ref / "results.csv").set_index("sample_id")
    ok = rep.results[rep.results["status"] == "ok"].set_index("sample_id")
    cols = ["cnr", "auc_roc", "miou", "pointing"]
    later = [s for s in ok.index if ok.loc[s, "dicom_id"] not in ("d0", "d1")]
    assert len(later) == 3
    pd.testing.assert_frame_equal(ok.loc[later, cols], want.loc[later, cols], check_exact=True)
    first = [s for s in ok.index if ok.loc[s, "dicom_id"] == "d0"]
    assert len(first) == 2
    assert np.abs(ok.loc[first, cols].to_numpy(float) - want.loc[first, cols].to_numpy(float)).max() < 1e-4



def test_sigkill_in_a_batched_run_loses_nothing(five, tmp_path, capsys):
    csv, ref = five
    out = tmp_path / "out"
    db = out / "results.sqlite"
    args = ["evaluate", "--model", "tiny", "--dataset", str(csv), "--out", str(out), *STEPS, "--quiet"]
    cmd = [sys.executable, "-m", "ldmground.cli", *args, "--batch-images", "2"]
    before = kill_after_rows(cmd, ROOT, _env(), db, 1)
    # whole batches only: the first batch holds 3 samples (image 0 has two phrases), the second 2
    assert len(before) in (3, 5)
    assert main(args) == 0  # auto continues with the stored batch size
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{6 - len(before)} succeeded, 0 failed, {len(before)} skipped"), line
    con = sqlite3.connect(db)
    after = dict(con.execute("SELECT key, seconds FROM results").fetchall())
    con.close()
    assert len(after) == 6 and {k: after[k] for k in before} == before
    _same(out, ref)
