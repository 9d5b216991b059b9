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
from gradlens._snapshot import Snapshot

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


def heatmap_rgb(snap: Snapshot, dpi: int = 80) -> Any:
    """The task x task cosine heatmap of one snapshot as an ``(H, W, 3)`` uint8 array.

    Drawn by :func:`gradlens.plots.conflict_heatmap` from this snapshot alone (its "mean" is the
    snapshot's cosine); needs the ``plot`` extra and at least two tasks.
    """
    from gradlens import plots
    from gradlens._snapshot import TOTAL_LAYER
    from gradlens.metrics import metrics_frame

    g = snap.gram.detach().cpu().double().numpy()[None, None]
    frame = metrics_frame(g, snap.tasks, steps=[snap.step], layers=[TOTAL_LAYER])
    fig = plots.conflict_heatmap(frame, title=f"step {snap.step}: cosine of each task pair")
    fig.set_dpi(dpi)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return rgba[..., :3].copy()
