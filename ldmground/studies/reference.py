"""Published numbers to compare with, and where they come from.

The only per-category table of this method available to the project is the authors'
follow-up re-run: Vilouras et al., MIDL 2026 ("Anatomy-Grounded Weakly Supervised Prompt
Tuning for Chest X-ray LDMs"), Table 1, whose "LDM (frozen)" row is this method under another
protocol (:data:`REFERENCE_SOURCES`). The JBHI paper's own table is not available here, so
nothing in this project is labelled as its numbers.

``PAPER_TABLE`` is long: one row per (method, category) with ``n`` (the reference's number
of pairs), ``cnr`` (signed, as MIDL 2026 reports it) and ``miou`` (a fraction, as
:func:`ldmground.metrics.miou` returns; the paper prints %). The row ``category="macro"`` is
the table's "Average" (mean over the eight categories).
"""

from __future__ import annotations

import pandas as pd

METHODS = ["LDM frozen", "BioViL", "BioViL-T"]

# category, N, then (CNR, mIoU %) per method in METHODS order, as printed in the paper.
_TABLE = [
    ("Pneumonia", 146, (1.19, 21.6), (1.57, 27.9), (1.69, 29.0)),
    ("Pneumothorax", 204, (-0.07, 6.1), (0.61, 10.1), (0.93, 13.0)),
    ("Consolidation", 105, (1.24, 23.3), (1.80, 29.5), (1.89, 30.4)),
    ("Atelectasis", 55, (1.08, 21.5), (0.73, 10.7), (1.14, 13.3)),
    ("Edema", 41, (0.84, 30.5), (0.74, 18.0), (0.74, 17.6)),
    ("Cardiomegaly", 333, (1.16, 40.8), (0.73, 22.1), (1.04, 23.2)),
    ("Lung Opacity", 78, (1.11, 15.6), (1.58, 19.0), (1.77, 21.4)),
    ("Pleural Effusion", 81, (0.88, 16.5), (1.60, 24.5), (1.75, 23.3)),
    ("macro", 1043, (0.93, 22.0), (1.17, 20.2), (1.37, 21.4)),
]

_MIDL26 = "Vilouras et al., MIDL 2026, Table 1"
_SUBSET = "MS-CXR-loc subset (1,043 of 1,162 pairs), rewritten prompts, single run"
REFERENCE_SOURCES = {
    "LDM frozen": {
        "label": "LDM frozen (MIDL 2026 re-run)",
        "cnr": "CNR (signed)",
        "source": _MIDL26,
        "protocol": f"this method with 100 DDIM steps, window [0.4, 0.6) (preset midl26); {_SUBSET}; signed CNR",
    },
    "BioViL": {
        "label": "BioViL (MIDL 2026)",
        "cnr": "CNR (signed)",
        "source": _MIDL26,
        "protocol": f"hi-ml-multimodal's BioViL similarity map; {_SUBSET}; signed CNR",
    },
    "BioViL-T": {
        "label": "BioViL-T (MIDL 2026)",
        "cnr": "CNR (signed)",
        "source": _MIDL26,
        "protocol": f"hi-ml-multimodal's BioViL-T similarity map; {_SUBSET}; signed CNR",
    },
}
"""Per method of :data:`PAPER_TABLE`: a short label, which CNR it reports, source, protocol."""

CATEGORIES = [row[0] for row in _TABLE if row[0] != "macro"]
"""MS-CXR's eight findings, in the paper's order."""

ORACLE = {"cnr": 2.11, "miou": 0.676}
"""An oracle Gaussian from the true boxes (the paper's upper reference)."""


def _paper_table() -> pd.DataFrame:
    rows = [
        {"method": method, "category": cat, "n": n, "cnr": cnr, "miou": miou / 100}
        for method_index, method in enumerate(METHODS)
        for cat, n, *values in _TABLE
        for cnr, miou in [values[method_index]]
    ]
    return pd.DataFrame(rows)


PAPER_TABLE: pd.DataFrame = _paper_table()
"""Columns: method, category, n, cnr, miou (fraction)."""
