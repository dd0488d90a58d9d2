"""Batch evaluation on a data set with boxes (MS-CXR, VinDr-CXR, ChestX-ray8), resumable and shardable.

Every finished image is committed at once to ``OUT/results.sqlite`` (SQLite in WAL mode),
one row per sample, keyed by sample id + config hash + model spec + a digest of the model's
weights files. A rerun with the same arguments and weights skips what is there; new weights
under the same spec (a retrained ``demo``, an updated folder) are computed afresh; shards
and processes (``--shard i/n`` or ``accelerate launch``) write to the same file. At the end
the rows of this run's (model, weights, config) are exported to ``results.csv`` and
summarised per category in ``summary.csv``; ``run.json`` records the version, config, model
spec and the weights' SHA-256.

With ``batch_images`` B > 1 (``--batch-images``) the images are grounded B at a time, in
batches fixed by the data set's order (consecutive images, whatever is done already), each
committed in one transaction; shards take whole batches. A batch's size changes the last
bits of its images' results (docs/performance.md), so the key holds B when it is not 1 and
runs under different B never share rows; ``run.json`` records B under ``compute``.

Per-sample problems (unreadable image, empty phrase, zero-area box, a malformed row of a box
list, ...) are stored with ``status="failed"`` and a reason, and the batch goes on.
Configuration problems (missing columns, unknown model, no image found at all) stop before
any compute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .._version import __version__
from ..config import GroundingConfig
from ..datasets.loader import detect_format, load_dataset
from ..datasets.mscxr import Sample
from ..errors import LdmGroundError
from ..method.heatmap import load_image
from ..metrics import all_metrics
from .grounders import CentrePriorGrounder, DiffusionGrounder, Grounder
from .store import COLUMNS, METRICS, RESULTS_VERSION, ResultStore, sample_key

log = logging.getLogger(__name__)

def make_grounder(spec: str, config: GroundingConfig, device: str | None = None) -> Grounder:
    """``centre-prior``, ``biovil`` / ``biovil-t`` (also ``biovil[-t]:<folder>`` or ``:random``:
    the BioViL baselines, :mod:`ldmground.models.biovil`), or any spec
    :func:`ldmground.models.folder.load_pipeline` knows."""
    if spec == "centre-prior":
        return CentrePriorGrounder()
    from .biovil import grounder_from_spec, parse_biovil_spec

    if parse_biovil_spec(spec) is not None:
        return grounder_from_spec(spec, device)
    from ..models.folder import load_pipeline

    return DiffusionGrounder(load_pipeline(spec, device=device), config)


# --- results store ------------------------------------------------------------------------


# Raised whenever stored rows of an earlier release would no longer be what this one computes
# (2: the authors' metric definitions, the model's own input range and single-threaded runs;
# 3: the phrase rows are a UNet call of their own, apart from the empty prompt's).
@dataclass
class EvaluationReport:
    """Counts of one call of :func:`evaluate` and where its files are."""

    out_dir: Path
    succeeded: int
    failed: int
    skipped: int
    summary: pd.DataFrame
    results: pd.DataFrame

    @property
    def failed_total(self) -> int:
        """Failed samples among all stored results of this data set, model and config."""
        return int((self.results["status"] != "ok").sum())

    @property
    def line(self) -> str:
        return (
            f"{self.succeeded} succeeded, {self.failed} failed, {self.skipped} skipped (already done); "
            f"stored: {len(self.results)} samples, {self.failed_total} failed"
        )


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); ``None`` -> (0, 1)."""
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise LdmGroundError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise LdmGroundError(f"--shard {text}: need 0 <= i < n")
    return i, n


def in_shard(path: str, shard: tuple[int, int]) -> bool:
    """Deterministic split by image, so all phrases of an image go to the same shard."""
    i, n = shard
    return int(hashlib.sha1(path.encode()).hexdigest(), 16) % n == i


def _validate_sample(sample: Sample, grounder: Grounder) -> list[str]:
    if sample.problem:  # a malformed row or a missing image, found by the reader
        raise LdmGroundError(sample.problem)
    notes = grounder.check_phrase(sample.phrase)
    for b in sample.boxes:
        if not all(math.isfinite(v) for v in b):
            raise LdmGroundError(f"box {b} has missing or non-finite coordinates (fields x, y, w, h)")
        if not b[2] > 0 or not b[3] > 0:
            raise LdmGroundError(f"zero-area box {b} (fields w, h)")
        if b[0] >= sample.width or b[1] >= sample.height or b[0] + b[2] <= 0 or b[1] + b[3] <= 0:
            raise LdmGroundError(f"box {b} lies outside the {sample.width}x{sample.height} image")
    return notes


