"""Reader for MS-CXR's local-alignment CSV (v1.0.0 and v1.1.0) and sets in its format.

One CSV row is one box. Rows with the same (path, label_text) are one sample (an
image-sentence pair) with several boxes. Boxes are in original-image pixels; ``path`` is
relative to the images root (MIMIC-CXR-JPG for the real data).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import LdmGroundError
from ..geometry import Geometry

log = logging.getLogger(__name__)

MSCXR_COLUMNS = [
    "dicom_id",
    "category_name",
    "label_text",
    "path",
    "x",
    "y",
    "w",
    "h",
    "image_width",
    "image_height",
]
"""Columns of MS-CXR v1.0.0; v1.1.0 appends ``split``."""


@dataclass(frozen=True)
class Sample:
    """One image-phrase pair.

    Attributes:
        sample_id: stable id: ``<dicom_id>-<8 hex of sha1(label_text)>``.
        boxes: ``(x, y, w, h)`` in original-image pixels, in CSV order.
        width, height: original image size in pixels (from the CSV).
        problem: why this sample cannot be evaluated (a malformed row of a box-list CSV,
            naming the file, line and column; its image missing), or "". Evaluation stores
            the sample as failed with this message. MS-CXR samples always have "".
    """

    sample_id: str
    dicom_id: str
    category: str
    phrase: str
    path: str
    boxes: tuple[tuple[float, float, float, float], ...]
    width: int
    height: int
    split: str = ""
    problem: str = ""

    def image_path(self, root: str | Path) -> Path:
        return Path(root) / self.path


def read_mscxr_csv(csv_path: str | Path) -> pd.DataFrame:
    """Read and validate the CSV; a missing column stops with one clear message."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise LdmGroundError(f"data set CSV not found: {csv_path}")
    df = pd.read_csv(csv_path, keep_default_na=False, na_values=[""])
    missing = [c for c in MSCXR_COLUMNS if c not in df.columns]
    if missing:
        raise LdmGroundError(
            f"{csv_path} lacks column(s) {missing}; an MS-CXR CSV needs {MSCXR_COLUMNS} (+ optional 'split')"
        )
    return df


def is_degenerate(box: tuple[float, float, float, float]) -> bool:
    """A box with a missing coordinate or no area."""
    return not all(math.isfinite(v) for v in box) or not (box[2] > 0 and box[3] > 0)


def boxes_in_crop(boxes, width: int, height: int, crop_size: int) -> list:
    """The boxes that reach into the centre crop of a ``width`` x ``height`` image.

    Degenerate boxes (w or h <= 0, NaN) are kept, so that evaluation can fail the sample
    with a reason instead of the box vanishing as "outside the crop".
    """
    geo = Geometry(width, height, crop_size)
    return [b for b in boxes if is_degenerate(b) or geo.box_to_model(b) is not None]


def _sample_id(dicom_id: str, phrase: str) -> str:
    return f"{dicom_id}-{hashlib.sha1(phrase.encode()).hexdigest()[:8]}"


