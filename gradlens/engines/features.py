"""The ``features`` engine: task gradients with respect to the shared representation only.

MGDA-UB style (Sener and Koltun 2018): the call passes ``features=z``, the output of the shared
part; one small backward per task through its own head gives each task's gradient with respect
to ``z``, and their Gram is an upper-bound proxy of the parameter-level one. The Grams are
representation-level (``Snapshot.level == "features"``; one layer named ``"features"``). The
weighted gradient of every parameter then comes from the single ordinary backward the profiler
runs, so the shared part is traversed once, as in plain training.
"""

from __future__ import annotations

from gradlens.engines._base import (
    BackwardContext,
    Engine,
    EngineResult,
    gram_of_rows,
    per_task_grad,
)

__all__ = ["FEATURES_LAYER", "FeaturesEngine"]

FEATURES_LAYER = "features"


class FeaturesEngine(Engine):
    """Representation-level Grams; ``features=`` is required at every probed step."""

    name = "features"
    level = "features"
    needs_features = True

    def compute(self, ctx: BackwardContext) -> EngineResult:
        feats = list(ctx.features or ())
        # one small backward per task: each runs through its own head only
        rows = per_task_grad(ctx.per_task(), feats, [z.shape for z in feats])
        rows = [r.to(z.dtype) for r, z in zip(rows, feats)]
        return EngineResult({FEATURES_LAYER: gram_of_rows(rows)}, {FEATURES_LAYER: "features"})
