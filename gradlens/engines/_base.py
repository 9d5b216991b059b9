"""The contract every engine fulfils, and what the engines share.

An engine receives the stacked task losses of one probed step and must
1. compute one float64 ``T x T`` Gram matrix per layer of the shared parameters (or of the
   representation, for representation-level engines), and
2. write ``sum_t w_t g_t`` into ``.grad`` of the shared parameters it computed gradients for,
   accumulating as autograd does, and report which parameters those are.
The profiler then runs one weighted backward restricted to every other leaf the losses reach
(task heads and the like), so that all ``.grad`` equal those of ``sum_t w_t L_t``.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, cast

import torch

from gradlens._errors import GradlensError
from gradlens._types import Level
from gradlens.engines._graph import GraphIndex
from gradlens.engines._shared import ROOT_LAYER, SharedParams, resolve_shared

__all__ = [
    "ROOT_LAYER",
    "BackwardContext",
    "Engine",
    "EngineResult",
    "SharedParams",
    "grads_atomic",
    "resolve_shared",
]


@dataclass
class BackwardContext:
    """What the profiler hands an engine at a probed step."""

    losses: torch.Tensor  # (T,)
    weights: torch.Tensor  # (T,), dtype and device of the losses
    #: Shared parameters that the losses reach, in the order of ``SharedParams.named``.
    reached: list[torch.Tensor]
    #: How many graph edges lead to each reached leaf (by id): uses in this forward.
    uses: dict[int, int]
    #: Autograd nodes of the losses' graph (for engines that recorded graph edges).
    nodes: AbstractSet[torch.autograd.graph.Node]
    features: Sequence[torch.Tensor] | None = None
    memory_budget: int = 1 << 30
    #: The scalar losses that ``losses`` stacks (a backward from one of them runs through its own
    #: task's graph only; one from ``losses[t]`` would run through every task's, via the stack).
    task_losses: Sequence[torch.Tensor] | None = None
    #: Every leaf the losses reach (by id), shared or not.
    leaves: Mapping[int, torch.Tensor] = field(default_factory=dict)
    #: Whether the engine may write ``.grad`` of leaves other than the shared parameters (False
    #: for ``Profiler.observe``: there the engine writes only the shared parameters' ``.grad``,
    #: which the profiler puts back).
    write: bool = True
    #: The caller's ``retain_graph`` (for an engine that runs the last backward itself).
    retain_graph: bool = False
    #: A Gram weighting's step (weights known only once the Grams are): keep the per-task blocks
    #: that writing ``J_l^T w_l`` needs, if they fit ``memory_budget``, and return a writer in
    #: ``EngineResult.writer`` (the ``.grad`` writes of ``compute`` are then discarded).
    keep_blocks: bool = False
    #: The index of the losses' graph (one walk, see :mod:`gradlens.engines._graph`); None when
    #: the caller built none (engines then walk what they need themselves).
    graph: GraphIndex | None = None
    #: Ids of the leaves whose gradient is sparse (``nn.Embedding(sparse=True)``): only an
    #: engine with ``sparse_grads`` is given shared ones; others may meet them among the heads.
    sparse: AbstractSet[int] = frozenset()

    def per_task(self) -> list[torch.Tensor]:
        """The per-task scalar losses (``task_losses``, or ``losses`` unbound as a fallback)."""
        return (
            list(self.task_losses) if self.task_losses is not None else list(self.losses.unbind(0))
        )


@dataclass
class EngineResult:
    """Per-layer Grams (float64, on the losses' device) and what the engine wrote."""

    layer_grams: dict[str, torch.Tensor]
    rules: dict[str, str] = field(default_factory=dict)
    #: Parameters whose ``.grad`` the engine wrote (by id).
    written: set[int] = field(default_factory=set)
    #: With ``ctx.keep_blocks``: adds ``sum_t w_{l,t} g_{l,t}`` to ``.grad`` of every reached
    #: shared parameter, given ``{layer: (T,) weights}``; None when the engine kept no blocks.
    writer: Callable[[Mapping[str, torch.Tensor]], None] | None = None
    #: The engine that computed this result (``auto`` names the candidate it ran).
    engine: str | None = None
    #: Seconds each candidate engine took on a probe of this graph shape (``auto`` only).
    timings: dict[str, float] = field(default_factory=dict)
    #: Facts about this probe worth recording in the Snapshot (see ``Snapshot.notes``).
    notes: list[str] = field(default_factory=list)
    #: ``layer_grams``' values as the rows of one ``(L, T, T)`` tensor, in the same order, when
    #: the engine computed them so (the profiler then stacks nothing); None otherwise.
    stacked: torch.Tensor | None = None


class Engine(ABC):
    """Base class of the engines; see the module docstring for the contract."""

    name: ClassVar[str]
    level: ClassVar[Level] = "parameters"
    needs_features: ClassVar[bool] = False
    #: Whether the engine relies on forward hooks (a forward they did not see costs it speed).
    uses_hooks: ClassVar[bool] = False
    #: Whether the engine takes shared parameters whose gradient is sparse (``nn.Embedding(...,
    #: sparse=True)``): it then writes them a sparse ``.grad``, as autograd does.
    sparse_grads: ClassVar[bool] = False
    #: Whether the engine runs the shared part's backward once, without keeping the graph
    #: (all that a torch.compile'd graph whose backward donates its buffers allows).
    one_pass: ClassVar[bool] = False

    def __init__(self, shared: SharedParams, n_tasks: int) -> None:
        self.shared = shared
        self.n_tasks = n_tasks

    def attach(self) -> None:
        """Install whatever hooks the engine needs (called once by the profiler)."""

    def detach(self) -> None:
        """Remove every hook; must be idempotent."""

    def set_recording(self, on: bool) -> None:
        """Tell the engine whether the coming forward pass belongs to a probed step."""

    def discard(self) -> None:
        """Drop what the hooks recorded for the current step (another engine served it)."""

    def release(self) -> None:
        """Free the buffers kept from one probe to the next (``auto``: a candidate that lost)."""

    def shared_changed(self) -> None:
        """The shared parameters were replaced (:meth:`SharedParams.follow`): drop whatever was
        planned for the old ones (called by the profiler before the probe's ``compute``)."""

    @abstractmethod
    def compute(self, ctx: BackwardContext) -> EngineResult:
        """Compute the per-layer Grams and write the weighted gradient (see module docstring)."""


@contextmanager
def grads_atomic(leaves: Collection[torch.Tensor]) -> Iterator[None]:
    """The block's ``.grad`` writes to ``leaves`` land together or not at all.

    The writes go where they would (into a ``.grad`` already there, in place: hooks on the
    leaves and views into a gradient bucket see what they saw before); a copy of each ``.grad``
    already there is kept for the block, and on an exception every ``.grad`` is put back as it
    was (its values into the same tensor; None where it was None): a failed probe (a user's
    error in a backward, an out-of-memory error, an interrupt) leaves no half-written gradient
    for a retry to count twice. The cost: one read of each ``.grad`` and, where gradients
    accumulate, a copy of them alive for the block.

    >>> p = torch.zeros(2, requires_grad=True)
    >>> p.grad = torch.ones(2)
    >>> with grads_atomic([p]):
    ...     p.grad += 2.0
    >>> p.grad.tolist()
    [3.0, 3.0]
    >>> try:
    ...     with grads_atomic([p]):
    ...         p.grad += 5.0
    ...         raise KeyError("a failure after a write")
    ... except KeyError:
    ...     pass
    >>> p.grad.tolist()
    [3.0, 3.0]
    """
    with torch.no_grad():
        held = [(p, g, g.clone()) for p in leaves if (g := p.grad) is not None]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for p in leaves:
                p.grad = None
            for p, g, copy in held:
                p.grad = g.copy_(copy)  # the same tensor, its values (sparse ones too)
        raise


def accumulate_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """Add ``g`` to ``p.grad`` as autograd's accumulation does (set when None).

    ``g`` is cast to the dtype of the parameter's gradient, :func:`grad_dtype` (rules may
    compute in a wider one under autocast).
    """
    g = g.detach()
    if g.shape != p.shape:  # each call below costs a dispatch even when it changes nothing
        g = g.reshape(p.shape)
    want = grad_dtype(p)
    if g.dtype != want:
        g = g.to(want)
    grad = p.grad
    if g.is_sparse:  # a sparse gradient (nn.Embedding(sparse=True)): kept sparse, as autograd's
        p.grad = g if grad is None else grad.add_(g)
        return
    if grad is not None and grad.is_sparse:  # a dense gradient into a sparse .grad: autograd
        p.grad = g + grad  # adds out of place (the sum is dense)
        return
    if grad is None:
        # alias a tensor that owns exactly its storage (as autograd steals a fresh gradient);
        # copy a slice of a larger buffer or a strided view. Autograd's layout contract: a new
        # .grad has its parameter's strides (all of them: a channels-last 1 x 1 convolution's
        # weight is also "contiguous", with other strides)
        own = g.untyped_storage().nbytes() == g.numel() * g.element_size()
        p.grad = g if own and g.stride() == p.stride() else new_grad(p, g)
    else:
        grad.add_(g)


def grad_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype autograd gives ``p.grad``: ``p.grad_dtype`` where it is set (torch 2.9 and
    later: a bfloat16 parameter may keep a float32 gradient), else the parameter's dtype (a
    ``grad_dtype`` of None admits any dtype, and a plain backward leaves the parameter's).

    >>> p = torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)
    >>> grad_dtype(p)
    torch.bfloat16
    >>> p.grad_dtype = torch.float32
    >>> grad_dtype(p)
    torch.float32
    """
    d = getattr(p, "grad_dtype", None)
    return p.dtype if d is None else d


def new_grad(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A copy of ``g`` laid out as ``p`` (autograd's gradient layout contract: a channels-last
    weight gets a channels-last ``.grad``).

    >>> p = torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last)
    >>> new_grad(p, torch.ones(2, 3, 4, 4)).stride() == p.stride()
    True
    """
    return torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)


