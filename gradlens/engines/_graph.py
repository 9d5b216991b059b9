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
what was derived from the structure of the first one (the cut plan, the heads' split, whether the
losses reach past the shared outputs: :meth:`GraphIndex.memo`), rebound by position to the new
graph's nodes, which are new objects at every step. Nothing but positions is kept between
probes, so a graph of another shape can never be served a stale node. One kept fact is not read
from the structure: which leaves a custom ``autograd.Function`` gives a sparse gradient, learned
by one backward on the first graph of each signature (:meth:`GraphIndex.sparse_leaves`).

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

from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import TypeVar, cast

import torch
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import Node

from gradlens._errors import GradlensError

__all__ = ["COMPILED", "REENTRANT", "GraphIndex", "Signature"]

T_ = TypeVar("T_")

#: The autograd node of ``checkpoint(..., use_reentrant=True)``.
REENTRANT = "CheckpointFunctionBackward"
#: The autograd node of a torch.compile'd graph (aot_autograd's ``CompiledFunction``).
COMPILED = "CompiledFunctionBackward"
#: Autograd nodes that give a leaf below them a sparse gradient, with the saved flag that says
#: so (``nn.Embedding(..., sparse=True)``, ``torch.gather(..., sparse_grad=True)``).
_SPARSE_NODES = {
    "EmbeddingBackward0": "_saved_sparse",
    "EmbeddingBagBackward0": "_saved_sparse",
    "GatherBackward0": "_saved_sparse_grad",
}
#: What :meth:`GraphIndex.sparse_leaves` names as the source of a sparse gradient, by node type.
_SPARSE_SOURCES = {
    "EmbeddingBackward0": "nn.Embedding(sparse=True)",
    "EmbeddingBagBackward0": "nn.EmbeddingBag(sparse=True)",
    "GatherBackward0": "torch.gather(sparse_grad=True)",
}
#: At most this many graph signatures' learned facts are kept (:meth:`GraphIndex.sparse_leaves`).
_MAX_CUSTOM = 64

_REENTRANT_MESSAGE = (
    "`losses` come from a model that uses reentrant activation checkpointing "
    "(torch.utils.checkpoint.checkpoint(..., use_reentrant=True), or Hugging Face's "
    "gradient_checkpointing_enable() with use_reentrant=True), which supports no "
    "per-task gradient (autograd.grad): pass use_reentrant=False (HF: "
    "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
    "False})). Nothing was written: .grad and the profiler's step are unchanged."
)


class Signature:
    """A graph's shape (see :attr:`GraphIndex.signature`), hashed once.

    Equal signatures mean equal node types and equal ``next_functions`` (child positions and
    ``output_nr``, None entries at the same places), node by node in walk order: every fact about
    the graph that is a function of its structure alone (the heads' split, the cut plan, whether
    the losses reach past the shared outputs) holds for both, position by position. Caches of
    such facts key on it and rebind positions to the new graph's nodes.
    """

    __slots__ = ("_hash", "value")

    def __init__(self, value: tuple[object, ...]) -> None:
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Signature):
            return NotImplemented
        return self is other or (self._hash == other._hash and self.value == other.value)

    def __repr__(self) -> str:
        return f"Signature(nodes={len(self.value[0])}, hash={self._hash:#x})"  # type: ignore[arg-type]  # value[0] is the tuple of node types


#: Facts derived from a graph's structure, by (kind, signature, positions...): see ``memo``.
_DERIVED: dict[tuple[object, ...], object] = {}
_MAX_DERIVED = 64


