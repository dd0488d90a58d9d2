"""Shared reader of box lists: one CSV row per box, the phrase made from the box's class.

VinDr-CXR (:mod:`.vindr`) and NIH ChestX-ray8 (:mod:`.chestxray8`) publish boxes with a
class name, not sentences. Each (image, class) pair becomes one :class:`~.mscxr.Sample`
whose phrase is the prompt template filled with the class, and whose boxes are all the
rows of that pair, in CSV order. The guarantees are those of :func:`.mscxr.load_mscxr`:

* exact duplicate rows are dropped and counted;
* boxes wholly outside the model's centre crop are dropped and counted
  (:meth:`ldmground.method.heatmap.Geometry.box_to_model`); a sample left with no box is skipped;
* a malformed row (an empty or non-numeric coordinate, ``x_max <= x_min``, ``w <= 0``, an
  empty class) or a missing image does not stop the others: its sample keeps its boxes and
  carries a ``problem`` naming the CSV file, its line and the column, and evaluation stores
  it as failed with that message;
* sample ids are ``<image id>-<first 8 hex digits of sha1(phrase)>``, as MS-CXR's are of its
  ``label_text``: stable across runs and machines, and a new template gives new ids, so a
  results folder never mixes the prompts of two templates (join two runs on ``dicom_id`` and
  ``category``).
"""

from __future__ import annotations

import logging
import math
import string
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import LdmGroundError
from .mscxr import Sample, _sample_id, boxes_in_crop

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "The patient has {class}"
"""The authors' prompt (``vios-s/ldm-phrase-grounding``, ``data/vindr_cxr.py``:
``f"The patient has {class_name}"``, the class name as the CSV writes it, not lower-cased)."""

TEMPLATE_FIELDS = ("class", "class_lower")
"""Fields a template may use: the class as the CSV writes it, and lower-cased."""

Box = tuple[float, float, float, float]


