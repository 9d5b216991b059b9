"""The ``loop`` engine: one ``torch.autograd.grad`` per task. The reference every engine matches.

Per-task gradients are kept in float64 until the Gram is formed, so this engine is the most exact
and the most memory hungry (``T x P`` float64). ``gradlens.testing.reference_grams`` is the same
computation for users' own checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from gradlens.engines._base import (
    BackwardContext,
    Engine,
    EngineResult,
    SharedParams,
    accumulate_grad,
    group_by_layer,
)

__all__ = ["LoopEngine", "flat_grads", "layer_grams_from_grads", "loop_task_grads"]


def loop_task_grads(
    losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """``grads[t][k]``: gradient of ``losses[t]`` w.r.t. ``params[k]`` (zeros where unreached)."""
    out = []
    for loss in losses:
        gs = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)])
    return out


def flat_grads(grads: list[list[torch.Tensor]]) -> torch.Tensor:
    """``J`` (T x P): each task's gradients flattened and concatenated, in parameter order."""
    return torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in grads])


def layer_grams_from_grads(
    shared: SharedParams,
    params: Sequence[torch.Tensor],
    grads: list[list[torch.Tensor]],
    J: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-layer float64 Grams from per-task gradients ``grads[t][k]`` of ``params[k]``.

    ``J`` is :func:`flat_grads` of ``grads`` when the caller has it already. It is converted to
    float64 once; each layer's Gram is the product of its columns (a view where the layer's
    parameters are adjacent, as they are in module order).
    """
    Jd = (flat_grads(grads) if J is None else J).to(torch.float64)
    start: dict[int, int] = {}
    k = 0
    for p in params:
        start[id(p)] = k
        k += p.numel()
    out = {}
    for layer, ps in group_by_layer(shared, params).items():
        spans = [(start[id(p)], start[id(p)] + p.numel()) for p in ps]
        if all(a == spans[i - 1][1] for i, (a, _) in enumerate(spans) if i):
            Jl = Jd[:, spans[0][0] : spans[-1][1]]
        else:
            Jl = torch.cat([Jd[:, a:b] for a, b in spans], dim=1)
        out[layer] = Jl @ Jl.T
    return out


class LoopEngine(Engine):
    """One backward per task (``torch.autograd.grad``); exact, slow, float64 Grams."""

    name = "loop"

    def compute(self, ctx: BackwardContext) -> EngineResult:
        params = ctx.reached
        if not params:
            return EngineResult({})
        # from each task's own scalar loss: a backward from ``losses[t]`` would run through the
        # stack into every task's head (with zero cotangents)
        grads = loop_task_grads(ctx.per_task(), params)
        J = flat_grads(grads)
        del grads
        grams = layer_grams_from_grads(self.shared, params, [], J)
        layer_of = self.shared.layer_of

        def write(weights: Mapping[str, torch.Tensor]) -> None:
            """``sum_t w_{l,t} g_{l,t}`` for every parameter, ``w_l`` its layer's weights."""
            k = 0
            for p in params:
                w = weights[layer_of[id(p)]].to(J.device, J.dtype)
                accumulate_grad(p, w @ J[:, k : k + p.numel()])
                k += p.numel()

        if ctx.keep_blocks:  # the per-task gradients are at hand: write once weights are known
            return EngineResult(grams, {layer: "loop" for layer in grams}, set(), writer=write)
        # the weighted sum as one product over the flattened per-task gradients
        flat = ctx.weights.to(J.dtype) @ J
        k = 0
        for p in params:
            accumulate_grad(p, flat[k : k + p.numel()])
            k += p.numel()
        return EngineResult(grams, {layer: "loop" for layer in grams}, {id(p) for p in params})
