"""Gram rule for the affine parameters of ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.BatchNorm``.

A norm layer computes ``y = xhat * weight + bias`` with ``xhat`` the input normalised (over the
last dimensions, over channel groups, or over the batch). Task t's gradients are
``sum D_t * xhat`` and ``sum D_t`` over every position but the parameter's own axes; ``xhat`` is
recomputed from the recorded input with the layer's own statistics (the batch's in training
mode, the running ones in evaluation mode, as the forward used them). Each layer's per-task
gradients are ``T x 2C`` numbers: the Gram is their product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradlens.engines.rules import register_rule

__all__ = ["normalized"]


def normalized(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``xhat``: the module's input normalised as its forward did, before the affine step.

    >>> ln = nn.LayerNorm(4)
    >>> x = torch.randn(3, 4)
    >>> torch.testing.assert_close(normalized(ln, x) * ln.weight + ln.bias, ln(x))
    """
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, eps=module.eps)
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    mean, var = module.running_mean, module.running_var
    batch_stats = module.training or mean is None or var is None
    return F.batch_norm(
        x,
        None if batch_stats or mean is None else mean.to(x.dtype),
        None if batch_stats or var is None else var.to(x.dtype),
        training=batch_stats,
        eps=module.eps,
    )


def _param_axes(module: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """Axes of the input (without T) that the per-task gradient sums over."""
    if isinstance(module, nn.LayerNorm):
        return tuple(range(x.dim() - len(module.normalized_shape)))
    return (0, *range(2, x.dim()))  # every axis but the channels


def _shape(module: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """How the parameter's entries lie along the input (for broadcasting the sums)."""
    if isinstance(module, nn.LayerNorm):
        return tuple(module.normalized_shape)
    return (x.shape[1],)


@register_rule(nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
               name="norm")
def norm_rule(
    module: nn.Module,
    inputs: list[torch.Tensor],
    out_grads: list[torch.Tensor],
    weights: torch.Tensor | None,
    budget: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The affine parameters' Gram and weighted gradients (see the module docstring)."""
    W, b = module.weight, module.bias
    has_w = W is not None and W.requires_grad
    has_b = b is not None and b.requires_grad
    T = out_grads[0].shape[0]
    gw: torch.Tensor | None = None
    gb: torch.Tensor | None = None
    for x, d in zip(inputs, out_grads):
        axes = tuple(a + 1 for a in _param_axes(module, x))
        if has_w:
            part = (d * normalized(module, x.to(d.dtype))).sum(axes).reshape(T, -1)
            gw = part if gw is None else gw + part
        if has_b:
            part = d.sum(axes).reshape(T, -1)
            gb = part if gb is None else gb + part
    rows = [g for g in (gw, gb) if g is not None]
    J = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]
    out: dict[str, torch.Tensor] = {}
    G = (J @ J.T).to(torch.float64)
    if weights is None:  # the Gram only
        return G, out
    w = weights.to(J.dtype)
    shape = _shape(module, inputs[0])
    if gw is not None:
        out["weight"] = (w @ gw).reshape(shape)
    if gb is not None:
        out["bias"] = (w @ gb).reshape(shape)
    return G, out
