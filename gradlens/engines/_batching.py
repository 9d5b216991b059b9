"""The vmapped backward of the ``gramian`` engine's second stage on CPU, and the batching rule
torch lacks for it.

The second stage pushes T cotangents through the shared part. ``autograd.grad(...,
is_grads_batched=True)`` runs the backward under torch's legacy vmap, which has no batching rule
for layer norm, GELU, tanh, softmax or attention backward: it loops over the T cotangents there
and stacks the results. ``torch.func.vmap`` around ``autograd.grad`` has batching rules for all
of those but one, the CPU attention backward (``_scaled_dot_product_flash_attention_for_cpu_
backward``); this module supplies it: the T cotangents are stacked along the batch dimension of
the recorded attention inputs (attention is independent across batch elements), one kernel call
for all tasks. Measured (``gradlens bench --zoo`` trunks, batch 4, T = 8, CPU time of one thread,
a loaded machine): the second stage of BERT 10.7 ms by one backward per task, 5.5 ms under the
legacy vmap, 5.2 ms here; ResNet 10.9 / 8.4 / 5.3 ms; ConvNeXt 11.2 / 6.2 / 4.7 ms. Since then,
the legacy vmap's lower cost per node made it the faster route on the small trunks whose second
stage runs only the node types of :data:`LEGACY_FAST` (the MLP and the transformer trunks of the
zoo, see there): :func:`vmapped_grad_from` takes either route.

The rule is registered with the dispatcher only while a :func:`vmapped_grad_from` call that asks
for it runs (``rules=True``; counted, so nested or concurrent calls share one registration), and
removed afterwards: nothing outside a probe sees it.

Example:
    >>> import torch
    >>> from torch.autograd.graph import get_gradient_edge
    >>> q = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    >>> o = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    >>> cot = torch.randn(3, *o.shape, dtype=torch.float64)
    >>> (g,) = vmapped_grad_from([get_gradient_edge(o)], [cot], [q])
    >>> ref = torch.stack([torch.autograd.grad(o, q, c, retain_graph=True)[0] for c in cot])
    >>> torch.allclose(g, ref)
    True
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch.autograd.graph import GradientEdge

from gradlens.engines._base import looped_grad_from, quiet_vmap

__all__ = ["LEGACY_FAST", "batching_rules", "segment_backward", "vmapped_grad_from"]

#: Autograd node types of the second stages that run faster under torch's legacy vmap
#: (``autograd.grad(..., is_grads_batched=True)``) than under ``torch.func.vmap`` on CPU, measured
#: graph by graph (``benchmarks/legacy_batching.py``, one thread): Linear, ReLU, add, mul,
#: sigmoid and views, each with a legacy batching rule (a test checks it), as in the 16-layer
#: MLP; the other types are those the second stages of the ``gradlens bench --zoo`` transformer
#: trunks run (BERT, GPT-2, T5 encoder, ViT: layer norm, GELU, attention, embedding, softmax,
#: ...), faster as a whole under the legacy vmap though it loops over the tasks inside some of
#: these nodes: functorch's per-node cost dominates at their sizes. Convolution and batch norm
#: are left out: the second stages that run them (ResNet, ConvNeXt, MobileNetV2) ran faster under
#: ``torch.func.vmap`` (a ViT's patch embedding lies below its lowest recorded layer and does not
#: run). A second stage that runs only these types takes the legacy vmap (the gramian engine
#: reads them with :meth:`~gradlens.engines._graph.GraphIndex.types_between`, which never lists
#: the leaves' ``AccumulateGrad``: the targets stop there); an unlisted type keeps
#: ``torch.func.vmap``.
LEGACY_FAST = frozenset(
    {
        "AddBackward0",
        "AddmmBackward0",
        "BmmBackward0",
        "CatBackward0",
        "CloneBackward0",
        "EmbeddingBackward0",
        "ExpandBackward0",
        "GeluBackward0",
        "MeanBackward1",
        "MmBackward0",
        "MulBackward0",
        "MulBackward1",
        "NativeLayerNormBackward0",
        "PermuteBackward0",
        "PowBackward0",
        "ReluBackward0",
        "ReshapeAliasBackward0",
        "RsqrtBackward0",
        "SafeSoftmaxBackward0",
        "ScaledDotProductFlashAttentionForCpuBackward0",
        "SelectBackward0",
        "SigmoidBackward0",
        "SplitBackward0",
        "TBackward0",
        "TanhBackward0",
        "TransposeBackward0",
        "UnsafeViewBackward0",
        "UnsqueezeBackward0",
        "ViewBackward0",
    }
)

#: The node type of the CPU attention backward, the op :func:`batching_rules` supplies a rule for.
SDPA_NODE = "ScaledDotProductFlashAttentionForCpuBackward0"

_SDPA_CPU_BACKWARD = "_scaled_dot_product_flash_attention_for_cpu_backward"

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"count": 0, "lib": None}


def _batched_parts() -> tuple[Any, Any, Any]:
    """functorch's unwrap / wrap of batched tensors and its current interpreter (private API)."""
    from torch._C._functorch import _add_batch_dim, _unwrap_batched
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

    return _unwrap_batched, _add_batch_dim, retrieve_current_functorch_interpreter


