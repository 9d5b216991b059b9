"""Gram rule for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` (zero padding, numeric padding).

The weight gradients of all T tasks come from one call of the convolution weight-gradient kernel
(``torch.nn.grad.convNd_weight``): the tasks' output gradients are stacked along the output
channels (``B x T*O x ...``, grouped so that each convolution group keeps its input channels),
which computes exactly the T per-task kernels at once, without copying the activations T-fold.
Blocks of output channels bound the memory when ``groups == 1``. The Gram is the product of the
``T x P_layer`` gradients (small for convolutions), the weighted gradient their weighted sum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.grad import conv1d_weight, conv2d_weight, conv3d_weight

from gradlens.engines.rules import register_rule

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
