"""The Weights & Biases sink (``wandb`` extra)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradlens._errors import GradlensError, require
from gradlens.sinks._queue import QueuedSink

__all__ = ["WandbSink"]

#: The x axis of every gradlens chart in W&B: the profiler's step.
STEP_KEY = "gradlens/step"
IMAGE_KEY = "gradlens.heatmap/cosine"


class WandbSink(QueuedSink):
    """Log gradient interference to a Weights & Biases run, off the training thread.

    Per snapshot, the scalars of :func:`gradlens.sinks.snapshot_scalars` (total and per-layer
    cosine, conflict frequency, GMS and norm ratio, each pair's cosine) plus ``gradlens/step``,
    declared with ``run.define_metric`` as the x axis of every ``gradlens*`` chart, so gradlens
    never passes ``step=`` to ``run.log`` (as Hugging Face's W&B callback does not): W&B's own
    ``_step`` advances by one per snapshot (one ``log`` call each), so if you log to the same run
    with explicit ``step=`` values, give your charts their own x axis with ``define_metric``
    instead (W&B drops rows logged to a step below its current one). Every ``image_every``
    snapshots, the task x task cosine heatmap as ``gradlens.heatmap/cosine``, in the same row. The
    profiler's meta (tasks, engine, layers, your ``meta=``) goes to ``run.config["gradlens"]``.

    Args:
        run: an existing run (``wandb.init(...)``'s result), left open by :meth:`close`; None
            starts one with ``wandb.init(**init)`` and finishes it on :meth:`close`.
        init: keyword arguments of ``wandb.init`` when ``run`` is None (``project``,
            ``mode="offline"``, ``dir``...).
        image_every, pair_limit, layer_limit, max_pending, max_pending_images: see
            :class:`gradlens.sinks.QueuedSink` (nothing blocks the training step; images are
            dropped before scalars when W&B falls behind).

    Example:
        >>> import tempfile, pytest, torch
        >>> from gradlens import Snapshot
        >>> wandb = pytest.importorskip("wandb")
        >>> sink = WandbSink(init={"mode": "offline", "dir": tempfile.mkdtemp(), "project": "demo",
        ...                        "settings": wandb.Settings(silent=True)}, image_every=0)
        >>> g = torch.tensor([[4.0, -2.0], [-2.0, 1.0]], dtype=torch.float64)
        >>> sink.add_snapshot(Snapshot(0, ("a", "b"), g, {}, torch.ones(2)))
        >>> sink.close()  # writes what is queued, then finishes the run it started
        >>> sink.last["gradlens/cosine_mean"], sink.dropped_scalars
        (-1.0, 0)
    """

    def __init__(
        self,
        run: Any = None,
        *,
        init: Mapping[str, Any] | None = None,
        image_every: int = 10,
        pair_limit: int = 10,
        layer_limit: int = 64,
        max_pending: int = 1000,
        max_pending_images: int = 2,
    ) -> None:
        super().__init__(
            image_every=image_every,
            pair_limit=pair_limit,
            layer_limit=layer_limit,
            max_pending=max_pending,
            max_pending_images=max_pending_images,
        )
        if init is not None and not isinstance(init, Mapping):
            raise GradlensError(
                f"`init` should be a dict of wandb.init arguments; found {type(init).__name__}."
            )
        wandb: Any = require("wandb", "wandb", "WandbSink")
        if run is None:
            self._owns = True
            run = wandb.init(**dict(init or {}))
        else:
            if init:
                raise GradlensError(
                    "`init` is used only when WandbSink starts the run; found it passed with an "
                    "existing `run`. Drop one of the two."
                )
            if not callable(getattr(run, "log", None)) or not hasattr(run, "define_metric"):
                raise GradlensError(
                    "`run` should be a wandb run (what wandb.init returns) or None; found "
                    f"{type(run).__name__}."
                )
            self._owns = False
        self.run = run
        self._wandb: Any = wandb
        run.define_metric(STEP_KEY)
        run.define_metric("gradlens*", step_metric=STEP_KEY)

    def _write(self, step: int, scalars: Mapping[str, float], rgb: Any | None) -> None:
        row: dict[str, Any] = {STEP_KEY: step, **scalars}
        if rgb is not None:
            row[IMAGE_KEY] = self._wandb.Image(rgb, caption=f"step {step}")
        self.run.log(row)  # one log call per snapshot: W&B's own _step advances by one

    def _write_meta(self, meta: Mapping[str, Any]) -> None:
        self.run.config.update({"gradlens": dict(meta)}, allow_val_change=True)

    def _finish(self) -> None:
        if self._owns:
            self.run.finish()

    def __repr__(self) -> str:
        return f"WandbSink(run={getattr(self.run, 'id', None)!r})"
