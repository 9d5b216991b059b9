"""Gram rule for ``nn.MultiheadAttention``'s packed in-projection, in self-attention.

``F.multi_head_attention_forward`` applies the packed ``in_proj_weight`` (3E x E) and
``in_proj_bias`` as one ``F.linear`` on the query when the query, key and value are one tensor,
inside the module's forward: neither that linear's input nor its output is a module input or
output, so :func:`record_in_proj` finds them in the autograd graph of the attention's output,
from the forward hook: the node that multiplies by the transposed weight (``AddmmBackward0``, or
``MmBackward0`` whose output is reshaped and, with a bias, added to it), its saved input matrix
``A`` (rows = positions x batch, in the node's own row order) and the edge whose gradient is the
projection's (``D``: the same rows, 3E wide). Task t's weight gradient is then ``D_t^T A`` and
its bias gradient ``D_t^T 1``: the Linear rule's math (:func:`~gradlens.engines.rules.linear.
linear_grads`).

Opt-in (:func:`enable`, before the Profiler is created): exact, but on CPU no faster than the
generic path it replaces (README "Engines", ``benchmarks/mha_rule.py``: 0.94x to 1.22x the
generic probe's CPU time on TransformerEncoder trunks), so ``gramian`` does not use it by default.

Served: ``_qkv_same_embed_dim`` (one packed weight, no kdim/vdim) without ``add_bias_kv``, and
only for calls whose query, key and value are the same tensor (``mha(x, x, x)``, as in
``nn.TransformerEncoderLayer``). Anything else records nothing for that call, so the engine
serves the whole layer through the exact generic path that probe: a packed weight split into
query / key-value chunks is one use of the weight in the graph for two or three projections,
and ``bias_k``/``bias_v`` join after the projection. ``out_proj`` is its own layer; its forward
is never called as a module, so it takes the generic path too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, Node

from gradlens.engines.rules import _RULES, register_rule
from gradlens.engines.rules.linear import _flatten, linear_grads

__all__ = ["disable", "enable", "mha_in_proj_rule", "record_in_proj"]

#: Nodes between the projection's product and its bias add (pure reshapes of its rows).
_RESHAPES = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")
#: A recorded call: (input A, edge of the projection's output, its shape, its dtype).
Recorded = tuple[torch.Tensor, GradientEdge, torch.Size, torch.dtype]


def _served(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.MultiheadAttention)
        and bool(module._qkv_same_embed_dim)
        and module.in_proj_weight is not None
        and module.bias_k is None
        and module.bias_v is None
    )


def _parents(root: Node, stop: Node | None) -> tuple[dict[Node, list[Node]], set[Node]]:
    """Each node's consumers in the graph below ``root`` down to ``stop`` (the query's node,
    not walked past: the attention's own graph only), and the nodes seen."""
    parents: dict[Node, list[Node]] = {}
    seen: set[Node] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node in seen or node is stop:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                parents.setdefault(child, []).append(node)
                stack.append(child)
    return parents, seen


def _leaf_node(seen: set[Node], param: object) -> Node | None:
    """The AccumulateGrad node of ``param`` among ``seen`` (None: absent, or not a tensor)."""
    if not isinstance(param, torch.Tensor):
        return None
    return next((n for n in seen if getattr(n, "variable", None) is param), None)


def record_in_proj(module: nn.Module, args: tuple[object, ...], output: object) -> Recorded | None:
    """The in-projection's input and output edge for one self-attention call, found in the
    graph of the attention's output; None when this call is not served (see the module doc).
    """
    if len(args) < 3 or not (args[0] is args[1] is args[2]) or not _served(module):
        return None
    query, y = args[0], output[0] if isinstance(output, tuple) else output
    if not isinstance(query, torch.Tensor) or not isinstance(y, torch.Tensor):
        return None
    if y.grad_fn is None:
        return None
    parents, seen = _parents(y.grad_fn, query.grad_fn)
    acc_w = _leaf_node(seen, module.in_proj_weight)
    if acc_w is None or len(parents.get(acc_w, ())) != 1:
        return None
    (t_node,) = parents[acc_w]
    if type(t_node).__name__ != "TBackward0" or len(parents.get(t_node, ())) != 1:
        return None
    (product,) = parents[t_node]
    kind = type(product).__name__
    saved = {"AddmmBackward0": "_saved_mat1", "MmBackward0": "_saved_self"}.get(kind)
    A = None if saved is None else getattr(product, saved, None)
    if not isinstance(A, torch.Tensor) or A.dim() != 2:
        return None
    top = _bias_node(product, parents, _leaf_node(seen, module.in_proj_bias))
    if top is None:
        return None
    meta = top._input_metadata[0]
    return A.detach(), GradientEdge(top, 0), torch.Size(meta.shape), meta.dtype


def _bias_node(
    product: Node, parents: dict[Node, list[Node]], acc_b: Node | None
) -> Node | None:
    """The node whose output is the whole projection: ``product`` itself (no bias, or the
    bias inside an addmm), else the add of the bias above reshapes of the product."""
    if acc_b is None or any(c is acc_b for c, _ in product.next_functions):
        return product
    node = product
    while True:
        ups = parents.get(node, [])
        if len(ups) != 1:
            return None
        node = ups[0]
        if any(c is acc_b for c, _ in node.next_functions):
            return node if type(node).__name__ == "AddBackward0" else None
        if type(node).__name__ not in _RESHAPES:
            return None


def mha_in_proj_rule(
    module: nn.Module,
    inputs: list[torch.Tensor],
    out_grads: list[torch.Tensor],
    weights: torch.Tensor | None,
    budget: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The packed in-projection's float64 Gram and weighted gradients (see the module doc)."""
    W, b = module.in_proj_weight, module.in_proj_bias
    if not isinstance(W, torch.Tensor):  # pragma: no cover - `applies` checked it
        raise TypeError("internal: MultiheadAttention without a packed in_proj_weight")
    out_f, in_f = W.shape
    A, D = _flatten(inputs, out_grads, in_f, out_f)
    has_b = isinstance(b, torch.Tensor) and b.requires_grad
    G, gW, gb = linear_grads(A, D, weights, W.requires_grad, has_b, budget)
    out: dict[str, torch.Tensor] = {}
    if gW is not None:
        out["in_proj_weight"] = gW
    if gb is not None:
        out["in_proj_bias"] = gb
    return G, out


def enable() -> None:
    """Serve ``nn.MultiheadAttention``'s packed in-projection by :func:`mha_in_proj_rule` in the
    Profilers created from now on (opt-in: see the module doc).

    >>> import torch
    >>> from gradlens.engines.rules import rule_for
    >>> enable(); rule_for(torch.nn.MultiheadAttention(4, 2)).name
    'mha_in_proj'
    >>> disable(); rule_for(torch.nn.MultiheadAttention(4, 2)) is None
    True
    """
    register_rule(
        nn.MultiheadAttention, name="mha_in_proj", applies=_served, record=record_in_proj
    )(mha_in_proj_rule)


def disable() -> None:
    """Back to the default: ``nn.MultiheadAttention`` through the exact generic path."""
    rule = _RULES.get(nn.MultiheadAttention)
    if rule is not None and rule.fn is mha_in_proj_rule:
        del _RULES[nn.MultiheadAttention]
