"""The package's layers, read from the source: every import (module level or inside a function)
of every module, checked against the rules in the README's Layout, and no import cycles."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ldmground"

# layer -> the layers it may import (its own included)
ALLOWED = {
    "base": {"base"},
    "config": set(),
    "metrics": set(),
    "method": {"base", "config", "method", "pipeline-type"},
    "models": {"base", "config", "models"},
    "datasets": {"base", "config", "datasets"},
    "runs": {"base", "config", "metrics", "method", "models", "datasets", "runs"},
    "studies": {"base", "config", "metrics", "method", "models", "datasets", "runs", "studies"},
    "demo": {"base", "config", "metrics", "method", "models", "datasets", "runs", "studies", "demo"},
    "top": {"base", "config", "metrics", "method", "models", "datasets", "runs", "studies", "demo", "top"},
}


def layer(module: str) -> str:
    parts = module.split(".")
    if module in ("ldmground", "ldmground.cli", "ldmground._compat"):
        return "top"
    if module in ("ldmground.errors", "ldmground._version", "ldmground.geometry"):
        return "base"
    if module == "ldmground.models.pipeline":
        return "pipeline-type"
    return parts[1]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The ldmground modules that ``module`` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import submodule` imports the submodule; `from pkg import name` the package
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != module)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        here = layer(src)
        if here == "pipeline-type":
            here = "models"
        for dst in sorted(targets):
            there = layer(dst)
            ok = there in ALLOWED[here] or (there == "pipeline-type" and "models" in ALLOWED[here])
            if not ok:
                bad.append(f"{src} ({here}) imports {dst} ({there})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_import_follows_the_layers():
    assert layer_violations(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_catch_a_forbidden_import_and_a_cycle():
    graph = import_graph()
    graph["ldmground.models.folder"] = graph["ldmground.models.folder"] | {"ldmground.demo.export"}
    assert "ldmground.models.folder (models) imports ldmground.demo.export (demo)" in layer_violations(graph)
    assert any("ldmground.models.folder" in c and "ldmground.demo.export" in c for c in cycles(graph))


def test_the_import_reader_sees_function_level_and_relative_imports(tmp_path):
    known = {"ldmground.a.b": tmp_path / "b.py", "ldmground.a.c": tmp_path / "c.py", "ldmground.d": tmp_path / "d.py"}
    src = tmp_path / "b.py"
    src.write_text("from .c import x\n\ndef f():\n    from ..d import y\n    return x, y\n")
    assert imports("ldmground.a.b", src, known) == {"ldmground.a.c", "ldmground.d"}


def test_modules_stay_short():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 520}
    assert long == {}


@pytest.mark.parametrize(
    "old, name, new",
    [
        ("ldmground.grounding", "ground", "ldmground.method.grounding"),
        ("ldmground.analysis", "sweep", "ldmground.studies.sweeps"),
        ("ldmground.analysis", "cache_samples", "ldmground.studies.cache"),
        ("ldmground.evaluation", "Grounder", "ldmground.runs.grounders"),
        ("ldmground.convert_monai", "convert_monai", "ldmground.models.monai.convert"),
        ("ldmground.phantom", "generate_phantom", "ldmground.datasets.phantom.render"),
        ("ldmground.biovil", "ResNet50", "ldmground.models.biovil"),
    ],
)
def test_old_paths_forward_with_a_deprecation_warning(old, name, new):
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.")):
        mod = importlib.import_module(old)
    assert getattr(mod, name) is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError):
        mod.no_such_name  # noqa: B018


def test_old_demo_folder_names_warn_and_point_to_models():
    import ldmground.demo
    import ldmground.models

    with pytest.warns(DeprecationWarning, match="ldmground.models.demo_dir"):
        assert ldmground.demo.demo_dir is ldmground.models.demo_dir
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from ldmground.demo import train_demo  # a name that still lives in demo: no warning
    assert train_demo.__module__ == "ldmground.demo.export"
