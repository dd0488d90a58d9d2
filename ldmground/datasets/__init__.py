"""Data sets in MS-CXR's format: the official CSV and the phantom set that shares it."""

from .mscxr import MSCXR_COLUMNS, Sample, load_mscxr, read_mscxr_csv

__all__ = ["MSCXR_COLUMNS", "Sample", "load_mscxr", "read_mscxr_csv"]
