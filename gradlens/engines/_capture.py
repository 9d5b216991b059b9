"""Every task's gradient at the shared outputs from one weighted backward through the heads.

Where each task's loss reaches the shared outputs ``z`` only through autograd nodes of its own
(its head), the gradient that such a node passes to ``z`` belongs to one task. One backward of
``sum_t w_t L_t`` with a hook on each of those nodes then yields every ``w_t dL_t/dz`` (and, in
the same pass, the weighted gradients of the heads' parameters), where one backward per task
would cost T calls into autograd and traverse the heads twice. When a node just above ``z`` is
reached by several tasks (one head computing all tasks' outputs, then sliced) the split does not
exist and the engines fall back to one backward per task.

The captured rows carry their weight: row t is ``u_t g_t`` with ``u_t = w_t``, except for tasks
whose weight is zero or negligible, which are computed alone (``u_t = 1``). Engines then use
``v_t = w_t / u_t`` as the weights of their weighted sum and divide each Gram entry by
``u_s u_t``: exact, with no division of a large tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.autograd.graph import GradientEdge, Node

from gradlens.engines._base import (
    BackwardContext,
    Workspace,
    accumulate_grads,
    grad_inputs,
    per_task_grad,
)
from gradlens.engines._graph import GraphIndex

__all__ = ["HeadSplit", "capture_rows", "partial_rows", "split_heads", "task_scales"]

#: A task whose weight is below this fraction of the largest weight is computed on its own.
_SMALL = 1e-8
#: Rows of at most this many bytes (all tasks) are stacked from the gradients the hooks keep;
#: larger ones are copied into one buffer as they arrive (see :func:`capture_rows`).
_STACK_MAX = 1 << 20


@dataclass
class HeadSplit:
    """The nodes just above the shared outputs, each owned by one task, and the head leaves."""

    #: node -> (task, [(index in the node's gradient outputs, index of the shared output)])
    consumers: dict[Node, tuple[int, list[tuple[int, int]]]]
    #: leaves whose every use in the graph lies between the losses and the shared outputs
    leaves: list[torch.Tensor]


def split_heads(
    task_losses: Sequence[torch.Tensor],
    edges: Sequence[GradientEdge],
    uses: dict[int, int],
    dtypes: Sequence[torch.dtype],
    graph: GraphIndex | None = None,
) -> HeadSplit | None:
    """Walk each task's graph down to ``edges``; None when no per-task split exists.

    Also None when a shared output or any node of the heads is in half precision (autocast):
    a row scaled by ``w_t`` would round (or underflow) differently for each weight there, where
    the unscaled per-task gradient does not depend on the weights.

    With the probe's ``graph`` (and its ``uses``), the walk's outcome is a fact about the
    graph's structure: computed once per graph signature (as positions, see
    :meth:`GraphIndex.memo`) and rebound to this graph's nodes; the dtypes of the heads' nodes
    are checked at every call.
    """
    if any(_narrow(d) or d == torch.complex32 for d in dtypes):
        return None
    maybe = [loss.grad_fn for loss in task_losses]
    roots = [r for r in maybe if r is not None]
    if len(roots) < len(maybe):
        return None
    found: tuple[dict[Node, tuple[int, list[tuple[int, int]]]], list[torch.Tensor], list[Node]]
    if (
        graph is not None
        and uses is graph.uses
        and all(r in graph.pos for r in roots)
        and all(e.node in graph.pos for e in edges)
    ):
        g, pos = graph, graph.pos
        key = (
            "split_heads",
            tuple(pos[r] for r in roots),
            tuple((pos[e.node], e.output_nr) for e in edges),
        )
        plan = g.memo(key, lambda: _split_plan(g, roots, edges, uses))
        if plan is None:
            return None
        nodes = g.nodes
        found = (
            {nodes[j]: (t, list(slots)) for j, t, slots in plan[0]},
            [g.leaf_at[j] for j in plan[1]],
            [nodes[j] for j in plan[2]],
        )
    else:
        walked = _walk(roots, edges, uses, graph)
        if walked is None:
            return None
        found = walked
    consumers, leaves, visited = found
    if any(_reduced(fn) for fn in visited):
        # a head computing in half precision (autocast): a row captured as w_t g_t there
        # would round differently for each weight; one unweighted backward per task instead,
        # so that the Grams do not depend on the weights
        return None
    return HeadSplit(consumers, leaves)


#: The heads' split as positions in a graph: (consumer, task, slots), leaves, visited nodes.
_Plan = tuple[
    tuple[tuple[int, int, tuple[tuple[int, int], ...]], ...], tuple[int, ...], tuple[int, ...]
]


def _split_plan(
    g: GraphIndex, roots: list[Node], edges: Sequence[GradientEdge], uses: dict[int, int]
) -> _Plan | None:
    """:func:`_walk` on an index, as positions (no node or tensor kept: see ``memo``)."""
    walked = _walk(roots, edges, uses, g)
    if walked is None:
        return None
    consumers, leaves, visited = walked
    pos = g.pos
    at = {id(var): j for j, var in g.leaf_at.items()}
    return (
        tuple((pos[n], t, tuple(slots)) for n, (t, slots) in consumers.items()),
        tuple(at[id(v)] for v in leaves),
        tuple(pos[n] for n in visited),
    )


def _walk(
    roots: list[Node],
    edges: Sequence[GradientEdge],
    uses: dict[int, int],
    graph: GraphIndex | None,
) -> tuple[dict[Node, tuple[int, list[tuple[int, int]]]], list[torch.Tensor], list[Node]] | None:
    """The structural part of :func:`split_heads`: the consumers, the head leaves and every
    node visited (whose dtypes the caller checks); None when no per-task split exists."""
    keys = {(e.node, e.output_nr): k for k, e in enumerate(edges)}

    def nexts(fn: Node) -> tuple[tuple[Node | None, int], ...]:
        return fn.next_functions if graph is None else graph.next_functions(fn)

    stop = {e.node for e in edges}
    owner: dict[Node, int] = {}
    consumers: dict[Node, tuple[int, list[tuple[int, int]]]] = {}
    above: dict[int, int] = {}
    leaf: dict[int, torch.Tensor] = {}
    visited: dict[Node, None] = {}  # over all tasks: each graph edge into a leaf is counted once
    for t, root in enumerate(roots):
        if root in stop:
            return None
        seen = {root}
        todo = [root]
        while todo:
            fn = todo.pop()
            first = fn not in visited
            visited[fn] = None
            if owner.setdefault(fn, t) != t and fn in consumers:
                return None  # a node passing gradient to z is shared by two tasks
            slots: list[tuple[int, int]] = []
            for i, (nxt, nr) in enumerate(nexts(fn)):
                if nxt is None:
                    continue
                k = keys.get((nxt, nr))
                if k is not None:
                    slots.append((i, k))
                    continue
                if nxt in stop:
                    return None  # an output of the shared part that is not recorded as one
                var = getattr(nxt, "variable", None)
                if var is not None:
                    if first:
                        above[id(var)] = above.get(id(var), 0) + 1
                        leaf[id(var)] = var
                    continue
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
            if slots:
                if owner[fn] != t:
                    return None
                consumers[fn] = (t, slots)
    leaves = [v for i, v in leaf.items() if above[i] == uses.get(i, 0)]
    return consumers, leaves, list(visited)


#: Per dtype: whether it is a floating type narrower than float32 (``torch.finfo`` is slow
#: enough to matter when every node of the heads is checked at every probe).
_NARROW: dict[torch.dtype, bool] = {}


def _narrow(dt: torch.dtype) -> bool:
    """Whether ``dt`` is a floating type narrower than float32 (cached per dtype)."""
    narrow = _NARROW.get(dt)
    if narrow is None:
        narrow = _NARROW[dt] = dt.is_floating_point and torch.finfo(dt).bits < 32
    return narrow


def _reduced(fn: Node) -> bool:
    """Whether a node receives its gradient in a floating type narrower than float32."""
    for m in getattr(fn, "_input_metadata", ()):
        narrow = _NARROW.get(m.dtype)
        if narrow is None:
            narrow = _narrow(m.dtype)
        if narrow:
            return True
    return False


def task_scales(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(u, v, alone)``: row factors, weights for the weighted sum, tasks computed alone."""
    w = weights.detach()
    vals = w.tolist()
    top = max(vals) if vals else 0.0
    alone = [t for t, x in enumerate(vals) if x <= 0 or x < _SMALL * top]
    u = w.clone()
    v = torch.ones_like(w)
    if alone:
        idx = torch.tensor(alone, device=w.device)
        u[idx] = 1.0
        v[idx] = w[idx]
    return u, v, alone


