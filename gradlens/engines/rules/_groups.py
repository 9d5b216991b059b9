"""Same-kind layers computed together: the ``gramian`` engine's grouped rules.

On small layers a rule's cost is the per-call overhead of its dozen tensor operations, not the
arithmetic. Layers served by the same built-in rule, called once each, with inputs and output
gradients of one shape and dtype, whose gradients arrive from the same backward call, are
computed by one grouped function: a handful of batched operations for the group (Linear and HF
Conv1D: :func:`gradlens.engines.rules.linear.linear_group_stacked`; LayerNorm:
:func:`gradlens.engines.rules.norm.layer_norm_group`). The numbers are the rules' own (the same
products, batched over the layers).

Example:
    >>> import torch
    >>> from torch import nn
    >>> lins = [nn.Linear(3, 2) for _ in range(2)]
    >>> G, grads = grouped("linear", lins, [torch.randn(4, 3)] * 2, [torch.randn(5, 4, 2)] * 2,
    ...                    torch.ones(5), 1 << 20)
    >>> tuple(G.shape), [(name, tuple(g.shape)) for name, g in grads]
    ((2, 5, 5), [('weight', (2, 2, 3)), ('bias', (2, 2))])
"""

from __future__ import annotations

import torch
from torch import nn

from gradlens.engines.rules.linear import conv1d_rule, linear_group_stacked, linear_rule
from gradlens.engines.rules.norm import layer_norm_group, norm_rule

__all__ = ["GROUPED", "grouped"]

#: The rules whose single-call layers of one shape are computed together, by kind.
GROUPED: dict[object, str] = {linear_rule: "linear", conv1d_rule: "conv1d", norm_rule: "norm"}


def grouped(
    kind: str,
    modules: list[nn.Module],
    inputs: list[torch.Tensor],
    out_grads: list[torch.Tensor],
    v: torch.Tensor | None,
    budget: int,
) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]] | None:
    """A group's stacked Grams ``(L, T, T)`` and its weighted gradients stacked over the layers
    by parameter name (none when ``v`` is None); None when the group declines (each layer's
    rule runs then)."""
    if kind == "norm":
        out = layer_norm_group(modules, inputs, out_grads, v)
    else:
        out = linear_group_stacked(
            modules, inputs, out_grads, v, budget, transposed=kind == "conv1d"
        )
    if out is None:
        return None
    G, gw, gb = out
    return G, [(n, g) for n, g in (("weight", gw), ("bias", gb)) if g is not None]