def _row(sample: Sample, grounder: Grounder, chash: str, batch: int, status: str, message: str = "", **values) -> dict:
    row = {c: None for c in COLUMNS}
    row.update(
        key=sample_key(sample.sample_id, chash, grounder.spec, grounder.weights_digest, batch),
        sample_id=sample.sample_id,
        dicom_id=sample.dicom_id,
        category=sample.category,
        phrase=sample.phrase,
        model=grounder.spec,
        config_hash=chash,
        status=status,
        message=message,
    )
    row.update(values)
    return row


def _ground_images(
    grounder: Grounder, root: Path, groups: list[tuple[str, list[Sample]]], chash: str, words_for, batch: int
) -> list[dict]:
    """All rows of a batch of images (``(path, samples)`` each); never raises for a
    per-sample or per-image problem: a bad image fails alone, its batch goes on."""
    rows, items, meta = [], [], []
    for path, samples in groups:
        good, notes = [], {}
        for s in samples:
            try:
                notes[s.sample_id] = _validate_sample(s, grounder)
                good.append(s)
            except LdmGroundError as err:
                rows.append(_row(s, grounder, chash, batch, "failed", str(err)))
        if not good:
            continue
        try:
            image = load_image(root / path)
            if image.shape != (good[0].height, good[0].width):
                raise LdmGroundError(
                    f"image {root / path} is {image.shape[1]}x{image.shape[0]} but the CSV says "
                    f"{good[0].width}x{good[0].height} (fields image_width, image_height)"
                )
        except LdmGroundError as err:
            rows += [_row(s, grounder, chash, batch, "failed", str(err)) for s in good]
            continue
        items.append((image, [s.phrase for s in good], [words_for(s) for s in good]))
        meta.append((root / path, good, notes))
    if not items:
        return rows
    start = time.perf_counter()
    with warnings.catch_warnings(record=True):  # kept per image in Heatmaps.image_notes
        warnings.simplefilter("always")
        outcomes = grounder.ground_batch(items)
    seconds = (time.perf_counter() - start) / sum(len(good) for _, good, _ in meta)
    for (path, good, notes), maps in zip(meta, outcomes, strict=True):
        if isinstance(maps, LdmGroundError):
            rows += [_row(s, grounder, chash, batch, "failed", str(maps)) for s in good]
            continue
        if isinstance(maps, Exception):  # a crash inside the model must not end the batch
            log.error("grounding failed on %s", path, exc_info=maps)
            rows += [_row(s, grounder, chash, batch, "failed", f"{type(maps).__name__}: {maps}") for s in good]
            continue
        image_notes = [n for n in maps.image_notes if "smaller than the model input" in n]
        for s, hm, extra in zip(good, maps.maps, maps.notes, strict=True):
            msgs = list(dict.fromkeys(notes[s.sample_id] + list(extra) + image_notes))  # check_phrase repeats some
            if not np.isfinite(hm).any():
                rows.append(_row(s, grounder, chash, batch, "failed", "heatmap is all NaN"))
                continue
            finite = hm[np.isfinite(hm)]
            if finite.max() == finite.min():
                msgs.append("constant heatmap")
            values = all_metrics(hm, s.boxes)
            extra_cols = {"unet_evals": maps.unet_evals, "seconds": seconds, **values}
            rows.append(_row(s, grounder, chash, batch, "ok", "; ".join(msgs), **extra_cols))
    return rows


def image_batches(samples: Sequence[Sample], batch: int) -> list[list[str]]:
    """The data set's images (paths, in order of first appearance) in consecutive groups
    of ``batch``: fixed by the data set alone, so a resumed or sharded run batches every
    image with the same others as an uninterrupted one."""
    paths = list(dict.fromkeys(s.path for s in samples))
    return [paths[k : k + batch] for k in range(0, len(paths), batch)]


