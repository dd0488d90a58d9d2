"""Reader of VinDr-CXR's box annotations (``annotations_test.csv``) as grounding samples.

The data set: VinDr-CXR 1.0.0 on PhysioNet (credentialed access; Nguyen et al., "VinDr-CXR:
An open dataset of chest X-rays with radiologist's annotations", Scientific Data 9, 429
(2022), arXiv:2012.15029). 18,000 postero-anterior chest X-rays in DICOM, 15,000 training
images each read by 3 radiologists and 3,000 test images labelled by the consensus of 5;
22 local labels carry boxes. Files used here:

* ``annotations/annotations_test.csv``: one row per box, columns ``image_id, class_name,
  x_min, y_min, x_max, y_max`` (pixels of the stored image; the training file adds
  ``rad_id``, which this reader ignores). An image without findings has one ``No finding``
  row with empty coordinates; those rows are skipped and counted (``no_finding_rows``).
* ``test/<image_id>.dicom``: the images (VinDr ships ``.dicom``, not ``.dcm``). Their size is
  not in the CSV: it is read from each DICOM header (``Columns`` x ``Rows``) with
  ``stop_before_pixels``, once per image, so loading the list decodes no pixel data.

Sources checked for the column names, the ``.dicom`` suffix and the prompt: the PhysioNet
project page (https://physionet.org/content/vindr-cxr/1.0.0/); the authors' loader,
``vios-s/ldm-phrase-grounding`` ``data/vindr_cxr.py`` (reads
``annotations/annotations_{split}.csv``, drops rows with a missing value, keeps 8 findings
and renames ``ILD`` and ``Infiltration`` to ``Pneumonia``, merges the boxes of an
(image_id, class_name) pair, converts ``x_min..x_max`` to ``(x, y, w, h)`` after ``int()``
of each coordinate, and prompts ``f"The patient has {class_name}"`` without lower-casing; it
reads JPEG copies ``{split}_jpg/<image_id>.jpg`` made from the DICOMs, not the DICOMs); and
public readers of the same file that use ``image_id,class_name,x_min,y_min,x_max,y_max`` and
``<root>/test/<image_id>.dicom``.

Differences from the authors' loader, on purpose: coordinates stay as published (floats;
they truncate each to an integer, a sub-pixel shift); every class is kept unless
``classes`` selects (``classes="authors"``: their 8 findings with ``ILD`` / ``Infiltration``
as ``Pneumonia``; their extra filter, an ``ILD`` / ``Infiltration`` box only on images whose
``image_labels_test.csv`` row has one of the 8 findings, is not applied); the DICOM is read
directly (:func:`ldmground.method.heatmap.load_image`: rescale, VOI LUT / window, MONOCHROME1
inversion, min-max), where their JPEG conversion is not published.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from pathlib import Path

from ._boxes import (
    DEFAULT_TEMPLATE,
    BoxRow,
    build_samples,
    check_template,
    class_mapping,
    parse_row,
    read_box_csv,
    select_classes,
)
from .mscxr import Sample

VINDR_COLUMNS = ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
"""Columns of VinDr-CXR 1.0.0's ``annotations_test.csv`` (``annotations_train.csv`` adds ``rad_id``)."""

NO_FINDING = "No finding"

VINDR_AUTHORS_CLASSES: dict[str, str] = {
    "Lung Opacity": "Lung Opacity",
    "Cardiomegaly": "Cardiomegaly",
    "Pleural effusion": "Pleural effusion",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Atelectasis": "Atelectasis",
    "Edema": "Edema",
    "Pneumonia": "Pneumonia",
    "ILD": "Pneumonia",
    "Infiltration": "Pneumonia",
}
"""The authors' selection (``data/vindr_cxr.py``: ``PATHOLOGIES`` plus ``ILD`` and
``Infiltration`` renamed to ``Pneumonia``), as ``classes=`` takes it (``"authors"``)."""


def load_vindr(
    csv_path: str | Path,
    images_root: str | Path | None = None,
    template: str = DEFAULT_TEMPLATE,
    crop_size: int | None = 512,
    check_files: bool = True,
    sample_ids: Collection[str] | None = None,
    classes: Collection[str] | Mapping[str, str] | str | None = None,
    image_suffix: str = ".dicom",
) -> tuple[list[Sample], dict[str, int]]:
    """Samples of a VinDr-CXR annotations CSV: one per (image, class), boxes merged.

    Args:
        csv_path: ``annotations_test.csv`` (or a file with its columns).
        images_root: the folder holding ``<image_id><image_suffix>`` (VinDr's ``test/``;
            default: the CSV's folder).
        template: the phrase of a class, with ``{class}`` (as the CSV writes it) or
            ``{class_lower}``; default the authors' ``"The patient has {class}"``.
        crop_size: model input S; boxes wholly outside the centre crop are dropped and
            samples left with no box are skipped. None keeps every box.
        check_files: stop with one error if images are missing; with False (what
            :func:`ldmground.runs.evaluation.evaluate` uses) a missing image is the sample's
            ``problem`` instead.
        sample_ids: keep only these samples (``<image_id>-<8 hex of sha1(phrase)>``).
        classes: keep only these classes (a collection, or a comma-separated string); a
            mapping also renames, merging the boxes of classes that map to one name;
            ``"authors"``: :data:`VINDR_AUTHORS_CLASSES`. Default: every class.
        image_suffix: the image file suffix (``.dicom`` as published; ``.png``/``.jpg`` for
            converted copies, whose size is then read from their header).

    Returns:
        (samples in CSV order, counts: rows, no_finding_rows, left_out_rows, duplicate_rows,
        samples, dropped_boxes, skipped_samples, problem_samples).
    """
    check_template(template)
    csv_path = Path(csv_path)
    root = Path(images_root) if images_root is not None else csv_path.parent
    if isinstance(classes, str) and classes.strip() == "authors":
        classes = VINDR_AUTHORS_CLASSES
    mapping = class_mapping(classes)
    df = read_box_csv(csv_path, VINDR_COLUMNS, "VinDr-CXR")
    counts = {"rows": len(df)}
    no_finding = df["class_name"] == NO_FINDING
    counts["no_finding_rows"] = int(no_finding.sum())
    df = select_classes(df[~no_finding], "class_name", mapping, csv_path, counts)
    duplicated = df.duplicated()
    counts["duplicate_rows"] = int(duplicated.sum())
    df = df[~duplicated]
    rows = []
    for line, image_id, cls, *coords in zip(df.index, *(df[c] for c in VINDR_COLUMNS), strict=True):
        values, problems = parse_row(VINDR_COLUMNS, image_id, cls, coords)
        x0, y0, x1, y1 = values
        for lo, hi, axis in ((x0, x1, "x"), (y0, y1, "y")):
            if math.isfinite(lo) and math.isfinite(hi) and not hi > lo:
                problems.append(f"column '{axis}_max' ({hi:g}) is not greater than column '{axis}_min' ({lo:g})")
        category = mapping.get(cls, cls) if mapping else cls
        box = (x0, y0, x1 - x0, y1 - y0)
        rows.append(BoxRow(int(line), image_id, f"{image_id}{image_suffix}", category, box, problems))
    return build_samples(
        csv_path,
        rows,
        root,
        template,
        counts,
        id_column="image_id",
        crop_size=crop_size,
        check_files=check_files,
        sample_ids=sample_ids,
        default_size=None,
        images_hint=f"VinDr-CXR's test/ folder of <image_id>{image_suffix}",
    )
