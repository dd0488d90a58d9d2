"""Reading the bundle's ``configs/inference.json`` without executing it, the scale factor
in ``scripts/sampler.py`` and ``configs/metadata.json``.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import LdmGroundError
from .bundle import CONFIG_FILE, METADATA_FILE, SAMPLER_FILE

log = logging.getLogger(__name__)


# --- the bundle's config -------------------------------------------------------------------


class _Unresolvable(Exception):
    def __init__(self, where: str, raw: Any, why: str):
        super().__init__(f"{where} = {raw!r}: {why}")
        self.where, self.raw, self.why = where, raw, why


class _Found:
    """A setting looked up in a bundle file: ``state`` is "value", "unresolved" or "absent"."""

    def __init__(
        self, state: str, where: str, value: Any = None, raw: Any = None, why: str = "", origin: str = CONFIG_FILE
    ):
        self.state, self.where, self.value, self.raw, self.why = state, where, value, raw, why
        self.origin = origin

    @property
    def source(self) -> str:
        return f"{self.origin} {self.where}" if self.origin else self.where


class BundleConfig:
    """A bundle's ``configs/inference.json``, read as data (nothing in it is executed).

    ``@name`` (and ``@a::b`` / ``@a#b``) references are followed; a ``$`` value is accepted
    when it is a Python literal (``"$1e-6"``) or a bare reference (``"$@name"``); anything
    else raises with the key named.
    """

    def __init__(self, data: dict[str, Any], path: Path):
        self.data, self.path = data, path

    @classmethod
    def read(cls, path: str | Path) -> BundleConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise LdmGroundError(f"cannot read {path} as JSON: {err}") from err
        if not isinstance(data, dict):
            raise LdmGroundError(f"{path} does not hold a JSON object")
        return cls(data, path)

    def resolve(self, value: Any, where: str, _seen: tuple[str, ...] = ()) -> Any:
        if isinstance(value, str):
            if value.startswith("@"):
                return self._reference(value[1:], where, _seen)
            if value.startswith("$"):
                expr = value[1:].strip()
                if re.fullmatch(r"@[\w.:#]+", expr):
                    return self._reference(expr[1:], where, _seen)
                try:
                    return ast.literal_eval(expr)
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    raise _Unresolvable(where, value, "an expression that ldmground does not evaluate") from None
            if value.startswith("%"):
                raise _Unresolvable(where, value, "a macro taken from another file")
            return value
        if isinstance(value, list):
            return [self.resolve(v, f"{where}[{i}]", _seen) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.resolve(v, f"{where}.{k}", _seen) for k, v in value.items()}
        return value

    def _reference(self, ref: str, where: str, seen: tuple[str, ...]) -> Any:
        if ref in seen:
            raise _Unresolvable(where, "@" + ref, "a circular reference")
        node: Any = self.data
        for part in re.split(r"::|#", ref):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise _Unresolvable(where, "@" + ref, f"a reference to {ref!r}, which the file does not define")
        return self.resolve(node, where, (*seen, ref))

    def section(self, kind: str, classes: Sequence[str], preferred: str) -> tuple[str, dict, str] | None:
        """(key, definition, target) of the one top-level definition of one of ``classes``."""
        found = []
        for key, val in self.data.items():
            if isinstance(val, dict) and "_target_" in val:
                try:
                    target = self.resolve(val["_target_"], f"{key}._target_")
                except _Unresolvable:
                    continue
                if isinstance(target, str) and target.rsplit(".", 1)[-1] in classes:
                    found.append((key, val, target))
        if len(found) > 1:
            chosen = [f for f in found if f[0] == preferred]
            if len(chosen) != 1:
                raise LdmGroundError(
                    f"{self.path}: several {kind} definitions ({', '.join(f[0] for f in found)}); "
                    "cannot tell which one the checkpoint belongs to"
                )
            found = chosen
        return found[0] if found else None

    def get(self, key: str, section: dict, *names: str) -> _Found:
        """The setting ``names[0]`` (or one of its alternative spellings) of ``section``."""
        present = [n for n in names if n in section]
        if len(present) > 1:
            raise LdmGroundError(f"{self.path}: {key} sets both {' and '.join(present)}")
        if not present:
            return _Found("absent", f"{key}.{names[0]}" if key else names[0])
        where = f"{key}.{present[0]}" if key else present[0]
        try:
            return _Found("value", where, value=self.resolve(section[present[0]], where))
        except _Unresolvable as err:
            return _Found("unresolved", where, raw=section[present[0]], why=f"{err.why} ({err.where} = {err.raw!r})")

    def scale_factors(self) -> list[_Found]:
        """Every ``scale_factor`` the file sets: as a key, or as ``scale_factor=`` in an expression."""
        out: list[_Found] = []

        def walk(node: Any, where: str):
            if isinstance(node, dict):
                for k, v in node.items():
                    w = f"{where}.{k}" if where else k
                    if k == "scale_factor":
                        try:
                            out.append(_Found("value", w, value=self.resolve(v, w)))
                        except _Unresolvable as err:
                            out.append(_Found("unresolved", w, raw=v, why=err.why))
                    else:
                        walk(v, w)
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{where}[{i}]")
            elif isinstance(node, str) and node.startswith("$"):
                for m in re.finditer(r"\bscale_factor\s*=\s*([^,()\s]+)", node):
                    token = m.group(1)
                    try:
                        value = self.resolve(token if token.startswith("@") else "$" + token, where)
                        out.append(_Found("value", f"{where} (scale_factor={token})", value=value))
                    except _Unresolvable as err:
                        out.append(_Found("unresolved", where, raw=node, why=err.why))

        walk(self.data, "")
        return out


def _sampler_scale_factor(path: Path) -> tuple[float, str] | None:
    """The default of a ``scale_factor`` argument in the bundle's sampler script (parsed)."""
    if not path.is_file():
        return None
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError) as err:
        log.warning("cannot parse %s (%s); its scale_factor default is not read", path, err)
        return None
    found: set[tuple[str, float]] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            pos = a.posonlyargs + a.args
            pairs = list(zip(pos, [None] * (len(pos) - len(a.defaults)) + list(a.defaults), strict=True))
            pairs += list(zip(a.kwonlyargs, a.kw_defaults, strict=True))
            for arg, default in pairs:
                if (
                    arg.arg == "scale_factor"
                    and isinstance(default, ast.Constant)
                    and isinstance(default.value, (int, float))
                    and not isinstance(default.value, bool)
                ):
                    found.add((node.name, float(default.value)))
    if not found:
        return None
    if len({v for _, v in found}) > 1:
        raise LdmGroundError(f"{path}: different scale_factor defaults {sorted(found)}; give --scale-factor")
    name, value = sorted(found)[0]
    return value, f"{SAMPLER_FILE} (default of {name}'s scale_factor)"


def _metadata(bundle: Path) -> dict[str, Any]:
    path = bundle / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("cannot read %s: %s", path, err)
        return {}
    return data if isinstance(data, dict) else {}
