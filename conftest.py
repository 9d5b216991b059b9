"""Collection rules for the whole tree (the tests' fixtures live in tests/conftest.py).

The default suite collects the doctests of every module under gradlens/ (``--doctest-modules``).
An integration module imports its optional library at import time and raises a clear error when
it is missing; such a module is left out of collection when its extra is not installed, so that
the suite runs with any subset of the extras.
"""

from __future__ import annotations

import importlib.util

# module path (relative to this file) -> the import name of the library it needs
_NEEDS = {
    "gradlens/integrations/lightning.py": "lightning",
    "gradlens/weightings/_cagrad.py": "scipy",  # its doctest solves with SLSQP
    "gradlens/integrations/transformers.py": "transformers",
}

collect_ignore = [path for path, lib in _NEEDS.items() if importlib.util.find_spec(lib) is None]
