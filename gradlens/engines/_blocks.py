"""What the ``gramian`` engine keeps of a layer's recorded calls, and the writer of a Gram
weighting's weighted gradient from the kept blocks (the weights are known only once every Gram
is: :mod:`gradlens.weightings`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import GradientEdge

from gradlens.engines._base import (
    SharedParams,
    accumulate_grad,
    accumulate_grads,
    compute_dtype,
)
from gradlens.engines.rules import Rule

__all__ = ["Record", "accumulate_own", "block_numel", "blocks_writer", "rule_args", "widen"]


@dataclass
class Record:
    """One recorded call of a rule-served module: its input, its output's edge, shape, dtype,
    and the shared root's forward it was made in (counted by the engine)."""

    input: torch.Tensor
    edge: GradientEdge
    out_shape: torch.Size
    out_dtype: torch.dtype
    forward: int = 0


def accumulate_own(module: nn.Module, weighted: Mapping[str, torch.Tensor]) -> None:
    """Add a pure rule's weighted gradients (by attribute name) to the module's own ``.grad``."""
    accumulate_grads([getattr(module, name) for name in weighted], list(weighted.values()))


def rule_args(
    recs: list[Record], raw: list[torch.Tensor | None], T: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A rule's inputs and per-task output gradients for a layer's recorded calls: a recorded
    output no task reached gets zeros; bf16/fp16 (autocast) is widened to float32."""
    got = [
        torch.zeros((T, *r.out_shape), dtype=compute_dtype(r.out_dtype), device=r.input.device)
        if g is None
        else g.to(compute_dtype(g.dtype))
        for r, g in zip(recs, raw)
    ]
    return [widen(r.input) for r in recs], got


def blocks_writer(
    shared: SharedParams,
    modules: Mapping[str, tuple[nn.Module, Rule]],
    rule_layers: dict[str, list[Record]],
    kept: dict[str, list[torch.Tensor | None]],
    by_layer: Mapping[str, list[torch.Tensor]],
    generic: list[torch.Tensor],
    gen_grads: dict[int, torch.Tensor],
    u: torch.Tensor,
    budget: int,
) -> Callable[[Mapping[str, torch.Tensor]], None]:
    """The writer of ``sum_t w_{l,t} g_{l,t}`` from the kept blocks (rows carry ``u_t``).

    A rule layer called once: its parameter gradient for the weighted output gradient
    ``sum_t w_t D_t`` comes from autograd on the layer's own output node (the weight-gradient
    products only: the gradient with respect to its input is not needed, so autograd skips it).
    A rule layer called several times: autograd from a later call's output would also reach the
    parameters through the earlier calls, so the rule itself writes the weighted gradient from
    the kept inputs and output gradients (recomputing its Gram, which is discarded). A generic
    layer: the weighted sum of its kept per-task gradients.
    """

    def scaled(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        w64, u64 = w.to(like.device, torch.float64), u.to(like.device, torch.float64)
        return (w64 / u64).to(like.dtype)

    def write(weights: Mapping[str, torch.Tensor]) -> None:
        for layer, recs in rule_layers.items():
            if len(recs) > 1:
                mod, rule = modules[layer]
                ins, got = rule_args(recs, kept[layer], u.shape[0])
                _, weighted = rule.fn(mod, ins, got, scaled(weights[layer], got[0]), budget)
                accumulate_own(mod, weighted)
                continue
            edges, grads = [], []
            for r, g in zip(recs, kept[layer]):
                if g is not None:
                    edges.append(r.edge)
                    grads.append(torch.tensordot(scaled(weights[layer], g), g, dims=1))
            if not edges:
                continue
            ps = by_layer[layer]
            gs = torch.autograd.grad(
                edges, ps, grad_outputs=grads, retain_graph=True, allow_unused=True
            )
            for p, g in zip(ps, gs):
                if g is not None:
                    accumulate_grad(p, g)
        for p in generic:
            g = gen_grads[id(p)]
            accumulate_grad(p, torch.tensordot(scaled(weights[shared.layer_of[id(p)]], g), g, 1))

    return write


def block_numel(rule_layers: Mapping[str, list[Record]], generic: list[torch.Tensor]) -> int:
    """Elements of one task's blocks: every recorded output, every generic parameter."""
    n = sum(r.out_shape.numel() for recs in rule_layers.values() for r in recs)
    return n + sum(p.numel() for p in generic)


def widen(x: torch.Tensor) -> torch.Tensor:
    """A recorded floating input in the dtype rules compute in (indices stay as they are)."""
    return x.to(compute_dtype(x.dtype)) if x.is_floating_point() else x
