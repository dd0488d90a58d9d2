"""The README's quickstart runs as written, and every relative link in README and docs resolves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def section(text: str, title: str) -> str:
    """The body of the ``## title...`` section."""
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README has no section starting with '## {title}'"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a document's headings."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def broken_links(path: Path) -> list[str]:
    text = path.read_text()
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{path.name}: {target} (no {dest.relative_to(ROOT) if ROOT in dest.parents else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            bad.append(f"{path.name}: {target} (no heading #{anchor})")
    return bad


@pytest.mark.parametrize("doc", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    assert broken_links(doc) == []


def test_the_link_check_catches_a_missing_file_and_anchor(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("# Title\n[a](missing.md) [b](#title) [c](#nowhere) [d](https://example.org)\n")
    assert broken_links(doc) == [
        f"x.md: missing.md (no {tmp_path / 'missing.md'})",
        "x.md: #nowhere (no heading #nowhere)",
    ]


def test_readme_is_a_short_guide():
    assert len(README.read_text().splitlines()) <= 200


@pytest.fixture
def workdir(tmp_path):
    # The quickstart's relative paths resolve against a folder that has the repository's data
    # but writes its outputs elsewhere.
    (tmp_path / "data").symlink_to(ROOT / "data")
    return tmp_path


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_quickstart_python_runs_as_written(workdir):
    [code] = code_blocks(section(README.read_text(), "Quickstart"), "python")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shape, cnr_line = done.stdout.strip().splitlines()[-2:]
    assert shape.startswith("(256, 256)")
    cnr_value = float(re.search(r"CNR (-?[\d.]+)", cnr_line).group(1))
    assert cnr_value > 1.0 and "pointing 1.0" in cnr_line  # the map sits on the effusion


def test_quickstart_commands_run_as_written(workdir):
    [script] = code_blocks(section(README.read_text(), "Quickstart"), "bash")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=workdir,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (workdir / "outputs/quickstart/effusion.png").stat().st_size > 1000
    results = (workdir / "outputs/quickstart/demo/results.csv").read_text().splitlines()
    assert len(results) == 1 + 16 and all(",ok," in row for row in results[1:])
