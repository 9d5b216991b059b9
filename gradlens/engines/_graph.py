"""One index of the losses' autograd graph per probe, built in one walk, serving every user.

A probe needs several facts about the graph of the stacked losses: the leaves it reaches and how
many edges lead to each (the profiler, the rules' use counts), the set of its nodes (which
recorded layer calls belong to this graph), whether the losses reach the shared part other than
through its outputs, which task owns each node just above the shared outputs (the heads' split,
:mod:`gradlens.engines._capture`), and where the backward through the shared part can be cut
(:mod:`gradlens.engines._segments`). :class:`GraphIndex` reads every node's ``next_functions``
once (each read builds Python tuples from autograd's C++ edges) and keeps the adjacency as
integer positions; the later passes run over those lists. Its ``signature`` (node types and
edges, in walk order) identifies the graph's shape: a probe of a graph with the same shape reuses
the cut plan computed for the first one.

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(3, 2)
    >>> L = torch.stack([lin(torch.randn(4, 3)).sum(), lin.weight.sum()])
    >>> g = GraphIndex.build(L)
    >>> sorted(g.uses[id(p)] for p in lin.parameters())
    [1, 2]
    >>> g.signature == GraphIndex.build(L).signature
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.graph import Node

from gradlens._errors import GradlensError

__all__ = ["REENTRANT", "GraphIndex"]

#: The autograd node of ``checkpoint(..., use_reentrant=True)``.
REENTRANT = "CheckpointFunctionBackward"

_REENTRANT_MESSAGE = (
    "`losses` come from a model that uses reentrant activation checkpointing "
    "(torch.utils.checkpoint.checkpoint(..., use_reentrant=True), or Hugging Face's "
    "gradient_checkpointing_enable() with use_reentrant=True), which supports no "
    "per-task gradient (autograd.grad): pass use_reentrant=False (HF: "
    "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
    "False})). Nothing was written: .grad and the profiler's step are unchanged."
)


class GraphIndex:
    """The autograd graph below ``L.grad_fn``, walked once (see the module docstring).

    Attributes:
        nodes: the graph's nodes in walk order (position = index in this list).
        pos: node -> position.
        edges: per position, its ``(child position, output_nr)`` pairs (``next_functions``
            without the Nones; a child reached twice appears twice).
        leaves: every leaf tensor reached, by id.
        uses: edges leading to each leaf, by id (its uses in this forward).
        signature: the graph's shape (node types and edges); equal for two graphs recorded by
            the same code on inputs of the same structure.
    """

    def __init__(
        self,
        nodes: list[Node],
        edges: list[tuple[tuple[int, int], ...]],
        leaves: dict[int, torch.Tensor],
        uses: dict[int, int],
        signature: tuple[object, ...],
    ) -> None:
        self.nodes = nodes
        self.pos = {n: i for i, n in enumerate(nodes)}
        self.edges = edges
        self.leaves = leaves
        self.uses = uses
        self.signature = signature
        #: each node's type, by position
        self.types: tuple[type, ...] = ()
        #: the leaf tensor of each AccumulateGrad node, by position
        self.leaf_at: dict[int, torch.Tensor] = {}
        #: each node's ``next_functions`` as autograd gave them (Nones included), by position
        self.raw: list[tuple[tuple[Node | None, int], ...]] = []
        self._node_set: set[Node] | None = None

    @classmethod
    def build(cls, L: torch.Tensor) -> GraphIndex:
        """Walk the graph of ``L`` once; raises (before any side effect) on a reentrant
        checkpoint, which supports no per-task gradient."""
        index = cls.from_roots([] if L.grad_fn is None else [L.grad_fn])
        if any(t.__name__ == REENTRANT for t in set(index.types)):
            raise GradlensError(_REENTRANT_MESSAGE)
        return index

    @classmethod
    def from_roots(cls, roots: Sequence[Node]) -> GraphIndex:
        """The graph below ``roots`` (positions 0.. for the distinct roots, in order)."""
        nodes: list[Node] = []
        pos: dict[Node, int] = {}
        for r in roots:
            if r not in pos:
                pos[r] = len(nodes)
                nodes.append(r)
        edges: list[tuple[tuple[int, int], ...]] = []
        leaves: dict[int, torch.Tensor] = {}
        uses: dict[int, int] = {}
        leaf_at: dict[int, torch.Tensor] = {}  # position -> leaf tensor (AccumulateGrad nodes)
        raw: list[tuple[tuple[Node | None, int], ...]] = []
        i = 0
        while i < len(nodes):  # breadth first: positions are assigned in a fixed order
            out = []
            fns = nodes[i].next_functions
            raw.append(fns)
            for nxt, nr in fns:
                if nxt is None:
                    continue
                j = pos.get(nxt)
                if j is None:
                    j = pos[nxt] = len(nodes)
                    nodes.append(nxt)
                    if _holds_leaf(type(nxt)):
                        var = nxt.variable  # type: ignore[attr-defined]  # AccumulateGrad's
                        leaves[id(var)] = leaf_at[j] = var
                        uses[id(var)] = 1
                elif j in leaf_at:
                    uses[id(leaf_at[j])] += 1
                out.append((j, nr))
            edges.append(tuple(out))
            i += 1
        types = tuple(type(n) for n in nodes)
        index = cls(nodes, edges, leaves, uses, (types, tuple(edges)))
        index.pos = pos
        index.types = types
        index.raw = raw
        index.leaf_at = leaf_at
        return index

    @property
    def node_set(self) -> set[Node]:
        """The graph's nodes as a set (built on first use)."""
        if self._node_set is None:
            self._node_set = set(self.nodes)
        return self._node_set

    def next_functions(self, fn: Node) -> tuple[tuple[Node | None, int], ...]:
        """``fn.next_functions``, read from the index when ``fn`` is in it."""
        i = self.pos.get(fn)
        return fn.next_functions if i is None else self.raw[i]

    def reaches_past(self, stop: set[Node], inside: set[Node], shared_ids: set[int]) -> bool:
        """Whether the graph reaches a node of ``inside`` or a leaf in ``shared_ids`` from the
        root without crossing ``stop`` (the shared part's output nodes)."""
        if not self.nodes:
            return False
        edges, leaf_at = self.edges, self.leaf_at
        stop_i = {self.pos[n] for n in stop if n in self.pos}
        inside_i = {self.pos[n] for n in inside if n in self.pos}
        seen = {0}
        todo = [0]
        while todo:
            for j, _ in edges[todo.pop()]:
                if j in seen:
                    continue
                seen.add(j)
                if j in stop_i:
                    continue
                if j in inside_i:
                    return True
                var = leaf_at.get(j)
                if var is not None and id(var) in shared_ids:
                    return True
                todo.append(j)
        return False


_LEAF_TYPES: dict[type, bool] = {}


def _holds_leaf(t: type) -> bool:
    """Whether autograd nodes of type ``t`` hold a leaf tensor (``AccumulateGrad``), cached per
    type (a failed attribute lookup on every node would cost an exception each)."""
    got = _LEAF_TYPES.get(t)
    if got is None:
        got = _LEAF_TYPES[t] = "variable" in dir(t)
    return got
