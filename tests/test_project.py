"""The project's own promises: dependency lists agree, notebooks carry no outputs."""

import json
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~ ;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = lines.index("  - pip:")
    pip_reqs = {ln.strip()[2:] for ln in lines[start + 1 :] if ln.strip().startswith("- ")}
    assert pip_reqs == wanted  # same names and the same version bounds


def test_the_explorer_notebook_has_no_outputs():
    """Notebooks 01-05 carry the embedded default's outputs (tests/test_notebooks.py checks
    them); the explorer's widgets only live in a kernel, so 06 is stored without outputs."""
    for path in [ROOT / "notebooks" / "06_explorer.ipynb"]:
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs"), f"{path.name} has stored outputs"
                assert cell.get("execution_count") is None, f"{path.name} has execution counts"
