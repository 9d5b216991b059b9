"""The ``features`` engine: task gradients with respect to the shared representation only.

MGDA-UB style (Sener and Koltun 2018): the call passes ``features=z``, the output of the shared
part; each task's gradient with respect to ``z`` is the Gram's row, an upper-bound proxy of the
parameter-level one. The Grams are representation-level (``Snapshot.level == "features"``; one
layer named ``"features"``).

Where every head is its own (see :mod:`gradlens.engines._capture`), the rows are captured by hooks
during the one weighted backward of ``sum_t w_t L_t`` that training runs anyway, so a probed step
costs a plain step plus copying T rows and their ``T x T`` product. Otherwise (heads sharing a
node just above ``z``) one small backward per task through its own head gives the rows, and the
profiler's ordinary backward the weighted gradient. Several features, one computed from another
inside the shared part (``z, f(z)``): each task's row is its gradient at the features as the
heads' inputs (MGDA-UB's representation as a whole), taken by one hooked backward per task.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

from gradlens._errors import GradlensError
from gradlens.engines._base import (
    BackwardContext,
    Engine,
    EngineResult,
    SharedParams,
    Workspace,
    gram_of_rows,
    per_task_grad,
)
from gradlens.engines._capture import capture_rows, partial_rows, split_heads
from gradlens.engines._graph import GraphIndex
from gradlens.engines._segments import fed_tops

__all__ = ["FEATURES_LAYER", "FeaturesEngine"]

FEATURES_LAYER = "features"


class FeaturesEngine(Engine):
    """Representation-level Grams; ``features=`` is required at every probed step."""

    name = "features"
    level = "features"
    needs_features = True
    sparse_grads = True  # the parameters' .grad come from autograd's own weighted backward
    one_pass = True  # the batched backward stops at the features

    def __init__(self, shared: SharedParams, n_tasks: int) -> None:
        super().__init__(shared, n_tasks)
        self._workspace = Workspace()

    def detach(self) -> None:
        self._workspace.clear()

    def compute(self, ctx: BackwardContext) -> EngineResult:
        # each feature once (a tensor given twice is one feature of the representation)
        unique: dict[tuple[object, int], tuple[torch.Tensor, GradientEdge]] = {}
        for k, z in enumerate(ctx.features or ()):
            e = get_gradient_edge(z)
            if e.node not in ctx.nodes:  # (checked before anything is written)
                raise GradlensError(
                    f"`features` should be tensors the losses were computed from; found "
                    f"features[{k}] outside the losses' graph (a z of another forward or an "
                    "earlier step, or one the heads do not read)."
                )
            unique.setdefault((e.node, e.output_nr), (z, e))
        feats = [z for z, _ in unique.values()]
        edges = [e for _, e in unique.values()]
        shapes = [z.shape for z in feats]
        if fed_tops(edges, ctx.graph):
            # a feature computed from another (``z, f(z)``): each task's rows as the heads'
            # inputs, by one hooked backward per task (the same whatever the weights)
            graph = ctx.graph if ctx.graph is not None else GraphIndex.build(ctx.losses)
            rows = partial_rows(ctx.per_task(), edges, shapes, graph)
            rows = [r.to(z.dtype) for r, z in zip(rows, feats)]
            return EngineResult({FEATURES_LAYER: gram_of_rows(rows)}, {FEATURES_LAYER: "features"})
        split = split_heads(ctx.per_task(), edges, ctx.uses, [z.dtype for z in feats])
        if split is None:
            # one small backward per task: each runs through its own head only
            rows = per_task_grad(ctx.per_task(), feats, shapes)
            rows = [r.to(z.dtype) for r, z in zip(rows, feats)]
            return EngineResult({FEATURES_LAYER: gram_of_rows(rows)}, {FEATURES_LAYER: "features"})
        # the training backward itself (every leaf when writing), rows captured on the way
        leaves = list(ctx.leaves.values()) if ctx.write else []
        rows, u, _ = capture_rows(
            ctx,
            edges,
            shapes,
            split,
            leaves,
            retain_graph=ctx.retain_graph or not ctx.write,
            workspace=self._workspace,
        )
        rows = [r.to(z.dtype) for r, z in zip(rows, feats)]
        G = gram_of_rows(rows) / torch.outer(u, u).to(torch.float64)
        return EngineResult(
            {FEATURES_LAYER: G}, {FEATURES_LAYER: "features"}, {id(p) for p in leaves}
        )