def _fold(x: torch.Tensor, bdim: int | None, n: int, shape: Sequence[int]) -> torch.Tensor:
    """``x`` (logical shape ``shape``, batched at ``bdim`` or not at all) as ``(n * shape[0],
    *shape[1:])``: the vmapped dimension folded into the leading (batch) dimension."""
    full = x.movedim(bdim, 0) if bdim is not None else x.expand(n, *x.shape)
    full = full.expand(n, *shape)
    return full.reshape(n * shape[0], *shape[1:])


def _sdpa_cpu_backward(
    keyset: object,
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    dropout_p: float,
    is_causal: bool,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, ...]:
    """The batching rule: fold the vmapped dimension into the attention's batch dimension
    (each batch element's attention is independent of the others), one call, unfold."""
    unwrap, wrap, interpreter = _batched_parts()
    interp = interpreter()
    level, n = interp.level(), interp.batch_size()
    tensors = [grad_out, query, key, value, out, logsumexp]
    parts = [unwrap(t, level) for t in tensors]
    mask, mask_dim = unwrap(attn_mask, level) if attn_mask is not None else (None, None)
    op = getattr(torch.ops.aten, _SDPA_CPU_BACKWARD).default
    below = torch._C._ExcludeDispatchKeyGuard(
        torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched)
    )
    with below:
        if all(d is None for _, d in parts) and mask_dim is None:
            return tuple(op(*tensors, dropout_p, is_causal, attn_mask=attn_mask, scale=scale))
        if dropout_p > 0:  # a random mask per call: keep torch's one call per slice
            return _per_slice(op, tensors, attn_mask, dropout_p, is_causal, scale, level, n)
        logical = [t.shape if d is None else t.movedim(d, 0).shape[1:] for t, d in parts]
        b = logical[0][0]
        folded = [_fold(t, d, n, s) for (t, d), s in zip(parts, logical)]
        if mask is not None:
            m = mask.movedim(mask_dim, 0) if mask_dim is not None else mask.unsqueeze(0)
            m = m.reshape(m.shape[0], *([1] * (5 - m.dim())), *m.shape[1:])  # n' x b' x h' x L x S
            mask = m.expand(n, b, *m.shape[2:]).reshape(n * b, *m.shape[2:])
        grads = op(*folded, dropout_p, is_causal, attn_mask=mask, scale=scale)
    return tuple(wrap(g.reshape(n, b, *g.shape[1:]), 0, level) for g in grads)


