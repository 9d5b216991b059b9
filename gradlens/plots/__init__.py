"""Figures of interference, weights and accuracy (the ``plot`` extra: matplotlib and seaborn).

Every function takes tidy inputs (a run from :func:`gradlens.load_run`, a long metrics frame, a
table from :mod:`gradlens.stats`) and returns a :class:`matplotlib.figure.Figure` drawn by Agg;
the caller saves it (:func:`save`). Nothing goes through ``pyplot``, so no global state changes
and figures are freed like any object. Conflict is red everywhere (diverging palettes centred at
0 for cosines and gains). Tick labels are sized, rotated and, as a last resort, thinned so that no
two overlap, for up to 40 tasks (and as many layers); numbers are written in heatmap cells for up
to 12 tasks.

- :func:`conflict_heatmap`: task x task mean cosine, and conflict frequency beside it.
- :func:`layer_step_heatmap`: layer x step mean pairwise cosine (or conflict) of one run.
- :func:`conflict_timeline`: conflict over training above the validation metric.
- :func:`weight_vs_interference`: runs of a sweep, regression line and band per model size.
- :func:`accuracy_vs_weight`: score against the weight per size, the optimum marked.
- :func:`gain_grid`: gain of joint over single-task training on a depth x width grid.
- :func:`pbt_schedules`: the weight schedules of a PBT population, stacked.

Example:
    >>> import tempfile, torch, gradlens as gl
    >>> from gradlens import plots
    >>> path = tempfile.mkdtemp() + "/run"
    >>> with gl.RunWriter(path, meta={"tasks": ["a", "b", "c"]}) as w:
    ...     for step in range(4):
    ...         v = torch.randn(3, 5, dtype=torch.float64)
    ...         w.add_snapshot(gl.Snapshot(step, ("a", "b", "c"), v @ v.T, {}, torch.ones(3)))
    >>> fig = plots.conflict_heatmap(gl.load_run(path))
    >>> [ax.get_title() for ax in fig.axes[:2]]
    ['Mean cosine', 'Conflict frequency (cos < 0)']
    >>> plots.save(fig, tempfile.mkdtemp() + "/heatmap.png").stat().st_size > 0
    True
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError
from gradlens._types import TOTAL_LAYER
from gradlens.plots import _util as _u

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from gradlens.store import Run

__all__ = [
    "accuracy_vs_weight",
    "conflict_heatmap",
    "conflict_timeline",
    "gain_grid",
    "layer_step_heatmap",
    "pbt_schedules",
    "save",
    "weight_vs_interference",
]

_DESCRIBE = {
    "cosine": "mean cosine",
    "conflict_freq": "conflict frequency (cos < 0)",
    "conflict": "fraction of pairs in conflict",
    "gms": "gradient magnitude similarity",
    "accuracy": "accuracy",
}


def _describe(col: str) -> str:
    """Axis label of a table column: ``conflict_freq.mean`` -> ``conflict frequency ... (mean)``."""
    head, _, tail = col.partition(".")
    if head not in _DESCRIBE:
        return _u.text(col)
    if tail == "mean":
        tail = (
            "mean over pairs" if head in ("cosine", "conflict_freq", "gms") else "mean over tasks"
        )
    return _u.text(f"{_DESCRIBE[head]}{f', {tail}' if tail else ''}")


def _layer_name(layer: str) -> str:
    return "all shared parameters" if layer == TOTAL_LAYER else _u.text(layer)


def _heat_side(n: int) -> float:
    """Side (inches) of a square heatmap panel of ``n`` cells."""
    return float(np.clip(0.22 * n + 1.4, 3.4, 11.0))


# --------------------------------------------------------------------------- heatmaps


def conflict_heatmap(
    run_or_metrics: Run | pd.DataFrame,
    *,
    layer: str = TOTAL_LAYER,
    tasks: Sequence[str] | None = None,
    annotate: bool | None = None,
    title: str | None = None,
) -> Figure:
    """Task x task mean cosine (left) and conflict frequency (right) over probed steps.

    The cosine panel uses a diverging palette centred at 0 (red: conflict), symmetric limits at
    the largest ``|mean cosine|``; the right panel is the fraction of probed values with
    ``cos < 0``. NaN cosines (a task with a zero gradient) are left out of both. The diagonal is
    grey. Cells hold their value when there are at most 12 tasks (``annotate`` overrides).

    Args:
        run_or_metrics: A run (``gradlens.load_run``) or a long metrics frame
            ``[step, layer, metric, task_i, task_j, value]``; frames of several runs with the
            same tasks may be concatenated, their probes are then pooled.
        layer: Layer to show (the total over shared parameters by default).
        tasks: Task order (default: the run's, or the frame's order).
        annotate: Write the values in the cells; default: when there are at most 12 tasks.
        title: Figure title (default: the layer and the number of probes).

    Raises:
        GradlensError: If the input has no probed steps, ``layer`` is unknown or there are
            fewer than two tasks.

    Example:
        >>> import numpy as np
        >>> from gradlens.metrics import metrics_frame
        >>> G = np.array([[[[1.0, -0.5], [-0.5, 1.0]]], [[[1.0, 0.2], [0.2, 1.0]]]])
        >>> fig = conflict_heatmap(metrics_frame(G, ["a", "b"], layers=["__all__"]))
        >>> [float(ax.images[0].get_array()[0, 1]) for ax in fig.axes[:2]]
        [-0.15, 0.5]
    """
    metrics, run_tasks = _u.metrics_of(run_or_metrics, "run_or_metrics")
    rows = _u.layer_rows(metrics, layer)
    order = _u.task_order(rows, tasks if tasks is not None else run_tasks)
    if len(order) < 2:
        raise GradlensError(
            f"`run_or_metrics` should have at least 2 tasks for a task x task heatmap; found "
            f"{order}."
        )
    metric = rows["metric"].astype(str)
    cos = _u.pair_matrix(rows[metric == "cosine"], order, conflict=False)
    freq = _u.pair_matrix(rows[metric == "conflict"], order, conflict=True)
    if np.isnan(cos).all():
        raise GradlensError(
            f"`run_or_metrics` should hold finite cosines for layer {layer!r}; found none."
        )
    np.fill_diagonal(cos, np.nan)
    np.fill_diagonal(freq, np.nan)
    n = len(order)
    counts = rows[metric == "cosine"].groupby(["task_i", "task_j"], observed=True).size()
    n_probes = int(counts.max()) if len(counts) else 0

    side = _heat_side(n)
    fig = _u.new_figure(2 * side + 2.2, side + 0.5)
    ax_cos, ax_freq = fig.subplots(1, 2)
    lim = _u.symmetric_limit(cos)
    annotate = n <= _u.ANNOTATE_MAX if annotate is None else bool(annotate)
    cell_font = 10.0 if n <= 4 else 8.0 if n <= 8 else 6.5
    labels = [_u.text(t) for t in order]
    panels = [
        (ax_cos, cos, _u.CONFLICT_CMAP, -lim, lim, "Mean cosine", "mean cosine", "{:+.2f}"),
        (ax_freq, freq, "Reds", 0.0, 1.0, "Conflict frequency (cos < 0)", "frequency", "{:.2f}"),
    ]
    for ax, mat, cmap_name, lo, hi, panel_title, cbar_label, fmt in panels:
        cmap = _colormap(cmap_name)
        image = ax.imshow(mat, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_xticks(range(n), labels)
        ax.set_yticks(range(n), labels)
        ax.set_title(panel_title)
        ax.tick_params(length=0)
        fig.colorbar(image, ax=ax, label=cbar_label, fraction=0.046, pad=0.03)
        if annotate:
            text = np.array([[fmt.format(v) if np.isfinite(v) else "" for v in row] for row in mat])
            _u.annotate_cells(ax, image, text, cell_font)
    default = f"{_layer_name(layer)}, {n_probes} probes per pair"
    fig.suptitle(_u.text(title) if title is not None else default)
    cell = (side - 1.4) * 72.0 / n
    _u.fit_tick_labels(fig, [ax_cos, ax_freq], (cell, cell), start=10.0 if n <= 12 else 9.0)
    return fig


def _colormap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="#d9d9d9")


def layer_step_heatmap(
    run_or_metrics: Run | pd.DataFrame,
    *,
    metric: str = "cosine",
    max_columns: int = 120,
    title: str | None = None,
) -> Figure:
    """Layer x step heatmap of the mean over task pairs of ``metric`` in one run.

    Rows are the layers (the total over shared parameters first, set apart by a line), columns
    the probed steps in order; with more than ``max_columns`` probes, consecutive probes are
    averaged into ``max_columns`` columns. ``metric="cosine"`` (diverging, centred at 0, red for
    conflict), ``"conflict"`` (fraction of pairs with ``cos < 0``) or ``"gms"``.

    Args:
        run_or_metrics: A run or its long metrics frame.
        metric: ``"cosine"``, ``"conflict"`` or ``"gms"``.
        max_columns: Most columns drawn.
        title: Figure title.

    Example:
        >>> import numpy as np
        >>> from gradlens.metrics import metrics_frame
        >>> G = np.tile(np.array([[1.0, -0.5], [-0.5, 1.0]]), (3, 2, 1, 1))  # 3 steps, 2 layers
        >>> fig = layer_step_heatmap(metrics_frame(G, ["a", "b"], layers=["__all__", "fc"]))
        >>> fig.axes[0].images[0].get_array().shape
        (2, 3)
    """
    allowed = ("cosine", "conflict", "gms")
    if metric not in allowed:
        raise GradlensError(f"`metric` should be one of {list(allowed)}; found {metric!r}.")
    if isinstance(max_columns, bool) or not isinstance(max_columns, int) or max_columns < 2:
        raise GradlensError(f"`max_columns` should be an int >= 2; found {max_columns!r}.")
    metrics, _ = _u.metrics_of(run_or_metrics, "run_or_metrics")
    rows = metrics[metrics["metric"].astype(str) == metric]
    if rows.empty:
        raise GradlensError(
            f"`run_or_metrics` should hold {metric!r} rows (a run with at least 2 tasks); "
            "found none."
        )
    values = rows["value"].to_numpy(np.float64)
    ok = np.isfinite(values)
    vals = (values[ok] > 0).astype(float) if metric == "conflict" else values[ok]
    work = pd.DataFrame(
        {"layer": rows["layer"].astype(str).to_numpy()[ok], "step": rows["step"].to_numpy()[ok]}
    ).assign(value=vals)
    layer_order = list(dict.fromkeys(rows["layer"].astype(str)))
    layer_order = [TOTAL_LAYER] * (TOTAL_LAYER in layer_order) + [
        x for x in layer_order if x != TOTAL_LAYER
    ]
    steps = np.unique(rows["step"].to_numpy())
    table = work.groupby(["layer", "step"])["value"].mean().unstack("step")
    table = table.reindex(index=layer_order, columns=steps)
    mat = table.to_numpy(np.float64)
    n_steps = steps.size
    if n_steps > max_columns:
        edges = np.linspace(0, n_steps, max_columns + 1).round().astype(int)
        with np.errstate(all="ignore"):
            cols = []
            for a, b in itertools.pairwise(edges):
                block = mat[:, a:b]
                good = np.isfinite(block)
                sums = np.where(good, block, 0.0).sum(1)
                cnt = good.sum(1)
                cols.append(np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan))
        mat = np.stack(cols, axis=1)
        col_steps = steps[edges[:-1]]
    else:
        col_steps = steps

    n_layers, n_cols = mat.shape
    height = float(np.clip(0.24 * n_layers + 1.6, 2.6, 14.0))
    width = float(np.clip(6.0 + 0.04 * n_cols, 7.0, 13.0))
    fig = _u.new_figure(width, height)
    ax = fig.subplots()
    if metric == "cosine":
        lim = _u.symmetric_limit(mat)
        cmap, lo, hi, label = _colormap(_u.CONFLICT_CMAP), -lim, lim, "mean pairwise cosine"
    elif metric == "conflict":
        cmap, lo, hi, label = _colormap("Reds"), 0.0, 1.0, "fraction of pairs with cos < 0"
    else:
        cmap, lo, hi, label = _colormap("viridis"), 0.0, 1.0, "mean pairwise GMS"
    image = ax.imshow(mat, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label, fraction=0.04, pad=0.02)
    ylabels = ["all shared" if x == TOTAL_LAYER else _u.text(x) for x in layer_order]
    ax.set_yticks(range(n_layers), ylabels)
    if TOTAL_LAYER in layer_order and n_layers > 1:
        ax.axhline(0.5, color="white", lw=2.5)
    from matplotlib.ticker import MaxNLocator

    positions = [int(p) for p in MaxNLocator(nbins=8, integer=True).tick_values(0, n_cols - 1)]
    positions = [p for p in positions if 0 <= p < n_cols]
    ax.set_xticks(positions, [str(int(col_steps[p])) for p in positions])
    binned = f" ({n_steps} probes averaged into {n_cols} columns)" if n_steps > n_cols else ""
    ax.set_xlabel(f"training step, in probe order{binned}")
    ax.set_ylabel("layer")
    ax.tick_params(length=2)
    default = f"Mean pairwise {metric} per layer over training"
    fig.suptitle(_u.text(title) if title is not None else default)
    _u.fit_tick_labels(fig, [ax], (200.0, (height - 1.3) * 72.0 / n_layers))
    return fig


# --------------------------------------------------------------------------- one run over time


def conflict_timeline(
    run: Run,
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
        run: A run from :func:`gradlens.load_run`.
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
    from gradlens import stats

    metrics, _ = _u.metrics_of(run, "run")
    rows = _u.layer_rows(metrics, layer)
    rows = rows[rows["metric"].astype(str) == "conflict"]
    if rows.empty:
        raise GradlensError("`run` should have at least 2 tasks to show conflict; found none.")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise GradlensError(f"`window` should be a positive int or None; found {window!r}.")
    if window is not None and window < 1:
        raise GradlensError(f"`window` should be a positive int or None; found {window!r}.")
    values = rows["value"].to_numpy(np.float64)
    ok = np.isfinite(values)
    per_probe = (
        pd.DataFrame({"step": rows["step"].to_numpy()[ok], "value": (values[ok] > 0) * 1.0})
        .groupby("step")["value"]
        .mean()
    )
    win = window if window is not None else max(3, len(per_probe) // 15)
    smooth = per_probe.rolling(win, min_periods=1, center=True).mean()

    try:
        epochs = stats.epoch_table(
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

    fig = _u.new_figure(9.0, 5.6)
    ax_c, ax_v = fig.subplots(2, 1, sharex=True, height_ratios=[1.1, 1.0])
    ax_c.scatter(
        per_probe.index,
        per_probe.to_numpy(),
        s=8,
        color="#b2182b",
        alpha=0.3,
        lw=0,
        label="per probe",
    )
    ax_c.plot(
        smooth.index,
        smooth.to_numpy(),
        color="#b2182b",
        lw=1.8,
        label=f"rolling mean ({win} probes)",
    )
    if epochs is not None and len(epochs):
        starts = np.concatenate([[per_probe.index.min()], epochs["step"].to_numpy()[:-1]])
        ax_c.hlines(
            epochs["interference"], starts, epochs["step"], color="black", lw=1.4, label="per epoch"
        )
    ax_c.set_ylim(-0.03, 1.03)
    ax_c.set_ylabel("fraction of pairs in conflict")
    ax_c.legend(
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        frameon=False,
        ncol=3,
        borderaxespad=0.1,
    )
    ax_c.set_title(f"Conflict ({_layer_name(layer)})", fontsize=10, loc="left")

    label = _u.text(f"{eval_metric} ({split})")
    if sel.empty:
        ax_v.text(
            0.5,
            0.5,
            _u.text(f"no per-epoch evals of {eval_metric} on {split}"),
            ha="center",
            va="center",
            transform=ax_v.transAxes,
            color="0.4",
        )
    else:
        wide = sel.pivot_table(index="step", columns="task", values="value", aggfunc="mean")
        wide.index = wide.index.astype(np.int64)
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
    ax_v.set_ylabel(label)
    ax_v.set_xlabel("training step")
    if title is not None:
        fig.suptitle(_u.text(title))
    return fig


# --------------------------------------------------------------------------- across runs


def _numeric(table: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    return table[list(cols)].apply(pd.to_numeric, errors="coerce")


def _palette(n: int) -> list[Any]:
    sns = _u.seaborn()
    return list(sns.color_palette("tab10" if n <= 10 else "husl", n))


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
    cols = [weight_col, interference_col] + ([size_col] if size_col else [])
    table = _u.frame(table, "table", cols)
    data = _numeric(table, [weight_col, interference_col])
    data["size"] = table[size_col].to_numpy() if size_col else "all runs"
    data = data.dropna(subset=[weight_col, interference_col])
    if data.empty:
        raise GradlensError(
            f"`table` should have runs with both {weight_col!r} and {interference_col!r}; "
            "found none."
        )
    sns = _u.seaborn()
    sizes = sorted(data["size"].unique(), key=_u.sort_key)
    colours = _palette(len(sizes))
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
    ax.set_ylabel(_describe(interference_col))
    if interference_col.startswith("cosine"):
        ax.axhline(0.0, color="0.5", lw=0.8, ls=":")
    ax.legend(
        title="model size" if size_col else None,
        fontsize=8,
        title_fontsize=8,
        frameon=False,
        loc="best",
    )
    ax.set_title(
        _u.text(title) if title is not None else f"Interference against the weight ({ci}% bands)",
        fontsize=11,
    )
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
    the grid optimum without an interval.

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
    from gradlens import stats

    table = _u.frame(table, "table", [weight_col, score_col, size_col])
    data = _numeric(table, [weight_col, score_col])
    data["size"] = table[size_col].to_numpy()
    data = data.dropna(subset=[weight_col, score_col])
    if data.empty:
        raise GradlensError(
            f"`table` should have runs with both {weight_col!r} and {score_col!r}; found none."
        )
    if optimum is None:
        optimum = stats.optimal_weight(
            data.rename(columns={"size": size_col}),
            weight_col=weight_col,
            score_col=score_col,
            size_cols=[size_col],
            n_boot=0,
        )
    _u.frame(optimum, "optimum", [size_col, "p_star", "score_at_p_star"])
    sizes = sorted(data["size"].unique(), key=_u.sort_key)
    colours = _palette(len(sizes))
    fig = _u.new_figure(7.2, 4.8)
    ax = fig.subplots()
    for size, colour in zip(sizes, colours):
        sub = data[data["size"] == size]
        means = sub.groupby(weight_col)[score_col].mean()
        ax.scatter(sub[weight_col], sub[score_col], s=10, color=colour, alpha=0.45, lw=0)
        opt = optimum[optimum[size_col].astype(str) == str(size)]
        label = _u.size_label(size_col, size)
        if len(opt):
            o = opt.iloc[0]
            p, score = float(o["p_star"]), float(o["score_at_p_star"])
            lo, hi = float(o.get("ci_low", math.nan)), float(o.get("ci_high", math.nan))
            interval = f" [{lo:.2g}, {hi:.2g}]" if math.isfinite(lo) and math.isfinite(hi) else ""
            label += f": p* = {p:.2g}{interval}"
            if math.isfinite(lo) and math.isfinite(hi):
                ax.errorbar(
                    [p],
                    [score],
                    xerr=[[max(p - lo, 0.0)], [max(hi - p, 0.0)]],
                    color=colour,
                    lw=1.2,
                    capsize=3,
                    zorder=4,
                )
            ax.scatter(
                [p], [score], marker="*", s=180, color=colour, edgecolor="black", lw=0.6, zorder=5
            )
        ax.plot(
            means.index, means.to_numpy(), color=colour, lw=1.6, marker="o", ms=3.5, label=label
        )
    ax.set_xlabel(_u.text(weight_col))
    ax.set_ylabel(_describe(score_col))
    ax.legend(
        fontsize=8, frameon=False, loc="best", title="model size (* optimum)", title_fontsize=8
    )
    ax.set_title(_u.text(title) if title is not None else "Score against the weight", fontsize=11)
    return fig


def gain_grid(
    gain_table: pd.DataFrame,
    *,
    row: str = "model.depth",
    col: str = "model.width",
    value: str = "gain",
    panel: str | None = None,
    ci: tuple[str, str] | None = ("ci_low", "ci_high"),
    scale: float = 1.0,
    digits: int = 3,
    unit: str = "",
    title: str | None = None,
) -> Figure:
    """Gain of joint over single-task training on a ``row`` x ``col`` (depth x width) grid.

    One cell per model size, coloured by ``value`` on a diverging palette centred at 0 (red:
    joint training hurts), with the value and its interval written in it; one panel per value
    of ``panel`` (e.g. ``"task"``). Pass one row per cell and panel (e.g. the rows of
    :func:`gradlens.stats.joint_gain` at the chosen weight); missing cells are grey.

    Args:
        gain_table: Table with ``row``, ``col``, ``value`` (and ``ci``, ``panel``) columns.
        row: Column on the y axis.
        col: Column on the x axis.
        value: Column coloured and written.
        panel: Column splitting the table into panels (``None``: one panel).
        ci: Interval columns written under the value (``None``: none).
        scale: Factor applied to the written values (e.g. 100 for accuracy points).
        digits: Decimals of the written values.
        unit: Unit of the scaled values, for the colour bar.
        title: Figure title.

    Raises:
        GradlensError: On missing columns or several rows for one cell.

    Example:
        >>> import pandas as pd
        >>> g = pd.DataFrame({"depth": [2, 2, 4, 4], "width": [32, 64, 32, 64],
        ...                   "gain": [-0.02, 0.0, 0.01, 0.03]})
        >>> fig = gain_grid(g, row="depth", col="width", ci=None, scale=100, digits=1,
        ...                 unit="points")
        >>> sorted(t.get_text() for t in fig.axes[0].texts)
        ['+0.0', '+1.0', '+3.0', '-2.0']
    """
    need = [row, col, value] + list(ci or ()) + ([panel] if panel else [])
    gain_table = _u.frame(gain_table, "gain_table", need)
    key = [row, col] + ([panel] if panel else [])
    dup = gain_table.duplicated(subset=key, keep=False)
    if dup.any():
        first = gain_table.loc[dup, key].iloc[0].tolist()
        raise GradlensError(
            f"`gain_table` should have one row per {key}; found {int(dup.sum())} rows sharing "
            f"cells, e.g. {first}. Select one weight per size (or aggregate) first."
        )
    panels = sorted(gain_table[panel].unique(), key=_u.sort_key) if panel else [None]
    rows_v = sorted(gain_table[row].unique(), key=_u.sort_key)
    cols_v = sorted(gain_table[col].unique(), key=_u.sort_key)
    all_vals = pd.to_numeric(gain_table[value], errors="coerce").to_numpy(np.float64) * scale
    lim = float(np.nanmax(np.abs(all_vals))) if np.isfinite(all_vals).any() else 1.0
    lim = lim if lim > 0 else 1.0
    n_p = len(panels)
    ncols = min(n_p, 4)
    nrows = math.ceil(n_p / ncols)
    cell_w = 1.05 if ci else 0.8
    pw = max(2.6, cell_w * len(cols_v) + 1.2)
    ph = max(2.2, 0.75 * len(rows_v) + 1.0)
    fig = _u.new_figure(pw * ncols + 1.2, ph * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    cmap = _colormap(_u.CONFLICT_CMAP)
    image = None
    for ax, pv in zip(axes, panels):
        sub = gain_table if panel is None else gain_table[gain_table[panel] == pv]
        mat = np.full((len(rows_v), len(cols_v)), np.nan)
        lows = np.full_like(mat, np.nan)
        highs = np.full_like(mat, np.nan)
        ri = {v: i for i, v in enumerate(rows_v)}
        cj = {v: j for j, v in enumerate(cols_v)}
        for _, r in sub.iterrows():
            i, j = ri[r[row]], cj[r[col]]
            mat[i, j] = float(r[value]) * scale
            if ci:
                lows[i, j] = float(r[ci[0]]) * scale
                highs[i, j] = float(r[ci[1]]) * scale
        image = ax.imshow(mat, cmap=cmap, vmin=-lim, vmax=lim, origin="lower", aspect="auto")
        text = np.full(mat.shape, "", dtype=object)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if not np.isfinite(mat[i, j]):
                    continue
                s = f"{mat[i, j]:+.{digits}f}"
                if np.isfinite(lows[i, j]) and np.isfinite(highs[i, j]):
                    s += f"\n[{lows[i, j]:+.{digits}f}, {highs[i, j]:+.{digits}f}]"
                text[i, j] = s
        _u.annotate_cells(ax, image, text, 8.0)
        ax.set_xticks(range(len(cols_v)), [_u.text(_fmt_tick(v)) for v in cols_v])
        ax.set_yticks(range(len(rows_v)), [_u.text(_fmt_tick(v)) for v in rows_v])
        ax.set_xlabel(_u.text(col))
        ax.set_ylabel(_u.text(row))
        if panel is not None:
            ax.set_title(_u.text(f"{panel} = {pv}"), fontsize=10)
    for ax in axes[n_p:]:
        ax.set_visible(False)
    if image is not None:
        cbar_label = _u.text(f"{value}{f' ({unit})' if unit else ''}")
        fig.colorbar(image, ax=list(axes[:n_p]), label=cbar_label, fraction=0.05, pad=0.02)
    default = "Joint minus single-task score (red: joint training hurts)"
    fig.suptitle(_u.text(title) if title is not None else default, fontsize=11)
    _u.fit_tick_labels(fig, list(axes[:n_p]))
    return fig


def _fmt_tick(v: Any) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


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
    if isinstance(max_cols, bool) or not isinstance(max_cols, int) or max_cols < 1:
        raise GradlensError(f"`max_cols` should be a positive int; found {max_cols!r}.")
    w = pd.to_numeric(schedule[weight], errors="coerce")
    if w.isna().any() or (w < 0).any():
        raise GradlensError(
            f"`schedule[{weight!r}]` should hold non-negative numbers; found "
            f"{schedule.loc[w.isna() | (w < 0), weight].head(3).tolist()}."
        )
    tasks = list(dict.fromkeys(schedule[task].astype(str)))
    members = sorted(schedule[member].unique(), key=_u.sort_key)
    colours = _palette(len(tasks))
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
        wide = sub.pivot_table(index=epoch, columns=task, values=weight, aggfunc="mean")
        wide = wide.reindex(columns=tasks).fillna(0.0).sort_index()
        x = wide.index.to_numpy(np.float64)
        # the last weights hold until the end of training: close the last step there
        last = float(np.median(np.diff(x))) if x.size > 1 else 1.0
        stop = float(end) if end is not None and end > x[-1] else x[-1] + last
        x = np.append(x, stop)
        wide = pd.concat([wide, wide.iloc[-1:]])
        handles = ax.stackplot(
            x,
            wide.to_numpy().T,
            colors=colours,
            step="post",
            labels=[_u.text(t) for t in tasks],
            lw=0,
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


# --------------------------------------------------------------------------- saving


def save(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix: .png, .svg, .pdf); returns the path.

    Parent directories are created.

    Example:
        >>> import tempfile, pandas as pd
        >>> g = pd.DataFrame({"model.depth": [2], "model.width": [8], "gain": [0.01],
        ...                   "ci_low": [0.0], "ci_high": [0.02]})
        >>> save(gain_grid(g), tempfile.mkdtemp() + "/a/gain.png").name
        'gain.png'
    """
    from matplotlib.figure import Figure

    if not isinstance(fig, Figure):
        raise GradlensError(f"`fig` should be a matplotlib Figure; found {type(fig).__name__}.")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out
