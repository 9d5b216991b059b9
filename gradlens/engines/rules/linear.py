"""Gram rule for ``nn.Linear``.

With ``A`` (N x in) the layer's inputs over all calls and positions and ``D_t`` (N x out) task t's
gradient with respect to the layer's output, task t's weight gradient is ``D_t^T A`` and its bias
gradient ``D_t^T 1``. Two exact ways to the Gram, the cheaper chosen by counting flops:
- kernel: ``G[s,t] = <D_s, K D_t>`` with ``K = A A^T (+ 1 1^T for the bias)``, N x N, formed in
  task chunks (``K D_c`` for a chunk c of tasks at a time, its size bounded by the memory budget;
  only the blocks on and below the diagonal, mirrored, as G is symmetric);
- gradients: form the T weight gradients (in output-row blocks under the memory budget) and
  multiply them.
A layer with a bias but no trainable weight needs neither: ``G = S S^T`` with ``S_t = D_t^T 1``.
The weighted gradient ``(sum_t w_t D_t)^T A`` costs what a plain backward's weight gradient costs.

HF's ``Conv1D`` (GPT-2), ``y = x W + b`` with ``W`` stored transposed, shares the math
(:func:`conv1d_rule`). The kernel path is one pure function, :func:`kernel_core`; on CUDA it runs
compiled through ``torch.compile`` (see :mod:`gradlens.engines.rules._fused`), elsewhere eagerly.
Several layers of one shape go through the cheaper of the two paths together in
:func:`linear_group` (the ``gramian`` engine uses it for layers whose gradients arrive from the
same backward call).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradlens.engines.rules import _fused, register_rule

__all__ = [
    "conv1d_rule",
    "kernel_chunk",
    "kernel_core",
    "kernel_grads",
    "kernel_wins",
    "linear_grads",
    "linear_group",
    "linear_group_stacked",
]


def _weighted_grads(
    A: torch.Tensor, D: torch.Tensor, w: torch.Tensor | None, has_weight: bool, has_bias: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(sum_t w_t D_t)^T A`` and ``(sum_t w_t D_t)^T 1``, None where the parameter is absent
    (both None for ``w=None``: a Gram weighting writes later, from the kept blocks)."""
    if w is None:
        return None, None
    Dw = torch.tensordot(w, D, dims=1)  # N x out
    return (Dw.T @ A if has_weight else None), (Dw.sum(0) if has_bias else None)


def kernel_wins(
    T: int, N: int, in_f: int, out_f: int, itemsize: int, budget: int, share: float = 1.0
) -> bool:
    """Whether the kernel path costs at most ``share`` times the gradient path's flops for ``T``
    tasks, ``N`` rows, ``in_f`` inputs and ``out_f`` outputs, with its ``N x N`` kernel within
    ``budget``.

    >>> kernel_wins(8, 32, 2304, 256, 4, 1 << 30), kernel_wins(8, 8192, 147, 32, 4, 1 << 30)
    (True, False)
    """
    kernel_flops = N * N * in_f + T * N * N * out_f + T * T * N * out_f
    grad_flops = T * N * out_f * in_f + T * T * out_f * in_f
    return N * N * itemsize <= budget and kernel_flops <= share * grad_flops