class GraphIndex:
    """The autograd graph below ``L.grad_fn``, walked once (see the module docstring).

    Attributes:
        nodes: the graph's nodes in walk order (position = index in this list).
        pos: node -> position.
        edges: per position, its ``(child position, output_nr)`` pairs (``next_functions``
            without the Nones; a child reached twice appears twice).
        leaves: every leaf tensor reached, by id.
        uses: edges leading to each leaf, by id (its uses in this forward).
        signature: the graph's shape (node types and every node's ``next_functions`` as
            positions, Nones included); equal for two graphs recorded by the same code on
            inputs of the same structure (see :class:`Signature`).
    """

    def __init__(
        self,
        nodes: list[Node],
        flat: list[int],
        leaves: dict[int, torch.Tensor],
        uses: dict[int, int],
        leaf_at: dict[int, torch.Tensor],
        pos: dict[Node, int] | None = None,
    ) -> None:
        self.nodes = nodes
        self.pos = {n: i for i, n in enumerate(nodes)} if pos is None else pos
        self.leaves = leaves
        self.uses = uses
        #: the leaf tensor of each AccumulateGrad node, by position
        self.leaf_at = leaf_at
        #: each node's type, by position
        self.types: tuple[type, ...] = tuple(map(type, nodes))
        #: per node in walk order: the length of its ``next_functions``, then each entry's
        #: ``(child position, output_nr)`` (position -1 for a None entry)
        self.flat = flat
        self.signature = Signature((self.types, tuple(flat)))
        self._edges: list[tuple[tuple[int, int], ...]] | None = None
        self._starts: list[int] | None = None
        self._node_set: set[Node] | None = None
        #: the leaves :meth:`sparse_leaves` found, by id: what gives them a sparse gradient
        self.sparse_from: dict[int, str] = {}

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
        leaves: dict[int, torch.Tensor] = {}
        uses: dict[int, int] = {}
        leaf_at: dict[int, torch.Tensor] = {}  # position -> leaf tensor (AccumulateGrad nodes)
        flat: list[int] = []
        holds, pos_get, add_node, add = _LEAF_TYPES, pos.get, nodes.append, flat.append
        # breadth first: positions are assigned in a fixed order (the loop reads the nodes the
        # walk appends to the list it iterates); one flat list of ints is the whole structure
        for fn in nodes:
            fns = fn.next_functions
            add(len(fns))
            for nxt, nr in fns:
                if nxt is None:
                    add(-1)
                    add(nr)
                    continue
                j = pos_get(nxt)
                if j is None:
                    j = pos[nxt] = len(nodes)
                    add_node(nxt)
                    leafy = holds.get(type(nxt))
                    if leafy is None:
                        leafy = _holds_leaf(type(nxt))
                    if leafy:
                        var = nxt.variable  # type: ignore[attr-defined]  # AccumulateGrad's
                        leaves[id(var)] = leaf_at[j] = var
                        uses[id(var)] = 1
                elif j in leaf_at:
                    uses[id(leaf_at[j])] += 1
                add(j)
                add(nr)
        return cls(nodes, flat, leaves, uses, leaf_at, pos)

    @property
    def edges(self) -> list[tuple[tuple[int, int], ...]]:
        """Per position, its ``(child position, output_nr)`` pairs (``next_functions``
        without the Nones; a child reached twice appears twice); built on first use."""
        if self._edges is None:
            flat, out, k = self.flat, [], 0
            for _ in self.nodes:
                n = flat[k]
                pairs = flat[k + 1 : k + 1 + 2 * n]
                out.append(tuple((j, nr) for j, nr in zip(pairs[::2], pairs[1::2]) if j >= 0))
                k += 1 + 2 * n
            self._edges = out
        return self._edges

    @property
    def node_set(self) -> set[Node]:
        """The graph's nodes as a set (built on first use)."""
        if self._node_set is None:
            self._node_set = set(self.nodes)
        return self._node_set

    def next_functions(self, fn: Node) -> tuple[tuple[Node | None, int], ...]:
        """``fn.next_functions``, rebuilt from the index when ``fn`` is in it."""
        i = self.pos.get(fn)
        if i is None:
            return fn.next_functions
        nodes, out = self.nodes, []
        for j, nr in self._entries(i):
            out.append((None if j < 0 else nodes[j], nr))
        return tuple(out)

    def _entries(self, i: int) -> list[tuple[int, int]]:
        """Node ``i``'s ``next_functions`` as ``(position or -1, output_nr)``."""
        if self._starts is None:
            starts, k = [], 0
            for _ in self.nodes:
                starts.append(k)
                k += 1 + 2 * self.flat[k]
            self._starts = starts
        k = self._starts[i]
        pairs = self.flat[k + 1 : k + 1 + 2 * self.flat[k]]
        return list(zip(pairs[::2], pairs[1::2]))

    def memo(self, key: tuple[object, ...], compute: Callable[[], T_]) -> T_:
        """A fact about this graph's structure, computed once per signature and ``key``.

        ``compute`` must depend only on the structure and on what ``key`` holds (positions,
        not nodes or tensors: those are new objects at every step); the fact is then valid for
        any graph of the same signature. Bounded: a new entry evicts the oldest.
        """
        full = (key, self.signature)
        if full in _DERIVED:
            return cast("T_", _DERIVED[full])
        got = compute()
        for old in list(_DERIVED)[: max(0, len(_DERIVED) - _MAX_DERIVED + 1)]:
            _DERIVED.pop(old, None)  # (tolerant of another thread's eviction)
        _DERIVED[full] = got
        return got

    def descendants(self, start: Iterable[int]) -> set[int]:
        """The positions reached from those in ``start`` by one edge or more.

        >>> x = torch.ones(2, requires_grad=True)
        >>> g = GraphIndex.build(torch.stack([(x.exp() * 2).sum()]))
        >>> [g.types[i].__name__ for i in sorted(g.descendants([g.pos[g.nodes[1]]]))]
        ['MulBackward0', 'ExpBackward0', 'AccumulateGrad']
        """
        seen: set[int] = set()
        todo = [j for i in start for j, _ in self.edges[i]]
        while todo:
            j = todo.pop()
            if j not in seen:
                seen.add(j)
                todo += [k for k, _ in self.edges[j]]
        return seen

    def types_between(self, tops: Sequence[Node], targets: Sequence[Node]) -> frozenset[str]:
        """The type names of the nodes a backward from ``tops`` to ``targets`` runs: those below
        ``tops`` (themselves included) from which a target is reached by one edge or more (a
        target's own node runs only when another target lies below it). Computed once per
        signature and positions (see :meth:`memo`).

        >>> x = torch.ones(2, requires_grad=True)
        >>> h = torch.exp(x)
        >>> y = torch.relu(h * 2)
        >>> g = GraphIndex.build(torch.stack([y.sum()]))
        >>> sorted(g.types_between([y.grad_fn], [h.grad_fn]))  # exp's node does not run
        ['MulBackward0', 'ReluBackward0']
        """
        pos = self.pos
        start = tuple(sorted({pos[n] for n in tops if n in pos}))
        ends = tuple(sorted({pos[n] for n in targets if n in pos}))
        key = ("types-between", start, ends)
        return self.memo(key, lambda: self._types_between(start, frozenset(ends)))

    def _types_between(self, start: tuple[int, ...], ends: frozenset[int]) -> frozenset[str]:
        edges, types = self.edges, self.types
        seen = set(start)
        todo = list(start)
        parents: dict[int, list[int]] = {}
        while todo:
            i = todo.pop()
            for j, _ in edges[i]:
                parents.setdefault(j, []).append(i)
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        runs: set[int] = set()
        todo = [j for j in ends if j in seen]
        while todo:  # upwards from the targets: every node with an edge into them runs
            for i in parents.get(todo.pop(), ()):
                if i not in runs:
                    runs.add(i)
                    todo.append(i)
        return frozenset(types[i].__name__ for i in runs)

    def sparse_leaves(
        self, L: torch.Tensor | None = None, learned: dict[object, dict[int, str]] | None = None
    ) -> set[int]:
        """Ids of the leaves whose gradient autograd makes sparse: the weight of an
        ``nn.Embedding`` or ``nn.EmbeddingBag`` with ``sparse=True`` and the input of a
        ``torch.gather(..., sparse_grad=True)`` (their nodes' saved flags say so), and a leaf
        to which a custom ``torch.autograd.Function`` just above it (its node a
        ``BackwardCFunction``, ``torch.library`` ops' included) returns a sparse tensor.

        Only running a custom backward tells what it returns: with ``L`` (the losses this index
        was built from; any other tensor teaches nothing) and ``learned`` (the caller's record
        of what it learned, by graph signature: a profiler keeps its own, so that another model
        of the same structure whose Function behaves otherwise is not served this one's), the
        first graph of each signature with a custom node above a leaf (its input, or through
        one-input nodes such as ``t``) runs one backward of ``L.sum()`` to those leaves
        (``autograd.grad``: no ``.grad`` written, the graph kept; a user's error in it
        propagates as raised), a hook on those nodes reading the layout of what they return;
        every later graph of the signature uses what was learned (a custom backward whose
        layout depends on the data is taken as it was then). Without ``L``, what ``learned``
        holds; without ``learned``, the nodes' flags only. :attr:`sparse_from` then names the
        source of each.

        >>> emb = torch.nn.Embedding(5, 2, sparse=True)
        >>> g = GraphIndex.build(torch.stack([emb(torch.tensor([1, 3])).sum()]))
        >>> g.sparse_leaves() == {id(emb.weight)}, g.sparse_from[id(emb.weight)]
        (True, 'nn.Embedding(sparse=True)')
        """
        where = self.memo(("sparse-nodes",), self._embedding_nodes)
        out = self.sparse_from
        out.clear()
        for i, leaves in where:
            name = self.types[i].__name__
            if getattr(self.nodes[i], _SPARSE_NODES[name], False):  # the node's saved flag
                out.update((id(self.leaf_at[j]), _SPARSE_SOURCES[name]) for j in leaves)
        for j, name in self._custom_sparse(L, learned).items():
            out.setdefault(id(self.leaf_at[j]), f"the custom autograd.Function node {name}")
        return set(out)

    def donating(self) -> list[str]:
        """The torch.compile'd graphs in this one whose compiled backward donates its saved
        buffers (``torch._functorch.config.donated_buffer``, on by default, and buffers found
        to donate: e.g. a graph recompiled with dynamic shapes): autograd can run such a
        backward once per forward, and not keep the graph. Each named by its node type and
        aot id.

        >>> GraphIndex.build(torch.ones(2, requires_grad=True).sum()).donating()
        []
        """
        at = self.memo(("compiled-nodes",), self._compiled_nodes)
        if not at:
            return []
        import torch._functorch.config as functorch_config

        if not functorch_config.donated_buffer:  # (read at backward time, as torch does)
            return []
        out = []
        for i in at:
            cls = getattr(self.nodes[i], "_forward_cls", None)
            if getattr(getattr(cls, "metadata", None), "bw_donated_idxs", None):
                out.append(f"{COMPILED} (aot id {getattr(cls, '_aot_id', '?')})")
        return out

    def _compiled_nodes(self) -> list[int]:
        return [i for i, t in enumerate(self.types) if t.__name__ == COMPILED]

    def compiled_reads(self, ids: AbstractSet[int]) -> bool:
        """Whether a torch.compile'd graph in this one reads a leaf of ``ids`` directly (a
        module compiled as part of a larger one: its parameters are the compiled graph's
        inputs, which a batched (vmap) backward cannot run through).

        >>> GraphIndex.build(torch.ones(2, requires_grad=True).sum()).compiled_reads({1})
        False
        """
        at = self.memo(("compiled-nodes",), self._compiled_nodes)
        if not at:  # (the edges' lists cost a pass over the whole graph)
            return False
        leaf_at, edges = self.leaf_at, self.edges
        return any(
            j in leaf_at and id(leaf_at[j]) in ids for i in at for j, _ in edges[i]
        )

    def _embedding_nodes(self) -> list[tuple[int, list[int]]]:
        """Positions of the embedding backward nodes, each with its leaf children's."""
        return [
            (i, [j for j, _ in self.edges[i] if j in self.leaf_at])
            for i, t in enumerate(self.types)
            if t.__name__ in _SPARSE_NODES
        ]

    def _custom_nodes(self) -> list[tuple[int, list[tuple[int, int]]]]:
        """Positions of the custom Functions' nodes above a leaf, each with those leaves as
        ``(index in next_functions, leaf position)``: a leaf child, or a leaf at the end of a
        chain of one-input nodes (a Function applied to ``W.t()`` or ``W.to(dtype)``)."""
        out = []
        edges, leaf_at = self.edges, self.leaf_at
        for i, t in enumerate(self.types):
            if issubclass(t, BackwardCFunction):
                kids = []
                for k, (j, _) in enumerate(self._entries(i)):
                    while j >= 0 and j not in leaf_at and len(edges[j]) == 1:
                        j = edges[j][0][0]
                    if j in leaf_at:
                        kids.append((k, j))
                if kids:
                    out.append((i, kids))
        return out

    def _custom_sparse(
        self, L: torch.Tensor | None, learned: dict[object, dict[int, str]] | None
    ) -> dict[int, str]:
        """Leaf positions a custom Function gives a sparse gradient, with its node's type
        name: learned once per signature from ``L`` into ``learned`` (see
        :meth:`sparse_leaves`)."""
        if learned is None:
            return {}
        custom = self.memo(("custom-nodes",), self._custom_nodes)
        if not custom or self.donating():  # (a backward that keeps the graph would raise)
            return {}
        got = learned.get(self.signature)
        if got is None and L is not None and L.grad_fn is self.nodes[0]:  # this index's graph
            got = _learn_sparse(L, [(self.nodes[i], kids) for i, kids in custom], self.leaf_at)
            for old in list(learned)[: max(0, len(learned) - _MAX_CUSTOM + 1)]:
                learned.pop(old, None)
            learned[self.signature] = got
        return got or {}

    def reaches_past(self, stop: set[Node], inside: set[Node], shared_ids: set[int]) -> bool:
        """Whether the graph reaches a node of ``inside`` or a leaf in ``shared_ids`` from the
        root without crossing ``stop`` (the shared part's output nodes)."""
        if not self.nodes:
            return False
        pos = self.pos
        stop_i = frozenset(pos[n] for n in stop if n in pos)
        inside_i = frozenset(pos[n] for n in inside if n in pos)
        shared_i = frozenset(j for j, var in self.leaf_at.items() if id(var) in shared_ids)
        return self.memo(
            ("reaches_past", stop_i, inside_i, shared_i),
            lambda: self._reaches_past(stop_i, inside_i | shared_i),
        )

    def _reaches_past(self, stop_i: frozenset[int], hit: frozenset[int]) -> bool:
        edges = self.edges
        seen = {0}
        todo = [0]
        while todo:
            for j, _ in edges[todo.pop()]:
                if j in seen:
                    continue
                seen.add(j)
                if j in stop_i:
                    continue
                if j in hit:
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


def _learn_sparse(
    L: torch.Tensor,
    custom: Sequence[tuple[Node, Sequence[tuple[int, int]]]],
    leaf_at: dict[int, torch.Tensor],
) -> dict[int, str]:
    """Run one backward of ``L.sum()`` to the leaf children of the custom nodes ``custom``
    (``autograd.grad``, graph kept) and return the leaf positions to which a node returned a
    sparse (not strided) gradient, with the node's type name."""
    found: dict[int, str] = {}

    def reader(node: Node, kids: Sequence[tuple[int, int]]) -> Callable[..., None]:
        def hook(grad_inputs: tuple[torch.Tensor | None, ...], _: object) -> None:
            for k, j in kids:
                g = grad_inputs[k]
                if g is not None and g.layout is not torch.strided:
                    found[j] = type(node).__name__

        return hook

    leaves = {id(leaf_at[j]): leaf_at[j] for _, kids in custom for _, j in kids}
    handles = [node.register_hook(reader(node, kids)) for node, kids in custom]
    try:
        torch.autograd.grad(L.sum(), list(leaves.values()), retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return found
