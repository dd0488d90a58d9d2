import numpy as np
import pandas as pd
import pytest

from ldmground.studies.reference import PAPER_TABLE, REFERENCE_SOURCES
from ldmground.studies.report import comparison_table, summary_with_ci


def _results(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for cat, n, mu in [("Edema", 200, 1.0), ("Pneumonia", 50, 2.0), ("Atelectasis", 1, 0.5)]:
        for v in rng.normal(mu, 0.5, n):
            rows.append({"category": cat, "status": "ok", "cnr": abs(v), "cnr_signed": v, "miou": 0.3})
    rows.append({"category": "Edema", "status": "failed", "cnr": 99.0, "cnr_signed": 99.0, "miou": 0.3})
    return pd.DataFrame(rows)


def test_summary_with_ci_per_category_and_macro():
    res = _results()
    s = summary_with_ci(res, metrics=["cnr_signed", "miou"]).set_index(["category", "metric"])
    edema = s.loc[("Edema", "cnr_signed")]
    values = res.query("category == 'Edema' and status == 'ok'")["cnr_signed"]
    assert edema["n"] == 200 and edema["mean"] == pytest.approx(values.mean())
    half = 1.96 * values.std(ddof=0) / np.sqrt(200)  # the normal approximation for n = 200
    assert edema["ci_low"] == pytest.approx(values.mean() - half, abs=0.25 * half)
    assert edema["ci_high"] == pytest.approx(values.mean() + half, abs=0.25 * half)
    one = s.loc[("Atelectasis", "cnr_signed")]
    assert one["n"] == 1 and np.isnan(one["ci_low"])  # no interval from one pair
    macro = s.loc[("macro", "cnr_signed")]
    cats = res[res["status"] == "ok"].groupby("category")["cnr_signed"].mean()
    assert macro["mean"] == pytest.approx(cats.mean()) and macro["n"] == 251
    assert np.isnan(macro["ci_low"])  # a category with one pair: no macro interval either
    assert s.loc[("Edema", "miou"), "ci_low"] == pytest.approx(0.3)  # a constant: a zero-width interval
    again = summary_with_ci(res, metrics=["cnr_signed", "miou"]).set_index(["category", "metric"])
    pd.testing.assert_frame_equal(s, again)  # seeded


def test_macro_interval_resamples_within_categories():
    res = _results().query("category != 'Atelectasis'")
    s = summary_with_ci(res, metrics=["cnr_signed"]).set_index("category")
    assert s.loc["macro", "ci_low"] < s.loc["macro", "mean"] < s.loc["macro", "ci_high"]
    # the macro mean weighs Pneumonia's 50 pairs like Edema's 200: its interval is wider than Edema's
    width = (s["ci_high"] - s["ci_low"]).to_dict()
    assert width["Edema"] < width["macro"] < width["Pneumonia"]


def test_comparison_table_labels_sources_and_n():
    table = comparison_table(
        {"demo": summary_with_ci(_results(), metrics=["cnr_signed", "cnr", "miou"])},
        metrics=["cnr_signed", "cnr", "miou"],
    )
    assert list(table.index[-1:]) == ["macro"]
    assert table.loc["Edema", "demo: n"] == 200
    assert table.loc["Edema", "demo: mIoU %"].startswith("30.0 [30.0, 30.0]")
    label = REFERENCE_SOURCES["LDM frozen"]["label"]
    assert "MIDL 2026" in label
    assert table.loc["Pneumothorax", f"{label}: N"] == 204
    assert table.loc["Pneumothorax", f"{label}: CNR (signed)"] == "-0.07"
    assert (
        table.loc["macro", f"{label}: N"]
        == PAPER_TABLE.query("method == 'LDM frozen' and category == 'macro'")["n"].item()
    )
    assert pd.isna(table.loc["Pneumothorax", "demo: n"])  # a category the run did not have
