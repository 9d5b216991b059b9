"""Gram rule for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` (zero padding, numeric padding).

The weight gradients of all T tasks come from one call of the convolution weight-gradient kernel
(``torch.nn.grad.convNd_weight``): the tasks' output gradients are stacked along the output
channels (``B x T*O x ...``, grouped so that each convolution group keeps its input channels),
which computes exactly the T per-task kernels at once, without copying the activations T-fold.
Blocks of output channels bound the memory when ``groups == 1``. The Gram is the product of the
``T x P_layer`` gradients (small for convolutions), the weighted gradient their weighted sum.

Where the output has few positions for its weight (the late stages of a CNN: a 3 x 3 convolution
of 256 channels on a 2 x 2 map, batch 8, has N = 32 output positions for 2,304 inputs per output
channel), an ungrouped 1-d or 2-d convolution takes the Linear rule's kernel path instead: its
input patches ``A`` (N x in*k, :func:`torch.nn.functional.unfold`) make it a Linear layer over
positions, ``G[s,t] = <D_s, A A^T D_t>`` with ``D_t`` task t's output gradient (N x out), and the
weighted gradient ``(sum_t w_t D_t)^T A``: no per-task weight gradient is formed. The path is
chosen by counting flops as for a Linear layer (:func:`~gradlens.engines.rules.linear.kernel_wins`)
and when the patches and the kernel fit the memory budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from torch.nn.grad import conv1d_weight, conv2d_weight, conv3d_weight

from gradlens.engines.rules import register_rule
from gradlens.engines.rules.linear import kernel_grads, kernel_wins

__all__ = ["conv_weight_grads"]

#: torch's weight-gradient kernels by spatial rank (torch leaves them unannotated)
_WEIGHT_GRAD: dict[int, Callable[..., torch.Tensor]] = {
    1: conv1d_weight,
    2: conv2d_weight,
    3: conv3d_weight,
}


def _applies(m: nn.Module) -> bool:
    return getattr(m, "padding_mode", "zeros") == "zeros" and not isinstance(m.padding, str)


def conv_weight_grads(
    module: nn.Module, x: torch.Tensor, d: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """Every task's weight gradient for output channels ``lo:hi``: (T, hi - lo, in/groups, *k).

    ``d`` is (T, B, O, *spatial), the task gradients of the module's output at one call.

    >>> conv = nn.Conv2d(4, 6, 3, groups=2, bias=False).double()
    >>> x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    >>> d = torch.randn(3, 2, 6, 3, 3, dtype=torch.float64)
    >>> got = conv_weight_grads(conv, x, d, 0, 6)
    >>> want = torch.stack([torch.autograd.grad(conv(x), conv.weight, d[t])[0] for t in range(3)])
    >>> torch.testing.assert_close(got, want)
    """
    assert isinstance(module, nn.modules.conv._ConvNd)  # registered for Conv1d/2d/3d only
    W = module.weight
    T, B = d.shape[:2]
    sp = d.shape[3:]
    g = module.groups
    oc = hi - lo
    per = oc // g  # output channels per group in this block (the whole layer when groups > 1)
    stacked = (
        d[:, :, lo:hi]
        .reshape(T, B, g, per, *sp)
        .permute(1, 2, 0, 3, *range(4, 4 + len(sp)))
        .reshape(B, T * oc, *sp)
    )
    gw = _WEIGHT_GRAD[len(sp)](
        x.to(d.dtype),
        (T * oc, *W.shape[1:]),
        stacked,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=g,
    )  # (g * T * per, in/g, *k), ordered (group, task, channel)
    k = gw.shape[1:]
    return gw.reshape(g, T, per, *k).transpose(0, 1).reshape(T, oc, *k)


#: The kernel path serves a convolution when its flops are at most this share of the weight
#: gradients' (:func:`~gradlens.engines.rules.linear.kernel_wins`): it runs more and smaller
#: calls (the patches, the copies, the products) than the one weight-gradient kernel it
#: replaces. Measured on CPU, one thread, T = 3 and 8, 22 layer shapes of the zoo's CNNs: the
#: crossover lies at flop ratios 0.5-0.9 (``benchmarks/conv_kernel_path.py``).
KERNEL_SHARE = 0.5


def _patch_rows(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """The input patches of one batched 1-d or 2-d call, a row per output position (batch-major,
    then row-major over the output), ``in * prod(kernel)`` columns in the weight's order."""
    pad = cast("tuple[int, ...]", module.padding)  # numeric (_applies)
    ks, st, dil = module.kernel_size, module.stride, module.dilation
    if all(k == 1 for k in ks) and not any(pad):  # a pointwise convolution: no unfold
        keep = (slice(None), slice(None), *(slice(None, None, s) for s in st))  # stride's
        x = x[keep]
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    if x.dim() == 3:  # 1-d: a 2-d unfold over a height of one
        x = x.unsqueeze(2)
        ks, st, pad, dil = (1, ks[0]), (1, st[0]), (0, pad[0]), (1, dil[0])
    cols = torch.nn.functional.unfold(x, ks, dilation=dil, padding=pad, stride=st)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B * L) x (in * k)