def _per_slice(
    op: Any,
    tensors: list[torch.Tensor],
    mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    level: int,
    n: int,
) -> tuple[torch.Tensor, ...]:
    """What torch's fallback does: one call per vmapped slice, stacked."""
    unwrap, wrap, _ = _batched_parts()

    def take(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
        if t is None:
            return None
        x, d = unwrap(t, level)
        return cast("torch.Tensor", x if d is None else x.select(d, i))

    outs = [
        op(*[take(t, i) for t in tensors], dropout_p, is_causal, attn_mask=take(mask, i),
           scale=scale)
        for i in range(n)
    ]  # fmt: skip
    return tuple(wrap(torch.stack(gs), 0, level) for gs in zip(*outs))


def _register() -> Any:
    """A dispatcher library holding the rule (torch leaves ``torch.library`` unannotated), or
    None where it cannot or need not be registered: a torch that batches the op itself (a newer
    one: overriding its kernel would warn), or one whose private API differs (an older one). Then
    vmap runs torch's own kernel or its exact per-task fallback (slower, never different)."""
    try:
        if torch._C._dispatch_has_kernel_for_dispatch_key(
            f"aten::{_SDPA_CPU_BACKWARD}", "FuncTorchBatched"
        ):
            return None
        make: Any = torch.library.Library
        lib = make("aten", "IMPL")
        lib.impl(_SDPA_CPU_BACKWARD, _sdpa_cpu_backward, "FuncTorchBatched", with_keyset=True)
    except (AttributeError, RuntimeError, TypeError, ImportError):
        return None
    return lib


@contextmanager
def batching_rules() -> Iterator[bool]:
    """Register the batching rule above with the dispatcher for the duration of the block; yields
    whether it is registered (see :func:`_register` for when it is not)."""
    with _LOCK:
        if _STATE["count"] == 0:
            _STATE["lib"] = _register()
        _STATE["count"] += 1
        registered = _STATE["lib"] is not None
    try:
        yield registered
    finally:
        with _LOCK:
            _STATE["count"] -= 1
            if _STATE["count"] == 0:
                if _STATE["lib"] is not None:
                    _STATE["lib"]._destroy()
                _STATE["lib"] = None


def vmapped_grad_from(
    outputs: Sequence[GradientEdge],
    cotangents: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor | GradientEdge],
    retain_graph: bool = True,
    chunk: int | None = None,
    *,
    legacy: bool = False,
    rules: bool = True,
) -> list[torch.Tensor | None]:
    """Each task's gradient of ``inputs`` from (T, ...) ``cotangents`` at ``outputs``: one
    backward under ``torch.func.vmap`` per ``chunk`` tasks (all T at once when None); stacked
    (T, ...), None where no task reaches an input.

    ``legacy``: the backward of each chunk runs under autograd's own batching
    (``is_grads_batched=True``, torch's legacy vmap) instead, which costs less for a graph of
    only the node types in :data:`LEGACY_FAST`; exact either way (where it has no batching rule
    it loops over the tasks). ``rules``: register :func:`batching_rules` for the call (needless
    when the graph holds no CPU attention backward: each registration costs ~40 us).
    """
    T = cotangents[0].shape[0]
    step = T if chunk is None else max(1, min(chunk, T))
    # autograd accepts edges and tensors mixed, which its annotations do not express
    targets = cast("list[torch.Tensor]", list(inputs))
    unused: list[bool] = []
    parts: list[tuple[torch.Tensor, ...]] = []
    for lo in range(0, T, step):
        last = lo + step >= T
        keep = retain_graph or not last
        if legacy:
            with quiet_vmap(legacy=True):
                gs = torch.autograd.grad(
                    list(outputs),
                    targets,
                    [c[lo : lo + step] for c in cotangents],
                    retain_graph=keep,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            unused[:] = [g is None for g in gs]
            n = cotangents[0][lo : lo + step].shape[0]  # (the placeholder vmap would make)
            parts.append(tuple(torch.zeros(n) if g is None else g for g in gs))
            continue

        def one(*cot: torch.Tensor, keep: bool = keep) -> tuple[torch.Tensor, ...]:
            gs = torch.autograd.grad(
                list(outputs), targets, list(cot), retain_graph=keep, allow_unused=True
            )
            unused[:] = [g is None for g in gs]
            return tuple(torch.zeros(()) if g is None else g for g in gs)

        with contextlib.ExitStack() as quiet:
            registered = rules and quiet.enter_context(batching_rules())
            if not registered:  # vmap loops over the tasks there, exactly: its warning is noise
                quiet.enter_context(warnings.catch_warnings())  # (a filter copy: only then)
                warnings.filterwarnings("ignore", message="There is a performance drop")
            parts.append(torch.func.vmap(one)(*[c[lo : lo + step] for c in cotangents]))
    got = parts[0] if len(parts) == 1 else tuple(torch.cat(gs) for gs in zip(*parts))
    # a vmapped dimension comes back where the batching rules left it (often not in front):
    # the rules that read these blocks want them laid out task by task
    return [None if u else g.contiguous() for u, g in zip(unused, got)]


def segment_backward(
    shape_of: Mapping[GradientEdge, torch.Size],
    itemsize: int,
    budget: int,
    forced: bool,
    looped: Callable[[], None],
    *,
    loop_above: int,
    legacy: bool = False,
    rules: bool = True,
) -> Callable[..., Sequence[torch.Tensor | None]]:
    """The ``gramian`` engine's CPU second stage's backward of a segment: vmapped over as many
    tasks at a time as keep its per-task blocks (targets', top cotangents') within half the
    ``budget``; per task where a target's per-task block exceeds ``loop_above`` bytes, unless
    ``forced`` (noted by ``looped``). ``legacy``, ``rules``: as :func:`vmapped_grad_from`'s (the
    graph holds only :data:`LEGACY_FAST` node types; it holds a CPU attention backward)."""

    def backward(
        tops: Sequence[GradientEdge],
        cots: Sequence[torch.Tensor],
        targets: Sequence[torch.Tensor | GradientEdge],
        keep: bool,
    ) -> Sequence[torch.Tensor | None]:
        blocks = [
            (t.numel() if isinstance(t, torch.Tensor) else shape_of[t].numel()) * itemsize
            for t in targets
        ]
        if not forced and max(blocks, default=0) > loop_above:
            looped()
            return looped_grad_from(tops, cots, targets, keep)
        per_task = sum(blocks) + sum(c[0].numel() * c.element_size() for c in cots)
        chunk = max(1, budget // max(1, 2 * per_task))
        return vmapped_grad_from(tops, cots, targets, keep, chunk, legacy=legacy, rules=rules)

    return backward
