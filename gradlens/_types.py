"""Constants and type aliases shared by every layer of gradlens; this module imports nothing.

Example:
    >>> from gradlens._types import TOTAL_LAYER
    >>> TOTAL_LAYER
    'total'
"""

from typing import Literal

__all__ = ["RENAMED_TOTAL", "TOTAL_LAYER", "Level"]

#: Name under which the Gram of all shared parameters is stored next to the per-layer Grams
#: (``"__all__"`` in runs of store format 1, read as this name).
TOTAL_LAYER = "total"

#: What a module (or a named parameter's prefix) called like the total is named as a layer:
#: module paths hold no spaces, so this name can be no other layer's.
RENAMED_TOTAL = f"{TOTAL_LAYER} (layer)"

#: What a Gram is taken over: the shared parameters, or a shared representation (``features=``).
Level = Literal["parameters", "features"]
