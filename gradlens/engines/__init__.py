"""Engines: the ways gradlens computes per-task Gram matrices, behind one contract.

=============  ==============================================================================
``auto``       the default: times the exact engines below on the first probes of each graph
               shape and keeps the fastest (see :mod:`gradlens.engines.auto`)
``loop``       one ``autograd.grad`` per task; ``gradlens.testing`` keeps its float64 version
               as the reference
``batched``    one batched backward over the T cotangents, chunked over tasks under a budget
``gramian``    per layer, Grams from activations and per-task output gradients; generic
               fallback per module; the weighted gradient from the same pass
``features``   gradients with respect to the shared representation (``features=z``) only
=============  ==============================================================================

Example:
    >>> from gradlens.engines import ENGINES, engine_class
    >>> sorted(ENGINES)
    ['auto', 'batched', 'features', 'gramian', 'loop']
    >>> engine_class("gramian").level
    'parameters'
"""

from __future__ import annotations

from gradlens._errors import GradlensError
from gradlens.engines._base import Engine
from gradlens.engines.auto import AutoEngine
from gradlens.engines.batched import BatchedEngine
from gradlens.engines.features import FeaturesEngine
from gradlens.engines.gramian import GramianEngine
from gradlens.engines.loop import LoopEngine

__all__ = ["ENGINES", "Engine", "engine_class"]

ENGINES: dict[str, type[Engine]] = {
    e.name: e for e in (AutoEngine, LoopEngine, BatchedEngine, GramianEngine, FeaturesEngine)
}


def engine_class(name: str) -> type[Engine]:
    """The engine class registered under ``name``."""
    try:
        return ENGINES[name]
    except (KeyError, TypeError):
        raise GradlensError(
            f"`engine` should be one of {sorted(ENGINES)}; found {name!r}."
        ) from None