def _kernel_route(
    module: nn.modules.conv._ConvNd,
    inputs: list[torch.Tensor],
    out_grads: list[torch.Tensor],
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The patches ``A`` (N x in*k) and output gradients ``D`` (T x N x out) over every call,
    when the kernel path serves this layer (see the module doc), else None."""
    W = module.weight
    nsp = W.dim() - 2
    if module.groups != 1 or nsp > 2 or any(x.dim() != nsp + 2 for x in inputs):
        return None
    T, O = out_grads[0].shape[0], W.shape[0]
    N = sum(d[0, :, 0].numel() for d in out_grads)
    in_k = W[0].numel()
    itemsize = out_grads[0].element_size()
    if N * (in_k + T * O) * itemsize > budget or not kernel_wins(
        T, N, in_k, O, itemsize, budget, KERNEL_SHARE
    ):
        return None
    A = torch.cat([_patch_rows(module, x.to(d.dtype)) for x, d in zip(inputs, out_grads)])
    D = torch.cat([d.movedim(2, -1).reshape(T, -1, O) for d in out_grads], dim=1)
    return A, D


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, name="conv", applies=_applies)
def conv_rule(
    module: nn.Module,
    inputs: list[torch.Tensor],
    out_grads: list[torch.Tensor],
    weights: torch.Tensor | None,
    budget: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The layer's float64 Gram and its parameters' weighted gradients (see the module doc)."""
    assert isinstance(module, nn.modules.conv._ConvNd)  # registered for Conv1d/2d/3d only
    W, b = module.weight, module.bias
    has_w = W.requires_grad
    has_b = b is not None and b.requires_grad
    T = out_grads[0].shape[0]
    O = W.shape[0]
    route = _kernel_route(module, inputs, out_grads, budget) if has_w else None
    if route is not None:
        G, gW, gb = kernel_grads(*route, weights, True, has_b, budget)
        return G, {} if gW is None else {"weight": gW.reshape(W.shape)} | (
            {"bias": gb} if gb is not None else {}
        )
    G = torch.zeros(T, T, dtype=torch.float64, device=W.device)
    w = None if weights is None else weights.to(out_grads[0].dtype)  # None: the Gram only
    out: dict[str, torch.Tensor] = {}
    if has_b:
        nsp = out_grads[0].dim() - 3  # spatial dims after (T, B, O)
        axes = (1, *range(3, 3 + nsp))
        gb = out_grads[0].sum(dim=axes)  # T x O
        for d in out_grads[1:]:
            gb = gb + d.sum(dim=axes)
        G += (gb @ gb.T).to(torch.float64)
        if w is not None:
            out["bias"] = w @ gb
    if not has_w:
        return G, out
    # one block holds the T weight gradients and the stacked output gradients of its channels
    spatial = max(d[0, :, 0].numel() for d in out_grads)
    per_channel = T * (W[0].numel() + spatial) * out_grads[0].element_size()
    block = O if module.groups > 1 else max(1, min(O, budget // max(1, per_channel)))
    weighted = []
    for lo in range(0, O, block):
        hi = min(O, lo + block)
        gW = None
        for x, d in zip(inputs, out_grads):
            part = conv_weight_grads(module, x, d, lo, hi)
            gW = part if gW is None else gW + part
        assert gW is not None  # a served layer has at least one recorded call
        g2 = gW.reshape(T, -1)
        G += (g2 @ g2.T).to(torch.float64)
        if w is not None:
            weighted.append(torch.tensordot(w, gW, dims=1))
    if weighted:
        out["weight"] = torch.cat(weighted) if len(weighted) > 1 else weighted[0]
    return G, out