def check_template(template: str) -> str:
    """Return ``template`` if it is a usable prompt template; else a clear error."""
    if not isinstance(template, str):
        raise LdmGroundError(f"prompt template must be a string, got {template!r}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise LdmGroundError(f"prompt template {template!r} is malformed ({err}); write {{class}}") from None
    unknown = [name for name in fields if name not in TEMPLATE_FIELDS]
    if unknown:
        raise LdmGroundError(
            f"prompt template {template!r} has unknown field(s) {unknown}; it may use {{class}} or {{class_lower}}"
        )
    if not fields:
        raise LdmGroundError(f"prompt template {template!r} names no class; put {{class}} (or {{class_lower}}) in it")
    return template


def render(template: str, class_name: str) -> str:
    """The phrase of one class: ``render("The patient has {class}", "Cardiomegaly")``."""
    return template.format(**{"class": class_name, "class_lower": class_name.lower()})


def class_mapping(classes: Collection[str] | Mapping[str, str] | str | None) -> dict[str, str] | None:
    """None (keep every class), or {class in the CSV: class to report}.

    A mapping renames (several classes may map to one, whose boxes then merge); a collection,
    or a comma-separated string, keeps those classes as they are.
    """
    if classes is None:
        return None
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    if isinstance(classes, Mapping):
        mapping = {str(k): str(v) for k, v in classes.items()}
    else:
        mapping = {str(c): str(c) for c in classes}
    if not mapping:
        raise LdmGroundError("the class selection is empty; name at least one class (or leave it out)")
    return mapping


def read_box_csv(csv_path: str | Path, columns: list[str], name: str) -> pd.DataFrame:
    """All cells as stripped text ("" when empty); a missing file or column is one clear error."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise LdmGroundError(f"data set CSV not found: {csv_path}")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise LdmGroundError(f"cannot read {csv_path} as CSV: {err}") from err
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LdmGroundError(f"{csv_path} lacks column(s) {missing}; a {name} CSV needs {columns}")
    df = df[columns].copy()
    for c in columns:
        df[c] = df[c].str.strip()
    df.index = df.index + 2  # the CSV's line numbers: line 1 is the header
    return df


def number(text: str, column: str) -> tuple[float, str | None]:
    """(value, None), or (NaN, what is wrong with ``column``'s cell)."""
    if text == "":
        return math.nan, f"column {column!r} is empty"
    try:
        value = float(text)
    except ValueError:
        return math.nan, f"column {column!r} is not a number ({text!r})"
    if not math.isfinite(value):
        return math.nan, f"column {column!r} is not finite ({text!r})"
    return value, None


def parse_row(columns: list[str], image: str, cls: str, coords) -> tuple[list[float], list[str]]:
    """The coordinates of one CSV row as numbers, and its problems (empty image or class
    field, a coordinate that is no number), each naming its column. ``columns`` are the
    format's: image, class, then the four coordinates."""
    problems = []
    if not image:
        problems.append(f"column {columns[0]!r} is empty")
    if not cls:
        problems.append(f"column {columns[1]!r} is empty")
    values = []
    for column, text in zip(columns[2:], coords, strict=True):
        value, problem = number(text, column)
        values.append(value)
        if problem:
            problems.append(problem)
    return values, problems


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header only: DICOM ``Columns``/``Rows`` (pixel data not
    read), else PIL's header parse. An unreadable header is an :class:`LdmGroundError`."""
    if path.suffix.lower() in {".dcm", ".dicom"}:
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
            return int(ds.Columns), int(ds.Rows)
        except Exception as err:  # pydicom raises many types for broken files
            raise LdmGroundError(f"cannot read Rows/Columns from the DICOM header of {path}: {err}") from err
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise LdmGroundError(f"cannot read the size of image {path}: {err}") from err


@dataclass
class BoxRow:
    """One CSV row, parsed: its line, image, class (after any renaming), box and problems."""

    line: int
    image_id: str
    path: str
    category: str
    box: Box
    problems: list[str] = field(default_factory=list)


def build_samples(
    csv_path: Path,
    rows: list[BoxRow],
    root: Path,
    template: str,
    counts: dict[str, int],
    *,
    id_column: str,
    crop_size: int | None,
    check_files: bool,
    sample_ids: Collection[str] | None,
    default_size: tuple[int, int] | None,
    images_hint: str,
    read_size: Callable[[Path], tuple[int, int]] = image_size,
) -> tuple[list[Sample], dict[str, int]]:
    """Merge rows per (image, class) into samples; see the module docstring."""
    groups: dict[tuple[str, str], list[BoxRow]] = {}
    for r in rows:
        groups.setdefault((r.path, r.category), []).append(r)
    sizes: dict[str, tuple[tuple[int, int] | None, str]] = {}

    def size_of(r: BoxRow) -> tuple[tuple[int, int] | None, str]:
        if r.path not in sizes:
            p = root / r.path
            if not p.is_file():
                sizes[r.path] = (default_size, f"no image {p} for {id_column} {r.image_id!r} (column {id_column!r})")
            else:
                try:
                    sizes[r.path] = (read_size(p), "")
                except LdmGroundError as err:
                    sizes[r.path] = (default_size, str(err))
        return sizes[r.path]

    name = csv_path.name
    samples: list[Sample] = []
    dropped_boxes = skipped = 0
    for (path, category), group in groups.items():
        first = group[0]
        size, size_problem = size_of(first)
        problems = [f"{name} line {first.line}: {size_problem}"] if size_problem else []
        problems += [f"{name} line {r.line}: {p}" for r in group for p in r.problems]
        boxes = [r.box for r in group]
        if crop_size is not None and size is not None:
            kept = boxes_in_crop(boxes, size[0], size[1], crop_size)
            dropped_boxes += len(boxes) - len(kept)
            boxes = kept
        if not boxes:
            skipped += 1
            continue
        phrase = render(template, category)
        width, height = size or (0, 0)
        samples.append(
            Sample(
                sample_id=_sample_id(first.image_id, phrase),
                dicom_id=first.image_id,
                category=category,
                phrase=phrase,
                path=path,
                boxes=tuple(boxes),
                width=int(width),
                height=int(height),
                problem="; ".join(dict.fromkeys(problems)),
            )
        )
    ids = pd.Series([s.sample_id for s in samples])
    if ids.duplicated().any():
        raise LdmGroundError(
            f"{csv_path}: the template {template!r} gives the same phrase to two classes of one image "
            f"(sample ids {sorted(set(ids[ids.duplicated()]))[:3]}); use {{class}}"
        )
    if sample_ids is not None:
        wanted = set(sample_ids)
        unknown = sorted(wanted - set(ids))
        if unknown:
            raise LdmGroundError(
                f"{len(unknown)} of {len(wanted)} listed sample ids match no sample of {csv_path} "
                f"(first: {', '.join(unknown[:5])})"
            )
        samples = [s for s in samples if s.sample_id in wanted]
    problem_samples = sum(bool(s.problem) for s in samples)
    counts.update(
        samples=len(samples), dropped_boxes=dropped_boxes, skipped_samples=skipped, problem_samples=problem_samples
    )
    if check_files:
        missing = [s.path for s in samples if not (root / s.path).is_file()]
        if missing:
            raise LdmGroundError(
                f"{len(missing)} of {len(samples)} images are missing under {root} (first: {', '.join(missing[:5])}); "
                f"check --images ({images_hint})"
            )
    if skipped or dropped_boxes:
        log.info("dropped %d boxes outside the crop; skipped %d samples with no box left", dropped_boxes, skipped)
    if problem_samples:
        log.warning("%d samples of %s have a problem and will fail: %s", problem_samples, csv_path, _first(samples))
    return samples, counts


def _first(samples: list[Sample]) -> str:
    return next(s.problem for s in samples if s.problem)


def select_classes(
    df: pd.DataFrame, column: str, mapping: dict[str, str] | None, csv_path: Path, counts: dict[str, int]
) -> pd.DataFrame:
    """Keep the rows whose class is in ``mapping`` (all when None); count the rest."""
    if mapping is None:
        counts["left_out_rows"] = 0
        return df
    keep = df[column].isin(mapping)
    counts["left_out_rows"] = int((~keep).sum())
    absent = sorted(set(mapping) - set(df[column]))
    if absent:
        log.info("classes with no box in %s: %s", csv_path, absent)
    if not keep.any() and len(df):
        raise LdmGroundError(
            f"no box of {csv_path} has a class in {sorted(mapping)} (column {column!r}); "
            f"its classes are {sorted(set(df[column]))[:25]}"
        )
    return df[keep]