def kernel_chunk(T: int, N: int, out_f: int, itemsize: int, budget: int) -> int:
    """Tasks per chunk of the kernel path: ``K D_c`` (and ``K`` broadcast over the chunk for the
    batched product) within ``budget`` bytes, at least one task, at most T.

    >>> kernel_chunk(40, 128, 1536, 4, 256 * 2**20), kernel_chunk(40, 128, 1536, 4, 1)
    (40, 1)
    """
    per_task = N * (out_f + N) * itemsize
    return max(1, min(T, budget // max(1, per_task)))


def kernel_core(
    A: torch.Tensor,
    D: torch.Tensor,
    w: torch.Tensor | None,
    chunk: int,
    *,
    has_weight: bool,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A Linear layer's float64 Gram (kernel path) and weighted weight and bias gradients.

    Args:
        A: N x in inputs (same dtype as ``D``; ignored without a weight).
        D: T x N x out task gradients with respect to the layer's output.
        w: T task weights (dtype of ``D``); None: no weighted gradients (returned as None).
        chunk: tasks per ``K D_c`` block (see :func:`kernel_chunk`).
        has_weight: whether the losses reach the weight (its gradient is formed, and ``A A^T``).
        has_bias: whether the losses reach the bias (its gradient is formed, and ``+ 1 1^T``).

    Pure (writes no ``.grad``): the same function runs eagerly and, on CUDA, compiled.

    >>> A, D = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    >>> G, gW, gb = kernel_core(A, D, torch.ones(2, dtype=torch.float64), 1,
    ...                         has_weight=True, has_bias=False)
    >>> g = torch.stack([(D[t].T @ A).reshape(-1) for t in range(2)])
    >>> torch.allclose(G, g @ g.T), torch.allclose(gW, D.sum(0).T @ A), gb is None
    (True, True, True)
    """
    T, N, _ = D.shape
    gW, gb = _weighted_grads(A, D, w, has_weight, has_bias)
    if not has_weight:  # K = 1 1^T: G[s,t] = <S_s, S_t> with S_t = D_t^T 1
        S = D.sum(1)
        return (S @ S.T).to(torch.float64), gW, gb
    K = A @ A.T
    if has_bias:
        K = K + 1.0
    Df = D.reshape(T, -1)
    G = D.new_zeros(T, T)
    for lo in range(0, T, chunk):
        hi = min(lo + chunk, T)
        KD = torch.bmm(K.expand(hi - lo, N, N), D[lo:hi])  # chunk x N x out
        G[lo:, lo:hi] = Df[lo:] @ KD.reshape(hi - lo, -1).T  # blocks on and below the diagonal
        del KD  # one chunk's K D_c alive at a time
    G = G.tril() + G.tril(-1).T  # exactly symmetric, whatever the chunking
    return G.to(torch.float64), gW, gb


def linear_grads(
    A: torch.Tensor,
    D: torch.Tensor,
    weights: torch.Tensor | None,
    has_w: bool,
    has_b: bool,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gram and weighted gradients of ``y = A W^T + b`` from ``A`` (N x in), ``D`` (T x N x out);
    ``weights=None``: the Gram only (both gradients None).

    >>> A, D = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    >>> G, gW, gb = linear_grads(A, D, torch.ones(2, dtype=torch.float64), True, True, 1 << 20)
    >>> g = torch.stack([torch.cat([(D[t].T @ A).reshape(-1), D[t].sum(0)]) for t in range(2)])
    >>> torch.allclose(G, g @ g.T), torch.allclose(gb, D.sum((0, 1)))
    (True, True)
    """
    T, N, out_f = D.shape
    in_f = A.shape[1]
    A = A.to(D.dtype)
    itemsize = D.element_size()
    if not has_w or kernel_wins(T, N, in_f, out_f, itemsize, budget):
        return kernel_grads(A, D, weights, has_w, has_b, budget)

    w = None if weights is None else weights.to(D.dtype)
    gW, gb = _weighted_grads(A, D, w, has_w, has_b)
    G = torch.zeros(T, T, dtype=torch.float64, device=D.device)
    if has_b:
        S = D.sum(1)  # T x out
        G += (S @ S.T).to(torch.float64)
    rows = max(1, min(out_f, budget // max(1, T * in_f * itemsize)))
    Dt = D.transpose(1, 2)  # T x out x N
    for lo in range(0, out_f, rows):
        gWt = torch.matmul(Dt[:, lo : lo + rows], A)  # T x rows x in
        g2 = gWt.reshape(T, -1)
        G += (g2 @ g2.T).to(torch.float64)
    return G, gW, gb


def kernel_grads(
    A: torch.Tensor,
    D: torch.Tensor,
    weights: torch.Tensor | None,
    has_w: bool,
    has_b: bool,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`linear_grads` by the kernel path whatever it costs (the caller chose it, e.g. by
    :func:`kernel_wins`): ``A`` (N x in) in ``D``'s dtype, ``D`` (T x N x out); on CUDA through
    the fused path when it is enabled (:mod:`gradlens.engines.rules._fused`).

    >>> A, D = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    >>> G, gW, gb = kernel_grads(A, D, None, True, True, 1 << 20)
    >>> G.shape, gW is None and gb is None
    (torch.Size([2, 2]), True)
    """
    T, N, out_f = D.shape
    w = None if weights is None else weights.to(D.dtype)
    chunk = kernel_chunk(T, N, out_f, D.element_size(), budget)
    return _fused.run(kernel_core, A, D, w, chunk, has_weight=has_w, has_bias=has_b)


def _flatten(
    inputs: list[torch.Tensor], out_grads: list[torch.Tensor], in_f: int, out_f: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (N x in) and ``D`` (T x N x out) over every call and position."""
    T = out_grads[0].shape[0]
    A = (
        torch.cat([x.reshape(-1, in_f) for x in inputs])
        if len(inputs) > 1
        else (inputs[0].reshape(-1, in_f))
    )
    D = (  # no copy for the usual single call: D is T x N x out, as large as the layer gets
        torch.cat([d.reshape(T, -1, out_f) for d in out_grads], dim=1)
        if len(out_grads) > 1
        else out_grads[0].reshape(T, -1, out_f)
    )
    return A, D


def _pack(gW: torch.Tensor | None, gb: torch.Tensor | None) -> dict[str, torch.Tensor]:
    out = {}
    if gW is not None:
        out["weight"] = gW
    if gb is not None:
        out["bias"] = gb
    return out


def _weight_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The module's ``weight`` and ``bias`` (None when absent) as tensors."""
    W, b = module.weight, getattr(module, "bias", None)
    if not isinstance(W, torch.Tensor) or not (b is None or isinstance(b, torch.Tensor)):
        raise TypeError(f"internal: {type(module).__name__} has no tensor weight and bias")
    return W, b


@register_rule(nn.Linear, name="linear")
def linear_rule(
    module: nn.Module,
    inputs: list[torch.Tensor],
    out_grads: list[torch.Tensor],
    weights: torch.Tensor | None,
    budget: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The layer's float64 Gram and its parameters' weighted gradients (see the module doc)."""
    W, b = _weight_bias(module)
    out_f, in_f = W.shape
    A, D = _flatten(inputs, out_grads, in_f, out_f)
    has_b = b is not None and b.requires_grad
    G, gW, gb = linear_grads(A, D, weights, W.requires_grad, has_b, budget)
    return G, _pack(gW, gb)


def conv1d_rule(
    module: nn.Module,
    inputs: list[torch.Tensor],
    out_grads: list[torch.Tensor],
    weights: torch.Tensor | None,
    budget: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hugging Face's ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` of shape (in, out), the
    transpose of a Linear's; the same Gram, the weight gradient transposed."""
    W, b = _weight_bias(module)
    in_f, out_f = W.shape
    A, D = _flatten(inputs, out_grads, in_f, out_f)
    has_b = b is not None and b.requires_grad
    G, gW, gb = linear_grads(A, D, weights, W.requires_grad, has_b, budget)
    return G, _pack(None if gW is None else gW.T, gb)


def linear_group(
    modules: Sequence[nn.Module],
    inputs: Sequence[torch.Tensor],
    out_grads: Sequence[torch.Tensor | None],
    weights: torch.Tensor | None,
    budget: int,
) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]] | None:
    """:func:`linear_rule` for several ``nn.Linear`` layers of one shape at once (one recorded
    call each): the kernel path as batched products over the layers, a handful of calls for
    the group instead of a dozen per layer (on small layers the per-call overhead dominates).

    ``inputs[l]`` is layer l's input, ``out_grads[l]`` its (T, *output) task gradients, all of
    one shape and dtype. Returns each layer's ``(Gram, weighted gradients)`` as the rule would,
    or None when the group is not served this way (see :func:`linear_group_stacked`, which
    returns the same numbers stacked over the layers).

    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> lins = [nn.Linear(16, 16).double() for _ in range(3)]
    >>> xs = [torch.randn(4, 16, dtype=torch.float64) for _ in lins]
    >>> ds = [torch.randn(2, 4, 16, dtype=torch.float64) for _ in lins]
    >>> w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    >>> got = linear_group(lins, xs, ds, w, 1 << 20)
    >>> want = [linear_rule(m, [x], [d], w, 1 << 20) for m, x, d in zip(lins, xs, ds)]
    >>> all(torch.allclose(g[0], r[0]) and torch.allclose(g[1]["weight"], r[1]["weight"])
    ...     and torch.allclose(g[1]["bias"], r[1]["bias"]) for g, r in zip(got, want))
    True
    """
    out = linear_group_stacked(modules, inputs, out_grads, weights, budget)
    if out is None:
        return None
    G, gW, gb = out
    if gW is None:  # the Grams only
        return [(g, {}) for g in G.unbind(0)]
    gbs = [None] * len(modules) if gb is None else gb.unbind(0)
    return [(g, _pack(w_, b_)) for g, w_, b_ in zip(G.unbind(0), gW.unbind(0), gbs)]


def linear_group_stacked(
    modules: Sequence[nn.Module],
    inputs: Sequence[torch.Tensor],
    out_grads: Sequence[torch.Tensor | None],
    weights: torch.Tensor | None,
    budget: int,
    *,
    transposed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """:func:`linear_group`'s numbers stacked over the layers: the Grams ``(L, T, T)`` (float64),
    the weighted weight gradients ``(L, *weight.shape)`` and bias gradients ``(L, out)`` (None
    where ``weights`` is None or the layers have no trainable bias). ``transposed``: the layers
    store their weight as (in, out), as Hugging Face's ``Conv1D`` does (:func:`conv1d_rule`).

    The path :func:`linear_grads` would take for one of the layers, batched over the layers:
    the kernel path, or the gradient path (each task's weight gradient ``D_t^T A`` of every layer
    from one batched product, then the Grams from them).

    None when the group is not served this way: the layers' trainable parameters differ, a
    layer has no trainable weight, the group's blocks exceed ``budget``, or the fused (compiled)
    path is enabled for their device.

    >>> lins = [nn.Linear(8, 6) for _ in range(2)]
    >>> G, gW, gb = linear_group_stacked(
    ...     lins, [torch.randn(2, 8)] * 2, [torch.randn(5, 2, 6)] * 2, torch.ones(5), 1 << 20)
    >>> tuple(G.shape), tuple(gW.shape), tuple(gb.shape), G.dtype
    ((2, 5, 5), (2, 6, 8), (2, 6), torch.float64)
    """
    params = [_weight_bias(m) for m in modules]
    W0, b0 = params[0]
    flag = (W0.requires_grad, b0 is not None and b0.requires_grad)
    if any(
        (W.requires_grad, b is not None and b.requires_grad) != flag or W.shape != W0.shape
        for W, b in params
    ) or any(d is None for d in out_grads):
        return None
    has_w, has_b = flag
    in_f, out_f = W0.shape if transposed else W0.shape[::-1]
    d0 = out_grads[0]
    assert d0 is not None
    T, n_layers, N = d0.shape[0], len(modules), inputs[0].numel() // in_f
    itemsize = d0.element_size()
    kernel = kernel_wins(T, N, in_f, out_f, itemsize, budget)
    per_layer = (2 * T * N * out_f + N * N) if kernel else (T * N * out_f + T * out_f * in_f)
    if not has_w or n_layers * (per_layer + N * (in_f + 1)) * itemsize > budget:
        return None
    if _fused.enabled_for(d0.device):  # the compiled per-layer kernel path was asked for
        return None
    # (stacked first, reshaped after: the stack is the one copy, whatever the blocks' layout)
    A = torch.stack(list(inputs)).reshape(n_layers, N, in_f)  # (inputs: contiguous)
    ds = [d for d in out_grads if d is not None]
    w = None if weights is None else weights.to(d0.dtype)
    if kernel:
        G, gW, gb = _group_kernel(A, torch.stack(ds).reshape(n_layers, T, N, out_f), w, has_b)
    else:
        G, gW, gb = _group_grads(A, [d.reshape(T, N, out_f) for d in ds], w, has_b)
    if gW is not None and transposed:
        gW = gW.transpose(1, 2)
    return G, gW, gb


def _group_kernel(
    A: torch.Tensor, D: torch.Tensor, w: torch.Tensor | None, has_b: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The kernel path over L layers: ``A`` (L, N, in), ``D`` (L, T, N, out)."""
    n_layers, T, N, out_f = D.shape
    K = A @ A.transpose(1, 2)  # L x N x N
    if has_b:
        K += 1.0
    Df = D.reshape(n_layers, T, N * out_f)
    KD = torch.matmul(K.unsqueeze(1), D).reshape(n_layers, T, N * out_f)
    G = Df @ KD.transpose(1, 2)  # L x T x T
    del KD
    G = (G.tril() + G.tril(-1).transpose(1, 2)).to(torch.float64)  # exactly symmetric
    if w is None:  # the Grams only
        return G, None, None
    Dw = torch.matmul(w, Df).reshape(n_layers, N, out_f)
    gW = Dw.transpose(1, 2) @ A  # L x out x in
    return G, gW, Dw.sum(1) if has_b else None


def _group_grads(
    A: torch.Tensor, ds: Sequence[torch.Tensor], w: torch.Tensor | None, has_b: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The gradient path over L layers: ``A`` (L, N, in), ``ds[l]`` (T, N, out) layer l's task
    gradients. Every task's weight gradient, transposed, ``A_l^T D_t`` (in x out), written
    layer by layer into one ``(L, T, in, out)`` block (one product per layer, ``A_l^T`` shared
    by the tasks as a stride-0 view: the output gradients are neither copied nor stacked); with
    a bias, ``A`` gets a column of ones, so the same products yield each task's bias gradient
    (``D_t^T 1``) beside its weight gradient. Then the Grams of all layers and their weighted
    gradients from one product each. The Grams are symmetric up to rounding (the profiler
    symmetrises every Gram)."""
    n_layers, N, in_f = A.shape
    T, _, out_f = ds[0].shape
    if has_b:
        A = torch.nn.functional.pad(A, (0, 1), value=1.0)  # L x N x (in + 1)
    rows = in_f + has_b
    At = A.transpose(1, 2)
    gT = A.new_empty((n_layers, T, rows, out_f))
    for k, d in enumerate(ds):
        torch.bmm(At[k].expand(T, rows, N), d, out=gT[k])
    g = gT.view(n_layers, T, rows * out_f)
    G = torch.bmm(g, g.transpose(1, 2)).to(torch.float64)  # L x T x T
    if w is None:  # the Grams only
        return G, None, None
    gw = torch.matmul(w, g).view(n_layers, rows, out_f)
    return G, gw[:, :in_f].transpose(1, 2), gw[:, in_f] if has_b else None
