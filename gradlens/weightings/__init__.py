"""Multi-task optimization methods as task weightings, run from the Gram gradlens measures.

Most such methods update with ``J^T w(G)``: their weights are a function of the ``T x T`` Gram
of the task gradients. ``prof.backward(losses, weights=w)`` accepts any callable ``w`` from the
float64 total Gram to T non-negative weights (every ``torchjd.aggregation.*Weighting``, or
:class:`CAGrad` and :class:`NashMTL` from here), and ``weights=gl.per_layer(w)`` weights each
layer by its own Gram. Loss-based baselines (:class:`UncertaintyWeighting`,
:class:`RandomLossWeighting`, :class:`DWA`) give plain weights from the losses instead.

Example:
    >>> import torch, gradlens as gl
    >>> from gradlens.weightings import NashMTL
    >>> trunk, heads = torch.nn.Linear(3, 4), torch.nn.ModuleList(
    ...     [torch.nn.Linear(4, 1) for _ in range(2)])
    >>> with gl.Profiler(trunk, tasks=["a", "b"]) as prof:
    ...     z = trunk(torch.randn(8, 3))
    ...     losses = {t: heads[i](z).pow(2).mean() for i, t in enumerate(prof.tasks)}
    ...     snap = prof.backward(losses, weights=NashMTL())
    >>> snap.weighting, tuple(snap.weights.shape)
    ('NashMTL', (2,))
"""

from __future__ import annotations

from gradlens.weightings._apply import PerLayer, Signed, call_weighting, per_layer
from gradlens.weightings._cagrad import CAGrad
from gradlens.weightings._gram import NashMTL
from gradlens.weightings._loss import DWA, LossWeighting, RandomLossWeighting, UncertaintyWeighting
from gradlens.weightings._registry import GRAM_METHODS, LOSS_METHODS, METHODS, make_weighting

__all__ = [
    "DWA",
    "GRAM_METHODS",
    "LOSS_METHODS",
    "METHODS",
    "CAGrad",
    "LossWeighting",
    "NashMTL",
    "PerLayer",
    "RandomLossWeighting",
    "Signed",
    "UncertaintyWeighting",
    "call_weighting",
    "make_weighting",
    "per_layer",
]
