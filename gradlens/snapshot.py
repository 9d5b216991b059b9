"""The :class:`Snapshot`: what the profiler measured at one probed step."""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from gradlens._types import TOTAL_LAYER, Level
from gradlens.metrics import functional as _metrics

__all__ = ["TOTAL_LAYER", "Level", "Snapshot"]


def _symmetric(G: torch.Tensor) -> torch.Tensor:
    """``(G + G^T) / 2``: exactly symmetric by construction (floating-point addition commutes),
    and equal to ``G`` when ``G`` already is; anything but a square matrix is left as it is.

    >>> G = torch.tensor([[1.0, 2.0], [2.0 + 1e-15, 3.0]], dtype=torch.float64)
    >>> S = _symmetric(G)
    >>> torch.equal(S, S.T), torch.equal(_symmetric(S), S)
    (True, True)
    """
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        return G
    return (G + G.T) / 2


#: True while the profiler builds a Snapshot from Grams it made exactly symmetric itself, with
#: the numbers :meth:`Snapshot.__post_init__` would give (see ``_profiler_checks.stack_grams``).
_GIVEN_SYMMETRIC: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "gradlens_snapshot_symmetric", default=False
)


@contextmanager
def _symmetric_given() -> Iterator[None]:
    """Snapshots built inside this block take their Grams as they are (already symmetric)."""
    token = _GIVEN_SYMMETRIC.set(True)
    try:
        yield
    finally:
        _GIVEN_SYMMETRIC.reset(token)


