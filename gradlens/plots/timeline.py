"""One run over time: :func:`conflict_timeline` draws conflict over training above the
per-epoch validation metric, from a :class:`gradlens.plots.TimelineData` (built from a run by
:func:`gradlens.plots.timeline_data` when a run is given)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gradlens._types import TOTAL_LAYER
from gradlens._validate import check_int
from gradlens.plots import _util as _u
from gradlens.plots.tables import TimelineData, timeline_data

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from gradlens.store import Run

__all__ = ["conflict_timeline"]

_RED = "#b2182b"


def conflict_timeline(
    run: Run | TimelineData,
    *,
    eval_metric: str = "accuracy",
    split: str = "val",
    layer: str = TOTAL_LAYER,
    window: int | None = None,
    title: str | None = None,
) -> Figure:
    """Conflict over training (top) above the per-epoch validation metric (bottom), same x.

    Top: the fraction of task pairs with ``cos < 0`` at each probed step (dots), its rolling
    mean over ``window`` probes (line), and the per-epoch conflict of
    :func:`gradlens.stats.epoch_table` (steps), the quantity :func:`gradlens.stats.within_run`
    correlates with the validation metric. Bottom: ``eval_metric`` on ``split`` at each epoch,
    per task (up to 10 tasks) and averaged. Without per-epoch evals the bottom panel says so.

    Args:
        run: A run from :func:`gradlens.load_run`, or the :class:`TimelineData` to draw
            (from :func:`gradlens.plots.timeline_data`; ``eval_metric``, ``split`` and
            ``layer`` are then the data's own).
        eval_metric: Eval metric to plot.
        split: Split of the per-epoch evals.
        layer: Layer of the conflict.
        window: Rolling window in probes (default: about a fifteenth of the probes, >= 3).
        title: Figure title.

    Example:
        >>> import tempfile, torch, gradlens as gl
        >>> with gl.RunWriter(tempfile.mkdtemp() + "/r", meta={"tasks": ["a", "b"]}) as w:
        ...     for s in range(6):
        ...         g = torch.tensor([[1.0, (-1.0) ** s / 2], [(-1.0) ** s / 2, 1.0]],
        ...                          dtype=torch.float64)
        ...         w.add_snapshot(gl.Snapshot(s, ("a", "b"), g, {}, torch.ones(2)))
        ...         if s % 3 == 2:
        ...             w.add_eval({"a": {"accuracy": s / 10}}, split="val",
        ...                        point=f"epoch:{s // 3 + 1}", epoch=s // 3 + 1, step=s)
        >>> fig = conflict_timeline(gl.load_run(w.path))
        >>> [ax.get_ylabel() for ax in fig.axes]
        ['fraction of pairs in conflict', 'accuracy (val)']
    """
    data = (
        run
        if isinstance(run, TimelineData)
        else timeline_data(run, eval_metric=eval_metric, split=split, layer=layer)
    )
    check_int("window", window, minimum=1, none_ok=True)
    per_probe = data.per_probe
    win = window if window is not None else max(3, len(per_probe) // 15)
    fig = _u.new_figure(9.0, 5.6)
    ax_c, ax_v = fig.subplots(2, 1, sharex=True, height_ratios=[1.1, 1.0])
    _draw_conflict(ax_c, data, win)
    _draw_evals(ax_c, ax_v, data)
    if title is not None:
        fig.suptitle(_u.text(title))
    return fig


def _draw_conflict(ax: Any, data: TimelineData, win: int) -> None:
    """Conflict per probe (dots), its rolling mean (line) and per epoch (steps)."""
    per_probe = data.per_probe
    smooth = per_probe.rolling(win, min_periods=1, center=True).mean()
    ax.scatter(
        per_probe.index, per_probe.to_numpy(), s=14, color=_RED, alpha=0.55, lw=0, label="per probe"
    )
    ax.plot(
        smooth.index, smooth.to_numpy(), color=_RED, lw=1.8, label=f"rolling mean ({win} probes)"
    )
    epochs = data.epochs
    if epochs is not None and len(epochs):
        starts = np.concatenate([[per_probe.index.min()], epochs["step"].to_numpy()[:-1]])
        ax.hlines(
            epochs["interference"], starts, epochs["step"], color="black", lw=1.4, label="per epoch"
        )
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("fraction of pairs in conflict")
    ax.legend(
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        frameon=False,
        ncol=3,
        borderaxespad=0.1,
    )
    ax.set_title(f"Conflict ({_u.layer_name(data.layer)})", fontsize=10, loc="left")


def _draw_evals(ax_c: Any, ax_v: Any, data: TimelineData) -> None:
    """The per-epoch evals per task and their mean, epochs marked on both panels."""
    wide = data.evals
    if wide.empty:
        ax_v.text(
            0.5,
            0.5,
            _u.text(f"no per-epoch evals of {data.eval_metric} on {data.split}"),
            ha="center",
            va="center",
            transform=ax_v.transAxes,
            color="0.4",
        )
    else:
        if wide.shape[1] <= 10:
            for task in wide.columns:
                ax_v.plot(
                    wide.index, wide[task], lw=1.0, alpha=0.7, marker=".", label=_u.text(task)
                )
        ax_v.plot(
            wide.index,
            wide.mean(axis=1),
            color="black",
            lw=2.0,
            marker="o",
            ms=3,
            label="mean over tasks",
        )
        ax_v.legend(loc="lower right", fontsize=8, frameon=False, ncol=min(4, wide.shape[1] + 1))
        if len(wide) <= 60:
            for s in wide.index:
                ax_c.axvline(s, color="0.85", lw=0.6, zorder=0)
                ax_v.axvline(s, color="0.85", lw=0.6, zorder=0)
    ax_v.set_ylabel(_u.text(f"{data.eval_metric} ({data.split})"))
    ax_v.set_xlabel("training step")
