"""The ``loop`` engine: one ``torch.autograd.grad`` per task, the pattern every engine matches.

Each task's gradients are copied into one ``T x P`` buffer in the parameters' dtype (kept from
one probe to the next on CPU up to :data:`KEEP` bytes: a fresh large buffer pays a page fault per
4 KiB page), and each
layer's Gram is the product of its columns, accumulated in float64 over column chunks of at most
:data:`CHUNK` (float32 sums over no more than 2^16 terms, then float64: the documented float32
tolerance, 1e-4 relative, holds however large a layer is; float64 parameters stay float64).
The weighted gradient is one product over the same buffer.

``gradlens.testing.reference_grams`` is not this engine: it keeps the straightforward
computation (:func:`loop_task_grads`, then :func:`layer_grams_from_grads` with every gradient in
float64), the reference every engine, this one included, is tested against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import cast

import torch
from torch.overrides import has_torch_function

from gradlens.engines._base import (
    BackwardContext,
    Engine,
    EngineResult,
    SharedParams,
    Workspace,
    accumulate_grad,
    accumulate_grads,
    grad_dtype,
    group_by_layer,
    new_grad,
)

__all__ = [
    "CHUNK",
    "FlatEngine",
    "FlatViews",
    "GramPlan",
    "LoopEngine",
    "fill_row",
    "flat_grads",
    "flat_layer_grams",
    "layer_columns",
    "layer_grams_from_grads",
    "loop_task_grads",
    "task_grad",
    "write_flat",
    "write_views",
]

#: Largest ``T x P`` buffer (bytes) kept from one probe to the next on CPU.
KEEP = 64 << 20

#: Columns of one Gram product: float32 products sum at most this many terms before float64.
CHUNK = 1 << 16

_EngineCall = Callable[..., tuple[torch.Tensor | None, ...]]


@functools.cache
def _engine_call() -> _EngineCall | None:
    """What ``torch.autograd.grad`` calls once it has checked its arguments (a private torch
    function, ``torch.autograd.graph._engine_run_backward``): the engine's backward, with
    autograd's logging hooks and context. Checked once on a trivial graph, so that a torch
    where it is missing or takes other arguments gets the public call; None then."""
    run: _EngineCall | None = getattr(torch.autograd.graph, "_engine_run_backward", None)
    if run is None:
        return None
    x = torch.ones((), requires_grad=True)
    try:
        got = run(((x * 2),), (torch.ones(()),), False, False, (x,), True, accumulate_grad=False)
    except (TypeError, RuntimeError):
        return None
    ok = len(got) == 1 and got[0] is not None and float(got[0]) == 2.0 and x.grad is None
    return run if ok else None


def loop_task_grads(
    losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """``grads[t][k]``: gradient of ``losses[t]`` w.r.t. ``params[k]`` (zeros where unreached)."""
    out = []
    for loss in losses:
        gs = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)])
    return out


def flat_grads(grads: list[list[torch.Tensor]]) -> torch.Tensor:
    """``J`` (T x P): each task's gradients flattened and concatenated, in parameter order (a
    sparse gradient densified)."""
    return torch.stack([torch.cat([_dense(g).reshape(-1) for g in row]) for row in grads])


def _weighted(parts: Sequence[torch.Tensor | None], w: torch.Tensor) -> torch.Tensor | None:
    """``sum_t w_t g_t`` over the tasks' (sparse) gradients ``parts`` (None: unreached)."""
    total: torch.Tensor | None = None
    for wt, g in zip(w.unbind(0), parts):
        if g is not None:
            part = wt.to(g.dtype) * g
            total = part if total is None else total + part
    return total


def _dense(g: torch.Tensor) -> torch.Tensor:
    """``g``, densified when sparse (an ``nn.Embedding(sparse=True)`` weight's gradient)."""
    return g.to_dense() if g.is_sparse else g


