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

from collections.abc import Sequence

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

__all__ = ["plan_segments"]

#: Graph size x candidate count above which the cut search is skipped (one segment).
_MAX_WORK = 400_000


def plan_segments(
    tops: Sequence[GradientEdge], targets: Sequence[GradientEdge | torch.Tensor]
) -> list[tuple[list[int], int | None]]:
    """Segments of the backward from ``tops``: ``(indices of targets, index of the cut)``.

    Segment k asks for its targets (and its cut, the last target it lists), starting from the
    previous segment's cut (from ``tops`` for the first); the last segment has no cut. Targets
    are layer-output edges or leaf tensors. One segment holding every target when no cut exists.
    """
    one = [(list(range(len(targets))), None)]
    nodes = [t.node if isinstance(t, GradientEdge) else _leaf_node(t) for t in targets]
    start = {e.node for e in tops}
    parents: dict[Node, list[tuple[Node, int]]] = {}
    seen = set(start)
    todo = list(start)
    while todo:
        fn = todo.pop()
        for nxt, nr in fn.next_functions:
            if nxt is None:
                continue
            parents.setdefault(nxt, []).append((fn, nr))
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    candidates = [
        i
        for i, t in enumerate(targets)
        if isinstance(t, GradientEdge) and t.node not in start and t.node in parents
    ]
    if not candidates or len(candidates) * len(seen) > _MAX_WORK:
        return one
    cuts: list[tuple[int, set[Node]]] = []
    for i in candidates:
        n = nodes[i]
        edge = targets[i]
        assert isinstance(edge, GradientEdge)
        if any(nr != edge.output_nr for _, nr in parents[n]):
            continue  # another output of the same node also carries gradient
        below = _descendants(n)
        if all(p is n or p in below for v in below for p, _ in parents.get(v, ())):
            cuts.append((i, below))
    cuts.sort(key=lambda c: -len(c[1]))
    chain: list[tuple[int, set[Node]]] = []
    for i, below in cuts:
        if not chain or nodes[i] in chain[-1][1]:
            chain.append((i, below))
    if not chain:
        return one
    segments: list[list[int]] = [[] for _ in range(len(chain) + 1)]
    for j, n in enumerate(nodes):
        segments[sum(n in below for _, below in chain)].append(j)
    # a cut is requested in the segment above it; list it last there
    out: list[tuple[list[int], int | None]] = []
    for s, members in enumerate(segments):
        cut = chain[s][0] if s < len(chain) else None
        if cut is not None:
            members = [m for m in members if m != cut] + [cut]
        out.append((members, cut))
    return out


def _leaf_node(t: torch.Tensor) -> Node:
    return get_gradient_edge(t).node


def _descendants(n: Node) -> set[Node]:
    out: set[Node] = set()
    todo = [n]
    while todo:
        fn = todo.pop()
        for nxt, _ in fn.next_functions:
            if nxt is not None and nxt not in out:
                out.add(nxt)
                todo.append(nxt)
    return out
