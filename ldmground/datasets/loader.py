"""One entry for every supported box format: :func:`load_dataset`.

``format`` is ``"mscxr"`` (MS-CXR's local-alignment CSV and sets in its schema, such as the
phantom set), ``"vindr"`` (VinDr-CXR's ``annotations_test.csv``) or ``"chestxray8"`` (NIH's
``BBox_List_2017.csv``); None detects it from the CSV's header: the format whose required
columns are all present. A header that fits none is read as the closest format, whose reader
then names the missing columns.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import pandas as pd

from ..errors import LdmGroundError
from ._boxes import DEFAULT_TEMPLATE
from .chestxray8 import CHESTXRAY8_COLUMNS, load_chestxray8
from .mscxr import MSCXR_COLUMNS, Sample, load_mscxr
from .vindr import VINDR_COLUMNS, load_vindr

FORMAT_COLUMNS: dict[str, list[str]] = {
    "mscxr": MSCXR_COLUMNS,
    "vindr": VINDR_COLUMNS,
    "chestxray8": CHESTXRAY8_COLUMNS,
}
"""Required CSV columns of each format, in the order detection tries them."""

FORMATS = tuple(FORMAT_COLUMNS)


def detect_format(csv_path: str | Path) -> str:
    """The format of a CSV from its header alone."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise LdmGroundError(f"data set CSV not found: {csv_path}")
    try:
        columns = set(pd.read_csv(csv_path, nrows=0).columns)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise LdmGroundError(f"cannot read {csv_path} as CSV: {err}") from err
    overlap = {name: len(columns & set(cols)) for name, cols in FORMAT_COLUMNS.items()}
    for name, cols in FORMAT_COLUMNS.items():
        if overlap[name] == len(cols):
            return name
    best = max(overlap, key=overlap.get)
    if overlap[best] == 0:
        shown = "; ".join(f"{name}: {cols}" for name, cols in FORMAT_COLUMNS.items())
        raise LdmGroundError(
            f"cannot tell the format of {csv_path} from its columns {sorted(columns)[:12]}; expected one of: {shown}"
        )
    return best  # its reader names the missing columns


def load_dataset(
    csv_path: str | Path,
    images_root: str | Path | None = None,
    format: str | None = None,
    template: str | None = None,
    *,
    crop_size: int | None = 512,
    check_files: bool = True,
    sample_ids: Collection[str] | None = None,
    split: str | None = None,
    prompt_column: str | None = None,
    classes: Collection[str] | Mapping[str, str] | str | None = None,
    image_suffix: str | None = None,
) -> tuple[list[Sample], dict[str, int]]:
    """Samples of any supported CSV (see the module docstring).

    Args:
        csv_path, images_root, crop_size, check_files, sample_ids: as for every reader.
        format: ``"mscxr"``, ``"vindr"``, ``"chestxray8"`` or None (detect).
        template: VinDr-CXR / ChestX-ray8: the phrase of a class, with ``{class}`` or
            ``{class_lower}`` (default ``"The patient has {class}"``, the authors').
        split, prompt_column: MS-CXR only (:func:`ldmground.datasets.mscxr.load_mscxr`).
        classes: VinDr-CXR / ChestX-ray8 only: which classes to keep (and rename); VinDr
            also takes ``"authors"``.
        image_suffix: VinDr-CXR only (default ``.dicom``).

    Returns:
        (samples, counts), as the format's reader returns them.
    """
    fmt = detect_format(csv_path) if format is None else format
    if fmt not in FORMAT_COLUMNS:
        raise LdmGroundError(f"unknown data set format {format!r}; use one of {list(FORMATS)} (or leave it out)")
    common = dict(crop_size=crop_size, check_files=check_files, sample_ids=sample_ids)
    if fmt == "mscxr":
        for option, name, hint in (
            (template, "prompt template", "MS-CXR has its own phrases; use --prompt-column for rewritten ones"),
            (classes, "class selection", "subset MS-CXR with --ids"),
            (image_suffix, "image suffix", "MS-CXR's 'path' column names each file"),
        ):
            if option is not None:
                raise LdmGroundError(f"a {name} does not apply to MS-CXR-format {csv_path}: {hint}")
        return load_mscxr(csv_path, images_root, split=split, prompt_column=prompt_column, **common)
    for option, name in ((split, "--split"), (prompt_column, "--prompt-column")):
        if option is not None:
            raise LdmGroundError(f"{name} applies to MS-CXR only, not to the {fmt} file {csv_path}")
    template = DEFAULT_TEMPLATE if template is None else template
    if fmt == "vindr":
        return load_vindr(
            csv_path, images_root, template, classes=classes, image_suffix=image_suffix or ".dicom", **common
        )
    if image_suffix is not None:
        raise LdmGroundError(f"an image suffix does not apply to ChestX-ray8's {csv_path}: 'Image Index' is the file")
    return load_chestxray8(csv_path, images_root, template, classes=classes, **common)
