"""A PBT population's loss-weight schedules: :func:`pbt_schedules` stacks each member's weights
over epochs, from a tidy schedule table it is given."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError
from gradlens._validate import check_int
from gradlens.plots import _util as _u

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["pbt_schedules"]


def pbt_schedules(
    schedule: pd.DataFrame,
    *,
    member: str = "member",
    epoch: str = "epoch",
    task: str = "task",
    weight: str = "weight",
    max_cols: int = 4,
    end: float | None = None,
    title: str | None = None,
) -> Figure:
    """The loss-weight schedule of each PBT member as stacked areas over epochs.

    One small panel per member (shared axes), the weights of the tasks stacked. Each row gives
    the weights that take effect at its epoch and hold until the member's next row (PBT changes
    them at round boundaries); the last ones hold until ``end`` (default: one more median
    interval). A task missing at an epoch counts 0. One legend for all panels.

    Args:
        schedule: Tidy table ``[member, epoch, task, weight]`` (column names configurable).
        member: Member column.
        epoch: Epoch column.
        task: Task column.
        weight: Weight column.
        max_cols: Panels per row.
        end: Epoch at which training ended (the right edge of every panel).
        title: Figure title.

    Example:
        >>> import pandas as pd
        >>> s = pd.DataFrame({"member": [0, 0, 0, 0, 1, 1, 1, 1], "epoch": [0, 0, 1, 1] * 2,
        ...                   "task": ["a", "b"] * 4,
        ...                   "weight": [0.5, 0.5, 0.7, 0.3, 0.5, 0.5, 0.2, 0.8]})
        >>> fig = pbt_schedules(s)
        >>> [ax.get_title() for ax in fig.axes]
        ['member 0', 'member 1']
    """
    schedule = _u.frame(schedule, "schedule", [member, epoch, task, weight])
    check_int("max_cols", max_cols, minimum=1)
    w = pd.to_numeric(schedule[weight], errors="coerce")
    if w.isna().any() or (w < 0).any():
        raise GradlensError(
            f"`schedule[{weight!r}]` should hold non-negative numbers; found "
            f"{schedule.loc[w.isna() | (w < 0), weight].head(3).tolist()}."
        )
    tasks = list(dict.fromkeys(schedule[task].astype(str)))
    members = sorted(schedule[member].unique(), key=_u.sort_key)
    colours = _u.palette(len(tasks))
    n = len(members)
    ncols = min(n, max_cols)
    nrows = math.ceil(n / ncols)
    legend_rows = math.ceil(len(tasks) / 6)
    fig = _u.new_figure(3.2 * ncols + 0.6, 2.3 * nrows + 0.9 + 0.22 * legend_rows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False))
    flat = axes.ravel()
    handles: list[Any] = []
    for ax, m in zip(flat, members):
        sub = schedule[schedule[member] == m].assign(**{task: lambda d: d[task].astype(str)})
        x, stacked = _steps(sub, epoch, task, weight, tasks, end)
        handles = ax.stackplot(
            x, stacked, colors=colours, step="post", labels=[_u.text(t) for t in tasks], lw=0
        )
        ax.set_title(_u.text(f"member {m}"), fontsize=9)
        ax.margins(x=0)
    for ax in flat[n:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(_u.text(epoch))
    for ax in axes[:, 0]:
        ax.set_ylabel("loss weight")
    fig.legend(
        handles,
        [_u.text(t) for t in tasks],
        loc="outside lower center",
        ncol=min(len(tasks), 6),
        fontsize=8 if len(tasks) <= 12 else 6,
        frameon=False,
    )
    fig.suptitle(_u.text(title) if title is not None else "PBT weight schedules", fontsize=11)
    return fig


def _steps(
    sub: pd.DataFrame, epoch: str, task: str, weight: str, tasks: list[str], end: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """One member's epochs (with the end of its last step appended) and weights (tasks x x)."""
    wide = sub.pivot_table(index=epoch, columns=task, values=weight, aggfunc="mean")
    wide = wide.reindex(columns=tasks).fillna(0.0).sort_index()
    x = wide.index.to_numpy(np.float64)
    # the last weights hold until the end of training: close the last step there
    last = float(np.median(np.diff(x))) if x.size > 1 else 1.0
    stop = float(end) if end is not None and end > x[-1] else x[-1] + last
    wide = pd.concat([wide, wide.iloc[-1:]])
    return np.append(x, stop), wide.to_numpy().T
