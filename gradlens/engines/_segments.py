"""Split the backward through the shared part at layer outputs that every path crosses.

The ``gramian`` engine needs, for every recorded layer output, the T task gradients with respect
to it. Asking autograd for all of them in one call keeps every layer's ``T x N x out`` block
alive until the call returns. When a recorded output ``e`` is a *cut* (every path from the
shared outputs to anything below ``e`` passes through ``e``), the gradient at ``e`` is all the
part below needs: the backward can stop there, the layers above can be turned into Grams and
freed, and a second backward can start from ``e``. A plain MLP or CNN is cut at every layer, so
at most about two layers' blocks are alive at once; a residual block is cut only at its ends.

Example:
    >>> import torch
    >>> from torch.autograd.graph import get_gradient_edge
    >>> lin1, lin2 = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    >>> h = lin1(torch.randn(5, 3))
    >>> z = lin2(torch.relu(h))
    >>> plan_segments([get_gradient_edge(z)], [get_gradient_edge(h), lin1.weight])
    [([0], 0), ([1], None)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from gradlens.engines._graph import GraphIndex

__all__ = ["fed_tops", "plan_from_index", "plan_segments", "segmented"]

#: Steps of the dominator-tree walks above which the cut search is skipped (one segment).
_MAX_WORK = 400_000
#: Plans kept for reuse, by graph shape (bounded: a new shape evicts the oldest).
_PLANS: dict[tuple[object, ...], list[tuple[list[int], int | None]]] = {}
_MAX_PLANS = 32
#: The virtual root above the ``tops`` in the dominator tree.
_ROOT = -1

Plan = list[tuple[list[int], int | None]]


def plan_segments(
    tops: Sequence[GradientEdge],
    targets: Sequence[GradientEdge | torch.Tensor],
    graph: GraphIndex | None = None,
) -> Plan:
    """Segments of the backward from ``tops``: ``(indices of targets, index of the cut)``.

    Segment k asks for its targets (and its cut, the last target it lists), starting from the
    previous segment's cut (from ``tops`` for the first); the last segment has no cut. Targets
    are layer-output edges or leaf tensors. One segment holding every target when no cut exists.
    ``graph``: an index of a graph holding ``tops`` (the probe's; else one is built from them).
    """
    if graph is None or any(e.node not in graph.pos for e in tops):
        graph = GraphIndex.from_roots([e.node for e in tops])
    return plan_from_index(graph, tops, targets)


def plan_from_index(
    g: GraphIndex, tops: Sequence[GradientEdge], targets: Sequence[GradientEdge | torch.Tensor]
) -> Plan:
    """:func:`plan_segments` on an index holding ``tops``; a plan is reused for a graph of the
    same shape (``g.signature``) with its tops and targets at the same positions."""
    nodes = [t.node if isinstance(t, GradientEdge) else _leaf_node(t) for t in targets]
    where = [
        (g.pos.get(n, -1), t.output_nr if isinstance(t, GradientEdge) else -1)
        for n, t in zip(nodes, targets)
    ]
    start = [g.pos[e.node] for e in tops]
    key = (g.signature, tuple(start), tuple(where))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(g, start, where)
        for old in list(_PLANS)[: max(0, len(_PLANS) - _MAX_PLANS + 1)]:  # evict the oldest
            _PLANS.pop(old, None)  # (tolerant of another thread's eviction)
        _PLANS[key] = plan
    return [(list(members), cut) for members, cut in plan]


def _plan(g: GraphIndex, start: list[int], where: list[tuple[int, int]]) -> Plan:
    """The plan from the dominator tree of the part of ``g`` below ``start``.

    A target node ``n`` is a cut when every path from ``start`` to anything below ``n`` passes
    through ``n``: when ``n`` dominates all its descendants, i.e. when no edge leaves the
    subtree of ``n`` in the dominator tree. An edge ``u -> v`` leaves the subtree of every node
    on the tree path from ``u`` up to ``idom(v)`` (exclusive): those are marked as no cut.
    """
    one: Plan = [(list(range(len(where))), None)]
    order, parents = _below(g, start)
    if order is None:
        return one
    starts = set(start)
    idom, depth = _dominators(order, parents, starts)
    candidates = [
        i
        for i, (j, nr) in enumerate(where)
        if nr >= 0 and j in idom and j not in starts
        and all(r == nr for _, r in parents[j])  # no other output of the node carries gradient
    ]  # fmt: skip
    if not candidates:
        return one
    bad: set[int] = set()
    work = 0
    for v in order:
        stop = idom[v]
        for u, _ in parents[v]:
            x = u
            while x != stop:
                bad.add(x)
                x = idom[x]
                work += 1
        if work > _MAX_WORK:
            return one
    size = dict.fromkeys(order, 1)  # dominator subtree sizes (a cut's descendants, plus one)
    for v in reversed(order):
        if idom[v] != _ROOT:
            size[idom[v]] += size[v]
    cuts = [i for i in candidates if where[i][0] not in bad]
    cuts.sort(key=lambda i: -size[where[i][0]])
    chain: list[int] = []
    for i in cuts:
        if not chain or _strictly_dominates(where[chain[-1]][0], where[i][0], idom, depth):
            chain.append(i)
    if not chain:
        return one
    in_chain = {where[i][0] for i in chain}
    above = {_ROOT: 0}  # chain cuts strictly dominating each node
    for v in order:
        d = idom[v]
        above[v] = above[d] + (d in in_chain)
    segments: list[list[int]] = [[] for _ in range(len(chain) + 1)]
    for k, (j, _) in enumerate(where):
        segments[above.get(j, 0)].append(k)
    # a cut is requested in the segment above it; list it last there
    out: Plan = []
    for s, members in enumerate(segments):
        cut = chain[s] if s < len(chain) else None
        if cut is not None:
            members = [m for m in members if m != cut] + [cut]
        out.append((members, cut))
    return out


def _below(
    g: GraphIndex, start: list[int]
) -> tuple[list[int] | None, dict[int, list[tuple[int, int]]]]:
    """The positions reachable from ``start`` in topological order (parents first) and each
    one's ``(parent, output_nr)`` edges from within that part."""
    reach = set(start) | g.descendants(start)
    edges = g.edges
    parents: dict[int, list[tuple[int, int]]] = {j: [] for j in reach}
    for u in reach:
        for j, nr in edges[u]:
            parents[j].append((u, nr))
    indeg = {j: len(ps) for j, ps in parents.items()}
    order = [j for j in sorted(reach) if indeg[j] == 0]
    k = 0
    while k < len(order):
        for j, _ in edges[order[k]]:
            indeg[j] -= 1
            if indeg[j] == 0:
                order.append(j)
        k += 1
    if len(order) != len(reach):  # not a DAG (cannot happen in autograd): no cuts
        return None, parents
    return order, parents


def _dominators(
    order: list[int], parents: dict[int, list[tuple[int, int]]], starts: set[int]
) -> tuple[dict[int, int], dict[int, int]]:
    """Immediate dominators (and tree depths) of a DAG in topological ``order`` whose entries
    are ``starts``, under a virtual root: one pass, each node after all its parents."""
    idom: dict[int, int] = {}
    depth = {_ROOT: 0}
    for v in order:
        preds = [u for u, _ in parents[v]]
        d = _ROOT if v in starts or not preds else preds[0]
        for u in preds:
            while d != u:  # the nearest common ancestor of d and u
                if depth[d] >= depth[u]:
                    d = idom[d]
                else:
                    u = idom[u]
        idom[v] = d
        depth[v] = depth[d] + 1
    return idom, depth


def _strictly_dominates(a: int, b: int, idom: dict[int, int], depth: dict[int, int]) -> bool:
    if a == b:
        return False
    while depth[b] > depth[a]:
        b = idom[b]
    return a == b


def fed_tops(edges: Sequence[GradientEdge], graph: GraphIndex | None) -> set[Node]:
    """The nodes of ``edges`` that the backward from another of ``edges`` reaches (a boundary
    output computed from another one); memoized by signature and positions on ``graph``."""
    if len(edges) < 2:
        return set()
    if graph is None or any(e.node not in graph.pos for e in edges):
        graph = GraphIndex.from_roots([e.node for e in edges])
    g = graph
    start = tuple(g.pos[e.node] for e in edges)
    fed = g.memo(("fed-tops", start), lambda: _fed_positions(g, start))
    return {g.nodes[i] for i in fed}


def _fed_positions(g: GraphIndex, start: tuple[int, ...]) -> frozenset[int]:
    tops = set(start)
    return frozenset(j for i in tops for j in g.descendants([i]) & tops)


def _leaf_node(t: torch.Tensor) -> Node:
    return get_gradient_edge(t).node


def segmented(
    edges: list[GradientEdge],
    cot: list[torch.Tensor],
    inputs: list[torch.Tensor | GradientEdge],
    sizes: list[int],
    limit: int,
    backward: Callable[..., Sequence[torch.Tensor | None]],
    keep: bool,
    graph: GraphIndex | None = None,
) -> Iterator[list[tuple[int, torch.Tensor | None]]]:
    """Gradients of ``inputs`` from cotangents ``cot`` at ``edges``, one backward per segment
    (consecutive segments merged while the bytes of their ``inputs``' blocks stay <= ``limit``),
    yielded as one batch ``[(index in inputs, gradient)]`` per backward call."""
    # a recorded output at the boundary gets its captured cotangent as is, unless another
    # boundary output is computed from it (``return z, f(z)``): its gradient then also holds
    # what flows back through f, and it is asked of the backward like any other target
    fed = fed_tops(edges, graph)
    at_boundary = {(e.node, e.output_nr): c for e, c in zip(edges, cot) if e.node not in fed}
    rest: list[int] = []
    first: list[tuple[int, torch.Tensor | None]] = []
    for i, x in enumerate(inputs):
        k = (x.node, x.output_nr) if isinstance(x, GradientEdge) else None
        if k in at_boundary:
            first.append((i, at_boundary[k]))
        else:
            rest.append(i)
    del at_boundary
    if first:
        yield first
    del first
    tops: list[GradientEdge] | None = edges
    cots = cot
    del cot
    merged: list[tuple[list[int], int | None, int]] = []
    for members, cut in plan_segments(edges, [inputs[i] for i in rest], graph):
        size = sum(sizes[rest[m]] for m in members)
        if merged and merged[-1][2] + size <= limit:  # the cut above becomes an inner target
            merged[-1] = (merged[-1][0] + members, cut, merged[-1][2] + size)
        else:
            merged.append((members, cut, size))
    for members, cut, _ in merged:
        if not members:
            continue
        if tops is None:  # the cut above was reached by no task: nothing below is
            yield [(rest[m], None) for m in members]
            continue
        got = dict(zip(members, backward(tops, cots, [inputs[rest[m]] for m in members], keep)))
        tops = None
        cots = []
        below = got[cut] if cut is not None else None
        if cut is not None and below is not None:
            edge = inputs[rest[cut]]
            assert isinstance(edge, GradientEdge)
            tops, cots = [edge], [below]
        del below
        yield [(rest[m], got.pop(m)) for m in members]
