"""Calling a Gram weighting and writing its update: what the profiler delegates here.

A *Gram weighting* is any callable from the ``T x T`` float64 Gram matrix to ``T`` non-negative
weights (every ``torchjd.aggregation.*Weighting`` is one). Its output is checked here before
anything is written to ``.grad``; :func:`write_per_layer` writes ``J_l^T w_l`` for weights that
differ from layer to layer.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet

import torch

from gradlens._errors import GradlensError
from gradlens.engines._base import accumulate_grad, batched_grad
from gradlens.engines._unbatchable import cause_of

__all__ = [
    "PerLayer",
    "Signed",
    "call_weighting",
    "is_weighting",
    "per_layer",
    "weighting_name",
    "write_per_layer",
]

#: Negative weights down to this fraction of the largest weight are a solver's rounding (a QP
#: solver's ``-1e-17``) and are set to 0; anything below is an error.
_ROUNDING = 1e-12

GramWeighting = Callable[[torch.Tensor], object]


class PerLayer:
    """``weights=gl.per_layer(w)``: apply the Gram weighting ``w`` to each layer's own Gram.

    Each layer's update is then ``J_l^T w(G_l)``; the task heads (parameters outside the shared
    part) are weighted by ``w(G)`` of the total Gram. ``Snapshot.layer_weights`` records the
    per-layer weights and ``Snapshot.weights`` the heads' ones.

    Example:
        >>> import torch, gradlens as gl
        >>> pl = gl.per_layer(lambda G: torch.ones(G.shape[0], dtype=G.dtype))
        >>> pl
        per_layer(<lambda>)
        >>> pl(torch.eye(2)).tolist()
        [1.0, 1.0]
    """

    def __init__(self, weighting: GramWeighting) -> None:
        if isinstance(weighting, PerLayer) or not callable(weighting):
            raise GradlensError(
                "`weighting` should be a callable from the T x T Gram to T weights (e.g. a "
                f"torchjd Weighting); found {type(weighting).__name__}."
            )
        self.weighting = weighting

    def __call__(self, gram: torch.Tensor) -> object:
        return self.weighting(gram)

    def __repr__(self) -> str:
        return f"per_layer({weighting_name(self.weighting)})"


class Signed:
    """A Gram weighting whose weights may be negative: its update ``J^T w`` is still the method's.

    IMTL-G (``pinv(G) d``, normalised) and Aligned-MTL (``sqrt(l_min) G^{-1/2} 1/T``) return
    negative weights on some Grams by their definition; every other weighting must return
    non-negative ones (a negative weight there is a bug of the callable and an error).

    Example:
        >>> import torch
        >>> s = Signed(lambda G: -G.diagonal())
        >>> s, call_weighting(s, torch.eye(2)).tolist()
        (signed(<lambda>), [-1.0, -1.0])
    """

    signed = True

    def __init__(self, weighting: GramWeighting) -> None:
        self.weighting = weighting

    def __call__(self, gram: torch.Tensor) -> object:
        return self.weighting(gram)

    def __repr__(self) -> str:
        return f"signed({weighting_name(self.weighting)})"


def per_layer(weighting: GramWeighting) -> PerLayer:
    """Weight each layer of the shared part by ``weighting`` of that layer's own Gram.

    See :class:`PerLayer`.

    Example:
        >>> import gradlens as gl
        >>> gl.per_layer(len)  # any callable; a torchjd Weighting in practice
        per_layer(len)
    """
    return PerLayer(weighting)


def weighting_name(fn: object) -> str:
    """A short readable name of a weighting callable (its class or function name).

    Example:
        >>> weighting_name(len), weighting_name(lambda G: G)
        ('len', '<lambda>')
    """
    if isinstance(fn, (PerLayer, Signed)):
        return repr(fn)
    if isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return fn.__name__
    return type(fn).__name__


def call_weighting(fn: GramWeighting, gram: torch.Tensor, where: str = "total") -> torch.Tensor:
    """``fn(gram)`` checked: T finite non-negative weights, as a float64 CPU tensor.

    ``fn`` gets a copy of ``gram`` (it cannot alter what the Snapshot records). ``where`` names
    the Gram in error messages (``"total"`` or a layer name).

    Raises:
        GradlensError: naming the callable and what it returned (or raised).

    Example:
        >>> import torch
        >>> call_weighting(lambda G: G.diagonal(), torch.eye(2)).tolist()
        [1.0, 1.0]
        >>> call_weighting(lambda G: -G.diagonal(), torch.eye(2))
        Traceback (most recent call last):
        ...
        gradlens._errors.GradlensError: `weights` callable <lambda> should return T = 2 finite \
