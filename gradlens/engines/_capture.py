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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.autograd.graph import GradientEdge, Node

from gradlens.engines._base import (
    BackwardContext,
    Workspace,
    accumulate_grad,
    grad_inputs,
    per_task_grad,
)
from gradlens.engines._graph import GraphIndex

__all__ = ["HeadSplit", "capture_rows", "split_heads"]

#: A task whose weight is below this fraction of the largest weight is computed on its own.
_SMALL = 1e-8


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
    """
    if any(torch.finfo(d).bits < 32 for d in dtypes):
        return None
    keys = {(e.node, e.output_nr): k for k, e in enumerate(edges)}

    def nexts(fn: Node) -> tuple[tuple[Node | None, int], ...]:
        return fn.next_functions if graph is None else graph.next_functions(fn)

    stop = {e.node for e in edges}
    owner: dict[Node, int] = {}
    consumers: dict[Node, tuple[int, list[tuple[int, int]]]] = {}
    above: dict[int, int] = {}
    leaf: dict[int, torch.Tensor] = {}
    visited: set[Node] = set()  # over all tasks: each graph edge into a leaf is counted once
    for t, loss in enumerate(task_losses):
        root = loss.grad_fn
        if root is None or root in stop:
            return None
        seen = {root}
        todo = [root]
        while todo:
            fn = todo.pop()
            if _reduced(fn):
                # a head computing in half precision (autocast): a row captured as w_t g_t
                # there would round differently for each weight; one unweighted backward per
                # task instead, so that the Grams do not depend on the weights
                return None
            first = fn not in visited
            visited.add(fn)
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
    return HeadSplit(consumers, leaves)


def _reduced(fn: Node) -> bool:
    """Whether a node receives its gradient in a floating type narrower than float32."""
    meta = getattr(fn, "_input_metadata", ())
    return any(m.dtype.is_floating_point and torch.finfo(m.dtype).bits < 32 for m in meta)


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
    # each hook copies its task's gradient into row t of one (T, *shape) buffer per shared
    # output, so the T gradients are never alive twice (as a list and as a stack)
    bufs: list[torch.Tensor | None] = [None] * len(edges)
    filled = [[False] * T for _ in edges]

    def make(t: int, slots: list[tuple[int, int]]) -> Callable[..., None]:
        def hook(grad_inputs: tuple[torch.Tensor | None, ...], _: object) -> None:
            for i, k in slots:
                g = grad_inputs[i]
                if g is None:
                    continue
                buf = bufs[k]
                if buf is None:
                    shape = (T, *shapes[k])
                    buf = bufs[k] = (
                        torch.empty(shape, dtype=g.dtype, device=g.device)
                        if workspace is None
                        else workspace.get(("rows", k), shape, g.dtype, g.device)
                    )
                if filled[k][t]:
                    buf[t].add_(g)
                else:
                    buf[t].copy_(g)
                    filled[k][t] = True

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
    for p, g in zip(leaves, grads[len(edges) :]):
        if g is not None:
            accumulate_grad(p, g)
    del grads
    rows = []
    for k, shape in enumerate(shapes):
        buf = bufs[k]
        if buf is None:  # no task reaches this output
            buf = torch.zeros((T, *shape), dtype=ctx.losses.dtype, device=ctx.losses.device)
        for t in range(T):
            if not filled[k][t]:
                buf[t].zero_()
        if alone:
            buf[alone] = solo[k].to(buf.dtype)
        rows.append(buf)
    return rows, u, v