def layer_grams_from_grads(
    shared: SharedParams,
    params: Sequence[torch.Tensor],
    grads: list[list[torch.Tensor]],
    J: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-layer float64 Grams from per-task gradients ``grads[t][k]`` of ``params[k]``.

    The reference computation (``gradlens.testing.reference_grams``): ``J`` (:func:`flat_grads`
    of ``grads`` unless given) is converted to float64 once and each layer's Gram is the product
    of its columns (a view where the layer's parameters are adjacent, as in module order).
    """
    Jd = (flat_grads(grads) if J is None else J).to(torch.float64)
    out = {}
    for layer, cols in layer_columns(shared, params).items():
        Jl = _columns(Jd, cols)
        out[layer] = Jl @ Jl.T
    return out


def layer_columns(
    shared: SharedParams, params: Sequence[torch.Tensor]
) -> dict[str, list[tuple[int, int]]]:
    """Each layer's column spans in the flattened parameters, merged where adjacent."""
    start: dict[int, int] = {}
    k = 0
    for p in params:
        start[id(p)] = k
        k += p.numel()
    out: dict[str, list[tuple[int, int]]] = {}
    for layer, ps in group_by_layer(shared, params).items():
        spans: list[tuple[int, int]] = []
        for p in ps:
            a, b = start[id(p)], start[id(p)] + p.numel()
            if spans and spans[-1][1] == a:
                spans[-1] = (spans[-1][0], b)
            else:
                spans.append((a, b))
        out[layer] = spans
    return out


def _columns(J: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The columns ``spans`` of ``J``: a view when they are one span."""
    if len(spans) == 1:
        return J[:, spans[0][0] : spans[0][1]]
    return torch.cat([J[:, a:b] for a, b in spans], dim=1)


def flat_layer_grams(
    J: torch.Tensor, columns: Mapping[str, Sequence[tuple[int, int]]]
) -> dict[str, torch.Tensor]:
    """Each layer's float64 Gram ``J_l J_l^T`` over its column spans of ``J`` (T x P).

    Products run in ``J``'s dtype (float32 at least) over at most :data:`CHUNK` columns each,
    into one buffer converted to float64 at once; a layer of several chunks (or spans) sums its
    chunks' products in float64.

    >>> J = torch.arange(12.0).reshape(2, 6)
    >>> g = flat_layer_grams(J, {"a": [(0, 2)], "b": [(2, 6)]})
    >>> g["a"].tolist(), g["b"].dtype
    ([[1.0, 7.0], [7.0, 85.0]], torch.float64)
    """
    plan = GramPlan(J, columns)
    return dict(zip(plan.layers, plan.run().unbind(0)))


class GramPlan:
    """The products of :func:`flat_layer_grams` for one buffer ``J``, prepared once.

    The views of ``J`` each product reads and the buffer it writes are made here, so that a
    probe reusing the same ``J`` (the engines' workspace) runs only the products: one
    ``torch.mm`` per chunk, one float64 conversion, one float64 sum when a layer spans several
    chunks. Holds ``J`` (through its views): keep a plan only as long as ``J`` is kept anyway.
    """

    def __init__(self, J: torch.Tensor, columns: Mapping[str, Sequence[tuple[int, int]]]) -> None:
        self.source, self.columns = J, columns
        self.layers = list(columns)
        owner: list[int] = []
        blocks: list[torch.Tensor] = []
        for i, spans in enumerate(columns.values()):
            for a, b in spans:
                for lo in range(a, b, CHUNK):
                    blocks.append(J[:, lo : min(b, lo + CHUNK)])
                    owner.append(i)
        T = J.shape[0]
        self._out = torch.empty((len(blocks), T, T), dtype=J.dtype, device=J.device)
        self._products = [(blk, blk.T, o) for blk, o in zip(blocks, self._out.unbind(0))]
        #: each layer's rows of ``_out`` (a range: its chunks are consecutive); None when every
        #: layer is one chunk
        self._ranges: list[tuple[int, int]] | None = None
        if owner != list(range(len(self.layers))):
            self._ranges = [
                (owner.index(i), len(owner) - owner[::-1].index(i)) if i in owner else (0, 0)
                for i in range(len(self.layers))
            ]

    def run(self) -> torch.Tensor:
        """The Grams of the buffer's current contents: ``(L, T, T)`` float64, one row per layer
        of :attr:`layers` (a layer of several chunks: their float64 sum, in a fixed order on
        every device and run)."""
        for blk, blk_t, out in self._products:
            torch.mm(blk, blk_t, out=out)
        grams = self._out.to(torch.float64, copy=True)  # never the buffer the next run rewrites
        if self._ranges is not None:  # (no index_add: its CUDA order is not fixed)
            zero = grams.new_zeros(grams.shape[1:])
            rows = [
                grams[a] if b - a == 1 else (grams[a:b].sum(0) if b > a else zero)
                for a, b in self._ranges
            ]
            grams = torch.stack(rows)
        return grams


def write_flat(
    params: Sequence[torch.Tensor], flat: torch.Tensor, skip: AbstractSet[int] = frozenset()
) -> None:
    """Add the slices of ``flat`` (P,), in parameter order, to the parameters' ``.grad``, as
    autograd's accumulation does (:func:`~gradlens.engines._base.accumulate_grads`): a
    parameter without ``.grad`` gets a copy of its slice (a tensor of its own, as autograd's
    fresh gradient; the common case after ``zero_grad()``), in one call per parameter. The
    parameters in ``skip`` (by id) are left alone."""
    # one call for every slice viewed in its parameter's shape (a split and a view per
    # parameter cost about as much as the copies on small parameters)
    write_views(params, torch._C._nn.unflatten_dense_tensors(flat, list(params)), skip)


def write_views(
    params: Sequence[torch.Tensor],
    views: Sequence[torch.Tensor],
    skip: AbstractSet[int] = frozenset(),
) -> None:
    """:func:`write_flat` from the slices already viewed in their parameters' shapes."""
    rest: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    for p, v in zip(params, views):
        if skip and id(p) in skip:
            continue
        if p.grad is None and v.dtype is grad_dtype(p):
            p.grad = v.clone() if v.stride() == p.stride() else new_grad(p, v)
        else:
            rest.append(p)
            grads.append(v)
    if rest:
        accumulate_grads(rest, grads)


class FlatViews:
    """Each parameter's slice of every row of a kept ``T x P`` buffer ``J``, viewed in the
    parameter's shape, made once: a probe reusing the buffer (the engines' workspace) copies
    each task's gradients into its row by one ``torch._foreach_copy_``, without a reshape per
    gradient and a concatenation. Holds ``J``: keep it only as long as ``J`` is kept anyway.
    """

    def __init__(self, J: torch.Tensor, params: Sequence[torch.Tensor], columns: object) -> None:
        self.source, self.columns = J, columns
        #: ``rows[t][k]``: parameter ``k``'s slice of ``J[t]``
        self.rows = [torch._C._nn.unflatten_dense_tensors(row, list(params)) for row in J]


class FlatEngine(Engine):
    """An engine that holds all tasks' gradients as one ``T x P`` buffer (parameter order):
    Grams by :func:`flat_layer_grams`, the weighted gradient by one product (``loop``, and
    ``batched`` when its tasks fit one chunk)."""

    def __init__(self, shared: SharedParams, n_tasks: int) -> None:
        super().__init__(shared, n_tasks)
        self._workspace = Workspace()
        self._cols: tuple[tuple[object, ...], dict[str, list[tuple[int, int]]]] | None = None
        self._plan: GramPlan | None = None
        self._views: FlatViews | None = None

    def detach(self) -> None:
        self.release()

    def release(self) -> None:
        self._workspace.clear()
        self._plan = None
        self._views = None

    def shared_changed(self) -> None:
        self._cols = None  # (keyed by ids: a replaced parameter's id may be reused)
        self.release()

    def flat_buffer(self, rows: int, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """An uninitialised ``rows x P`` buffer in the parameters' (promoted) dtype, float32 at
        least; reused from one probe to the next on CPU up to :data:`KEEP` bytes."""
        dtype = torch.float32  # (promoted once per distinct dtype: one, as a rule)
        for d in {p.dtype for p in params}:
            dtype = torch.promote_types(dtype, d)
        shape = (rows, sum([p.numel() for p in params]))
        if shape[0] * shape[1] * dtype.itemsize <= KEEP:
            return self._workspace.get("J", shape, dtype, params[0].device)
        # not held between probes: training would carry it at every step
        return torch.empty(shape, dtype=dtype, device=params[0].device)

    @staticmethod
    def other_leaves(ctx: BackwardContext, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The leaves outside ``params`` that the losses reach (the task heads, ...), when the
        engine is to write them: their per-task gradients then come from the same backward
        passes as the parameters', and no backward through the heads follows. None for
        ``observe`` (``ctx.write`` False) and a Gram weighting's step (``ctx.keep_blocks``).

        ``sum_t w_t g_t`` from per-task gradients is the weighted backward's sum, non-finite
        values included (``w_t * inf``, ``0 * inf``: the same products); a batched backward
        would also push zero cotangents through every other task's head (``0 * inf = NaN``
        where the plain backward has none), so only the loop engine writes them."""
        if not ctx.write or ctx.keep_blocks:
            return []
        ids = set(map(id, params))
        return [v for i, v in ctx.leaves.items() if i not in ids]

    def flat_result(
        self,
        ctx: BackwardContext,
        params: list[torch.Tensor],
        J: torch.Tensor,
        others: Sequence[tuple[torch.Tensor, torch.Tensor | None]] = (),
        sparse: Mapping[int, list[torch.Tensor | None]] | None = None,
    ) -> EngineResult:
        """Grams of ``J`` (all tasks' gradients of ``params``) and the weighted gradient written
        (or, with ``ctx.keep_blocks``, a writer that writes it once the weights are known);
        ``others``: ``(leaf, sum_t w_t g_t)`` of the :meth:`other_leaves`, written too (None:
        no task reaches it); ``sparse``: the per-task sparse gradients of the parameters (by id)
        that autograd gives a sparse gradient, whose ``J`` rows are densified: their weighted
        gradient is written sparse, as autograd's."""
        layers, stacked = self._grams(J, params)
        grams = dict(zip(layers, stacked.unbind(0)))
        rules = dict.fromkeys(grams, self.name)
        layer_of = self.shared.layer_of
        sparse = sparse or {}

        def write(weights: Mapping[str, torch.Tensor]) -> None:
            """``sum_t w_{l,t} g_{l,t}`` for every parameter, ``w_l`` its layer's weights."""
            k = 0
            for p in params:
                w = weights[layer_of[id(p)]].to(J.device, J.dtype)
                parts = sparse.get(id(p))
                g = w @ J[:, k : k + p.numel()] if parts is None else _weighted(parts, w)
                if g is not None:
                    accumulate_grad(p, g)
                k += p.numel()

        if ctx.keep_blocks:  # the per-task gradients are at hand: write once weights are known
            return EngineResult(grams, rules, set(), writer=write, stacked=stacked)
        # the weighted sum as one product over the flattened per-task gradients
        write_flat(params, ctx.weights.to(J.dtype) @ J, skip=sparse.keys())
        for p in params if sparse else ():
            parts = sparse.get(id(p))
            g = None if parts is None else _weighted(parts, ctx.weights)
            if g is not None:
                accumulate_grad(p, g)
        for leaf, g in others:
            if g is not None:
                accumulate_grad(leaf, g)
        written = set(map(id, params))
        written.update(id(v) for v, _ in others)
        return EngineResult(grams, rules, written, stacked=stacked)

    def _grams(
        self, J: torch.Tensor, params: list[torch.Tensor]
    ) -> tuple[list[str], torch.Tensor]:
        """The layers and their Grams, stacked (:meth:`GramPlan.run`), by a plan kept while
        ``J`` is the workspace's buffer (made afresh for a buffer not kept between probes)."""
        columns = self._columns(params)
        plan = self._plan
        if not self._workspace.holds("J", J):
            plan = GramPlan(J, columns)
        elif plan is None or plan.source is not J or plan.columns is not columns:
            plan = self._plan = GramPlan(J, columns)
        return plan.layers, plan.run()

    def flat_views(self, J: torch.Tensor, params: list[torch.Tensor]) -> FlatViews | None:
        """The :class:`FlatViews` of ``J``, kept while ``J`` is the workspace's buffer and the
        parameter set is the last probe's; None for a buffer not kept between probes."""
        if not self._workspace.holds("J", J):
            return None
        columns = self._columns(params)
        views = self._views
        if views is None or views.source is not J or views.columns is not columns:
            views = self._views = FlatViews(J, params, columns)
        return views

    def _columns(self, params: list[torch.Tensor]) -> dict[str, list[tuple[int, int]]]:
        """:func:`layer_columns` of ``params``, kept for the parameter set of the last probe
        (the same parameters with the same shapes: a parameter whose ``.data`` was replaced by
        one of another shape gets new columns, and the plan and views made from them)."""
        key = tuple([(id(p), p.shape) for p in params])
        if self._cols is None or self._cols[0] != key:
            self._cols = (key, layer_columns(self.shared, params))
        return self._cols[1]


class LoopEngine(FlatEngine):
    """One backward per task (``torch.autograd.grad``); exact, ``T x P`` in the parameters'
    dtype, float64 Grams."""

    name = "loop"
    sparse_grads = True

    def compute(self, ctx: BackwardContext) -> EngineResult:
        params = ctx.reached
        if not params:
            return EngineResult({})
        losses = ctx.per_task()
        J = self.flat_buffer(len(losses), params)
        views = self.flat_views(J, params)
        rest = self.other_leaves(ctx, params)
        inputs, n = (*params, *rest), len(params)
        direct = not has_torch_function((*losses, *inputs))
        rest_sum: list[torch.Tensor | None] = [None] * len(rest)
        # shared parameters with a sparse gradient: their J rows densified, the tasks' sparse
        # gradients kept for a sparse weighted gradient
        sparse_at = [k for k, p in enumerate(params) if id(p) in ctx.sparse] if ctx.sparse else []
        sparse: dict[int, list[torch.Tensor | None]] = {id(params[k]): [] for k in sparse_at}
        # each row by one copy into the parameters' views of it when every gradient is a dense
        # tensor (fill_row otherwise: zeros for an unreached parameter, a sparse one densified)
        rows = None if views is None or sparse_at else views.rows
        # each task's weight once per dtype of the leaves it multiplies (not an index and a cast
        # per leaf and task): the same products
        w_of: dict[torch.dtype, list[torch.Tensor]] = {}
        # from each task's own scalar loss: a backward from ``losses[t]`` would run through the
        # stack into every task's head (with zero cotangents)
        T = len(losses)
        for t, loss in enumerate(losses):
            # the last backward frees the graph, as the weighted backward it replaces would
            keep = ctx.retain_graph or t < T - 1 or not rest
            gs = task_grad(loss, inputs, keep, direct)
            own = gs[:n]
            if rows is not None and all(g is not None and g.layout is torch.strided for g in own):
                torch._foreach_copy_(rows[t], cast("tuple[torch.Tensor, ...]", own))  # no None
            else:
                fill_row(J[t], params, own)
            for k in sparse_at:
                sparse[id(params[k])].append(gs[k])
            for j, g in enumerate(gs[n:]):  # a head: reached by its own task only, as a rule
                if g is not None:
                    ws = w_of.get(g.dtype)
                    if ws is None:
                        ws = w_of[g.dtype] = list(ctx.weights.to(g.dtype).unbind(0))
                    part = ws[t] * g
                    prev = rest_sum[j]
                    rest_sum[j] = part if prev is None else prev + part
        return self.flat_result(ctx, params, J, list(zip(rest, rest_sum)), sparse)


def task_grad(
    loss: torch.Tensor, inputs: tuple[torch.Tensor, ...], keep: bool, direct: bool
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(loss, inputs, retain_graph=keep, allow_unused=True)``.

    ``direct`` (plain tensors only, no ``__torch_function__`` to dispatch to): the same backward
    by the engine call that ``autograd.grad`` ends in, without the argument handling around it
    (a Python pass over ``inputs``, ~30 us a call at 34 inputs); the loss's own cotangent is
    ``ones_like(loss)``, as there (a non-scalar or gradient-free loss raises as there: the
    engine checks the same).
    """
    run = _engine_call() if direct else None
    if run is not None and loss.numel() == 1:  # (else autograd.grad's own message)
        return run(
            (loss,), (torch.ones_like(loss),), keep, False, inputs, True, accumulate_grad=False
        )
    return torch.autograd.grad(loss, inputs, retain_graph=keep, allow_unused=True)


def fill_row(
    row: torch.Tensor, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
) -> None:
    """One task's gradients concatenated into ``row`` (P,) by one call (zeros for None)."""
    torch.cat(
        [
            (p.new_zeros(p.numel()) if g is None else _dense(g).reshape(-1))
            for p, g in zip(params, grads)
        ],
        out=row,
    )