def capture_rows(
    ctx: BackwardContext,
    edges: Sequence[GradientEdge],
    shapes: Sequence[Sequence[int]],
    split: HeadSplit,
    leaves: Sequence[torch.Tensor],
    retain_graph: bool = True,
    workspace: Workspace | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One weighted backward to ``edges`` (and ``leaves``, whose ``.grad`` it accumulates).

    Returns the rows (one ``(T, *shape)`` tensor per edge, row t equal to ``u_t dL_t/dz``) and
    ``u``, ``v`` (see the module docstring). With a ``workspace`` the rows are written into its
    buffers (valid until the next call with the same workspace).
    """
    parts = ctx.per_task()
    T = len(parts)
    u, v, alone = task_scales(ctx.weights)
    solo = per_task_grad([parts[t] for t in alone], edges, shapes) if alone else []
    itemsize = ctx.losses.element_size()
    # small rows: each hook keeps its task's gradient and the rows are stacked at the end (one
    # copy for all tasks); large ones (or a workspace): each hook copies its task's gradient
    # into row t of one (T, *shape) buffer per shared output, so that the T gradients are never
    # alive twice (as a list and as a stack)
    keep = [
        workspace is None and T * math.prod(shape) * itemsize <= _STACK_MAX for shape in shapes
    ]
    got: list[list[torch.Tensor | None]] = [[None] * T for _ in edges]
    bufs: list[torch.Tensor | None] = [None] * len(edges)

    def make(t: int, slots: list[tuple[int, int]]) -> Callable[..., None]:
        def hook(grad_inputs: tuple[torch.Tensor | None, ...], _: object) -> None:
            for i, k in slots:
                g = grad_inputs[i]
                if g is None:
                    continue
                row = got[k][t]
                if keep[k]:  # autograd does not add into a gradient a hook holds: g stays
                    got[k][t] = g if row is None else row + g
                    continue
                if row is None:
                    row = got[k][t] = _buffer(bufs, k, (T, *shapes[k]), g, workspace)[t]
                    row.copy_(g)
                else:
                    row.add_(g)

        return hook

    handles = [node.register_hook(make(t, slots)) for node, (t, slots) in split.consumers.items()]
    try:
        out = ctx.weights @ ctx.losses
        grads = torch.autograd.grad(
            out, grad_inputs([*edges, *leaves]), retain_graph=retain_graph, allow_unused=True
        )
    finally:
        for h in handles:
            h.remove()
    heads = [(p, g) for p, g in zip(leaves, grads[len(edges) :]) if g is not None]
    accumulate_grads([p for p, _ in heads], [g for _, g in heads])
    del grads, heads
    rows = []
    for k, shape in enumerate(shapes):
        row_k = got[k]
        buf: torch.Tensor | None
        like = next((g for g in row_k if g is not None), None)
        if keep[k] and like is not None:
            buf = torch.stack([torch.zeros_like(like) if g is None else g for g in row_k])
        else:
            buf = bufs[k]
            if buf is None:  # no task reaches this output
                buf = torch.zeros((T, *shape), dtype=ctx.losses.dtype, device=ctx.losses.device)
            for t in range(T):
                if row_k[t] is None:
                    buf[t].zero_()
        if alone:
            buf[alone] = solo[k].to(buf.dtype)
        rows.append(buf)
    return rows, u, v


def _buffer(
    bufs: list[torch.Tensor | None],
    k: int,
    shape: tuple[int, ...],
    like: torch.Tensor,
    workspace: Workspace | None,
) -> torch.Tensor:
    """The (T, *shape) buffer of shared output ``k``, made on first use."""
    buf = bufs[k]
    if buf is None:
        buf = bufs[k] = (
            torch.empty(shape, dtype=like.dtype, device=like.device)
            if workspace is None
            else workspace.get(("rows", k), shape, like.dtype, like.device)
        )
    return buf


def partial_rows(
    task_losses: Sequence[torch.Tensor],
    edges: Sequence[GradientEdge],
    shapes: Sequence[Sequence[int]],
    graph: GraphIndex,
) -> list[torch.Tensor]:
    """Each task's gradient at ``edges`` as the heads' inputs: what flows into each from the
    nodes outside the shared part only, not back from another of ``edges`` computed from it
    (``z, f(z)``), which a backward to ``edges`` would add; one hooked backward per task.

    Returns one ``(T, *shape)`` tensor per edge (zeros where a task does not reach it).
    """
    consumers = _outside_consumers(edges, graph)
    T = len(task_losses)
    got: list[list[torch.Tensor | None]] = [[None] * T for _ in edges]

    def make(t: int, slots: list[tuple[int, int]]) -> Callable[..., None]:
        def hook(grad_inputs: tuple[torch.Tensor | None, ...], _: object) -> None:
            for i, k in slots:
                g = grad_inputs[i]
                if g is not None:
                    row = got[k][t]
                    got[k][t] = g if row is None else row + g

        return hook

    for t, loss in enumerate(task_losses):
        handles = [node.register_hook(make(t, slots)) for node, slots in consumers.items()]
        try:
            torch.autograd.grad(loss, grad_inputs(edges), retain_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
    ref = task_losses[0]
    zeros = [torch.zeros(tuple(s), dtype=ref.dtype, device=ref.device) for s in shapes]
    return [torch.stack([z if g is None else g for g in row]) for row, z in zip(got, zeros)]


def _outside_consumers(
    edges: Sequence[GradientEdge], graph: GraphIndex
) -> dict[Node, list[tuple[int, int]]]:
    """The nodes with an input slot fed by one of ``edges`` (slot, edge index) that lie above
    every edge (neither an edge's own node nor reached from one): the heads' side, not ``f`` in
    ``return z, f(z)``."""
    pos = graph.pos
    at: dict[tuple[Node | None, int], int] = {
        (e.node, e.output_nr): k for k, e in enumerate(edges)
    }
    tops = {pos[e.node] for e in edges if e.node in pos}
    below = graph.descendants(tops)
    out: dict[Node, list[tuple[int, int]]] = {}
    for u, kids in enumerate(graph.edges):
        if u in below or u in tops or not any(c in tops for c, _ in kids):
            continue
        node = graph.nodes[u]
        for i, (fn, nr) in enumerate(node.next_functions):
            k = at.get((fn, nr))
            if k is not None:
                out.setdefault(node, []).append((i, k))
    return out
