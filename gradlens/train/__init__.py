"""The training harness: train one multi-task or multi-domain model with the profiler attached.

A run is described by a :class:`TrainConfig` (dataset, tasks, model family and size, loss weights
or sampling probabilities, optimizer, epochs, seed, profiler engine and schedule). :func:`train`
runs it end to end; :class:`Trainer` exposes the pieces that sweeps and population-based training
build on (train a few epochs, change the weights, evaluate, checkpoint, clone).

Scalarization, as in Royer et al. (2023):

- multi-task datasets (one head per task): the loss is ``sum_t w_t L_t`` with ``w`` the loss
  weights normalised to the simplex; ``L_t`` is the mean cross-entropy (classification) or mean
  squared error (regression) of task ``t`` on the batch.
- multi-domain datasets (one head, the tasks are the domains): ``w`` are sampling probabilities.
  Each sample of a batch draws its domain ``t`` with probability ``p_t`` and then a training sample
  of that domain uniformly (resampling, with replacement) and the plain batch mean loss is
  minimised. The profiler receives the per-domain losses ``L_t`` (mean over the batch's samples of
  domain ``t``) with weights ``n_t / B`` (each domain's share of the batch), so that
  ``sum_t (n_t / B) L_t`` is exactly the batch mean loss; the snapshots store these shares.

Example:
    >>> import tempfile
    >>> from gradlens.train import train
    >>> res = train({"dataset": "multidigits", "dataset_options": {"n": 256}, "width": 0.25,
    ...              "epochs": 1, "batch_size": 64, "every": 2},
    ...             run_dir=tempfile.mkdtemp() + "/run", progress=False)
    >>> sorted(res.metrics), sorted(res.metrics["test"]), res.epochs_run
    (['test', 'val'], ['left', 'right'], 1)
    >>> sorted(res.metrics["val"]["left"])
    ['accuracy', 'loss']
"""

from gradlens.train._data import TASK_OPTIONS, score, steps_per_epoch
from gradlens.train._format import format_metrics
from gradlens.train.config import OPTIMIZERS, TrainConfig
from gradlens.train.run import TrainResult, train
from gradlens.train.trainer import Trainer

__all__ = [
    "OPTIMIZERS",
    "TASK_OPTIONS",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "format_metrics",
    "score",
    "steps_per_epoch",
    "train",
]
