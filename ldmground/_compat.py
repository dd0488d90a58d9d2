"""Old import paths, kept for one release.

Before 0.2 the package was 23 flat modules; they now live in subpackages (see the README's
Layout). ``import ldmground.grounding`` and ``from ldmground.analysis import sweep`` still
work: a finder on ``sys.meta_path`` answers for the old names with a module that forwards
every attribute to its new home and warns once with a ``DeprecationWarning``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# old module -> the new modules that hold its names, searched in order
OLD_PATHS: dict[str, tuple[str, ...]] = {
    "attention": ("ldmground.method.attention",),
    "inversion": ("ldmground.method.inversion",),
    "tokens": ("ldmground.method.tokens",),
    "heatmap": ("ldmground.method.heatmap",),
    "grounding": ("ldmground.method.grounding",),
    "evaluation": ("ldmground.runs.evaluation", "ldmground.runs.grounders"),
    "grounders": ("ldmground.runs.grounders",),
    "baselines": ("ldmground.runs.baselines",),
    "biovil": ("ldmground.runs.biovil", "ldmground.models.biovil"),
    "convert_monai": tuple(
        f"ldmground.models.monai.{m}"
        for m in ("convert", "bundle", "bundle_config", "checkpoints", "autoencoder", "unet", "architecture", "card")
    ),
    "phantom": tuple(f"ldmground.datasets.phantom.{m}" for m in ("render", "anatomy", "findings")),
    "analysis": tuple(f"ldmground.studies.{m}" for m in ("cache", "sweeps", "probes", "panels")),
    "figures": ("ldmground.studies.figures",),
    "explorer": ("ldmground.studies.explorer",),
    "overlay": ("ldmground.studies.overlay",),
    "report": ("ldmground.studies.report",),
    "reference": ("ldmground.studies.reference",),
}


class _Forwarder(importlib.abc.Loader):
    def __init__(self, homes: tuple[str, ...]):
        self.homes = homes

    def create_module(self, spec):
        return None  # a plain new module

    def exec_module(self, module: types.ModuleType) -> None:
        homes = self.homes
        warnings.warn(
            f"{module.__name__} moved to {', '.join(homes)}; the old path goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )

        def __getattr__(name: str):
            if name.startswith("__"):  # inspect and pickle probe __file__ & co.: never import for them
                raise AttributeError(name)
            for home in homes:
                mod = importlib.import_module(home)
                if name in vars(mod):
                    return vars(mod)[name]
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")

        module.__getattr__ = __getattr__


class _OldPathFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != "ldmground" or name not in OLD_PATHS:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Forwarder(OLD_PATHS[name]))


def install() -> None:
    if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _OldPathFinder())
