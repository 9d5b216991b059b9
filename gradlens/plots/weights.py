"""Runs of a sweep against a loss weight: interference (:func:`weight_vs_interference`) and the
score with its optimum (:func:`accuracy_vs_weight`), one colour per model size."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError
from gradlens.plots import _util as _u
from gradlens.plots.tables import grid_optimum

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["accuracy_vs_weight", "weight_vs_interference"]


def _runs(table: pd.DataFrame, x: str, y: str, size_col: str | None) -> pd.DataFrame:
    """``[x, y, size]`` as numbers, the runs missing either left out (an error if none is left)."""
    table = _u.frame(table, "table", [x, y] + ([size_col] if size_col else []))
    data = _u.numeric(table, [x, y])
    data["size"] = table[size_col].to_numpy() if size_col else "all runs"
    data = data.dropna(subset=[x, y])
    if data.empty:
        raise GradlensError(f"`table` should have runs with both {x!r} and {y!r}; found none.")
    return data


def weight_vs_interference(
    table: pd.DataFrame,
    *,
    weight_col: str,
    interference_col: str = "conflict_freq.mean",
    size_col: str | None = "model.n_params",
    ci: int = 95,
    title: str | None = None,
) -> Figure:
    """Interference against a loss weight across runs, one colour per model size.

    Each run is a point (sizes dodged slightly along x so seeds at one weight stay visible);
    each size gets its least-squares line with a ``ci`` % bootstrap band (``seaborn.regplot``,
    seeded). Runs with a NaN in either column (single-task baselines) are left out.

    Args:
        table: One row per run (``gradlens.stats.runs_table``).
        weight_col: The weight on the x axis (e.g. ``"weights.left"``).
        interference_col: The interference summary on the y axis.
        size_col: Column of the model size (``None``: one colour).
        ci: Confidence level of the band, in percent.
        title: Axes title.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"w": [0.1, 0.5, 0.9, 0.1, 0.5, 0.9], "c": [0.1, 0.3, 0.6, 0.2, 0.3,
        ...                   0.7], "size": [1, 1, 1, 2, 2, 2]})
        >>> fig = weight_vs_interference(t, weight_col="w", interference_col="c", size_col="size")
        >>> len(fig.axes[0].collections) >= 2
        True
    """
    data = _runs(table, weight_col, interference_col, size_col)
    sns = _u.seaborn()
    sizes = sorted(data["size"].unique(), key=_u.sort_key)
    colours = _u.palette(len(sizes))
    span = float(np.ptp(data[weight_col].to_numpy())) or 1.0
    fig = _u.new_figure(7.2, 4.8)
    ax = fig.subplots()
    for k, (size, colour) in enumerate(zip(sizes, colours)):
        sub = data[data["size"] == size]
        offset = (k - (len(sizes) - 1) / 2) * 0.008 * span
        label = _u.size_label(size_col, size) if size_col else "all runs"
        ax.scatter(
            sub[weight_col] + offset,
            sub[interference_col],
            s=22,
            color=colour,
            alpha=0.75,
            lw=0,
            label=label,
        )
        if len(sub) >= 3 and sub[weight_col].nunique() >= 2:
            sns.regplot(
                data=sub,
                x=weight_col,
                y=interference_col,
                ax=ax,
                scatter=False,
                ci=ci,
                n_boot=500,
                seed=0,
                color=colour,
                truncate=True,
                line_kws={"lw": 1.6},
            )
    ax.set_xlabel(_u.text(weight_col))
    ax.set_ylabel(_u.describe(interference_col))
    if interference_col.startswith("cosine"):
        ax.axhline(0.0, color="0.5", lw=0.8, ls=":")
    ax.legend(
        title="model size" if size_col else None,
        fontsize=8,
        title_fontsize=8,
        frameon=False,
        loc="best",
    )
    default = f"Interference against the weight ({ci}% bands)"
    ax.set_title(_u.text(title) if title is not None else default, fontsize=11)
    return fig


def accuracy_vs_weight(
    table: pd.DataFrame,
    *,
    weight_col: str,
    score_col: str = "accuracy.mean",
    size_col: str = "model.n_params",
    optimum: pd.DataFrame | None = None,
    title: str | None = None,
) -> Figure:
    """Score against a loss weight per model size, seeds as dots, the optimum marked.

    Lines join the mean over seeds at each weight; a star marks the optimal weight ``p*`` of each
    size with its interval as a horizontal bar, from ``optimum`` (a table of
    :func:`gradlens.stats.optimal_weight` with ``size_cols=[size_col]``) or, when not given,
    the grid optimum without an interval (:func:`gradlens.plots.grid_optimum`).

    A percentile bootstrap interval of an argmax estimator need not contain its point estimate
    (``p*`` of the full data can lie outside the percentiles of the resampled ``p*``); that is
    legitimate, not an error. Each side of the bar runs from the star to its end of the interval,
    with its length clipped at zero, so the bar covers ``[min(ci_low, p*), max(ci_high, p*)]``;
    the legend gives the interval as estimated.

    Args:
        table: One row per run.
        weight_col: The swept weight.
        score_col: The score (e.g. ``"accuracy.mean"``).
        size_col: Model-size column.
        optimum: ``[size_col, p_star, score_at_p_star, ci_low, ci_high]`` per size.
        title: Axes title.

    Example:
        >>> import numpy as np, pandas as pd
        >>> w = np.repeat([0.1, 0.3, 0.5, 0.7, 0.9], 2)
        >>> t = pd.DataFrame({"w": w, "acc": 0.8 - (w - 0.3) ** 2, "size": 1})
        >>> fig = accuracy_vs_weight(t, weight_col="w", score_col="acc", size_col="size")
        >>> fig.axes[0].get_legend().get_texts()[0].get_text()
        'size=1: p* = 0.3'
    """
    data = _runs(table, weight_col, score_col, size_col)
    if optimum is None:
        optimum = grid_optimum(
            data.rename(columns={"size": size_col}),
            weight_col=weight_col,
            score_col=score_col,
            size_col=size_col,
        )
    _u.frame(optimum, "optimum", [size_col, "p_star", "score_at_p_star"])
    sizes = sorted(data["size"].unique(), key=_u.sort_key)
    fig = _u.new_figure(7.2, 4.8)
    ax = fig.subplots()
    for size, colour in zip(sizes, _u.palette(len(sizes))):
        sub = data[data["size"] == size]
        means = sub.groupby(weight_col)[score_col].mean()
        ax.scatter(sub[weight_col], sub[score_col], s=10, color=colour, alpha=0.45, lw=0)
        opt = optimum[optimum[size_col].astype(str) == str(size)]
        label = _u.size_label(size_col, size)
        if len(opt):
            label += _draw_optimum(ax, opt.iloc[0], colour)
        ax.plot(
            means.index, means.to_numpy(), color=colour, lw=1.6, marker="o", ms=3.5, label=label
        )
    ax.set_xlabel(_u.text(weight_col))
    ax.set_ylabel(_u.describe(score_col))
    ax.legend(
        fontsize=8, frameon=False, loc="best", title="model size (* optimum)", title_fontsize=8
    )
    ax.set_title(_u.text(title) if title is not None else "Score against the weight", fontsize=11)
    return fig


def _draw_optimum(ax: Any, o: pd.Series, colour: Any) -> str:
    """The star at ``p*`` with its interval bar; returns the legend's ``: p* = ...`` text."""
    p, score = float(o["p_star"]), float(o["score_at_p_star"])
    lo, hi = float(o.get("ci_low", math.nan)), float(o.get("ci_high", math.nan))
    bounded = math.isfinite(lo) and math.isfinite(hi)
    if bounded:
        ax.errorbar(
            [p],
            [score],
            xerr=[[max(p - lo, 0.0)], [max(hi - p, 0.0)]],
            color=colour,
            lw=1.2,
            capsize=3,
            zorder=4,
        )
    ax.scatter([p], [score], marker="*", s=180, color=colour, edgecolor="black", lw=0.6, zorder=5)
    return f": p* = {p:.2g}" + (f" [{lo:.2g}, {hi:.2g}]" if bounded else "")