def read_sample_ids(path: str | Path) -> list[str]:
    """Sample ids from a file: a CSV with a ``sample_id`` column, or with ``dicom_id`` and
    ``label_text`` columns (one row per pair, as MS-CXR spells them), or plain text with one
    id per line (``<dicom_id>-<8 hex>``, the ``sample_id`` of ``results.csv``)."""
    path = Path(path)
    if not path.is_file():
        raise LdmGroundError(f"sample id list not found: {path}")
    if path.suffix.lower() == ".csv":
        df = pd.read_csv(path, keep_default_na=False, dtype=str)
        if "sample_id" in df.columns:
            return list(df["sample_id"])
        if {"dicom_id", "label_text"} <= set(df.columns):
            return [_sample_id(d, t) for d, t in zip(df["dicom_id"], df["label_text"], strict=True)]
        raise LdmGroundError(f"{path} needs a 'sample_id' column, or 'dicom_id' and 'label_text' columns")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_mscxr(
    csv_path: str | Path,
    images_root: str | Path | None = None,
    split: str | None = None,
    crop_size: int | None = 512,
    check_files: bool = True,
    prompt_column: str | None = None,
    sample_ids: Collection[str] | None = None,
) -> tuple[list[Sample], dict[str, int]]:
    """Samples of an MS-CXR-format CSV.

    Args:
        csv_path: the CSV (MS-CXR v1.0.0 / v1.1.0 or the phantom set).
        images_root: folder that ``path`` is relative to (default: the CSV's folder).
        split: keep only rows of this ``split`` (needs the column).
        crop_size: model input S; boxes wholly outside the short-side centre crop are
            dropped and samples left with no box are skipped. None keeps every box.
        check_files: verify every image exists before returning; missing ones are one
            error that says how many and lists the first few.
        prompt_column: ground this column's text instead of ``label_text`` (e.g. the
            rewritten prompts of a follow-up protocol); it must be the same on every row of a
            sample. Sample ids stay those of ``label_text``.
        sample_ids: keep only these samples (see :func:`read_sample_ids`); an id that
            matches no sample is an error naming it.

    Returns:
        (samples in CSV order, counts: rows, samples, duplicate_rows, dropped_boxes,
        skipped_samples).
    """
    df = read_mscxr_csv(csv_path)
    if prompt_column is not None and prompt_column not in df.columns:
        raise LdmGroundError(f"{csv_path} has no column {prompt_column!r} (--prompt-column)")
    root = Path(images_root) if images_root is not None else Path(csv_path).parent
    if split is not None:
        if "split" not in df.columns:
            raise LdmGroundError(f"{csv_path} has no 'split' column (MS-CXR v1.0.0); drop --split")
        df = df[df["split"] == split]
    counts = {"rows": len(df), "duplicate_rows": int(df.duplicated().sum())}
    df = df.drop_duplicates()
    samples: list[Sample] = []
    dropped_boxes = skipped = 0
    for (path, phrase), rows in df.groupby(["path", "label_text"], sort=False, dropna=False):
        first = rows.iloc[0]
        width, height = int(first["image_width"]), int(first["image_height"])
        boxes = [tuple(float(v) for v in r) for r in rows[["x", "y", "w", "h"]].itertuples(index=False)]
        if crop_size is not None:
            kept = boxes_in_crop(boxes, width, height, crop_size)
            dropped_boxes += len(boxes) - len(kept)
            boxes = kept
        if not boxes:
            skipped += 1
            continue
        phrase = "" if pd.isna(phrase) else str(phrase)
        prompt = phrase
        if prompt_column is not None:
            prompts = rows[prompt_column].fillna("").astype(str).unique()
            if len(prompts) != 1:
                raise LdmGroundError(
                    f"{csv_path}: column {prompt_column!r} differs between the boxes of {first['dicom_id']} / "
                    f"{phrase!r}: {list(prompts)}"
                )
            prompt = prompts[0]
        samples.append(
            Sample(
                sample_id=_sample_id(str(first["dicom_id"]), phrase),
                dicom_id=str(first["dicom_id"]),
                category=str(first["category_name"]),
                phrase=prompt,
                path=str(path),
                boxes=tuple(boxes),
                width=width,
                height=height,
                split=str(first["split"]) if "split" in rows.columns else "",
            )
        )
    if sample_ids is not None:
        wanted = set(sample_ids)
        unknown = sorted(wanted - {s.sample_id for s in samples})
        if unknown:
            raise LdmGroundError(
                f"{len(unknown)} of {len(wanted)} listed sample ids match no sample of {csv_path} "
                f"(first: {', '.join(unknown[:5])})"
            )
        samples = [s for s in samples if s.sample_id in wanted]
    counts.update(samples=len(samples), dropped_boxes=dropped_boxes, skipped_samples=skipped)
    if check_files:
        missing = [s.path for s in samples if not s.image_path(root).is_file()]
        if missing:
            shown = ", ".join(missing[:5])
            raise LdmGroundError(
                f"{len(missing)} of {len(samples)} images are missing under {root} (first: {shown}); "
                "check --images (the MIMIC-CXR-JPG root for MS-CXR)"
            )
    if skipped or dropped_boxes:
        log.info("dropped %d boxes outside the crop; skipped %d samples with no box left", dropped_boxes, skipped)
    return samples, counts
