"""Every numbered notebook runs end to end (papermill, tiny model, few samples and steps)
and writes the files it promises; 05 redraws every figure from the results of 01-04."""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

papermill = pytest.importorskip("papermill")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PHANTOM = ROOT / "data" / "phantom"
CHEAP = {"model": "tiny", "dataset": str(PHANTOM / "test.csv"), "images": str(PHANTOM), "preset": "demo"}

EXPECTED = {
    "01_feature_selection": (
        ["layers.csv", "steps.csv", "windows.csv", "layer_maps.npz", "step_maps.npz"],
        [
            "feature_selection_layers",
            "feature_selection_steps",
            "feature_selection_windows",
            "feature_selection_layer_maps",
            "feature_selection_step_maps",
        ],
    ),
    "02_aggregation": (
        ["aggregation.csv", "attribution.csv", "inversion_steps.csv"],
        ["aggregation", "aggregation_inversion_steps"],
    ),
    "03_postprocessing": (
        ["postprocessing.csv", "thresholds.csv", "contrast.csv"],
        ["postprocessing_sigma", "postprocessing_thresholds", "postprocessing_contrast"],
    ),
    "04_mscxr_evaluation": (
        [
            "summaries.csv",
            "summaries_ci.csv",
            "results_table.csv",
            "results_table.md",
            "evaluation.json",
            "examples.csv",
            "tiny/results.csv",
            "centre-prior/summary.csv",
            "random-tiny/run.json",
        ],
        ["evaluation_per_category", "qualitative"],
    ),
}
PARAMS = {
    "01_feature_selection": {"steps": 10, "n_samples": 4},
    "02_aggregation": {"steps": 10, "n_samples": 3, "step_counts": [5, 10]},
    "03_postprocessing": {"steps": 10, "n_samples": 3, "sigmas": [0.0, 4.0], "contrasts": [0.0, 0.5]},
    "04_mscxr_evaluation": {"steps": 5, "limit": 4, "n_examples": 2},
}


@contextmanager
def _one_thread():
    # The kernels inherit it: torch's thread pool on a busy 2-core machine is much slower.
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old


def _run(name: str, workdir: Path, **params) -> dict:
    with _one_thread():
        papermill.execute_notebook(
            str(NOTEBOOKS / f"{name}.ipynb"),
            str(workdir / "executed" / f"{name}.ipynb"),
            parameters=params,
            cwd=str(NOTEBOOKS),
            progress_bar=False,
            kernel_name="python3",
        )
    return json.loads((workdir / "executed" / f"{name}.ipynb").read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebooks")
    (root / "executed").mkdir()
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED))
def test_numbered_notebook_writes_its_results(workdir, name):
    out = workdir / "outputs" / name
    _run(name, workdir, **CHEAP, **PARAMS[name], out_dir=str(out), figures_dir=str(workdir / "figures"))
    files, figs = EXPECTED[name]
    for f in files:
        assert (out / f).is_file(), f
    for f in figs:
        assert (workdir / "figures" / f"{f}.png").stat().st_size > 1000, f


@pytest.mark.slow
def test_figures_notebook_redraws_every_figure(workdir):
    import pandas as pd

    missing = [n for n in EXPECTED if not (workdir / "outputs" / n).is_dir()]
    if missing:
        pytest.skip(f"needs the results of {missing} (run the whole module)")
    redrawn = workdir / "redrawn"
    _run("05_figures", workdir, results_dir=str(workdir / "outputs"), figures_dir=str(redrawn))
    expected = {f"{f}.png" for _, figs in EXPECTED.values() for f in figs}
    assert {p.name for p in redrawn.glob("*.png")} == expected
    table = pd.read_csv(workdir / "outputs" / "04_mscxr_evaluation" / "results_table.csv", index_col=0)
    assert table.index[-1] == "macro" and "tiny: CNR (signed)" in table.columns and "tiny: n" in table.columns
    assert {"tiny: CNR (abs)", "tiny: AUC (5 bins)", "tiny: AUC (exact)"} <= set(table.columns)
    assert not any("MIDL" in c for c in table.columns)  # the phantom set is not MS-CXR


@pytest.mark.slow
def test_explorer_notebook_runs(workdir):
    nb = _run("06_explorer", workdir, **CHEAP, steps=10, n_samples=3)
    texts = [o.get("data", {}).get("text/plain", "") for c in nb["cells"] for o in c.get("outputs", [])]
    assert any("'cnr'" in "".join(t) for t in texts)
    streams = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "Loading weights" not in streams  # no loading bars above the explorer
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "".join(code[-1]["source"]).strip() == "explorer"  # Run All ends on the explorer itself