def _symmetric_all(grams: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`_symmetric` of each Gram; square Grams of one shape, dtype and device (the usual
    case: one per layer) in one stacked computation, the same numbers as one at a time.

    >>> gs = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.eye(2)}
    >>> {n: g.tolist() for n, g in _symmetric_all(gs).items()}
    {'a': [[1.0, 2.5], [2.5, 4.0]], 'b': [[1.0, 0.0], [0.0, 1.0]]}
    """
    gs = list(grams.values())
    if len(gs) < 2 or any(
        g.ndim != 2 or g.shape != gs[0].shape or g.shape[0] != g.shape[1]
        or g.dtype != gs[0].dtype or g.device != gs[0].device
        for g in gs
    ):  # fmt: skip
        return {n: _symmetric(g) for n, g in grams.items()}
    S = torch.stack(gs)
    return dict(zip(grams, ((S + S.transpose(1, 2)) / 2).unbind(0)))


@dataclass(frozen=True)
class Snapshot:
    """Per-task Gram matrices of one probed step.

    ``gram[s, t] = <g_s, g_t>`` where ``g_t`` is the gradient of task ``t``'s loss with respect to
    the shared parameters (``level == "parameters"``) or to the shared representation passed as
    ``features=`` (``level == "features"``). ``layer_grams`` holds the same per module; their sum
    is ``gram``. All matrices are float64 CPU tensors of shape ``(T, T)``.

    Example:
        >>> import torch
        >>> snap = Snapshot(step=0, tasks=("a", "b"), gram=torch.tensor([[4.0, -2.0], [-2.0, 1.0]],
        ...                 dtype=torch.float64), layer_grams={}, weights=torch.ones(2))
        >>> snap.cosine()[0, 1].item()
        -1.0
        >>> snap.norms().tolist()
        [2.0, 1.0]
    """

    step: int
    tasks: tuple[str, ...]
    gram: torch.Tensor
    layer_grams: Mapping[str, torch.Tensor]
    weights: torch.Tensor
    engine: str = "loop"
    level: Level = "parameters"
    #: Which rule computed each layer's Gram ("linear", "conv", "generic", ...).
    rules: Mapping[str, str] = field(default_factory=dict)
    #: The task losses at this step, as floats.
    losses: Mapping[str, float] = field(default_factory=dict)
    #: Name of the Gram weighting that chose ``weights`` (``prof.backward(weights=callable)``),
    #: else None.
    weighting: str | None = None
    #: How a Gram weighting's update was written: ``"kept_blocks"`` (from the per-task blocks the
    #: engine kept from its pass, under ``memory_budget``), else ``"second_backward"`` (whole
    #: model: one backward of ``sum_t w_t L_t`` after the Grams) or ``"per_layer_batched"`` (per
    #: layer: batched backwards over task chunks); None for fixed weights.
    weighting_path: str | None = None
    #: ``gl.per_layer(w)``: each layer's own weights ``w(G_l)`` (float64, CPU); else empty.
    layer_weights: Mapping[str, torch.Tensor] = field(default_factory=dict)
    #: ``engine="auto"``: seconds of the fastest timed probe of each candidate engine on this
    #: graph shape so far (``engine`` names the candidate that computed this snapshot).
    timings: Mapping[str, float] = field(default_factory=dict)
    #: Shared layers that no loss reached at this step: their Gram is zero (listed, not absent).
    unreached: tuple[str, ...] = ()
    #: Facts about this probe: ``"forward-not-recorded"`` (the ``gramian`` engine served it with
    #: nothing recorded by its hooks, e.g. the forward ran before the profiler existed: every
    #: layer took the generic path),
    #: ``"auto-chose:<engine>"`` (the probe that settled ``auto``'s choice),
    #: ``"auto-loop:sparse-grad"`` (``auto`` served the probe by ``loop``, untimed: a shared
    #: parameter's gradient is sparse).
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The one place that makes every Gram a Snapshot holds exactly symmetric, whatever engine
        # or BLAS produced it: a product such as ``S @ S.T`` is symmetric only up to rounding on
        # some machines. Averaging with the transpose is exact for an already symmetric matrix.
        if _GIVEN_SYMMETRIC.get():
            return
        object.__setattr__(self, "gram", _symmetric(self.gram))
        object.__setattr__(self, "layer_grams", _symmetric_all(self.layer_grams))

    @property
    def zero_tasks(self) -> tuple[str, ...]:
        """Tasks whose gradient on the shared parameters is exactly zero (their cosines are NaN).

        A task whose gradient is not finite is not zero: see :attr:`nonfinite_tasks`.

        Example:
            >>> g = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, float("nan")]])
            >>> s = Snapshot(0, ("a", "b", "c"), g.double(), {}, torch.ones(3))
            >>> s.zero_tasks, s.nonfinite_tasks
            (('b',), ('c',))
        """
        d = torch.diagonal(self.gram, dim1=-2, dim2=-1).tolist()
        return tuple(t for t, x in zip(self.tasks, d) if math.isfinite(x) and not x > 0)

    @property
    def nonfinite_tasks(self) -> tuple[str, ...]:
        """Tasks whose gradient holds NaN or infinity (``G[t, t]`` not finite), e.g. the
        gradient of ``sqrt`` at 0 from a finite loss."""
        d = torch.diagonal(self.gram, dim1=-2, dim2=-1).tolist()
        return tuple(t for t, x in zip(self.tasks, d) if not math.isfinite(x))

    def norms(self, layer: str | None = None) -> torch.Tensor:
        """Gradient norm of each task, ``sqrt(diag G)``, in total or for one layer.

        See :func:`gradlens.metrics.norms`.
        """
        return _metrics.norms(self._select(layer))

    def cosine(self, layer: str | None = None) -> torch.Tensor:
        """Cosine matrix ``G[s,t] / (|g_s| |g_t|)``; NaN for a task whose gradient is zero.

        See :func:`gradlens.metrics.cosine`.
        """
        return _metrics.cosine(self._select(layer))

    def _select(self, layer: str | None) -> torch.Tensor:
        if layer is None or layer == TOTAL_LAYER:
            return self.gram
        try:
            return self.layer_grams[layer]
        except KeyError:
            raise KeyError(
                f"`layer` should be one of {sorted(self.layer_grams)}; found {layer!r}."
            ) from None
