"""gradlens: measure how the tasks of a multi-task PyTorch model interfere.

Example:
    >>> import torch, gradlens as gl
    >>> trunk = torch.nn.Linear(3, 4)
    >>> heads = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 1), "b": torch.nn.Linear(4, 1)})
    >>> prof = gl.Profiler(trunk, tasks=["a", "b"], engine="gramian")
    >>> z = trunk(torch.randn(5, 3))
    >>> snap = prof.backward({"a": heads["a"](z).mean(), "b": -heads["a"](z).mean()})
    >>> round(snap.cosine()[0, 1].item(), 6)
    -1.0
    >>> prof.close()
"""

from __future__ import annotations

import importlib
from typing import Any

from gradlens import metrics, schedules, testing, weightings
from gradlens._errors import GradlensError, GradlensWarning, MissingExtraError, StoreError
from gradlens.profiler import Profiler
from gradlens.snapshot import TOTAL_LAYER, Snapshot
from gradlens.store import Run, RunWriter, load_run, load_runs
from gradlens.weightings import per_layer

__all__ = [
    "TOTAL_LAYER",
    "GradlensError",
    "GradlensWarning",
    "MissingExtraError",
    "Profiler",
    "Run",
    "RunWriter",
    "Snapshot",
    "StoreError",
    "load_run",
    "load_runs",
    "metrics",
    "per_layer",
    "schedules",
    "testing",
    "weightings",
]
__version__ = "0.1.0"

# Heavier layers (scipy, matplotlib, the harness) load on first use: `gl.stats`, `gl.plots`, ...
_LAZY = {"stats", "plots", "report", "data", "models", "train", "search", "sinks"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"gradlens.{name}")
    raise AttributeError(f"module 'gradlens' has no attribute {name!r}")
