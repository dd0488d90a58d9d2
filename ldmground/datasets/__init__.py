"""Data sets with boxes: MS-CXR's CSV (and the phantom set that shares it), VinDr-CXR's and
NIH ChestX-ray8's box lists; :func:`load_dataset` reads any of them."""

from ._boxes import DEFAULT_TEMPLATE
from .chestxray8 import CHESTXRAY8_COLUMNS, load_chestxray8
from .loader import FORMATS, detect_format, load_dataset
from .mscxr import MSCXR_COLUMNS, Sample, load_mscxr, read_mscxr_csv
from .vindr import VINDR_AUTHORS_CLASSES, VINDR_COLUMNS, load_vindr

__all__ = [
    "CHESTXRAY8_COLUMNS",
    "DEFAULT_TEMPLATE",
    "FORMATS",
    "MSCXR_COLUMNS",
    "VINDR_AUTHORS_CLASSES",
    "VINDR_COLUMNS",
    "Sample",
    "detect_format",
    "load_chestxray8",
    "load_dataset",
    "load_mscxr",
    "load_vindr",
    "read_mscxr_csv",
]
