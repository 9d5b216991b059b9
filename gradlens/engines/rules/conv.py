"""Gram rule for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` (zero padding, numeric padding).

One call of the convolution weight-gradient kernel (``torch.nn.grad.convNd_weight``) per task
yields the T weight gradients (``T x P_layer``, small for convolutions); blocks of output channels
bound the memory when ``groups == 1``. The Gram is their product, the weighted gradient their
weighted sum.
"""

from __future__ import annotations

import torch
from torch import nn

from gradlens.engines._base import accumulate_grad
from gradlens.engines.rules import register_rule

__all__: list[str] = []

_WEIGHT_GRAD = {
    nn.Conv1d: torch.nn.grad.conv1d_weight,
    nn.Conv2d: torch.nn.grad.conv2d_weight,
    nn.Conv3d: torch.nn.grad.conv3d_weight,
}


def _applies(m: nn.Module) -> bool:
    return getattr(m, "padding_mode", "zeros") == "zeros" and not isinstance(m.padding, str)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, name="conv", applies=_applies)
def conv_rule(
    module: nn.Module,
    inputs: list[torch.Tensor],
    out_grads: list[torch.Tensor],
    weights: torch.Tensor | None,
    params: list[torch.Tensor],
    budget: int,
) -> torch.Tensor:
    W, b = module.weight, module.bias
    has_w = any(p is W for p in params)
    has_b = b is not None and any(p is b for p in params)
    T = out_grads[0].shape[0]
    O = W.shape[0]
    g = module.groups
    wgrad = _WEIGHT_GRAD[type(module)]
    G = torch.zeros(T, T, dtype=torch.float64, device=W.device)
    w = None if weights is None else weights.to(W.dtype)  # None: the Gram only
    if has_b:
        nsp = out_grads[0].dim() - 3  # spatial dims after (T, B, O)
        gb = sum(d.sum(dim=(1, *range(3, 3 + nsp))) for d in out_grads)  # T x O
        G += (gb @ gb.T).to(torch.float64)
        if w is not None:
            accumulate_grad(b, w @ gb)
    if not has_w:
        return G
    per_channel = T * W[0].numel() * W.element_size()
    block = O if g > 1 else max(1, min(O, budget // max(1, per_channel)))
    weighted = []
    for lo in range(0, O, block):
        hi = min(O, lo + block)
        gW = None
        for x, d in zip(inputs, out_grads):
            oc = hi - lo
            xd = x.to(d.dtype)
            # one weight-gradient kernel call per task on its (B, oc, *sp) slice: the same work
            # as one call on tasks stacked as channels, without copying T-fold activations
            part = torch.stack(
                [
                    wgrad(
                        xd,
                        (oc, *W.shape[1:]),
                        d[t, :, lo:hi],
                        stride=module.stride,
                        padding=module.padding,
                        dilation=module.dilation,
                        groups=g,
                    )
                    for t in range(T)
                ]
            )
            gW = part if gW is None else gW + part
        if gW is None:  # no recorded call: nothing to add
            continue
        g2 = gW.reshape(T, -1)
        G += (g2 @ g2.T).to(torch.float64)
        if w is not None:
            weighted.append(torch.tensordot(w, gW, dims=1))
    if weighted:
        accumulate_grad(W, torch.cat(weighted) if len(weighted) > 1 else weighted[0])
    return G
