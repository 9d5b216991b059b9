"""Figures of interference, weights and accuracy (the ``plot`` extra: matplotlib and seaborn).

Every function draws tidy inputs it is given (a run from :func:`gradlens.load_run`, a long
metrics frame, a table from :mod:`gradlens.stats`) and returns a :class:`matplotlib.figure.Figure`
drawn by Agg; the caller saves it (:func:`save`). Nothing goes through ``pyplot``, so no global
state changes and figures are freed like any object. Conflict is red everywhere (diverging
palettes centred at 0 for cosines and gains). Tick labels are sized, rotated and, as a last
resort, thinned so that no two overlap, for up to 40 tasks (and as many layers); numbers are
written in heatmap cells for up to 12 tasks.

- :func:`conflict_heatmap`: task x task mean cosine, and conflict frequency beside it.
- :func:`layer_step_heatmap`: layer x step mean pairwise cosine (or conflict) of one run.
- :func:`conflict_timeline`: conflict over training above the validation metric.
- :func:`weight_vs_interference`: runs of a sweep, regression line and band per model size.
- :func:`accuracy_vs_weight`: score against the weight per size, the optimum marked.
- :func:`gain_grid`: gain of joint over single-task training on a depth x width grid.
- :func:`pbt_schedules`: the weight schedules of a PBT population, stacked.

One module per figure family: ``heatmaps`` (the first two), ``timeline``, ``weights``, ``gains``
(the depth x width grid), ``pbt``. Computing and drawing are apart: the statistics a figure
shows come from :mod:`gradlens.stats` through :mod:`gradlens.plots.tables`
(:func:`timeline_data`, :func:`grid_optimum`), which a figure given a run (or no optimum) calls
before it draws; call them yourself to reuse or change the table.

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

from gradlens.plots._util import save
from gradlens.plots.gains import gain_grid
from gradlens.plots.heatmaps import conflict_heatmap, layer_step_heatmap
from gradlens.plots.pbt import pbt_schedules
from gradlens.plots.tables import TimelineData, grid_optimum, timeline_data
from gradlens.plots.timeline import conflict_timeline
from gradlens.plots.weights import accuracy_vs_weight, weight_vs_interference

__all__ = [
    "TimelineData",
    "accuracy_vs_weight",
    "conflict_heatmap",
    "conflict_timeline",
    "gain_grid",
    "grid_optimum",
    "layer_step_heatmap",
    "pbt_schedules",
    "save",
    "timeline_data",
    "weight_vs_interference",
]
