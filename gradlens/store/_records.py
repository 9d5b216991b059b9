"""What the writer puts on disk, checked and converted: ``meta`` as JSON types, a Snapshot's
fit to the run, its row of the ``probes`` table, and the rows of an eval.

Example:
    >>> import numpy as np
    >>> jsonable({"w": np.float32(0.5), "dims": (2, 3)}, "meta")
    {'w': 0.5, 'dims': [2, 3]}
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from gradlens._errors import StoreError
from gradlens._types import TOTAL_LAYER
from gradlens._validate import check_tasks
from gradlens.snapshot import Snapshot
from gradlens.store._io import LEGACY_TOTAL

__all__: list[str] = []


def jsonable(obj: Any, key: str) -> Any:
    """Convert ``obj`` to JSON types (numpy/torch scalars and arrays, tuples, paths)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, f"{key}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, f"{key}[{i}]") for i, v in enumerate(obj)]
    raise StoreError(
        f"`meta` should hold JSON-serialisable values (numbers, strings, lists, dicts, numpy or "
        f"torch scalars and arrays); found {type(obj).__name__} at {key!r}."
    )


def versions() -> dict[str, str]:
    import gradlens

    return {
        "gradlens": gradlens.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
        "python": platform.python_version(),
    }


def meta_tasks(tasks: object) -> tuple[str, ...]:
    return check_tasks(tasks, "meta['tasks']", StoreError)


def check_snapshot(snap: Snapshot, tasks: tuple[str, ...], last_step: int | None) -> int:
    """The snapshot's step, after checking it fits the run: its tasks, a step after the last
    one, square Grams of the run's size, one weight per task, no layer named like the total."""
    step = int(snap.step)
    if tuple(snap.tasks) != tasks:
        raise StoreError(
            f"`snap.tasks` should be the run's tasks {list(tasks)}; found {list(snap.tasks)} "
            f"at step {step}."
        )
    if last_step is not None and step <= last_step:
        raise StoreError(
            f"`snap.step` should increase strictly; found step {step} after step {last_step}."
        )
    if TOTAL_LAYER in snap.layer_grams or LEGACY_TOTAL in snap.layer_grams:
        raise StoreError(
            f"`snap.layer_grams` should not hold a layer named {TOTAL_LAYER!r} or "
            f"{LEGACY_TOTAL!r} (the store's names for the total Gram); found one at step {step}. "
            f"Rename that module."
        )
    n = len(tasks)
    for name, m in ((TOTAL_LAYER, snap.gram), *snap.layer_grams.items()):
        if tuple(m.shape) != (n, n):
            raise StoreError(
                f"The Gram of layer {name!r} at step {step} should be {n} x {n} for tasks "
                f"{list(tasks)}; found shape {tuple(m.shape)}."
            )
    if tuple(snap.weights.shape) != (n,):
        raise StoreError(
            f"`snap.weights` should have shape ({n},); found {tuple(snap.weights.shape)} at "
            f"step {step}."
        )
    return step


def probe_row(step: int, snap: Snapshot) -> dict[str, Any]:
    """The row of the ``probes`` table for one snapshot (everything but Grams, weights, losses)."""
    layer_weights = {
        str(k): v.detach().to("cpu", torch.float64).reshape(-1).tolist()
        for k, v in snap.layer_weights.items()
    }
    return {
        "step": step,
        "engine": snap.engine,
        "level": snap.level,
        "weighting": snap.weighting,
        "weighting_path": snap.weighting_path,
        "rules": [(str(k), str(v)) for k, v in snap.rules.items()],
        "timings": [(str(k), float(v)) for k, v in snap.timings.items()],
        "unreached": [str(x) for x in snap.unreached],
        "notes": [str(x) for x in snap.notes],
        "layer_weights": list(layer_weights.items()),
    }


def eval_rows(values: object) -> list[tuple[str, str, float]]:
    """``(task, metric, value)`` rows of :meth:`RunWriter.add_eval`'s ``values``."""
    if not isinstance(values, Mapping) or not values:
        raise StoreError(
            f"`values` should be a non-empty mapping {{task: {{metric: value}}}}; found "
            f"{values!r:.80}."
        )
    rows: list[tuple[str, str, float]] = []
    for task, metrics in values.items():
        if not isinstance(task, str) or not isinstance(metrics, Mapping):
            raise StoreError(
                f"`values` should map task names to {{metric: value}} mappings; found "
                f"{task!r}: {metrics!r:.80}."
            )
        for metric, value in metrics.items():
            try:
                rows.append((task, str(metric), float(value)))
            except (TypeError, ValueError):
                raise StoreError(
                    f"`values[{task!r}][{metric!r}]` should be a number; found {value!r:.80}."
                ) from None
    return rows
