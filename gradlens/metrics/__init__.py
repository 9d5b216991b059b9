"""Interference metrics: pure functions of per-task Gram matrices, and a streaming summary.

Every function takes a Gram matrix ``G`` with ``G[..., s, t] = <g_s, g_t>`` (``g_t`` the gradient of
task ``t``), as a :class:`torch.Tensor` or a :class:`numpy.ndarray` of shape ``(..., T, T)``.
Leading dimensions are batch dimensions and broadcast (for instance ``(steps, layers, T, T)``), so
per-layer metrics are the same call on the stack of layer Grams, and the total is the call on their
sum. Results are float64 and of the array type of ``G`` (tensor in, tensor out on the same device;
ndarray in, ndarray out). The functions compute in NumPy and do not propagate autograd.

NaN policy: a task whose gradient is zero (``diag G == 0``, flagged by :func:`zero_tasks`) has no
direction, so every ratio that involves it (cosine, conflict, conflict strength, GMS, norm ratio,
cosine with the update) is NaN, never 0 and never an exception or a warning. Products (norms,
:func:`loss_change`, :func:`loss_change_matrix`) stay defined: their value for such a task is 0.
The formulas are in each docstring and in ``docs/metrics.md``.

Example:
    >>> import numpy as np
    >>> from gradlens import metrics
    >>> J = np.array([[1.0, 0.0], [-2.0, 0.0], [0.0, 3.0]])   # three task gradients, 2 parameters
    >>> G = J @ J.T
    >>> metrics.cosine(G)[0].tolist()
    [1.0, -1.0, 0.0]
    >>> metrics.conflict(G)[0, 1], metrics.gms(G)[0, 1]
    (np.float64(1.0), np.float64(0.8))
    >>> metrics.loss_change(G, w=np.ones(3), lr=0.1).tolist()    # first order: -lr * G w
    [0.1, -0.2, -0.9]
    >>> summary = metrics.StreamingSummary(["a", "b", "c"])
    >>> summary.update(G, step=0)
    >>> table = summary.result()[["task_i", "task_j", "count", "mean", "conflict_freq"]]
    >>> print(table.to_string(index=False))
    task_i task_j  count  mean  conflict_freq
         a      b      1  -1.0            1.0
         a      c      1   0.0            0.0
         b      c      1   0.0            0.0

The package: :mod:`~gradlens.metrics.functional` (the pure functions of ``G``),
:mod:`~gradlens.metrics.frame` (:func:`metrics_frame`, tidy tables) and
:mod:`~gradlens.metrics.summary` (:class:`StreamingSummary`), sharing one private module of
NumPy kernels; every name is importable from ``gradlens.metrics``.
"""

from __future__ import annotations

from gradlens.metrics.frame import metrics_frame
from gradlens.metrics.functional import (
    conflict,
    conflict_strength,
    cos_to_update,
    cosine,
    gms,
    loss_change,
    loss_change_matrix,
    norm_cv,
    norm_ratio,
    norms,
    zero_tasks,
)
from gradlens.metrics.summary import QUANTILES as QUANTILES
from gradlens.metrics.summary import StreamingSummary

__all__ = [
    "StreamingSummary",
    "conflict",
    "conflict_strength",
    "cos_to_update",
    "cosine",
    "gms",
    "loss_change",
    "loss_change_matrix",
    "metrics_frame",
    "norm_cv",
    "norm_ratio",
    "norms",
    "zero_tasks",
]
