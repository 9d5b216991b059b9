"""Plain-text tables of training results for the ``train`` and ``demo`` commands."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from gradlens.train._data import score

__all__: list[str] = []

#: Metric columns in display order; others follow alphabetically.
_ORDER = ("accuracy", "r2", "mse", "loss")


def format_metrics(metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """One row per task, one column per ``split metric``, and a mean row.

    Example:
        >>> print(format_metrics({"val": {"a": {"accuracy": 0.5, "loss": 1.0},
        ...                               "b": {"accuracy": 0.75, "loss": 0.5}}}))
        task  val accuracy  val loss
        a           0.5000    1.0000
        b           0.7500    0.5000
        mean        0.6250    0.7500
    """
    columns: list[tuple[str, str]] = []
    tasks: list[str] = []
    for split, per_task in metrics.items():
        names: set[str] = set()
        for task, values in per_task.items():
            if task not in tasks:
                tasks.append(task)
            names.update(values)
        ordered = [m for m in _ORDER if m in names] + sorted(names - set(_ORDER))
        columns += [(split, m) for m in ordered]
    header = ["task"] + [f"{s} {m}" for s, m in columns]
    rows = []
    for task in tasks:
        rows.append([task] + [_cell(metrics[s].get(task, {}).get(m)) for s, m in columns])
    if len(tasks) > 1:
        means = []
        for s, m in columns:
            vals = [metrics[s][t][m] for t in tasks if m in metrics[s].get(t, {})]
            finite = [float(v) for v in vals if math.isfinite(float(v))]
            means.append(_cell(sum(finite) / len(finite) if finite else None))
        rows.append(["mean", *means])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        first = r[0].ljust(widths[0])
        lines.append("  ".join([first] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    v = float(value)
    return "nan" if math.isnan(v) else f"{v:.4f}"


def loss_text(tasks: Sequence[str], sums: np.ndarray, counts: np.ndarray) -> str:
    """The progress bar's running mean loss per task (the first six)."""
    parts = [f"{t}={s / c:.3f}" for t, s, c in zip(tasks, sums, counts) if c > 0]
    return " ".join(parts[:6]) + (" ..." if len(parts) > 6 else "")


def postfix(train_losses: Mapping[str, float], val: Mapping[str, Mapping[str, float]]) -> str:
    """The progress bar's end-of-epoch text: mean training loss and validation score."""
    finite = [v for v in train_losses.values() if math.isfinite(v)]
    loss = math.fsum(finite) / len(finite) if finite else math.nan
    return f"train loss {loss:.3f}, val score {score(val):.3f}"
