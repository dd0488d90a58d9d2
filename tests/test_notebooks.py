"""Every numbered notebook runs end to end (papermill, tiny model, few samples and steps)
and writes the files it promises; 05 redraws every figure from the results of 01-04."""

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest

papermill = pytest.importorskip("papermill")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PHANTOM = ROOT / "data" / "phantom"
CHEAP = {"model": "tiny", "images": str(PHANTOM), "preset": "demo"}
TEST = {"dataset": str(PHANTOM / "test.csv"), "split": "test"}

EXPECTED = {  # what the tiny-model run on other data (the path MS-CXR takes) must write
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
    "04_mscxr_evaluation": {**TEST, "steps": 5, "limit": 4, "random_limit": 2, "n_examples": 2},
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
@pytest.mark.parametrize("name", list(EXPECTED))  # 01-05 on the default: nbval below
def test_numbered_notebook_writes_its_results(workdir, name):
    out = workdir / "outputs" / name
    _run(
        name,
        workdir,
        **CHEAP,
        **PARAMS[name],
        out_dir=str(out),
        figures_dir=str(workdir / "figures"),
    )
    files, figs = EXPECTED[name]
    for f in files:
        assert (out / f).is_file(), f
    for f in figs:
        assert (workdir / "figures" / f"{f}.png").stat().st_size > 1000, f
    import pandas as pd

    table = pd.read_csv(out / "results_table.csv", index_col=0)
    assert table.index[-1] == "macro" and "tiny: CNR (signed)" in table.columns and "tiny: n" in table.columns
    assert {"tiny: CNR (abs)", "tiny: AUC (5 bins)", "tiny: AUC (exact)"} <= set(table.columns)
    assert not any("MIDL" in c for c in table.columns)  # the phantom set is not MS-CXR


@pytest.mark.slow
def test_explorer_notebook_runs(workdir):
    nb = _run("06_explorer", workdir, **CHEAP, dataset=str(PHANTOM / "test.csv"), steps=10, n_samples=3)
    texts = [o.get("data", {}).get("text/plain", "") for c in nb["cells"] for o in c.get("outputs", [])]
    assert any("'cnr'" in "".join(t) for t in texts)
    streams = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "Loading weights" not in streams  # no loading bars above the explorer
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "".join(code[-1]["source"]).startswith("explorer.show()")  # Run All ends on the explorer itself


# --- the committed notebooks: outputs of the embedded default, checked by nbval -----------------

COMMITTED = ["01_feature_selection", "02_aggregation", "03_postprocessing", "04_mscxr_evaluation", "05_figures"]
# absolute paths of a machine: home folders, temporary folders, this checkout, a drive letter
MACHINE_PATH = re.compile(
    "|".join([re.escape(str(ROOT)), *(re.escape(f"/{d}/") for d in ("home", "root", "tmp", "Users")), r"[A-Z]:\\"])
)


def _outputs_text(nb: dict) -> str:
    parts = []
    for cell in nb["cells"]:
        parts.append("".join(cell["source"]))
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            for key, value in out.get("data", {}).items():
                if not key.startswith("image/"):
                    parts.append("".join(value) if isinstance(value, list) else str(value))
    return "\n".join(parts)


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_notebook_carries_the_default_run(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("outputs") or "parameters" in c["metadata"].get("tags", []) for c in code), "cells without outputs"
    assert not any(o.get("output_type") == "error" for c in code for o in c["outputs"])
    assert not any("injected-parameters" in c["metadata"].get("tags", []) for c in code), "papermill parameters"
    assert path.stat().st_size <= 2_000_000
    assert MACHINE_PATH.findall(_outputs_text(nb)) == []
    if name != "05_figures":  # a chapter ends in its findings, computed in the run
        assert "What we found" in "".join(nb["cells"][-2]["source"])
        assert nb["cells"][-1]["outputs"] and "NBVAL_CHECK_OUTPUT" in "".join(nb["cells"][-1]["source"])


def test_every_committed_figure_is_made_by_a_notebook_and_shown_in_the_docs():
    made = set()
    for name in COMMITTED:
        made |= set(
            re.findall(
                r'"([a-z_]+)"',
                "".join(
                    c for cell in json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())["cells"] for c in cell["source"]
                ),
            )
        )
    docs = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    for png in (ROOT / "figures").glob("*.png"):
        assert png.stem in made, f"{png.name} is made by no notebook"
        assert f"figures/{png.name}" in docs, f"{png.name} is shown nowhere in README or docs"


@pytest.mark.slow
def test_committed_notebooks_reproduce_under_nbval(tmp_path):
    """nbval re-runs the committed notebooks (01 -> 05, in a copy of the repository layout so
    that nothing tracked is written) and compares the result cells marked NBVAL_CHECK_OUTPUT."""
    import shutil
    import subprocess
    import sys

    (tmp_path / "notebooks").mkdir()
    (tmp_path / "data").symlink_to(ROOT / "data")
    for name in COMMITTED:
        shutil.copy(NOTEBOOKS / f"{name}.ipynb", tmp_path / "notebooks")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--nbval-lax",
            "--nbval-cell-timeout=1800",
            *[f"notebooks/{n}.ipynb" for n in COMMITTED],
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    assert (tmp_path / "figures" / "qualitative.png").is_file()


def test_a_run_on_other_data_writes_only_under_out():
    """`make reproduce` with a CSV of its own writes executed copies and figures under OUT only:
    the committed notebooks and figures/ are written only by the embedded default."""
    import subprocess

    def dry(*args: str) -> str:
        done = subprocess.run(["make", "-n", "reproduce", *args], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    other = dry("DATASET=/data/MS_CXR_Local_Alignment_v1.1.0.csv", "IMAGES=/data/mimic", "OUT=/tmp/ms")
    papermill_lines = [line for line in other.splitlines() if "papermill" in line]
    assert papermill_lines and all(" /tmp/ms/notebooks/" in line for line in papermill_lines)
    assert "figures_dir /tmp/ms/figures" in other and f"{ROOT}/figures" not in other
    default = dry()
    assert "notebooks/$nb.ipynb notebooks/$nb.ipynb" in default
    assert " -p " not in default  # no injected parameters: no machine paths in committed outputs
    assert " -p preset paper" in dry("PRESET=paper") and "notebooks/$nb.ipynb notebooks/$nb" not in dry("PRESET=paper")
