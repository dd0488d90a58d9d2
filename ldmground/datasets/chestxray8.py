"""Reader of NIH ChestX-ray8's box list (``BBox_List_2017.csv``) as grounding samples.

The data set: NIH Clinical Center ChestX-ray8 / ChestX-ray14 (Wang et al., "ChestX-ray8:
Hospital-scale Chest X-ray Database and Benchmarks on Weakly-Supervised Classification and
Localization of Common Thorax Diseases", CVPR 2017), 112,120 frontal X-rays as 1024 x 1024
PNGs from https://nihcc.app.box.com/v/ChestXray-NIHCC (``images_001.tar.gz`` ...
``images_012.tar.gz``, each unpacking into one ``images/`` folder). ``BBox_List_2017.csv``
holds 984 boxes on 880 images for 8 findings (``Atelectasis, Cardiomegaly, Effusion,
Infiltrate, Mass, Nodule, Pneumonia, Pneumothorax``; the box list writes ``Infiltrate`` where
the label file writes ``Infiltration``).

Its header is ``Image Index,Finding Label,Bbox [x,y,w,h],,,``: the commas inside
``Bbox [x,y,w,h]`` split it, so the columns are ``Image Index``, ``Finding Label``,
``Bbox [x``, ``y``, ``w``, ``h]`` and three empty ones, which this reader ignores. Boxes are
``(x, y, w, h)`` in pixels of the 1024 x 1024 PNG (start at x, y; extend w right, h down).
Sources: the NIH README and the box list itself as mirrored in public repositories (its
first line as above, float coordinates such as ``225.084745762712``).

Image sizes are read from each PNG's header (PIL parses the header only); where an image
cannot be read, the documented 1024 x 1024 is used for the crop and the sample carries the
problem, so evaluation fails it with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from pathlib import Path

from ..errors import LdmGroundError
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

CHESTXRAY8_COLUMNS = ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]
"""Columns of ``BBox_List_2017.csv`` as pandas reads its header (trailing empty ones aside)."""

CHESTXRAY8_SIZE = (1024, 1024)
"""The documented size of every ChestX-ray8 PNG, used only where a header cannot be read."""


def load_chestxray8(
    csv_path: str | Path,
    images_root: str | Path | None = None,
    template: str = DEFAULT_TEMPLATE,
    crop_size: int | None = 512,
    check_files: bool = True,
    sample_ids: Collection[str] | None = None,
    classes: Collection[str] | Mapping[str, str] | str | None = None,
) -> tuple[list[Sample], dict[str, int]]:
    """Samples of ``BBox_List_2017.csv``: one per (image, finding), boxes merged.

    Args:
        csv_path: ``BBox_List_2017.csv`` (or a file with its columns).
        images_root: the folder holding the ``Image Index`` files (the unpacked ``images/``;
            default: the CSV's folder).
        template, crop_size, check_files, sample_ids, classes: as for
            :func:`ldmground.datasets.vindr.load_vindr` (no ``"authors"`` selection here).

    Returns:
        (samples in CSV order, counts: rows, left_out_rows, duplicate_rows, samples,
        dropped_boxes, skipped_samples, problem_samples).
    """
    check_template(template)
    csv_path = Path(csv_path)
    root = Path(images_root) if images_root is not None else csv_path.parent
    if isinstance(classes, str) and classes.strip() == "authors":
        raise LdmGroundError("classes='authors' is the authors' VinDr-CXR selection; name ChestX-ray8 classes instead")
    mapping = class_mapping(classes)
    df = read_box_csv(csv_path, CHESTXRAY8_COLUMNS, "ChestX-ray8 (BBox_List_2017.csv)")
    counts = {"rows": len(df)}
    df = select_classes(df, "Finding Label", mapping, csv_path, counts)
    duplicated = df.duplicated()
    counts["duplicate_rows"] = int(duplicated.sum())
    df = df[~duplicated]
    rows = []
    for line, image, cls, *coords in zip(df.index, *(df[c] for c in CHESTXRAY8_COLUMNS), strict=True):
        values, problems = parse_row(CHESTXRAY8_COLUMNS, image, cls, coords)
        for column, value in zip(("w", "h]"), values[2:], strict=True):
            if math.isfinite(value) and not value > 0:
                problems.append(f"column {column!r} ({value:g}) is not positive")
        category = mapping.get(cls, cls) if mapping else cls
        rows.append(BoxRow(int(line), image, image, category, tuple(values), problems))
    return build_samples(
        csv_path,
        rows,
        root,
        template,
        counts,
        id_column="Image Index",
        crop_size=crop_size,
        check_files=check_files,
        sample_ids=sample_ids,
        default_size=CHESTXRAY8_SIZE,
        images_hint="the unpacked images/ folder of ChestX-ray8's PNGs",
    )
