"""Gram rule for the affine parameters of ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.BatchNorm``.

A norm layer computes ``y = xhat * weight + bias`` with ``xhat`` the input normalised (over the
last dimensions, over channel groups, or over the batch). Task t's gradients are
``sum D_t * xhat`` and ``sum D_t`` over every position but the parameter's own axes; ``xhat`` is
recomputed from the recorded input with the layer's own statistics (the batch's in training
mode, the running ones in evaluation mode, as the forward used them). Each layer's per-task
gradients are ``T x 2C`` numbers: the Gram is their product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gradlens.engines.rules import register_rule

__all__ = ["layer_norm_group", "normalized"]


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


def layer_norm_group(
    modules: Sequence[nn.Module],
    inputs: Sequence[torch.Tensor],
    out_grads: Sequence[torch.Tensor],
    weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """:func:`norm_rule` for several ``nn.LayerNorm`` layers called once each, all of one
    ``normalized_shape``, ``eps``, input shape and dtype and the same trainable parameters, in a
    handful of calls for the group: the Grams stacked ``(L, T, T)`` (float64), the weighted
    weight and bias gradients ``(L, *normalized_shape)`` (None where absent or ``weights`` is
    None). None when the group is not served this way (the caller runs the rule per layer).

    >>> lns = [nn.LayerNorm(4).double() for _ in range(2)]
    >>> xs = [torch.randn(3, 4, dtype=torch.float64) for _ in lns]
    >>> ds = [torch.randn(2, 3, 4, dtype=torch.float64) for _ in lns]
    >>> w = torch.tensor([0.5, 1.0], dtype=torch.float64)
    >>> G, gw, gb = layer_norm_group(lns, xs, ds, w)
    >>> G1, ref = norm_rule(lns[1], [xs[1]], [ds[1]], w, 1 << 20)
    >>> torch.allclose(G[1], G1), torch.allclose(gw[1], ref["weight"])
    (True, True)
    """
    m0 = modules[0]
    if not isinstance(m0, nn.LayerNorm):
        return None
    flags = _flags(m0)
    if not any(flags) or any(
        not isinstance(m, nn.LayerNorm)
        or m.normalized_shape != m0.normalized_shape
        or m.eps != m0.eps
        or _flags(m) != flags
        for m in modules
    ):
        return None
    x0, d0 = inputs[0], out_grads[0]
    if any(x.shape != x0.shape or x.dtype != x0.dtype for x in inputs) or any(
        d.shape != d0.shape or d.dtype != d0.dtype for d in out_grads
    ):
        return None
    has_w, has_b = flags
    n_layers, T = len(modules), d0.shape[0]
    C = math.prod(m0.normalized_shape)
    axes = tuple(a + 1 for a in _param_axes(m0, x0))
    # per layer, into slices of J (L x T x (C or 2C)): no stacked copy of the output gradients
    # and one product buffer for all layers (large fresh buffers cost page faults here)
    J = d0.new_empty((n_layers, T, C * (has_w + has_b)))
    at = (T, *m0.normalized_shape)
    X = torch.stack(list(inputs)).to(d0.dtype)
    xhat = F.layer_norm(X, m0.normalized_shape, eps=m0.eps) if has_w else X
    tmp = torch.empty_like(d0) if has_w else d0
    for k, d in enumerate(out_grads):
        if has_w:
            torch.sum(torch.mul(d, xhat[k], out=tmp), axes, out=J[k, :, :C].view(at))
        if has_b:
            torch.sum(d, axes, out=J[k, :, C * has_w :].view(at))
    G = torch.bmm(J, J.transpose(1, 2)).to(torch.float64)
    if weights is None:  # the Grams only
        return G, None, None
    shape = (n_layers, *m0.normalized_shape)
    wJ = torch.matmul(weights.to(J.dtype), J)  # L x (C or 2C)
    gw = wJ[:, :C].reshape(shape) if has_w else None
    gb = wJ[:, C * has_w :].reshape(shape) if has_b else None
    return G, gw, gb


def _flags(module: nn.Module) -> tuple[bool, bool]:
    """Whether the module's weight and bias exist and are trainable."""
    W, b = module.weight, module.bias
    return (
        isinstance(W, torch.Tensor) and W.requires_grad,
        isinstance(b, torch.Tensor) and b.requires_grad,
    )
