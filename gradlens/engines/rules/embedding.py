"""Gram rule for ``nn.Embedding``: sparse row updates, no dense ``T x vocab x dim`` tensor.

Task t's weight gradient is non-zero only on the rows the batch looked up: row ``v`` is the sum
of task t's output gradients at the positions holding index ``v`` (none at ``padding_idx``). The
rule sums them per distinct index (``T x U x dim`` for U distinct indices, at most the size of
the output gradients themselves), forms the Gram from those rows and scatters the weighted rows
into the dense ``vocab x dim`` gradient that a plain backward writes. Declined (generic path) for
``sparse=True``, ``max_norm`` and ``scale_grad_by_freq``, whose gradients differ.
"""

from __future__ import annotations

import torch
from torch import nn

from gradlens.engines.rules import register_rule

__all__ = ["rows_by_index"]


def _applies(m: nn.Module) -> bool:
    return not m.sparse and m.max_norm is None and not m.scale_grad_by_freq


def rows_by_index(
    idx: torch.Tensor, D: torch.Tensor, padding_idx: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uniq, rows)``: the distinct indices looked up and each task's gradient rows there.

    ``idx`` is (N,) indices, ``D`` (T, N, dim) the task gradients at those positions.

    >>> idx = torch.tensor([2, 0, 2]); D = torch.ones(1, 3, 2)
    >>> uniq, rows = rows_by_index(idx, D, padding_idx=0)
    >>> uniq.tolist(), rows.tolist()
    ([2], [[[2.0, 2.0]]])
    """
    if padding_idx is not None:
        keep = idx != padding_idx
        idx, D = idx[keep], D[:, keep]
    uniq, inv = torch.unique(idx, return_inverse=True)
    rows = D.new_zeros(D.shape[0], uniq.numel(), D.shape[2]).index_add_(1, inv, D)
    return uniq, rows


@register_rule(nn.Embedding, name="embedding", applies=_applies)
def embedding_rule(
    module: nn.Module,
    inputs: list[torch.Tensor],
    out_grads: list[torch.Tensor],
    weights: torch.Tensor | None,
    budget: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The embedding table's Gram and weighted gradient (see the module docstring)."""
    assert isinstance(module, nn.Embedding)  # registered for nn.Embedding only
    W = module.weight
    T, dim = out_grads[0].shape[0], W.shape[1]
    # (one call, the usual case: views, no copy of the output gradients)
    idx = torch.cat([x.reshape(-1) for x in inputs]) if len(inputs) > 1 else inputs[0].reshape(-1)
    D = (
        torch.cat([d.reshape(T, -1, dim) for d in out_grads], dim=1)
        if len(out_grads) > 1
        else out_grads[0].reshape(T, -1, dim)
    )
    uniq, rows = rows_by_index(idx, D, module.padding_idx)
    flat = rows.reshape(T, -1)
    G = (flat @ flat.T).to(torch.float64)
    if weights is None:  # the Gram only
        return G, {}
    grad = D.new_zeros(W.shape)
    grad[uniq] = torch.tensordot(weights.to(D.dtype), rows, dims=1)
    return G, {"weight": grad}
