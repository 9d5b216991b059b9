"""Benchmark steps of multi-task optimization methods (``gradlens bench --methods ...``).

A method ``<path>+<weighting>`` is one training step that computes the Gram, the weights of
``<weighting>`` (TorchJD's ``UPGradWeighting`` or ``MGDAWeighting``) from it, and writes the
weighted gradient, three ways:

- ``gramian+w``: gradlens, ``prof.backward(losses, weights=w)`` (``gramian+w/per_layer``:
  ``weights=gl.per_layer(w)``);
- ``torchjd+w``: TorchJD's autogram path as its documentation shows it,
  ``gramian = engine.compute_gramian(losses)``, ``weights = w(gramian)``,
  ``losses.backward(weights)``;
- ``loop-libmtl+w``: LibMTL's pattern, one ``autograd.grad`` per task on the shared parameters,
  flattened and stacked into ``J``, ``G = J J^T``, ``J^T w(G)`` written back, the heads by a
  weighted backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradlens._errors import require
from gradlens.engines._base import quiet_vmap as _quiet_vmap
from gradlens.weightings import per_layer

__all__ = ["WEIGHTED_METHODS", "weighted_step", "weighting_for"]

#: The benchmark's multi-task optimization methods, ``<path>+<weighting>``.
WEIGHTED_METHODS: tuple[str, ...] = (
    "gramian+upgrad",
    "torchjd+upgrad",
    "loop-libmtl+upgrad",
    "gramian+upgrad/per_layer",
    "gramian+mgda",
    "torchjd+mgda",
    "loop-libmtl+mgda",
    "gramian+mgda/per_layer",
)


def weighting_for(method: str) -> Any:
    """The Gram weighting of a :data:`WEIGHTED_METHODS` name (``gl.per_layer`` wrapped)."""
    agg = require("torchjd.aggregation", "weightings", f"the benchmark method {method}")
    name, _, suffix = method.partition("+")[2].partition("/")
    w = {"upgrad": agg.UPGradWeighting, "mgda": agg.MGDAWeighting}[name]()
    return per_layer(w) if suffix == "per_layer" else w


def weighted_step(setup: Any, method: str, every: int = 1) -> None:
    """One step of ``method`` on a :class:`gradlens.bench._Setup` (after ``prepare``)."""
    path = method.partition("+")[0]
    if method not in setup._weightings:
        setup._weightings[method] = weighting_for(method)
    w = setup._weightings[method]
    if path == "gramian":
        losses, _ = setup.losses()
        setup._profilers[(method, every)].backward(losses, weights=w)
    elif path == "torchjd":
        L, gramian = torchjd_gramian(setup)
        L.backward(w(gramian))
    else:
        losses, _ = setup.losses()
        params = list(setup.trunk.parameters())
        J = libmtl_jacobian(losses, params)
        wt = w(J @ J.T).to(J.dtype)
        libmtl_write(wt, J, params, losses, list(setup.heads.parameters()))


def libmtl_jacobian(
    losses: dict[str, torch.Tensor], params: Sequence[torch.Tensor]
) -> torch.Tensor:
    """LibMTL's pattern: one ``autograd.grad`` per task on the shared parameters, flattened and
    stacked into ``J`` (T x P)."""
    rows = []
    for v in losses.values():
        gs = torch.autograd.grad(v, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def libmtl_write(
    wt: torch.Tensor,
    J: torch.Tensor,
    params: Sequence[torch.Tensor],
    losses: dict[str, torch.Tensor],
    heads: Sequence[torch.Tensor],
) -> None:
    """Write ``J^T wt`` back to the shared parameters' ``.grad``, the heads' by a weighted
    backward (LibMTL's pattern)."""
    flat = wt @ J
    k = 0
    for p in params:
        p.grad = flat[k : k + p.numel()].view_as(p).clone()
        k += p.numel()
    L = torch.stack(list(losses.values()))
    torch.autograd.backward(wt @ L, inputs=heads)


def torchjd_gramian(setup: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """TorchJD's autogram path on the set-up's own copy of the trunk: the stacked losses and
    ``engine.compute_gramian(losses)``."""
    for p in setup._jd_trunk.parameters():
        p.grad = None
    losses, _ = setup.losses(setup._jd_trunk)
    L = torch.stack(list(losses.values()))
    with _quiet_vmap():  # its vmap's slow-path notices (e.g. SDPA backward on CPU)
        gramian = setup._torchjd.compute_gramian(L)
    return L, gramian
