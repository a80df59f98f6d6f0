"""bnsuite: a pytest-driven benchmark and regression suite for Batch Normalization.

The plugin API: `register_normalization`, `register_variant`, `register_network`, `register_study`,
`register_measure` and `register_dataset` (bnsuite.registry) add a user's own normalizations (for every network
with slots for them), variants built whole, networks, studies, per-epoch measurements and datasets, and
`register_known_exceptions` pins the verdicts of claims that do not hold for them, from a module of their own,
imported with `--bn-plugin MODULE` or found through the `bnsuite.plugins` entry-point group. Importing bnsuite
registers the built-in studies (bnsuite.studies); it imports no torch.

The modules live in two folders, `bnsuite/core/` (no torch) and `bnsuite/training/`, and each is importable by its
flat name as well, `bnsuite.models` for `bnsuite.training.models` (bnsuite.layout).
"""

from bnsuite import studies  # noqa: F401  (the built-in studies register on import, before any plugin's)
from bnsuite.core import layout
from bnsuite.core.registry import (
    register_dataset,
    register_known_exceptions,
    register_measure,
    register_network,
    register_normalization,
    register_study,
    register_variant,
)

layout.install()  # `import bnsuite.models` and every other flat name, from here on

__all__ = ["register_dataset", "register_known_exceptions", "register_measure", "register_network",
           "register_normalization", "register_study", "register_variant"]
