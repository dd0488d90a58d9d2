"""Batch evaluation under crashes, bad inputs and many processes; provenance of a run."""

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import ldmground
from ldmground.cli import _config, build_parser, main
from ldmground.datasets.mscxr import MSCXR_COLUMNS, load_mscxr
from ldmground.errors import LdmGroundError
from ldmground.runs.evaluation import evaluate, in_shard, make_grounder, parse_shard
from ldmground.runs.grounders import CentrePriorGrounder

from .helpers import QUICK, blob_image, kill_after_rows, write_dataset

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--steps", "10"]  # with the default paper preset this is exactly QUICK
N_SAMPLES = 5  # write_dataset(n_images=4): image 0 has two phrases


def _env() -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=path)



def _assert_same_run(out: Path, ref: Path) -> None:
    """results.csv (less timings) and summary.csv of two folders are identical, bit for bit.

    The runs compare rows computed in different processes, with other thread settings and
    shards: grounding pins torch's thread count (``GroundingConfig.threads``), so nothing
    may differ, not even the last bit of a float (CSV floats are written with 17 digits)."""
    a, b = (pd.read_csv(d / "results.csv").drop(columns="seconds") for d in (out, ref))
    assert len(a) == N_SAMPLES and a["sample_id"].is_unique
    assert list(a["sample_id"]) == list(b["sample_id"])  # data-set order, however it was computed
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), pd.read_csv(ref / "summary.csv"), check_exact=True)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """(CSV of 4 images / 5 samples, folder of an uninterrupted single-process tiny run)."""
    root = tmp_path_factory.mktemp("four")
    csv = write_dataset(root / "data", n_images=4)
    ref = root / "ref"
    assert main(["evaluate", "--model", "tiny", "--dataset", str(csv), "--out", str(ref), *STEPS, "--quiet"]) == 0
    assert len(pd.read_csv(ref / "results.csv")) == N_SAMPLES
    return csv, ref


# --- crash and resume ------------------------------------------------------------------------


