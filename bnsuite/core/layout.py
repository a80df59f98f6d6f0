"""Where bnsuite's modules live, and the flat names they are known by.

The package has two halves, each a folder: `bnsuite/core/`, what a reader of records needs and nothing of torch
(specs, networks and datasets as data, the registries, records, claims, verdicts, the baseline gate, the report),
and `bnsuite/training/`, what turns a spec into records (data, networks, normalizations, the steps, evaluation,
measurements, the roofline). At the top, the edge that joins them: the study session, the pytest plugin, the
executors, the docs generator and the studies.

Every module of either half is also importable by its flat name, `bnsuite.<module>` (`bnsuite.models`,
`bnsuite.report`, `bnsuite.registry`): the name users import (docs/plugins.md), `python -m bnsuite.report` runs and
records name a builder by (`bnsuite.models:bn`), so moving a module between folders changes none of them. The flat
name is the same module object as the folder's, imported on first use (`import bnsuite` stays free of torch).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

CORE = ("baseline", "claims", "datasets", "described", "files", "idx", "layout", "networks", "plots", "records",
        "registry", "report", "report_parts", "spec", "verdicts")
TRAINING = ("batchnorm", "compiled", "data", "environment", "epochs", "evaluation", "fastpath", "fused",
            "landscape", "models", "original", "precise", "probe", "signal", "speed", "train")

# flat name -> the module's path in its half
LOCATIONS = {f"bnsuite.{name}": f"bnsuite.{half}.{name}"
             for half, names in (("core", CORE), ("training", TRAINING)) for name in names}
FLAT_NAMES = {location: flat for flat, location in LOCATIONS.items()}


def flat_name(module: str) -> str:
    """The name a module of bnsuite is known by (`bnsuite.training.models` -> `bnsuite.models`); any other module's
    name unchanged."""
    return FLAT_NAMES.get(module, module)


class _FlatNameLoader(importlib.abc.Loader):
    """Loads `bnsuite.<module>` as the module at its place in a half: the same module object, not a copy."""

    def __init__(self, location: str):
        self.location = location
        self._spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.location)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec  # importlib set the flat name's spec on it; the module keeps its own

    def get_code(self, fullname: str):
        """The module's code, for `python -m bnsuite.report` (runpy runs it as __main__ without importing it)."""
        spec = importlib.util.find_spec(self.location)
        return spec.loader.get_code(self.location)


class FlatNames(importlib.abc.MetaPathFinder):
    """Finds `bnsuite.<module>` for every module of the two halves (installed by `import bnsuite`)."""

    def find_spec(self, fullname, path, target=None):
        location = LOCATIONS.get(fullname)
        if location is None:
            return None
        origin = importlib.util.find_spec(location)
        return importlib.util.spec_from_loader(fullname, _FlatNameLoader(location),
                                               origin=origin.origin if origin else None)


def install() -> None:
    """Put the finder of flat names on sys.meta_path, once."""
    if not any(isinstance(finder, FlatNames) for finder in sys.meta_path):
        sys.meta_path.append(FlatNames())
