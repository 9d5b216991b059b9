"""What the dashboard sinks log per snapshot: grouped scalar names and the cosine heatmap.

Names are grouped by their first ``/`` so W&B and MLflow fold each group into one section:

- ``gradlens/cosine_mean``, ``gradlens/conflict_frequency``, ``gradlens/gms_mean``,
  ``gradlens/norm_ratio``: over all shared parameters (the total Gram);
- ``gradlens.cosine/<task_i>|<task_j>``: each pair's cosine (at most ``pair_limit`` tasks);
- ``gradlens.layer_cosine/<layer>``, ``gradlens.layer_conflict/<layer>``,
  ``gradlens.layer_gms/<layer>``, ``gradlens.layer_norm_ratio/<layer>``: the same per layer (at
  most ``layer_limit`` layers).

Means and frequencies run over the pairs ``i < j`` whose cosine is defined (a task with a zero
gradient is left out, NaN if no pair is left), as in :class:`gradlens.sinks.TensorBoardSink`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlens import metrics
from gradlens.snapshot import Snapshot

__all__ = ["LAYER_GROUPS", "TOTAL_NAMES", "heatmap_rgb", "snapshot_scalars"]

#: Scalar names of the total Gram, by metric.
TOTAL_NAMES = {
    "cosine": "gradlens/cosine_mean",
    "conflict": "gradlens/conflict_frequency",
    "gms": "gradlens/gms_mean",
    "norm_ratio": "gradlens/norm_ratio",
}
#: Group (section) of each per-layer metric.
LAYER_GROUPS = {
    "cosine": "gradlens.layer_cosine",
    "conflict": "gradlens.layer_conflict",
    "gms": "gradlens.layer_gms",
    "norm_ratio": "gradlens.layer_norm_ratio",
}
PAIR_GROUP = "gradlens.cosine"


def _nanmean(values: np.ndarray) -> float:
    ok = values[~np.isnan(values)]
    return float(ok.mean()) if ok.size else float("nan")


def _summary(g: np.ndarray) -> dict[str, float]:
    """Mean pair cosine, conflict frequency, mean GMS and norm ratio of one Gram."""
    iu, ju = np.triu_indices(len(g), k=1)
    out = {"norm_ratio": float(metrics.norm_ratio(g))}
    if len(iu):
        out["cosine"] = _nanmean(metrics.cosine(g)[iu, ju])
        out["conflict"] = _nanmean(metrics.conflict(g)[iu, ju])
        out["gms"] = _nanmean(metrics.gms(g)[iu, ju])
    return out


def snapshot_scalars(
    snap: Snapshot, *, pair_limit: int = 10, layer_limit: int = 64
) -> dict[str, float]:
    """The scalars of one snapshot under their grouped names (see the module docstring).

    Example:
        >>> import torch
        >>> g = torch.tensor([[4.0, -2.0], [-2.0, 1.0]], dtype=torch.float64)
        >>> out = snapshot_scalars(Snapshot(3, ("a", "b"), g, {"fc": g}, torch.ones(2)))
        >>> out["gradlens/cosine_mean"], out["gradlens.cosine/a|b"], out["gradlens/norm_ratio"]
        (-1.0, -1.0, 2.0)
        >>> out["gradlens.layer_conflict/fc"], round(out["gradlens/gms_mean"], 3)
        (1.0, 0.8)
    """
    g = snap.gram.detach().cpu().double().numpy()
    out = {TOTAL_NAMES[k]: v for k, v in _summary(g).items()}
    n = len(snap.tasks)
    if 1 < n <= pair_limit:
        cos = metrics.cosine(g)
        for i, j in zip(*np.triu_indices(n, k=1)):
            out[f"{PAIR_GROUP}/{snap.tasks[i]}|{snap.tasks[j]}"] = float(cos[i, j])
    if len(snap.layer_grams) <= layer_limit:
        for layer, lg in snap.layer_grams.items():
            for k, v in _summary(lg.detach().cpu().double().numpy()).items():
                out[f"{LAYER_GROUPS[k]}/{layer}"] = v
    return out


def heatmap_rgb(snap: Snapshot, dpi: int = 100) -> Any:
    """The task x task cosine matrix of one snapshot drawn as an ``(H, W, 3)`` uint8 array.

    A small figure, cheap to draw from the sink's worker thread (about 70 ms of CPU for four
    tasks here, against 400 ms for :func:`gradlens.plots.conflict_heatmap`, whose layout fitting
    would hold the interpreter lock the training thread needs): a diverging palette fixed to
    ``[-1, 1]`` (red: conflict), the diagonal grey, values in the cells for up to 12 tasks. Needs
    the ``plot`` extra.

    Example:
        >>> import torch
        >>> g = torch.tensor([[4.0, -2.0], [-2.0, 1.0]], dtype=torch.float64)
        >>> rgb = heatmap_rgb(Snapshot(0, ("a", "b"), g, {}, torch.ones(2)))
        >>> rgb.dtype.name, rgb.shape[2], rgb.shape[0] > 100
        ('uint8', 3, True)
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from gradlens.plots.style import ANNOTATE_MAX, CONFLICT_CMAP, new_figure, text

    cos = metrics.cosine(snap.gram.detach().cpu().double().numpy())
    n = len(snap.tasks)
    np.fill_diagonal(cos, np.nan)
    cell = min(0.45, 8.0 / n)
    side = cell * n
    fig = new_figure(side + 2.3, side + 1.3)
    fig.set_layout_engine("none")
    fig.set_dpi(dpi)
    w, h = fig.get_size_inches()
    ax = fig.add_axes((1.0 / w, 0.9 / h, side / w, side / h))
    cmap = colormaps[CONFLICT_CMAP].with_extremes(bad="#d9d9d9")
    image = ax.imshow(cos, cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
    labels = [text(t) for t in snap.tasks]
    font = 8.0 if n <= 12 else max(4.0, 8.0 * 12 / n)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.tick_params(length=0)
    if n <= ANNOTATE_MAX:
        for i in range(n):
            for j in range(n):
                if i != j and np.isfinite(cos[i, j]):
                    colour = "white" if abs(cos[i, j]) > 0.6 else "black"
                    ax.text(
                        j,
                        i,
                        f"{cos[i, j]:+.2f}",
                        ha="center",
                        va="center",
                        fontsize=min(font, 7.0),
                        color=colour,
                    )
    ax.set_title(f"cosine, step {snap.step}", fontsize=9)
    cax = fig.add_axes(((side + 1.2) / w, 0.9 / h, 0.12 / w, side / h))
    fig.colorbar(image, cax=cax).ax.tick_params(labelsize=7)
    canvas = fig.canvas
    if not isinstance(canvas, FigureCanvasAgg):  # pragma: no cover - new_figure draws with Agg
        canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return rgba[..., :3].copy()
