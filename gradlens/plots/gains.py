"""The gain of joint over single-task training per model size: :func:`gain_grid` draws one cell
per depth x width (the capacity grid), from a table of gains it is given."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError
from gradlens.plots import _util as _u

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["gain_grid"]


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
    pw = max(2.6, (1.05 if ci else 0.8) * len(cols_v) + 1.2)
    ph = max(2.2, 0.75 * len(rows_v) + 1.0)
    fig = _u.new_figure(pw * ncols + 1.2, ph * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    image = None
    for ax, pv in zip(axes, panels):
        sub = gain_table if panel is None else gain_table[gain_table[panel] == pv]
        cells = _cells(sub, rows_v, cols_v, row, col, value, ci, scale)
        image = _draw_cells(ax, cells, lim, digits)
        ax.set_xticks(range(len(cols_v)), [_u.text(_u.fmt_tick(v)) for v in cols_v])
        ax.set_yticks(range(len(rows_v)), [_u.text(_u.fmt_tick(v)) for v in rows_v])
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


def _cells(
    sub: pd.DataFrame,
    rows_v: list[Any],
    cols_v: list[Any],
    row: str,
    col: str,
    value: str,
    ci: tuple[str, str] | None,
    scale: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scaled value, interval low and high per (row, col) cell of one panel (NaN: missing)."""
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
    return mat, lows, highs


def _draw_cells(
    ax: Any, cells: tuple[np.ndarray, np.ndarray, np.ndarray], lim: float, digits: int
) -> Any:
    """The coloured cells with their value (and interval) written in; returns the image."""
    mat, lows, highs = cells
    image = ax.imshow(
        mat,
        cmap=_u.colormap(_u.CONFLICT_CMAP),
        vmin=-lim,
        vmax=lim,
        origin="lower",
        aspect="auto",
    )
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
    return image
