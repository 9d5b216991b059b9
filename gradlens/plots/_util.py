"""Helpers of :mod:`gradlens.plots`: figures without pyplot, readable tick labels, input checks,
labels and colours shared by the figure modules, and :func:`save`.

Figures are built as ``matplotlib.figure.Figure`` objects with an Agg canvas attached, never
through ``pyplot``: no global figure registry, no backend switch, nothing changed at import.

What other subsystems use of it (``ANNOTATE_MAX``, ``CONFLICT_CMAP``, ``new_figure``, ``text``,
``size_label``) they import from the public :mod:`gradlens.plots.style`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError, require
from gradlens._types import TOTAL_LAYER
from gradlens._validate import check_type

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

__all__: list[str] = []

#: Columns of the long metrics frame (``gradlens.metrics.metrics_frame``, ``Run.metrics``).
METRIC_COLUMNS = ("step", "layer", "metric", "task_i", "task_j", "value")
#: Smallest tick label font size (points) before labels are thinned out instead.
MIN_FONT = 4.0
#: Largest number of tasks whose heatmap cells get a number written in them.
ANNOTATE_MAX = 12
#: Colour of conflict (negative cosine) in every figure.
CONFLICT_CMAP = "RdBu"


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout Figure drawn by Agg (matplotlib imported here, not at import time)."""
    require("matplotlib", "plot", "gradlens.plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def seaborn() -> Any:
    """The seaborn module, or a MissingExtraError naming the ``plot`` extra."""
    return require("seaborn", "plot", "gradlens.plots")


def text(value: Any) -> str:
    """A user string made safe for matplotlib: ``$`` would otherwise start mathtext."""
    return str(value).replace("$", r"\$")


def frame(obj: Any, name: str, columns: Sequence[str]) -> pd.DataFrame:
    """Check that ``obj`` is a DataFrame holding ``columns`` and at least one row."""
    if not isinstance(obj, pd.DataFrame):
        raise GradlensError(f"`{name}` should be a pandas DataFrame; found {type(obj).__name__}.")
    missing = [c for c in columns if c not in obj.columns]
    if missing:
        raise GradlensError(
            f"`{name}` should have the columns {list(columns)}; found no {missing} among "
            f"{list(obj.columns)}."
        )
    if obj.empty:
        raise GradlensError(f"`{name}` should hold at least one row; found an empty table.")
    return obj


def metrics_of(run_or_metrics: Any, name: str) -> tuple[pd.DataFrame, list[str] | None]:
    """The long metrics frame of a Run (with its task order) or of a metrics DataFrame."""
    if isinstance(run_or_metrics, pd.DataFrame):
        return frame(run_or_metrics, name, METRIC_COLUMNS), None
    metrics = getattr(run_or_metrics, "metrics", None)
    if not isinstance(metrics, pd.DataFrame):
        raise GradlensError(
            f"`{name}` should be a gradlens Run (from load_run) or a metrics DataFrame "
            f"{list(METRIC_COLUMNS)}; found {type(run_or_metrics).__name__}."
        )
    tasks = [str(t) for t in getattr(run_or_metrics, "tasks", ())] or None
    if metrics.empty:
        path = getattr(run_or_metrics, "path", "the run")
        raise GradlensError(f"`{name}` should hold probed steps; found none in {path}.")
    return metrics, tasks


def task_order(metrics: pd.DataFrame, tasks: Sequence[str] | None) -> list[str]:
    """Tasks in the given order, else in order of first appearance (the frame's task order)."""
    if tasks is not None:
        return [str(t) for t in tasks]
    seen: dict[str, None] = {}
    pairs = metrics[metrics["task_j"].astype(str) != ""]
    for a, b in zip(pairs["task_i"].astype(str), pairs["task_j"].astype(str)):
        seen.setdefault(a)
        seen.setdefault(b)
    for a in metrics["task_i"].astype(str):
        if a:
            seen.setdefault(a)
    return list(seen)


def layer_rows(metrics: pd.DataFrame, layer: str, name: str = "layer") -> pd.DataFrame:
    """Rows of one layer, or an error listing the layers there are."""
    layers = metrics["layer"].astype(str)
    rows = metrics[layers == layer]
    if rows.empty:
        raise GradlensError(
            f"`{name}` should be one of {sorted(layers.unique().tolist())}; found {layer!r}."
        )
    return rows


def pair_matrix(rows: pd.DataFrame, tasks: Sequence[str], conflict: bool) -> np.ndarray:
    """Symmetric ``T x T`` mean (or frequency of ``value > 0`` when ``conflict``) over rows."""
    values = rows["value"].to_numpy(np.float64)
    ok = np.isfinite(values)
    sel = rows[ok].assign(value=(values[ok] > 0).astype(float) if conflict else values[ok])
    means = sel.groupby(["task_i", "task_j"], observed=True)["value"].mean()
    index = {t: k for k, t in enumerate(tasks)}
    out = np.full((len(tasks), len(tasks)), np.nan)
    for (a, b), v in means.items():
        i, j = index.get(str(a)), index.get(str(b))
        if i is not None and j is not None:
            out[i, j] = out[j, i] = v
    return out


def size_label(col: str, value: Any) -> str:
    """A compact legend label of a model size: ``12.3k params`` or ``depth=4``."""
    if col.endswith("n_params"):
        try:
            n = float(value)
        except (TypeError, ValueError):
            return text(value)
        for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(n) >= div:
                return f"{n / div:.3g}{unit} params"
        return f"{n:g} params"
    short = col.split(".")[-1].lstrip("_") or "size"
    return text(f"{short}={value:g}" if isinstance(value, (int, float)) else f"{short}={value}")


def sort_key(value: Any) -> tuple[int, Any]:
    """Sort numbers numerically before strings."""
    try:
        return (0, float(value))
    except (TypeError, ValueError):
        return (1, str(value))


def luminance_text_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on the background colour ``rgba``."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def annotate_cells(ax: Axes, image: Any, labels: np.ndarray, fontsize: float) -> None:
    """Write ``labels[i, j]`` in the middle of each cell of an ``imshow`` image."""
    data = np.ma.getdata(image.get_array())
    for i in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            if not labels[i, j]:
                continue
            value = data[i, j]
            colour = "black" if not np.isfinite(value) else None
            if colour is None:
                colour = luminance_text_colour(image.cmap(image.norm(value)))
            ax.text(j, i, labels[i, j], ha="center", va="center", fontsize=fontsize, color=colour)


def _agg(fig: Figure) -> FigureCanvasAgg:
    """The Agg canvas :func:`new_figure` attached (the base canvas type has no renderer)."""
    return cast("FigureCanvasAgg", fig.canvas)


def _extents(fig: Figure, labels: list[Any]) -> list[Any]:
    renderer = _agg(fig).get_renderer()
    return [lab.get_window_extent(renderer) for lab in labels]


def overlapping(fig: Figure, labels: list[Any], pad: float = 0.5) -> bool:
    """Whether any two of the (visible, non-empty) text artists' boxes overlap."""
    shown = [lab for lab in labels if lab.get_visible() and lab.get_text()]
    boxes = _extents(fig, shown)
    for k in range(len(boxes)):
        for m in range(k + 1, len(boxes)):
            a, b = boxes[k], boxes[m]
            if a.x0 < b.x1 - pad and b.x0 < a.x1 - pad and a.y0 < b.y1 - pad and b.y0 < a.y1 - pad:
                return True
    return False


def _apply(labels: list[Any], size: float, rotation: float | None) -> None:
    for lab in labels:
        lab.set_fontsize(size)
        if rotation is not None:
            lab.set_rotation(rotation)
            lab.set_horizontalalignment("center")


def fit_tick_labels(
    fig: Figure,
    axes: Sequence[Axes],
    cell_pts: tuple[float, float] | None = None,
    start: float = 10.0,
) -> None:
    """Size, rotate, then thin tick labels until no two labels of one axis overlap.

    With ``cell_pts`` (the expected spacing of x and y ticks, in points) the font starts at
    ``0.6`` of the spacing (at most ``start``) and x labels are turned vertical when the widest
    would not fit side by side; then the figure is laid out (without rendering) and, while two
    labels of an axis still overlap, x labels are turned vertical, the font shrinks down to
    :data:`MIN_FONT` points, and finally every other label is hidden.
    """
    from matplotlib.font_manager import FontProperties

    renderer = _agg(fig).get_renderer()
    todo: list[tuple[list[Any], str, float, float]] = []
    for ax in axes:
        for k, axis in enumerate(("x", "y")):
            labels = list(ax.get_xticklabels() if axis == "x" else ax.get_yticklabels())
            if not [lab for lab in labels if lab.get_text()]:
                continue
            size = start
            rotation = 0.0
            if cell_pts is not None:
                size = float(np.clip(0.6 * cell_pts[k], MIN_FONT, start))
                if axis == "x":
                    prop = FontProperties(size=size)
                    widest = max(
                        renderer.get_text_width_height_descent(lab.get_text(), prop, ismath=False)[
                            0
                        ]
                        for lab in labels
                    )
                    if widest * 72.0 / fig.dpi > 0.9 * cell_pts[0]:
                        rotation = 90.0
            _apply(labels, size, rotation if axis == "x" else None)
            todo.append((labels, axis, size, rotation))
    for _ in range(40):
        fig.draw_without_rendering()
        again = []
        for labels, axis, size, rotation in todo:
            if not overlapping(fig, labels):
                continue
            if axis == "x" and rotation == 0.0:
                rotation = 90.0
            elif size > MIN_FONT:
                size = max(MIN_FONT, size * 0.85)
            else:
                shown = [lab for lab in labels if lab.get_visible()]
                if len(shown) <= 2:
                    continue
                for lab in shown[1::2]:
                    lab.set_visible(False)
            _apply(labels, size, rotation if axis == "x" else None)
            again.append((labels, axis, size, rotation))
        if not again:
            return
        todo = again


def symmetric_limit(values: np.ndarray, floor: float = 0.1, cap: float = 1.0) -> float:
    """Symmetric colour limit: the largest ``|value|`` rounded up to 0.1, within [floor, cap]."""
    finite = np.abs(values[np.isfinite(values)])
    if finite.size == 0:
        return cap
    return float(min(cap, max(floor, math.ceil(finite.max() * 10 - 1e-9) / 10)))


# --------------------------------------------------------------------------- shared by the figures

_DESCRIBE = {
    "cosine": "mean cosine",
    "conflict_freq": "conflict frequency (cos < 0)",
    "conflict": "fraction of pairs in conflict",
    "gms": "gradient magnitude similarity",
    "accuracy": "accuracy",
}


def describe(col: str) -> str:
    """Axis label of a table column: ``conflict_freq.mean`` -> ``conflict frequency ... (mean)``."""
    head, _, tail = col.partition(".")
    if head not in _DESCRIBE:
        return text(col)
    if tail == "mean":
        tail = (
            "mean over pairs" if head in ("cosine", "conflict_freq", "gms") else "mean over tasks"
        )
    return text(f"{_DESCRIBE[head]}{f', {tail}' if tail else ''}")


def layer_name(layer: str) -> str:
    """Words for a layer: the total over shared parameters, or the layer's own (escaped) name."""
    return "all shared parameters" if layer == TOTAL_LAYER else text(layer)


def colormap(name: str) -> Any:
    """A matplotlib colormap with NaN cells grey."""
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="#d9d9d9")


def numeric(table: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """``cols`` of ``table`` as numbers (anything else NaN)."""
    return table[list(cols)].apply(pd.to_numeric, errors="coerce")


def palette(n: int) -> list[Any]:
    """``n`` distinct colours (tab10 up to 10, husl beyond)."""
    sns = seaborn()
    return list(sns.color_palette("tab10" if n <= 10 else "husl", n))


def fmt_tick(v: Any) -> str:
    """A tick label: integral floats without their ``.0``."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def save(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix: .png, .svg, .pdf); returns the path.

    Parent directories are created.

    Example:
        >>> import tempfile, pandas as pd
        >>> from gradlens.plots import gain_grid, save
        >>> g = pd.DataFrame({"model.depth": [2], "model.width": [8], "gain": [0.01],
        ...                   "ci_low": [0.0], "ci_high": [0.02]})
        >>> save(gain_grid(g), tempfile.mkdtemp() + "/a/gain.png").name
        'gain.png'
    """
    from matplotlib.figure import Figure

    check_type("fig", fig, Figure, "a matplotlib Figure")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out