def accumulate_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """:func:`accumulate_grad` for many parameters: the additions into existing ``.grad`` of
    the same shape and dtype in one ``torch._foreach_add_`` call (the same sums, one dispatch
    instead of one per parameter), the others one at a time.

    >>> p, q = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    >>> p.grad = torch.ones(2)
    >>> accumulate_grads([p, q], [torch.ones(2), torch.arange(3.0)])
    >>> p.grad.tolist(), q.grad.tolist()
    ([2.0, 2.0], [0.0, 1.0, 2.0])
    """
    into: list[torch.Tensor] = []
    adds: list[torch.Tensor] = []
    for p, g in zip(params, grads):
        grad = p.grad
        if (
            grad is not None
            and g.dtype is grad.dtype
            and g.shape == grad.shape
            and not grad.is_sparse
            and not g.is_sparse
        ):  # (a .grad is on its parameter's device, where the engines compute its gradient)
            into.append(grad)
            adds.append(g)
        else:
            accumulate_grad(p, g)
    with torch.no_grad():  # as the detach of accumulate_grad: .grad never joins a graph
        if len(into) > 1:
            torch._foreach_add_(into, adds)
        elif into:
            into[0].add_(adds[0])


class Workspace:
    """Large per-probe buffers kept from one probe to the next, on CPU.

    A fresh large CPU allocation is mapped anew and pays a page fault per 4 KiB page on first
    touch (glibc maps blocks above 32 MiB for each allocation, and smaller ones once its
    threshold has moved; ``benchmarks/page_faults.py`` on the reference machine: stacking 40
    rows of 0.75 MiB into a new buffer took ~20 ms, 225 ms once under load, ~3 ms into a reused
    one). CUDA tensors come from the caching allocator instead.
    """

    def __init__(self) -> None:
        self._bufs: dict[object, torch.Tensor] = {}

    def get(
        self, key: object, shape: Sequence[int], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """An uninitialised buffer of this shape (the same one as last time when it fits)."""
        if device.type != "cpu":
            return torch.empty(tuple(shape), dtype=dtype, device=device)
        b = self._bufs.get(key)
        if b is None or b.shape != tuple(shape) or b.dtype != dtype:
            b = torch.empty(tuple(shape), dtype=dtype, device=device)
            self._bufs[key] = b
        return b

    def holds(self, key: object, buf: torch.Tensor) -> bool:
        """Whether ``buf`` is the buffer kept under ``key``."""
        return self._bufs.get(key) is buf

    def clear(self) -> None:
        """Release every buffer."""
        self._bufs.clear()


def batched_grad(
    losses: torch.Tensor,
    inputs: Sequence[torch.Tensor | torch.autograd.graph.GradientEdge],
    tasks: slice | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """One batched backward: the gradient of each selected task's loss w.r.t. each input.

    Returns, for each input, a tensor of shape ``(n_selected, *input.shape)`` (None when no
    selected loss reaches it).
    """
    T = losses.shape[0]
    eye = torch.eye(T, dtype=losses.dtype, device=losses.device)
    if tasks is not None:
        eye = eye[tasks]
    with quiet_vmap(legacy=True):
        return torch.autograd.grad(
            losses,
            grad_inputs(inputs),
            grad_outputs=eye,
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )


def per_task_grad(
    losses: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor | torch.autograd.graph.GradientEdge],
    shapes: Sequence[Sequence[int]],
) -> list[torch.Tensor]:
    """Each task's gradient w.r.t. each input by one small backward per task, stacked (T, ...).

    Used where the inputs sit just below the task heads: task t's backward only runs through the
    part of the graph between its own loss and the inputs (its head), so the cost grows linearly
    with T, where a batched backward would push all T cotangents through every head.
    """
    T = len(losses)
    ref = losses[0]
    got: list[list[torch.Tensor | None]] = [[] for _ in inputs]
    for t in range(T):
        gs = torch.autograd.grad(
            losses[t], grad_inputs(inputs), retain_graph=True, allow_unused=True
        )
        for k, g in enumerate(gs):
            got[k].append(g)
    out = []
    for row, shape in zip(got, shapes):
        like = next((g for g in row if g is not None), None)
        dtype = ref.dtype if like is None else like.dtype
        zeros = torch.zeros(tuple(shape), dtype=dtype, device=ref.device)
        out.append(torch.stack([zeros if g is None else g for g in row]))
    return out


def batched_grad_from(
    outputs: Sequence[torch.autograd.graph.GradientEdge],
    cotangents: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor | torch.autograd.graph.GradientEdge],
    retain_graph: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """Batched backward from intermediate ``outputs`` with (T, ...) ``cotangents``."""
    if not inputs:
        return ()
    with quiet_vmap(legacy=True):
        return torch.autograd.grad(
            list(outputs),
            grad_inputs(inputs),
            grad_outputs=list(cotangents),
            is_grads_batched=True,
            retain_graph=retain_graph,
            allow_unused=True,
        )


def looped_grad_from(
    outputs: Sequence[torch.autograd.graph.GradientEdge],
    cotangents: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor | torch.autograd.graph.GradientEdge],
    retain_graph: bool = True,
) -> list[torch.Tensor | None]:
    """As :func:`batched_grad_from`, by one backward per task (stacked; None where unreached).

    On CPU, vmap has no efficient batching rule for convolution backward (it loops over the T
    cotangents and concatenates T-fold activations); one plain backward per task is faster there.
    """
    if not inputs:
        return []
    T = cotangents[0].shape[0]
    got: list[list[torch.Tensor | None]] = [[] for _ in inputs]
    for t in range(T):
        gs = torch.autograd.grad(
            list(outputs),
            grad_inputs(inputs),
            grad_outputs=[c[t] for c in cotangents],
            retain_graph=retain_graph or t < T - 1,
            allow_unused=True,
        )
        for k, g in enumerate(gs):
            got[k].append(g)
    out: list[torch.Tensor | None] = []
    for row in got:
        like = next((g for g in row if g is not None), None)
        if like is None:
            out.append(None)
        else:
            out.append(torch.stack([torch.zeros_like(like) if g is None else g for g in row]))
    return out


