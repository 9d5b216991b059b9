"""The ``batched`` engine: one batched backward over the T cotangents, chunked over tasks.

``torch.autograd.grad(..., is_grads_batched=True)`` computes every task's gradient of every shared
parameter in one call. When ``T x P`` would exceed ``memory_budget`` bytes the tasks are split into
chunks of ``c`` tasks; the Gram's off-diagonal blocks then need a chunk pair in memory at once, so
the engine recomputes chunks (``n + n(n-1)/2`` batched backwards for ``n`` chunks) and never holds
more than two chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradlens.engines._base import (
    BackwardContext,
    EngineResult,
    accumulate_grad,
    batched_grad,
    gram_of_rows,
    group_by_layer,
)
from gradlens.engines._unbatchable import unbatchable
from gradlens.engines.loop import FlatEngine, fill_row

__all__ = ["BatchedEngine"]


class BatchedEngine(FlatEngine):
    """All tasks' parameter gradients from one batched backward (chunked under a budget)."""

    name = "batched"

    def compute(self, ctx: BackwardContext) -> EngineResult:
        # a graph a batched backward cannot run (dropout recomputed by a non-reentrant
        # checkpoint, .item() in a backward, anomaly mode): an UnbatchableGraphError
        with unbatchable(self.name):
            return self._compute(ctx)

    def _compute(self, ctx: BackwardContext) -> EngineResult:
        params = ctx.reached
        if not params:
            return EngineResult({})
        T = ctx.losses.shape[0]
        itemsize = params[0].element_size()
        per_task = sum(p.numel() for p in params) * itemsize
        # two chunks may be alive at once
        chunk = max(1, min(T, ctx.memory_budget // max(1, 2 * per_task)))
        bounds = [(s, min(T, s + chunk)) for s in range(0, T, chunk)]
        if len(bounds) == 1:  # one chunk: the loop engine's Grams and write, from one buffer
            return self._one_chunk(ctx, params)
        layers = group_by_layer(self.shared, params)
        index = {id(p): k for k, p in enumerate(params)}
        dev = ctx.losses.device
        grams = {layer: torch.zeros(T, T, dtype=torch.float64, device=dev) for layer in layers}
        weighted: list[torch.Tensor | None] = [None] * len(params)

        def grads_of(lo: int, hi: int) -> list[torch.Tensor]:
            gs = batched_grad(ctx.losses, params, slice(lo, hi))
            J = [
                torch.zeros((hi - lo, *p.shape), dtype=p.dtype, device=p.device) if g is None else g
                for g, p in zip(gs, params)
            ]
            return _redo_nonfinite(J, ctx.per_task()[lo:hi], params)

        for i, (lo, hi) in enumerate(bounds):
            Ji = grads_of(lo, hi)
            w = ctx.weights[lo:hi]
            for k, g in enumerate(Ji):
                # the weights are in the losses' dtype (promoted across tasks), g in the
                # parameter's: float32 parameters under a float64 loss are summed in float32
                part = torch.tensordot(w.to(g.dtype), g, dims=1)
                prev = weighted[k]
                weighted[k] = part if prev is None else prev + part
            for layer, ps in layers.items():
                rows = [Ji[index[id(p)]] for p in ps]
                grams[layer][lo:hi, lo:hi] = gram_of_rows(rows)
            for lo2, hi2 in bounds[i + 1 :]:
                Jj = grads_of(lo2, hi2)
                for layer, ps in layers.items():
                    block = gram_of_rows(
                        [Ji[index[id(p)]] for p in ps], [Jj[index[id(p)]] for p in ps]
                    )
                    grams[layer][lo:hi, lo2:hi2] = block
                    grams[layer][lo2:hi2, lo:hi] = block.T
                del Jj
            del Ji
        for p, total in zip(params, weighted):
            if total is not None:
                accumulate_grad(p, total)
        return EngineResult(grams, {layer: "batched" for layer in grams}, {id(p) for p in params})

    def _one_chunk(self, ctx: BackwardContext, params: list[torch.Tensor]) -> EngineResult:
        """All tasks' gradients by one batched backward, as one ``T x P`` buffer; a task whose
        row is not finite is recomputed by its own backward (see :func:`_redo_nonfinite`). The
        other leaves (the heads) are left to the weighted backward (see
        :meth:`FlatEngine.other_leaves`)."""
        T = ctx.losses.shape[0]
        gs = batched_grad(ctx.losses, params)
        J = self.flat_buffer(T, params)
        torch.cat(
            [
                (p.new_zeros((T, p.numel())) if g is None else g.reshape(T, -1))
                for p, g in zip(params, gs)
            ],
            dim=1,
            out=J,
        )
        del gs
        # a row holding an inf or a NaN sums to one (a finite row may overflow: recomputed for
        # nothing); isfinite over T x P costs 25x the sum (BERT-tiny, T = 3: 0.8 ms vs 0.03 ms)
        bad = (~torch.isfinite(J.sum(1))).nonzero().flatten().tolist()
        losses = ctx.per_task()
        for t in bad:
            own = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
            fill_row(J[t], params, own)
        return self.flat_result(ctx, params, J)


def _redo_nonfinite(
    J: list[torch.Tensor], losses: list[torch.Tensor], params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Recompute, by its own backward, each task whose rows of ``J`` are not finite.

    The batched backward pushes every task's zero cotangent through every other task's graph:
    where one task's graph holds an inf, ``0 * inf = NaN`` reaches every task's rows. A task
    whose own gradient is finite gets it back; one whose own gradient is not stays so (and is
    flagged in ``Snapshot.nonfinite_tasks``), as with the loop engine.
    """
    n = J[0].shape[0]
    finite = torch.ones(n, dtype=torch.bool, device=J[0].device)
    for g in J:
        finite &= torch.isfinite(g.reshape(n, -1).sum(1))  # see BatchedEngine._one_chunk
    for i in (~finite).nonzero().flatten().tolist():
        own = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        for g, o in zip(J, own):
            g[i] = 0.0 if o is None else o
    return J
