"""The ``features`` engine: task gradients with respect to the shared representation only.

MGDA-UB style (Sener and Koltun 2018): the call passes ``features=z``, the output of the shared
part; one batched backward through the (cheap) task heads gives each task's gradient with respect
to ``z``, and their Gram is an upper-bound proxy of the parameter-level one. The Grams are
representation-level (``Snapshot.level == "features"``; one layer named ``"features"``). The
weighted gradient of every parameter then comes from the single ordinary backward the profiler
runs, so the shared part is traversed once, as in plain training.
"""

from __future__ import annotations

from gradlens.engines._base import BackwardContext, Engine, EngineResult, batched_grad, gram_of_rows

__all__ = ["FEATURES_LAYER", "FeaturesEngine"]

FEATURES_LAYER = "features"


class FeaturesEngine(Engine):
    """Representation-level Grams; ``features=`` is required at every probed step."""

    name = "features"
    level = "features"
    needs_features = True

    def compute(self, ctx: BackwardContext) -> EngineResult:
        feats = list(ctx.features or ())
        grads = batched_grad(ctx.losses, feats)
        T = ctx.losses.shape[0]
        rows = [g if g is not None else z.new_zeros((T, *z.shape)) for g, z in zip(grads, feats)]
        return EngineResult({FEATURES_LAYER: gram_of_rows(rows)}, {FEATURES_LAYER: "features"})
