"""Heatmaps of interference: task x task (:func:`conflict_heatmap`) and layer x step
(:func:`layer_step_heatmap`).

Both draw a long metrics frame ``[step, layer, metric, task_i, task_j, value]`` (a run's
``Run.metrics``, or :func:`gradlens.metrics.metrics_frame`); averaging it into the cells is the
only computation, done by the private ``_..._matrix`` steps before drawing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError
from gradlens._types import TOTAL_LAYER
from gradlens._validate import check_choice, check_int
from gradlens.plots import _util as _u

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from gradlens.store import Run

__all__ = ["conflict_heatmap", "layer_step_heatmap"]


def _heat_side(n: int) -> float:
    """Side (inches) of a square heatmap panel of ``n`` cells."""
    return float(np.clip(0.22 * n + 1.4, 3.4, 11.0))


# --------------------------------------------------------------------------- task x task


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
        >>> import numpy as np, gradlens as gl
        >>> from gradlens.metrics import metrics_frame
        >>> G = np.array([[[[1.0, -0.5], [-0.5, 1.0]]], [[[1.0, 0.2], [0.2, 1.0]]]])
        >>> fig = conflict_heatmap(metrics_frame(G, ["a", "b"], layers=[gl.TOTAL_LAYER]))
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
    cos, freq, n_probes = _pair_matrices(rows, order, layer)
    n = len(order)
    annotate = n <= _u.ANNOTATE_MAX if annotate is None else bool(annotate)
    default = f"{_u.layer_name(layer)}, {n_probes} probes per pair"
    return _draw_pairs(cos, freq, order, annotate, _u.text(title) if title is not None else default)


def _pair_matrices(
    rows: pd.DataFrame, order: list[str], layer: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean cosine and conflict frequency per pair (diagonal NaN), and the probes per pair."""
    metric = rows["metric"].astype(str)
    cos = _u.pair_matrix(rows[metric == "cosine"], order, conflict=False)
    freq = _u.pair_matrix(rows[metric == "conflict"], order, conflict=True)
    if np.isnan(cos).all():
        raise GradlensError(
            f"`run_or_metrics` should hold finite cosines for layer {layer!r}; found none."
        )
    np.fill_diagonal(cos, np.nan)
    np.fill_diagonal(freq, np.nan)
    counts = rows[metric == "cosine"].groupby(["task_i", "task_j"], observed=True).size()
    return cos, freq, int(counts.max()) if len(counts) else 0


def _draw_pairs(
    cos: np.ndarray, freq: np.ndarray, order: list[str], annotate: bool, title: str
) -> Figure:
    n = len(order)
    side = _heat_side(n)
    fig = _u.new_figure(2 * side + 2.2, side + 0.5)
    ax_cos, ax_freq = fig.subplots(1, 2)
    lim = _u.symmetric_limit(cos)
    cell_font = 10.0 if n <= 4 else 8.0 if n <= 8 else 6.5
    labels = [_u.text(t) for t in order]
    panels = [
        (ax_cos, cos, _u.CONFLICT_CMAP, -lim, lim, "Mean cosine", "mean cosine", "{:+.2f}"),
        (ax_freq, freq, "Reds", 0.0, 1.0, "Conflict frequency (cos < 0)", "frequency", "{:.2f}"),
    ]
    for ax, mat, cmap_name, lo, hi, panel_title, cbar_label, fmt in panels:
        image = ax.imshow(
            mat, cmap=_u.colormap(cmap_name), vmin=lo, vmax=hi, interpolation="nearest"
        )
        ax.set_xticks(range(n), labels)
        ax.set_yticks(range(n), labels)
        ax.set_title(panel_title)
        ax.tick_params(length=0)
        fig.colorbar(image, ax=ax, label=cbar_label, fraction=0.046, pad=0.03)
        if annotate:
            text = np.array([[fmt.format(v) if np.isfinite(v) else "" for v in row] for row in mat])
            _u.annotate_cells(ax, image, text, cell_font)
    fig.suptitle(title)
    cell = (side - 1.4) * 72.0 / n
    _u.fit_tick_labels(fig, [ax_cos, ax_freq], (cell, cell), start=10.0 if n <= 12 else 9.0)
    return fig


