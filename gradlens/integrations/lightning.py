"""A PyTorch Lightning callback that profiles a multi-task ``LightningModule`` (observe-only).

Convention: ``training_step`` returns a dict holding the total loss under ``"loss"`` (what
Lightning backpropagates, as usual) and the per-task losses under ``"task_losses"``; optionally
the loss weights under ``"task_weights"`` (stored with each snapshot; default 1 per task) and,
for ``engine="features"``, the shared representation under ``"features"``::

    def training_step(self, batch, batch_idx):
        x, ys = batch
        z = self.trunk(x)
        task_losses = {t: F.mse_loss(self.heads[t](z).squeeze(1), ys[t]) for t in TASKS}
        total = sum(self.w[t] * task_losses[t] for t in TASKS)
        return {"loss": total, "task_losses": task_losses, "task_weights": self.w}

The callback wraps ``training_step`` to see that dict, and in ``on_before_backward`` calls
:meth:`gradlens.Profiler.observe` on the task losses: Lightning's own backward, optimizer,
precision plugin and strategy are untouched. Cost per probed step: the engine's measurement plus
keeping the graph until Lightning's backward (see ``Profiler.observe``); unprobed steps cost
nothing. The profiler's step counts backward calls (micro-batches under
``accumulate_grad_batches``). Under a multi-process strategy (DDP) every rank measures its own
batch: Grams are rank-local (``meta["grams"] == "local"``) and only global rank 0 writes the
store. Automatic optimization only: with manual optimization call ``Profiler.backward`` in
``training_step`` instead.

Checkpoints: the callback's state (:meth:`gradlens.Profiler.state_dict`: the profiler's step,
``auto``'s decisions) is saved in Lightning's checkpoints; ``trainer.fit(..., ckpt_path=...)``
restores it and continues the same run directory (reopened in append mode and cut back to the
checkpoint's step, as ``RunWriter.rewind`` does), so the resumed fit's probes and engines are the
uninterrupted fit's. The profiler is created when training starts (``on_train_start``), after
Lightning has restored the checkpoint.

Example:
    >>> from gradlens.integrations.lightning import GradlensCallback
    >>> cb = GradlensCallback(tasks=["a", "b"], shared_attr="trunk", engine="gramian", every=10)
    >>> cb.tasks
    ('a', 'b')
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradlens._errors import GradlensError, require
from gradlens.integrations._common import check_callback_args, shared_module
from gradlens.profiler import Profiler
from gradlens.schedules import Schedule
from gradlens.snapshot import Snapshot
from gradlens.store import RunWriter

require("lightning", "lightning", "gradlens.integrations.lightning")

from lightning.pytorch.callbacks import Callback  # noqa: E402

__all__ = ["GradlensCallback"]


class GradlensCallback(Callback):
    """Profile the shared part of a multi-task ``LightningModule`` (see the module docstring).

    Args:
        tasks: task names, the keys of ``training_step``'s ``"task_losses"``.
        shared_attr: attribute path of the shared module on the LightningModule (dots allowed,
            e.g. ``"model.backbone"``).
        engine, every, memory_budget, meta: as in :class:`gradlens.Profiler`.
        store: run directory written by global rank 0 (None: keep snapshots in memory only).
        keep: how many recent snapshots ``self.snapshots`` holds (0 keeps none).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        shared_attr: str = "trunk",
        engine: str = "auto",
        every: int | Schedule = 1,
        store: str | Path | None = None,
        *,
        keep: int = 100,
        memory_budget: int = 256 * 2**20,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.tasks, keep = check_callback_args(tasks, shared_attr, keep, example="trunk")
        self.shared_attr = shared_attr
        self._engine = engine
        self._every = every
        self._store = store
        self._budget = memory_budget
        self._meta = dict(meta or {})
        self.profiler: Profiler | None = None
        #: The most recent snapshots (at most ``keep``), oldest first.
        self.snapshots: deque[Snapshot] = deque(maxlen=keep)
        self._out: Mapping[str, Any] | None = None
        self._wrapped: Any = None
        #: A profiler state restored from a checkpoint, applied when training starts.
        self._restored: Mapping[str, Any] | None = None

    @property
    def state_key(self) -> str:
        """Lightning's key of this callback's state in a checkpoint (two callbacks on other
        tasks or modules keep theirs apart)."""
        return self._generate_state_key(tasks=list(self.tasks), shared_attr=self.shared_attr)

    # -- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self._wrapped is not None:
            return
        if not pl_module.automatic_optimization:
            raise GradlensError(
                "GradlensCallback needs automatic optimization; found "
                "automatic_optimization=False. With manual optimization call "
                "gradlens.Profiler.backward(losses, weights) in training_step instead."
            )
        shared_module(pl_module, self.shared_attr)  # a wrong attribute fails before training
        self._wrapped = pl_module.training_step
        pl_module.training_step = self._capture(self._wrapped)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.profiler is not None:  # left by a fit that failed before its teardown
            self.profiler.close()
            self.profiler = None
        restored, self._restored = self._restored, None
        path = self._store if trainer.is_global_zero else None
        store: str | Path | RunWriter | None = path
        if path is not None and restored is not None:
            step = restored.get("step")
            if isinstance(step, bool) or not isinstance(step, int):
                raise GradlensError(
                    "the checkpoint's GradlensCallback state should hold the profiler's step "
                    f"(an int); found {step!r}."
                )
            # the run the checkpoint belongs to, continued from the checkpoint's step
            store = RunWriter(path, meta={"tasks": list(self.tasks)}, append=True)
            store.rewind(step)
        meta = {"grams": "local", "world_size": int(trainer.world_size), **self._meta}
        try:
            prof = Profiler(
                shared_module(pl_module, self.shared_attr),
                self.tasks,
                engine=self._engine,
                every=self._every,
                store=store,
                memory_budget=self._budget,
                meta=meta,
            )
        except BaseException:
            if isinstance(store, RunWriter):
                store.close()
            raise
        if restored is not None:
            try:
                prof.load_state_dict(restored)
            except BaseException:
                prof.close()
                raise
        self.profiler = prof

    def state_dict(self) -> dict[str, Any]:
        """The profiler's state (:meth:`gradlens.Profiler.state_dict`), saved by Lightning."""
        if self.profiler is not None:
            return {"profiler": self.profiler.state_dict()}
        return {} if self._restored is None else {"profiler": dict(self._restored)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the restored profiler state for :meth:`on_train_start` (Lightning restores
        callbacks before training starts; some strategies after ``on_fit_start``)."""
        self._restored = state_dict.get("profiler")

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        prof, out = self.profiler, self._out
        self._out = None
        if prof is None or out is None:
            return
        snap = prof.observe(
            out["task_losses"],
            out.get("task_weights"),
            features=out.get("features") if prof.engine == "features" else None,
            grad_scale=getattr(getattr(trainer, "precision_plugin", None), "scaler", None),
        )
        if snap is not None:
            self.snapshots.append(snap)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self._wrapped is not None:
            del pl_module.training_step  # the class's method shows through again
            self._wrapped = None
        if self.profiler is not None:
            self.profiler.close()
            self.profiler = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """A fit that raised: as its teardown (the wrapper removed, the profiler and its store
        closed with what was flushed), so that a resumed fit in this process starts clean."""
        self.teardown(trainer, pl_module, "fit")

    # -- internals -------------------------------------------------------------------------------
    def _capture(self, step: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(step)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            if not isinstance(out, Mapping) or not isinstance(out.get("task_losses"), Mapping):
                raise GradlensError(
                    "`training_step` should return a dict with 'loss' and 'task_losses' (task -> "
                    "scalar loss) for GradlensCallback; found "
                    + (
                        f"keys {sorted(out)}"
                        if isinstance(out, Mapping)
                        else f"{type(out).__name__}"
                    )
                    + "."
                )
            self._out = out
            return out

        return training_step