def test_sigkill_then_resume_recomputes_nothing(four, tmp_path, capsys):
    start = time.perf_counter()
    csv, ref = four
    out = tmp_path / "out"
    db = out / "results.sqlite"
    cmd = [
        sys.executable,
        "-m",
        "ldmground.cli",
        "evaluate",
        "--model",
        "tiny",
        "--dataset",
        str(csv),
        "--out",
        str(out),
        *STEPS,
        "--quiet",
    ]
    before = kill_after_rows(cmd, ROOT, _env(), db, 2)
    assert 2 <= len(before) < N_SAMPLES
    assert not (out / "results.csv").exists()  # killed before the end

    code = main(["evaluate", "--model", "tiny", "--dataset", str(csv), "--out", str(out), *STEPS, "--quiet"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0
    assert line.startswith(f"{N_SAMPLES - len(before)} succeeded, 0 failed, {len(before)} skipped"), line
    con = sqlite3.connect(db)
    after = dict(con.execute("SELECT key, seconds FROM results").fetchall())
    con.close()
    assert len(after) == N_SAMPLES
    assert {k: after[k] for k in before} == before  # rows committed before the kill were not recomputed
    _assert_same_run(out, ref)
    print(f"\nkill/resume test: {time.perf_counter() - start:.1f} s")


# --- several processes ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_two_cpu_processes_merge_by_key(four, tmp_path):
    csv, ref = four
    paths = pd.read_csv(csv)["path"].unique()
    assert all(any(in_shard(p, (i, 2)) for p in paths) for i in range(2))  # both processes get work
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.is_file():
        pytest.skip("accelerate launcher not installed")
    out = tmp_path / "out"
    # `--cpu` would pick accelerate's single-process launcher (multi-CPU there needs mpirun);
    # `--multi_gpu` goes through torchrun, and ACCELERATE_USE_CPU=1 keeps the processes on
    # the CPU (gloo backend).
    cmd = [
        str(launcher),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "ldmground.cli",
        "-v",
        "evaluate",
        "--model",
        "tiny",
        "--dataset",
        str(csv),
        "--out",
        str(out),
        *STEPS,
        "--shard",
        "auto",
        "--quiet",
    ]
    # torchrun sets OMP_NUM_THREADS=1 of its own; the results must not care
    env = _env() | {"ACCELERATE_USE_CPU": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # each process computed its own shard; the main one then merged (nothing left to do)
    samples, _ = load_mscxr(csv)
    mine = [sum(in_shard(s.path, (i, 2)) for s in samples) for i in range(2)]
    for i in range(2):
        assert f"shard {i}/2: {mine[i]} of {mine[i]} samples to compute" in run.stderr, run.stderr[-3000:]
    assert f"shard 0/1: 0 of {N_SAMPLES} samples to compute, {N_SAMPLES} already done" in run.stderr
    assert run.stdout.strip().splitlines()[-1].startswith(f"{N_SAMPLES} succeeded, 0 failed, 0 skipped")
    _assert_same_run(out, ref)
    assert json.loads((out / "run.json").read_text())["model"] == "tiny"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ldmground.cli", *args]


def test_fresh_processes_with_other_threads_and_shards_agree_exactly(four, tmp_path):
    """One process with OMP_NUM_THREADS=1, unsharded; one with torch's default thread count
    (this machine's cores) as two worker processes (two shards): both equal the in-process
    reference bit for bit."""
    csv, ref = four
    base = ["evaluate", "--model", "tiny", "--dataset", str(csv), *STEPS, "--quiet"]
    single = subprocess.run(
        _cli(*base, "--out", str(tmp_path / "single")),
        cwd=ROOT,
        env=_env() | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    default_env = {k: v for k, v in _env().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    sharded = subprocess.run(
        _cli(*base, "--out", str(tmp_path / "workers"), "--workers", "2"),
        cwd=ROOT,
        env=default_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    # the workers computed everything; the calling process only merged
    assert sharded.stdout.strip().splitlines()[-1].startswith(f"0 succeeded, 0 failed, {N_SAMPLES} skipped")
    _assert_same_run(tmp_path / "single", ref)
    _assert_same_run(tmp_path / "workers", ref)
    compute = json.loads((tmp_path / "workers" / "run.json").read_text())["compute"]
    assert compute["threads"] == 1 and compute["dtype"] == "fp32" and compute["torch"] == torch.__version__


def test_threads_setting_is_restored_and_auto_leaves_it(tiny_pipe, xray):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        [a] = ldmground.ground(tiny_pipe, xray, "Left effusion", QUICK)
        assert torch.get_num_threads() == 2
        [b] = ldmground.ground(tiny_pipe, xray, "Left effusion", QUICK.replace(threads=None))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert QUICK.threads == 1 and QUICK.replace(threads=None).digest() != QUICK.digest()
    np.testing.assert_array_equal(np.isnan(a.heatmap), np.isnan(b.heatmap))


def test_sequential_shards_then_merge(four, tmp_path, capsys):
    csv, _ = four
    out = tmp_path / "out"
    base = ["evaluate", "--model", "centre-prior", "--dataset", str(csv), "--out", str(out), "--quiet"]
    lines = []
    for shard in ("0/2", "1/2", None):
        assert main(base + (["--shard", shard] if shard else [])) == 0
        lines.append(capsys.readouterr().out.strip().splitlines()[-1])
    n0 = int(lines[0].split()[0])
    assert 0 < n0 < N_SAMPLES
    assert lines[1].startswith(f"{N_SAMPLES - n0} succeeded, 0 failed, 0 skipped")
    assert lines[2].startswith(f"0 succeeded, 0 failed, {N_SAMPLES} skipped")
    res = pd.read_csv(out / "results.csv")
    assert len(res) == N_SAMPLES and res["sample_id"].is_unique
    evaluate("centre-prior", csv, None, tmp_path / "single", QUICK, progress=False)
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), pd.read_csv(tmp_path / "single" / "summary.csv"))


@pytest.mark.parametrize("text", ["2/2", "-1/2", "0/0", "1", "a/b", "1/2/3", "1/-2"])
def test_bad_shard_is_a_clear_error(text):
    with pytest.raises(LdmGroundError, match="--shard"):
        parse_shard(text)


def test_good_shards_parse():
    assert parse_shard(None) == (0, 1) and parse_shard("3/4") == (3, 4)


def test_cli_bad_shard_exits_2(four, tmp_path, capsys):
    csv, _ = four
    out = tmp_path / "out"
    assert (
        main(["evaluate", "--model", "centre-prior", "--dataset", str(csv), "--out", str(out), "--shard", "3/2"]) == 2
    )
    assert "--shard 3/2" in capsys.readouterr().err
    assert not out.exists()


# --- bad inputs -------------------------------------------------------------------------------


class Recording(CentrePriorGrounder):
    """Centre prior that keeps what it was given; phrases 'flat' / 'void' / 'boom' get a
    constant map, an all-NaN map, or a crash."""

    def __init__(self, image_size=64):
        super().__init__(image_size)
        self.calls: list[tuple[np.ndarray, list[str]]] = []

    def __call__(self, image, phrases, words):
        self.calls.append((image, list(phrases)))
        if "boom" in phrases:
            raise RuntimeError("model exploded")
        hms = super().__call__(image, phrases, words)
        for i, p in enumerate(phrases):
            if p == "flat":
                hms.maps[i] = np.full(image.shape, 0.5, np.float32)
            elif p == "void":
                hms.maps[i] = np.full(image.shape, np.nan, np.float32)
        return hms


W, H = 96, 80
GOOD_BOX = [38, 30, 20, 20]


def _png(root: Path, name: str, array=None, mode=None) -> str:
    (root / "images").mkdir(parents=True, exist_ok=True)
    array = (blob_image(W, H, 48, 40) * 255).astype(np.uint8) if array is None else array
    Image.fromarray(array, mode=mode).save(root / "images" / name)
    return f"images/{name}"


def _csv(root: Path, rows: list[list], columns=MSCXR_COLUMNS) -> Path:
    """rows: [dicom_id, phrase, path, x, y, w, h] (+ optional width, height); category 'Pneumonia'."""
    full = []
    for r in rows:
        dicom, phrase, path, x, y, w, h, *size = r
        iw, ih = size or (W, H)
        full.append([dicom, "Pneumonia", phrase, path, x, y, w, h, iw, ih])
    csv = root / "data.csv"
    pd.DataFrame(full, columns=MSCXR_COLUMNS)[list(columns)].to_csv(csv, index=False)
    return csv


def _run(root: Path, bad_rows: list[list], grounder=None, **kw):
    """Evaluate one good image plus ``bad_rows``; returns (report, results by dicom_id, grounder)."""
    good = _png(root, "good.png")
    csv = _csv(root, [["good", "left opacity", good, *GOOD_BOX], *bad_rows])
    grounder = grounder or Recording()
    rep = evaluate(grounder, csv, None, root / "out", QUICK, progress=False, **kw)
    res = pd.read_csv(root / "out" / "results.csv", keep_default_na=False, na_values=[""]).set_index("dicom_id")
    assert res.loc["good", "status"] == "ok"  # the batch went on
    return rep, res, grounder


def _failed(res, dicom_id, *words):
    row = res.loc[dicom_id]
    assert row["status"] == "failed"
    for w in words:
        assert w in row["message"], row["message"]
    assert np.isnan(row["cnr"])


def test_missing_image_file_fails_that_sample(tmp_path):
    rep, res, g = _run(tmp_path, [["gone", "right effusion", "images/gone.png", *GOOD_BOX]])
    _failed(res, "gone", "image file not found", "gone.png")
    assert (rep.succeeded, rep.failed, rep.skipped) == (1, 1, 0)
    assert len(g.calls) == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_image_fails_that_sample(tmp_path, damage):
    bad = tmp_path / "images" / "bad.png"
    _png(tmp_path, "bad.png")
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x89PNG\r\n\x1a\n not a png")
    rep, res, g = _run(tmp_path, [["bad", "right effusion", "images/bad.png", *GOOD_BOX]])
    _failed(res, "bad", "cannot read image", "bad.png")
    assert rep.failed == 1 and len(g.calls) == 1


def test_16bit_png_succeeds_with_full_range(tmp_path):
    arr16 = (blob_image(W, H, 30, 40) * 65535).astype(np.uint16)
    path = _png(tmp_path, "deep.png", arr16)
    assert Image.open(tmp_path / path).mode.startswith("I;16")
    rep, res, g = _run(tmp_path, [["deep", "right effusion", path, *GOOD_BOX]])
    assert res.loc["deep", "status"] == "ok" and rep.failed == 0
    image = next(img for img, phrases in g.calls if phrases == ["right effusion"])
    np.testing.assert_allclose(image, arr16 / 65535.0, atol=1e-6)  # not clipped to 8 bits


def test_rgb_png_succeeds_as_grayscale(tmp_path):
    gray = (blob_image(W, H, 30, 40) * 255).astype(np.uint8)
    path = _png(tmp_path, "rgb.png", np.stack([gray] * 3, axis=-1))
    rep, res, g = _run(tmp_path, [["rgb", "right effusion", path, *GOOD_BOX]])
    assert res.loc["rgb", "status"] == "ok" and rep.failed == 0
    image = next(img for img, phrases in g.calls if phrases == ["right effusion"])
    assert image.shape == (H, W)
    np.testing.assert_allclose(image, gray / 255.0, atol=1 / 255)


def test_dicom_succeeds(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    dcm = tmp_path / "images" / "x.dcm"
    dcm.parent.mkdir(parents=True)
    ds = FileDataset(str(dcm), {}, file_meta=meta, preamble=b"\0" * 128)
    arr = (blob_image(W, H, 30, 40) * 4000).astype(np.uint16)
    ds.Rows, ds.Columns = H, W
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = arr.tobytes()
    ds.save_as(dcm, enforce_file_format=True)
    rep, res, g = _run(tmp_path, [["dcm", "right effusion", "images/x.dcm", *GOOD_BOX]])
    assert res.loc["dcm", "status"] == "ok" and rep.failed == 0
    image = next(img for img, phrases in g.calls if phrases == ["right effusion"])
    assert image.shape == (H, W) and image.min() == 0 and image.max() == pytest.approx(1)


def test_size_mismatch_with_csv_fails_that_sample(tmp_path):
    path = _png(tmp_path, "other.png", np.zeros((50, 60), np.uint8))
    rep, res, _ = _run(tmp_path, [["other", "right effusion", path, *GOOD_BOX]])
    _failed(res, "other", "60x50", "image_width")


@pytest.mark.parametrize("phrase", ["", "   "])
def test_empty_phrase_fails_that_sample(tmp_path, phrase):
    rep, res, g = _run(tmp_path, [["empty", phrase, "images/good.png", 10, 10, 20, 20]])
    _failed(res, "empty", "empty phrase")
    assert rep.failed == 1 and g.calls[0][1] == ["left opacity"]  # never sent to the model


@pytest.mark.parametrize(
    "box, reason",
    [
        ((10, 10, 0, 20), "zero-area"),
        ((10, 10, 20, 0), "zero-area"),
        ((10, 10, -5, 20), "zero-area"),
        ((np.nan, 10, 20, 20), "non-finite"),
    ],
)
def test_degenerate_box_fails_that_sample(tmp_path, box, reason):
    rep, res, g = _run(tmp_path, [["deg", "right effusion", "images/good.png", *box]])
    _failed(res, "deg", reason)
    assert rep.failed == 1 and g.calls[0][1] == ["left opacity"]


def test_box_outside_image_is_dropped_and_counted(tmp_path):
    rep, res, _ = _run(
        tmp_path,
        [
            ["out", "right effusion", "images/good.png", 200, 10, 20, 20],  # only box outside: sample skipped
            ["half", "small nodule", "images/good.png", 10, 10, 20, 20],
            ["half", "small nodule", "images/good.png", 10, 500, 20, 20],  # second box outside: dropped
        ],
    )
    assert "out" not in res.index and res.loc["half", "status"] == "ok"
    assert len(res) == 2 and rep.failed == 0
    counts = json.loads((tmp_path / "out" / "run.json").read_text())["dataset_counts"]
    assert counts["dropped_boxes"] == 2 and counts["skipped_samples"] == 1 and counts["samples"] == 2


def test_constant_and_nan_heatmaps(tmp_path):
    rep, res, g = _run(
        tmp_path,
        [["flat", "flat", "images/good.png", 10, 10, 20, 20], ["void", "void", "images/good.png", 10, 10, 20, 20]],
    )
    assert res.loc["flat", "status"] == "ok" and "constant heatmap" in res.loc["flat", "message"]
    assert res.loc["flat", "cnr"] == 0
    _failed(res, "void", "all NaN")
    assert (rep.succeeded, rep.failed) == (2, 1) and len(g.calls) == 1  # three phrases, one image, one call


def test_model_crash_fails_that_image_only(tmp_path):
    _png(tmp_path, "b.png")
    rep, res, _ = _run(tmp_path, [["crash", "boom", "images/b.png", *GOOD_BOX]])
    _failed(res, "crash", "RuntimeError: model exploded")


def test_duplicate_rows_counted_and_evaluated_once(tmp_path):
    row = ["dup", "right effusion", "images/good.png", 10, 10, 20, 20]
    rep, res, g = _run(tmp_path, [row, list(row), list(row)])
    assert list(res.index).count("dup") == 1 and rep.succeeded == 2
    assert sum(p.count("right effusion") for _, p in g.calls) == 1
    assert json.loads((tmp_path / "out" / "run.json").read_text())["dataset_counts"]["duplicate_rows"] == 2


def test_missing_columns_stop_before_compute(tmp_path):
    path = _png(tmp_path, "good.png")
    csv = _csv(tmp_path, [["good", "left opacity", path, *GOOD_BOX]], columns=[c for c in MSCXR_COLUMNS if c != "h"])
    g = Recording()
    with pytest.raises(LdmGroundError, match=r"lacks column\(s\) \['h'\]"):
        evaluate(g, csv, None, tmp_path / "out", QUICK, progress=False)
    assert g.calls == [] and not (tmp_path / "out").exists()


# the two cases where the model matters: its input size and its text encoder's limit


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """One tiny-model run: a 40x32 image (input is 64) and a too-long phrase on the good image."""
    root = tmp_path_factory.mktemp("tiny")
    small = _png(root, "small.png", (blob_image(40, 32, 20, 16) * 255).astype(np.uint8))
    rows = [
        ["small", "right effusion", small, 5, 5, 10, 10, 40, 32],
        ["long", "opacity in the left lower lobe " * 30, "images/good.png", *GOOD_BOX],
    ]
    rep, res, _ = _run(root, rows, grounder=make_grounder("tiny", QUICK))
    assert (rep.succeeded, rep.failed) == (3, 0)
    return res


def test_image_smaller_than_model_input_succeeds_with_note(tiny_results):
    res = tiny_results
    assert res.loc["small", "status"] == "ok" and np.isfinite(res.loc["small", "cnr"])
    assert "image 40x32 is smaller than the model input 64" in res.loc["small", "message"]
    assert "smaller" not in str(res.loc["good", "message"])  # 96x80 >= 64


def test_phrase_longer_than_encoder_succeeds_truncated(tiny_results):
    res = tiny_results
    assert res.loc["long", "status"] == "ok" and np.isfinite(res.loc["long", "cnr"])
    assert res.loc["long", "message"].count("more than the encoder's 77; truncated") == 1
    assert "truncated" not in str(res.loc["good", "message"])


# --- the command line over a mixed folder -------------------------------------------------------


def test_cli_mixed_folder_exit_code_and_counts(tmp_path, capsys):
    good = _png(tmp_path, "good.png")
    other = _png(tmp_path, "other.png")
    (tmp_path / "images" / "bad.png").write_bytes(b"not an image")
    csv = _csv(
        tmp_path,
        [
            ["a", "left opacity", good, *GOOD_BOX],
            ["b", "right opacity", other, *GOOD_BOX],
            ["c", "", good, *GOOD_BOX],
            ["d", "effusion", "images/bad.png", *GOOD_BOX],
            ["e", "effusion", "images/missing.png", *GOOD_BOX],
            ["f", "nodule", other, 10, 10, 0, 5],
        ],
    )
    args = ["evaluate", "--model", "centre-prior", "--dataset", str(csv), "--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "2 succeeded, 4 failed, 0 skipped (already done); stored: 6 samples, 4 failed"
    )
    res = pd.read_csv(tmp_path / "out" / "results.csv")
    assert dict(zip(res["dicom_id"], res["status"], strict=True)) == dict(
        a="ok", b="ok", c="failed", d="failed", e="failed", f="failed"
    )
    assert res.loc[res["status"] == "failed", "message"].str.len().gt(5).all()  # each with a reason
    # a rerun skips everything and still reports the stored failures; --retry-failed retries them
    assert main(args) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("0 succeeded, 0 failed, 6 skipped")
    assert main(args + ["--retry-failed"]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("0 succeeded, 4 failed, 2 skipped")


def test_cli_wrong_model_folder_exits_2_before_compute(four, tmp_path, capsys):
    csv, _ = four
    folder = tmp_path / "not-a-model"
    (folder / "vae").mkdir(parents=True)
    out = tmp_path / "out"
    assert main(["evaluate", "--model", str(folder), "--dataset", str(csv), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {folder} is not a diffusers model folder: it has no unet/ subfolder"]
    assert not out.exists()


# --- provenance ---------------------------------------------------------------------------------


def test_run_json_records_version_config_and_weight_hashes(four, tmp_path, capsys):
    from ldmground.models.folder import load_pipeline, save_pipeline

    csv, _ = four
    model = save_pipeline(load_pipeline("tiny"), tmp_path / "model")
    out = tmp_path / "out"
    args = [
        "evaluate",
        "--model",
        str(model),
        "--dataset",
        str(csv),
        "--out",
        str(out),
        *STEPS,
        "--limit",
        "1",
        "--quiet",
    ]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    cfg = _config(build_parser().parse_args(args))
    assert run["ldmground_version"] == ldmground.__version__
    assert run["model"] == str(model)
    assert run["config"] == json.loads(json.dumps(cfg.to_dict())) and run["config_hash"] == cfg.digest()
    assert run["dataset"] == str(csv) and run["dataset_counts"]["samples"] == N_SAMPLES
    hashes = run["weights_sha256"]
    for part in ("unet", "vae"):
        name = f"{part}/diffusion_pytorch_model.safetensors"
        assert hashes[name] == hashlib.sha256((model / name).read_bytes()).hexdigest()
    on_disk = {f"{p.parent.name}/{p.name}" for p in model.glob("*/*.safetensors")}
    assert set(hashes) == on_disk