non-negative weights from the total Gram; found negative weights [-1.0, -1.0] (wrap a \
method whose weights may be negative by definition in gradlens.weightings.Signed).
    """
    T = gram.shape[0]
    name = weighting_name(fn)
    head = (
        f"`weights` callable {name} should return T = {T} finite non-negative weights from the "
        f"{where if where == 'total' else f'layer {where!r}'} Gram"
    )
    try:
        out = fn(gram.detach().clone())
    except Exception as exc:
        raise GradlensError(f"{head}; it raised {type(exc).__name__}: {exc}") from exc
    try:
        w = torch.as_tensor(
            out.detach() if isinstance(out, torch.Tensor) else out, dtype=torch.float64
        ).to("cpu")
    except (TypeError, ValueError, RuntimeError):
        raise GradlensError(f"{head}; found {type(out).__name__}: {out!r}.") from None
    if tuple(w.shape) != (T,):
        raise GradlensError(f"{head}; found shape {tuple(w.shape)}: {w.tolist()}.")
    if not bool(torch.isfinite(w).all()):
        raise GradlensError(f"{head}; found non-finite weights {w.tolist()}.")
    inner = fn.weighting if isinstance(fn, PerLayer) else fn
    if getattr(inner, "signed", False):
        return w
    top = float(w.abs().max()) if T else 0.0
    if bool((w < -_ROUNDING * top).any()) or (top == 0.0 and bool((w < 0).any())):
        raise GradlensError(
            f"{head}; found negative weights {w.tolist()} (wrap a method whose weights may be "
            "negative by definition in gradlens.weightings.Signed)."
        )
    return w.clamp_min(0.0)


def write_per_layer(
    losses: torch.Tensor,
    params: Sequence[torch.Tensor],
    layer_of: Mapping[int, str],
    layer_weights: Mapping[str, torch.Tensor],
    budget: int,
    sparse: AbstractSet[int] = frozenset(),
) -> None:
    """Add ``sum_t w_{l,t} g_{l,t}`` to ``.grad`` of each shared parameter (``l`` its layer).

    Per-task gradients come from batched backwards over chunks of tasks whose ``c x P`` block
    fits ``budget`` bytes; the graph is kept (the caller runs the heads' backward after). The
    parameters in ``sparse`` (by id; a sparse gradient, ``nn.Embedding(sparse=True)``, which
    no batched backward takes) get theirs from one weighted backward per layer, sparse.
    """
    if sparse and any(id(p) in sparse for p in params):
        by_layer: dict[str, list[torch.Tensor]] = {}
        for p in params:
            if id(p) in sparse:
                by_layer.setdefault(layer_of[id(p)], []).append(p)
        for layer, ps in by_layer.items():
            w = layer_weights[layer].to(losses.device, losses.dtype)
            got = torch.autograd.grad(w @ losses, ps, retain_graph=True, allow_unused=True)
            for p, one in zip(ps, got):
                if one is not None:
                    accumulate_grad(p, one)
        params = [p for p in params if id(p) not in sparse]
    if not params:
        return
    T = losses.shape[0]
    size = sum(p.numel() for p in params) * params[0].element_size()
    chunk = max(1, min(T, budget // max(1, size)))
    W = {id(p): layer_weights[layer_of[id(p)]].to(losses.device, p.dtype) for p in params}
    acc: list[torch.Tensor | None] = [None] * len(params)
    for lo in range(0, T, chunk):
        hi = min(T, lo + chunk)
        gs = _chunk_grads(losses, params, lo, hi)
        for k, (p, g) in enumerate(zip(params, gs)):
            if g is None:
                continue
            part = torch.tensordot(W[id(p)][lo:hi], g, dims=1)
            acc[k] = part if acc[k] is None else acc[k] + part
        del gs
    for p, g in zip(params, acc):
        if g is not None:
            accumulate_grad(p, g)


def _chunk_grads(
    losses: torch.Tensor, params: Sequence[torch.Tensor], lo: int, hi: int
) -> Sequence[torch.Tensor | None]:
    """Tasks ``lo:hi``'s gradients of ``params``, stacked: one batched backward, or one backward
    per task where the graph cannot run under vmap (dropout inside a non-reentrant activation
    checkpoint, ``.item()`` in a backward, anomaly mode: see :mod:`gradlens.engines._unbatchable`;
    the batched backward keeps the graph, so it is whole for the loop)."""
    try:
        return batched_grad(losses, params, slice(lo, hi))
    except RuntimeError as exc:
        if cause_of(exc) is None:
            raise
    eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)
    rows = [
        torch.autograd.grad(losses, params, eye[t], retain_graph=True, allow_unused=True)
        for t in range(lo, hi)
    ]
    out: list[torch.Tensor | None] = []
    for k in range(len(params)):
        got = [r[k] for r in rows]
        like = next((g for g in got if g is not None), None)
        out.append(
            None
            if like is None
            else torch.stack([torch.zeros_like(like) if g is None else g for g in got])
        )
    return out


def is_weighting(weights: object) -> bool:
    """Whether ``weights`` is a Gram weighting (a callable that is not a mapping)."""
    return callable(weights) and not isinstance(weights, Mapping)