def _resolve_batch(requested: int | None, grounder: Grounder, store: ResultStore, run: str) -> int:
    """Images per batch: 1 for grounders that ground one image at a time; else ``requested``
    or, when None, the batch size stored for this run by an earlier or parallel process (so
    that a rerun resumes and all processes agree), else the grounder's default."""
    if requested is not None and requested < 1:
        raise LdmGroundError(f"--batch-images must be >= 1, got {requested}")
    if not grounder.batches_images:
        if requested not in (None, 1):
            log.info("%s grounds one image at a time; --batch-images %d has no effect", grounder.spec, requested)
        return 1
    if requested is not None:
        stored = store.batch_size(run, requested)
        if stored != requested:
            log.warning(
                "this output folder holds results of batch size %d; those of batch size %d are stored apart "
                "(leave --batch-images out to continue with %d)",
                stored,
                requested,
                stored,
            )
        return requested
    return store.batch_size(run, grounder.default_batch_images())


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per-category mean and std of every metric over succeeded samples, plus the macro
    mean over categories (``category="macro"``) and the mean over samples (``"all"``)."""
    ok = results[results["status"] == "ok"].copy()
    ok[METRICS] = ok[METRICS].astype(float)
    if ok.empty:
        return pd.DataFrame(columns=["category", "n"])
    grouped = ok.groupby("category")[METRICS]
    summary = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=0).add_suffix("_std"))
    summary.insert(0, "n", ok.groupby("category").size())
    macro = summary.drop(columns="n").mean().to_frame().T
    macro.insert(0, "n", len(ok))
    macro.index = ["macro"]
    overall = (
        ok[METRICS]
        .mean()
        .add_suffix("_mean")
        .to_frame()
        .T.join(ok[METRICS].std(ddof=0).add_suffix("_std").to_frame().T)
    )
    overall.insert(0, "n", len(ok))
    overall.index = ["all"]
    out = pd.concat([summary, macro, overall])
    out.index.name = "category"
    return out.reset_index()


def evaluate(
    model: str | Grounder,
    dataset: str | Path,
    images: str | Path | None,
    out_dir: str | Path,
    config: GroundingConfig,
    split: str | None = None,
    limit: int | None = None,
    shard: tuple[int, int] = (0, 1),
    device: str | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    on_image_done: Callable[[str], None] | None = None,
    finalize: bool = True,
    prompt_column: str | None = None,
    sample_ids: Sequence[str] | None = None,
    dataset_format: str | None = None,
    prompt_template: str | None = None,
    classes: Sequence[str] | str | None = None,
    batch_images: int | None = None,
) -> EvaluationReport:
    """Evaluate a model (spec or :class:`Grounder`) on a data set CSV.

    Args:
        model: model spec (``tiny``, ``demo``, ``centre-prior``, ``random:<spec>``, a folder,
            a repo id) or a ready :class:`Grounder`.
        dataset: the CSV (MS-CXR-format, VinDr-CXR's ``annotations_test.csv`` or
            ChestX-ray8's ``BBox_List_2017.csv``); ``images``: the folder its image paths are
            relative to.
        out_dir: results folder (created); reruns resume in it.
        limit: evaluate only the first ``limit`` samples (after the split filter).
        shard: ``(i, n)``: this process takes the images whose path hash is i mod n.
        retry_failed: recompute samples stored as failed.
        finalize: write results.csv / summary.csv / run.json (the last process does it).
        prompt_column, sample_ids: see :func:`ldmground.datasets.mscxr.load_mscxr` (a
            follow-up protocol's rewritten prompts and subset).
        dataset_format, prompt_template, classes: ``format``, ``template`` and ``classes``
            of :func:`ldmground.datasets.load_dataset` (the format is detected from the
            CSV's columns when None; the template and classes are for VinDr-CXR and
            ChestX-ray8).
        batch_images: images grounded together (one UNet batch per step); None: the batch
            size this output folder's run already uses, else 1 on the CPU and one from the
            free memory on CUDA. Results of different batch sizes are kept apart (see the
            module's docstring).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    size = model.image_size if isinstance(model, Grounder) else None
    fmt = dataset_format or detect_format(dataset)
    samples, counts = load_dataset(
        dataset,
        images,
        fmt,
        prompt_template,
        split=split,
        crop_size=size or 512,
        check_files=False,
        prompt_column=prompt_column,
        sample_ids=sample_ids,
        classes=classes,
    )
    root = Path(images) if images is not None else Path(dataset).parent
    if limit is not None:
        samples = samples[:limit]
    present = [s for s in samples if s.image_path(root).is_file()]
    if samples and not present:
        raise LdmGroundError(f"none of the {len(samples)} images exists under {root}; check --images")
    grounder = model if isinstance(model, Grounder) else make_grounder(model, config, device)
    out.mkdir(parents=True, exist_ok=True)
    chash = config.digest()
    store = ResultStore(out / "results.sqlite")
    run = f"{grounder.spec}|{grounder.weights_digest}|{chash}|v{RESULTS_VERSION}"
    batch = _resolve_batch(batch_images, grounder, store, run)
    done = store.done_keys()
    if retry_failed:
        failed = set(store.frame(grounder.spec, chash).query("status == 'failed'")["key"])
        done -= failed
    key_of = {
        s.sample_id: sample_key(s.sample_id, chash, grounder.spec, grounder.weights_digest, batch) for s in samples
    }
    # whole batches go to a shard (by their first image; with batch 1, image by image)
    batches = [b for b in image_batches(samples, batch) if in_shard(b[0], shard)]
    mine_paths = {p for b in batches for p in b}
    mine = [s for s in samples if s.path in mine_paths]
    todo = [s for s in mine if key_of[s.sample_id] not in done]
    skipped = len(mine) - len(todo)
    log.info(
        "shard %d/%d: %d of %d samples to compute, %d already done (%d images per batch)",
        *shard,
        len(todo),
        len(mine),
        skipped,
        batch,
    )
    by_image: dict[str, list[Sample]] = {}
    for s in todo:
        by_image.setdefault(s.path, []).append(s)
    words_for = _class_words if config.tokens == "class" else (lambda s: [])
    succeeded = failed_n = 0
    bar = tqdm(total=len(todo), desc=f"evaluate {grounder.spec}", unit="sample", disable=not progress)
    for paths in batches:
        groups = [(p, by_image[p]) for p in paths if p in by_image]
        if not groups:
            continue
        rows = _ground_images(grounder, root, groups, chash, words_for, batch)
        store.write(rows)  # the batch's rows in one transaction
        succeeded += sum(r["status"] == "ok" for r in rows)
        failed_n += sum(r["status"] != "ok" for r in rows)
        bar.update(len(rows))
        if on_image_done:
            for path, _ in groups:
                on_image_done(path)
    bar.close()
    results = store.frame(grounder.spec, chash)
    order = {key_of[s.sample_id]: i for i, s in enumerate(samples)}
    results = results[results["key"].isin(order)]
    results = results.iloc[results["key"].map(order).argsort(kind="stable")].reset_index(drop=True)
    summary = summarize(results)
    if finalize:
        results.drop(columns="key").to_csv(out / "results.csv", index=False)
        summary.to_csv(out / "summary.csv", index=False)
        listed = classes if classes is None or isinstance(classes, str | dict) else list(classes)
        dataset_info = {"format": fmt, "prompt_template": prompt_template, "classes": listed}
        _write_provenance(out, grounder, config, dataset, counts, dataset_info, batch)
    store.close()
    return EvaluationReport(out, succeeded, failed_n, skipped, summary, results)


def compute_environment(config: GroundingConfig, device=None, batch_images: int = 1) -> dict:
    """What the last bits of the results depend on (recorded in ``run.json``), the images
    per UNet batch among them.

    On one machine, the same software, device, dtype and ``threads`` give bitwise-identical
    results in every process; another CPU (its vector instructions), another torch, oneDNN
    or MKL build, or a GPU can change the last bits (see docs/determinism.md).
    """
    import platform

    import torch

    info = {
        "torch": torch.__version__,
        "device": str(device or "cpu"),
        "dtype": config.dtype,
        "batch_images": batch_images,
        "threads": config.threads if config.threads is not None else f"auto ({torch.get_num_threads()})",
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(),
    }
    if str(device or "cpu").startswith("cuda") and torch.cuda.is_available():
        info |= {
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "gpu": torch.cuda.get_device_name(torch.device(str(device))),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
        }
    return info


def _class_words(sample: Sample) -> list[str]:
    return [sample.category]


def _write_provenance(
    out: Path,
    grounder: Grounder,
    config: GroundingConfig,
    dataset,
    counts: dict,
    dataset_info: dict | None = None,
    batch_images: int = 1,
) -> None:
    info = {
        "ldmground_version": __version__,
        "model": grounder.spec,
        "config": config.to_dict(),
        "config_hash": config.digest(),
        "dataset": str(dataset),
        "dataset_counts": counts,
        **{f"dataset_{k}": v for k, v in (dataset_info or {}).items()},
        "weights_sha256": grounder.weights_sha256,
        "weights_digest": grounder.weights_digest,
        "compute": compute_environment(config, getattr(grounder, "device", None), batch_images),
    }
    tmp = out / "run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(out / "run.json")
