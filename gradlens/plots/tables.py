"""The tables some figures draw, computed with :mod:`gradlens.stats` (compute apart from draw).

The figure functions of :mod:`gradlens.plots` draw tables they are given. Where a figure accepts a
run or an incomplete table for convenience, it builds what it draws with the functions here and
then draws it; call them yourself to inspect, change or reuse that table:

- :func:`timeline_data`: what :func:`gradlens.plots.conflict_timeline` draws of one run (conflict
  per probe, per-epoch conflict of :func:`gradlens.stats.epoch_table`, per-epoch evals).
- :func:`grid_optimum`: the grid optimum per size that :func:`gradlens.plots.accuracy_vs_weight`
  marks when no ``optimum`` is given (:func:`gradlens.stats.optimal_weight` without intervals).

Example:
    >>> import tempfile, torch, gradlens as gl
    >>> from gradlens import plots
    >>> with gl.RunWriter(tempfile.mkdtemp() + "/r", meta={"tasks": ["a", "b"]}) as w:
    ...     for s in range(4):
    ...         g = torch.tensor([[1.0, (-1.0) ** s / 2], [(-1.0) ** s / 2, 1.0]],
    ...                          dtype=torch.float64)
    ...         w.add_snapshot(gl.Snapshot(s, ("a", "b"), g, {}, torch.ones(2)))
    >>> data = plots.timeline_data(gl.load_run(w.path))
    >>> data.per_probe.tolist(), data.epochs is None, data.evals.empty
    ([0.0, 1.0, 0.0, 1.0], True, True)
    >>> [ax.get_ylabel() for ax in plots.conflict_timeline(data).axes]
    ['fraction of pairs in conflict', 'accuracy (val)']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError
from gradlens._types import TOTAL_LAYER
from gradlens.plots import _util as _u

if TYPE_CHECKING:
    from gradlens.store import Run

__all__ = ["TimelineData", "grid_optimum", "timeline_data"]


@dataclass(frozen=True)
class TimelineData:
    """What :func:`gradlens.plots.conflict_timeline` draws.

    Attributes:
        per_probe: Fraction of task pairs with ``cos < 0`` at each probed step (index: step).
        epochs: ``[step, interference]`` per epoch (:func:`gradlens.stats.epoch_table`), or
            ``None`` when the run has no per-epoch evals to align with.
        evals: ``eval_metric`` on ``split`` per epoch: index the step, one column per task
            (empty without per-epoch evals).
        eval_metric: The eval metric of ``evals``.
        split: The split of ``evals``.
        layer: The layer of the conflict.
    """

    per_probe: pd.Series
    epochs: pd.DataFrame | None
    evals: pd.DataFrame
    eval_metric: str = "accuracy"
    split: str = "val"
    layer: str = TOTAL_LAYER


def timeline_data(
    run: Run, *, eval_metric: str = "accuracy", split: str = "val", layer: str = TOTAL_LAYER
) -> TimelineData:
    """The conflict of ``run`` per probe and per epoch, and its per-epoch evals.

    Args:
        run: A run from :func:`gradlens.load_run`.
        eval_metric: Eval metric of the per-epoch evals.
        split: Split of the per-epoch evals.
        layer: Layer of the conflict (the total over shared parameters by default).

    Raises:
        GradlensError: If the run has no probed step, ``layer`` is unknown or the run has
            fewer than two tasks.
    """
    from gradlens import stats

    metrics, _ = _u.metrics_of(run, "run")
    rows = _u.layer_rows(metrics, layer)
    rows = rows[rows["metric"].astype(str) == "conflict"]
    if rows.empty:
        raise GradlensError("`run` should have at least 2 tasks to show conflict; found none.")
    values = rows["value"].to_numpy(np.float64)
    ok = np.isfinite(values)
    per_probe = (
        pd.DataFrame({"step": rows["step"].to_numpy()[ok], "value": (values[ok] > 0) * 1.0})
        .groupby("step")["value"]
        .mean()
    )
    try:
        epochs: pd.DataFrame | None = stats.epoch_table(
            run, metric="conflict", eval_metric=eval_metric, split=split, layer=layer
        )
    except GradlensError:
        epochs = None
    evals = run.evals
    sel = evals[
        evals["point"].astype(str).str.startswith("epoch:")
        & (evals["split"] == split)
        & (evals["metric"] == eval_metric)
        & evals["step"].notna()
    ]
    wide = pd.DataFrame()
    if not sel.empty:
        wide = sel.pivot_table(index="step", columns="task", values="value", aggfunc="mean")
        wide.index = wide.index.astype(np.int64)
    return TimelineData(per_probe, epochs, wide, eval_metric, split, layer)


def grid_optimum(
    table: pd.DataFrame, *, weight_col: str, score_col: str, size_col: str
) -> pd.DataFrame:
    """The weight with the best mean score per size (grid optimum, no interval).

    :func:`gradlens.stats.optimal_weight` with ``n_boot=0``: ``[size_col, p_star,
    score_at_p_star, ...]`` per size, the ``optimum`` of
    :func:`gradlens.plots.accuracy_vs_weight`.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"w": [0.1, 0.5, 0.9] * 2, "acc": [0.5, 0.8, 0.6] * 2, "n": 1})
        >>> grid_optimum(t, weight_col="w", score_col="acc", size_col="n")["p_star"].tolist()
        [0.5]
    """
    from gradlens import stats

    return stats.optimal_weight(
        table, weight_col=weight_col, score_col=score_col, size_cols=[size_col], n_boot=0
    )