# --------------------------------------------------------------------------- layer x step


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
        >>> import numpy as np, gradlens as gl
        >>> from gradlens.metrics import metrics_frame
        >>> G = np.tile(np.array([[1.0, -0.5], [-0.5, 1.0]]), (3, 2, 1, 1))  # 3 steps, 2 layers
        >>> fig = layer_step_heatmap(metrics_frame(G, ["a", "b"], layers=[gl.TOTAL_LAYER, "fc"]))
        >>> fig.axes[0].images[0].get_array().shape
        (2, 3)
    """
    check_choice("metric", metric, ("cosine", "conflict", "gms"))
    check_int("max_columns", max_columns, minimum=2)
    metrics, _ = _u.metrics_of(run_or_metrics, "run_or_metrics")
    rows = metrics[metrics["metric"].astype(str) == metric]
    if rows.empty:
        raise GradlensError(
            f"`run_or_metrics` should hold {metric!r} rows (a run with at least 2 tasks); "
            "found none."
        )
    mat, layer_order, steps = _layer_step_matrix(rows, metric)
    n_steps = steps.size
    if n_steps > max_columns:
        mat, col_steps = _bin_columns(mat, steps, max_columns)
    else:
        col_steps = steps
    default = f"Mean pairwise {metric} per layer over training"
    return _draw_layer_steps(
        mat,
        layer_order,
        col_steps,
        n_steps,
        metric,
        _u.text(title) if title is not None else default,
    )


def _layer_step_matrix(rows: pd.DataFrame, metric: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Mean over pairs per layer (total first) and probed step; the layers and the steps."""
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
    return table.to_numpy(np.float64), layer_order, steps


def _bin_columns(
    mat: np.ndarray, steps: np.ndarray, max_columns: int
) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive probes averaged (NaN-aware) into ``max_columns`` columns; their first steps."""
    edges = np.linspace(0, steps.size, max_columns + 1).round().astype(int)
    with np.errstate(all="ignore"):
        cols = []
        for a, b in itertools.pairwise(edges):
            block = mat[:, a:b]
            good = np.isfinite(block)
            sums = np.where(good, block, 0.0).sum(1)
            cnt = good.sum(1)
            cols.append(np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan))
    return np.stack(cols, axis=1), steps[edges[:-1]]


def _draw_layer_steps(
    mat: np.ndarray,
    layer_order: list[str],
    col_steps: np.ndarray,
    n_steps: int,
    metric: str,
    title: str,
) -> Figure:
    from matplotlib.ticker import MaxNLocator

    n_layers, n_cols = mat.shape
    height = float(np.clip(0.24 * n_layers + 1.6, 2.6, 14.0))
    width = float(np.clip(6.0 + 0.04 * n_cols, 7.0, 13.0))
    fig = _u.new_figure(width, height)
    ax = fig.subplots()
    if metric == "cosine":
        lim = _u.symmetric_limit(mat)
        cmap, lo, hi, label = _u.colormap(_u.CONFLICT_CMAP), -lim, lim, "mean pairwise cosine"
    elif metric == "conflict":
        cmap, lo, hi, label = _u.colormap("Reds"), 0.0, 1.0, "fraction of pairs with cos < 0"
    else:
        cmap, lo, hi, label = _u.colormap("viridis"), 0.0, 1.0, "mean pairwise GMS"
    image = ax.imshow(mat, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label, fraction=0.04, pad=0.02)
    ylabels = ["all shared" if x == TOTAL_LAYER else _u.text(x) for x in layer_order]
    ax.set_yticks(range(n_layers), ylabels)
    if TOTAL_LAYER in layer_order and n_layers > 1:
        ax.axhline(0.5, color="white", lw=2.5)
    positions = [int(p) for p in MaxNLocator(nbins=8, integer=True).tick_values(0, n_cols - 1)]
    positions = [p for p in positions if 0 <= p < n_cols]
    ax.set_xticks(positions, [str(int(col_steps[p])) for p in positions])
    binned = f" ({n_steps} probes averaged into {n_cols} columns)" if n_steps > n_cols else ""
    ax.set_xlabel(f"training step, in probe order{binned}")
    ax.set_ylabel("layer")
    ax.tick_params(length=2)
    fig.suptitle(title)
    _u.fit_tick_labels(fig, [ax], (200.0, (height - 1.3) * 72.0 / n_layers))
    return fig
