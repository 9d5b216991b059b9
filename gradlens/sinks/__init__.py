"""Sinks: receivers of the profiler's snapshots other than the run store.

A sink is any object with ``add_snapshot(snap)`` and ``close()`` (and optionally
``update_meta(**meta)``, which the profiler calls once with its run meta); pass it as
``gl.Profiler(..., sinks=[sink])`` and the profiler feeds it every probed step and closes it with
itself.

- :class:`TensorBoardSink` (``tensorboard`` extra): four scalars per probe, written in the
  training thread.
- :class:`WandbSink` (``wandb`` extra) and :class:`MLflowSink` (``mlflow`` extra): total and
  per-layer cosine, conflict, GMS and norm ratio under grouped names
  (:func:`snapshot_scalars`), the cosine heatmap every k probes, the run meta as config or
  params; logged by a worker thread (:class:`QueuedSink`) that drops images before scalars when
  it falls behind, and says so once.

Example:
    >>> import torch
    >>> from gradlens import Snapshot
    >>> g = torch.tensor([[4.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    >>> sorted(snapshot_scalars(Snapshot(0, ("a", "b"), g, {}, torch.ones(2))))
    ['gradlens.cosine/a|b', 'gradlens/conflict_frequency', 'gradlens/cosine_mean', \
'gradlens/gms_mean', 'gradlens/norm_ratio']
"""

from __future__ import annotations

from gradlens.sinks._mlflow import MLflowSink, mlflow_key
from gradlens.sinks._queue import QueuedSink
from gradlens.sinks._scalars import heatmap_rgb, snapshot_scalars
from gradlens.sinks._tensorboard import TensorBoardSink
from gradlens.sinks._wandb import WandbSink

__all__ = [
    "MLflowSink",
    "QueuedSink",
    "TensorBoardSink",
    "WandbSink",
    "heatmap_rgb",
    "mlflow_key",
    "snapshot_scalars",
]