def grad_inputs(
    inputs: Sequence[torch.Tensor | torch.autograd.graph.GradientEdge],
) -> Sequence[torch.Tensor]:
    """``inputs`` for ``torch.autograd.grad``: autograd accepts tensors and gradient edges mixed
    in one sequence, which torch's annotations (a sequence of one kind) do not express."""
    return cast("Sequence[torch.Tensor]", list(inputs))


@contextmanager
def quiet_vmap(legacy: bool = False) -> Iterator[None]:
    """Silence vmap's slow-path notice inside the block (also used by ``gradlens bench``).

    The notice ("There is a performance drop because we have not yet implemented the batching
    rule for ...") is not the user's concern: the result is exact either way. ``legacy``: the
    block runs only ``autograd.grad(is_grads_batched=True)``, whose (legacy) vmap emits the
    notice only once ``torch._C._debug_only_display_vmap_fallback_warnings(True)`` was called;
    the warnings filters are then left alone unless it was (saving their copy at every call).
    """
    enabled = getattr(torch._C, "_debug_only_are_vmap_fallback_warnings_enabled", None)
    if legacy and enabled is not None and not enabled():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        yield


def gram_of_rows(
    rows: Sequence[torch.Tensor], other: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """``sum_k R_k O_k^T`` over blocks of shape (T, ...) flattened per task, in float64 output.

    Half-precision blocks (autocast) are multiplied in float32 at least.
    """
    other = rows if other is None else other
    total: torch.Tensor | None = None
    for r, o in zip(rows, other):
        r2 = r.reshape(r.shape[0], -1)
        o2 = o.reshape(o.shape[0], -1)
        r2, o2 = r2.to(compute_dtype(r2.dtype)), o2.to(compute_dtype(o2.dtype))
        g = (r2 @ o2.T).to(torch.float64)
        total = g if total is None else total + g
    if total is None:
        raise GradlensError("internal: gram_of_rows needs at least one block")
    return total


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype Grams are multiplied in: ``dtype`` promoted to float32 at least."""
    return torch.promote_types(dtype, torch.float32)


def group_by_layer(
    shared: SharedParams, params: Iterable[torch.Tensor]
) -> Mapping[str, list[torch.Tensor]]:
    """Group parameters by their layer, in layer order."""
    out: dict[str, list[torch.Tensor]] = {}
    for p in params:
        out.setdefault(shared.layer_of[id(p)], []).append(p)
    return {layer: out[layer] for layer in shared.layers if layer in out}
