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

__all__ = ["LoopEngine", "loop_task_grads"]


def loop_task_grads(
    losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """``grads[t][k]``: gradient of ``losses[t]`` w.r.t. ``params[k]`` (zeros where unreached)."""
    out = []
    for loss in losses:
        gs = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)])
    return out


def layer_grams_from_grads(
    shared: SharedParams, params: Sequence[torch.Tensor], grads: list[list[torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Per-layer float64 Grams from per-task gradients ``grads[t][k]`` of ``params[k]``."""
    index = {id(p): k for k, p in enumerate(params)}
    out = {}
    for layer, ps in group_by_layer(shared, params).items():
        J = torch.stack(
            [torch.cat([g[index[id(p)]].reshape(-1).to(torch.float64) for p in ps]) for g in grads]
        )
        out[layer] = J @ J.T
    return out


class LoopEngine(Engine):
    """One backward per task (``torch.autograd.grad``); exact, slow, float64 Grams."""

    name = "loop"

    def compute(self, ctx: BackwardContext) -> EngineResult:
        params = ctx.reached
        if not params:
            return EngineResult({})
        grads = loop_task_grads(list(ctx.losses.unbind(0)), params)
        grams = layer_grams_from_grads(self.shared, params, grads)
        layer_of = self.shared.layer_of

        def write(weights: Mapping[str, torch.Tensor]) -> None:
            for k, p in enumerate(params):
                w = weights[layer_of[id(p)]].tolist()
                accumulate_grad(p, sum(wt * g[k] for wt, g in zip(w, grads)))

        if ctx.keep_blocks:  # the per-task gradients are at hand: write once weights are known
            return EngineResult(grams, {layer: "loop" for layer in grams}, set(), write)
        write(dict.fromkeys(grams, ctx.weights))
        return EngineResult(grams, {layer: "loop" for layer in grams}, {id(p) for p in params})
