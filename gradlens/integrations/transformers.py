"""A Hugging Face ``Trainer`` callback that profiles a multi-task model (observe-only).

Convention: the model's ``forward`` returns a dict (or a ``ModelOutput``) holding the total loss
under ``"loss"`` (what ``Trainer`` backpropagates, as usual) and the per-task losses under
``"task_losses"``; optionally the loss weights under ``"task_weights"`` (stored with each
snapshot; default 1 per task) and, for ``engine="features"``, the shared representation under
``"features"``::

    def forward(self, input_ids, attention_mask, label_a, label_b):
        z = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        task_losses = {"a": F.cross_entropy(self.head_a(z), label_a),
                       "b": F.mse_loss(self.head_b(z).squeeze(1), label_b)}
        return {"loss": sum(task_losses.values()), "task_losses": task_losses}

In ``on_train_begin`` the callback creates a :class:`gradlens.Profiler` on the shared module
(``shared_attr``) and wraps the model's ``forward``; after each training forward (the model in
train mode, gradients enabled) it calls :meth:`gradlens.Profiler.observe` on the task losses, so
``Trainer``'s own backward, optimizer, gradient accumulation, mixed precision and strategy are
untouched and the parameters are the same, bit for bit, as without the callback. Evaluation
forwards are not profiled. ``on_train_end`` removes the wrapper and closes the profiler (and its
store and sinks). The profiler's step counts training forwards, i.e. micro-batches under
``gradient_accumulation_steps``. In a multi-process run every rank measures its own batch
(``meta["grams"] == "local"``) and only the main process writes the store and feeds the sinks.
``trainer.train(resume_from_checkpoint=...)`` continues the same run directory (reopened in
append mode, cut back to the checkpoint's step, ``global_step`` times the accumulation steps) and
the profiler's step and schedule from there; ``auto`` times its candidates anew (``Trainer``
keeps no callback state it could restore them from).

Example:
    >>> import pytest
    >>> _ = pytest.importorskip("transformers")
    >>> from gradlens.integrations.transformers import GradlensTrainerCallback
    >>> cb = GradlensTrainerCallback(tasks=["a", "b"], shared_attr="bert", every=10)
    >>> cb.tasks, cb.profiler is None
    (('a', 'b'), True)
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gradlens._errors import GradlensError, require
from gradlens.integrations._common import check_callback_args, shared_module
from gradlens.profiler import Profiler, Sink
from gradlens.schedules import Schedule
from gradlens.snapshot import Snapshot
from gradlens.store import RunWriter

require("transformers", "transformers", "gradlens.integrations.transformers")

from transformers import TrainerCallback  # noqa: E402

__all__ = ["GradlensTrainerCallback"]


class GradlensTrainerCallback(TrainerCallback):
    """Profile the shared part of a multi-task model trained by ``Trainer`` (module docstring).

    Args:
        tasks: task names, the keys of the model output's ``"task_losses"``.
        shared_attr: attribute path of the shared module on the model (dots allowed, e.g.
            ``"bert"`` or ``"model.encoder"``).
        engine, every, memory_budget, meta: as in :class:`gradlens.Profiler`.
        store: run directory written by the main process (None: no store).
        sinks: more receivers on the main process (e.g. :class:`gradlens.sinks.WandbSink`).
        keep: how many recent snapshots ``self.snapshots`` holds (0 keeps none).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        shared_attr: str,
        engine: str = "auto",
        every: int | Schedule = 1,
        store: str | Path | None = None,
        *,
        sinks: Sequence[Sink] = (),
        keep: int = 100,
        memory_budget: int = 256 * 2**20,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.tasks, keep = check_callback_args(tasks, shared_attr, keep, example="bert")
        self.shared_attr = shared_attr
        self._engine = engine
        self._every = every
        self._store = store
        self._sinks = list(sinks)
        self._budget = memory_budget
        self._meta = dict(meta or {})
        self.profiler: Profiler | None = None
        #: The most recent snapshots (at most ``keep``), oldest first.
        self.snapshots: deque[Snapshot] = deque(maxlen=keep)
        self._model: Any = None
        self._had_forward = False

    # -- Trainer events --------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is None:
            return
        if self.profiler is not None:  # left by a train() that raised (no on_train_end)
            self._detach()
        shared = shared_module(model, self.shared_attr)
        main = bool(state.is_world_process_zero)
        world = int(getattr(args, "world_size", 1))
        meta = {"grams": "local", "world_size": world, "framework": "transformers"}
        # a run resumed from a checkpoint starts after its forwards (micro-batches)
        start = _forwards_done(state, args, kwargs.get("train_dataloader"))
        store: str | Path | RunWriter | None = self._store if main else None
        if self._store is not None and main and start > 0:
            store = RunWriter(self._store, meta={"tasks": list(self.tasks)}, append=True)
            store.rewind(start)  # the interrupted run's probes past the checkpoint go
        try:
            self.profiler = Profiler(
                shared,
                self.tasks,
                engine=self._engine,
                every=self._every,
                store=store,
                sinks=self._sinks if main else (),
                memory_budget=self._budget,
                meta={**meta, **self._meta},
            )
        except BaseException:
            if isinstance(store, RunWriter):
                store.close()
            raise
        self.profiler.step = start
        self._model = model
        self._had_forward = "forward" in vars(model)
        model.forward = self._observe_after(model.forward, model)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._detach()

    # -- internals -------------------------------------------------------------------------------
    def _detach(self) -> None:
        model, self._model = self._model, None
        if model is not None:
            wrapped = vars(model).get("forward")
            inner = getattr(wrapped, "__wrapped__", None)
            if self._had_forward and inner is not None:
                model.forward = inner  # a forward set on the instance before us (accelerate)
            elif "forward" in vars(model):
                del model.forward  # the class's method shows through again
        if self.profiler is not None:
            self.profiler.close()
            self.profiler = None

    def _observe_after(self, forward: Callable[..., Any], model: Any) -> Callable[..., Any]:
        @functools.wraps(forward)
        def observed(*args: Any, **kwargs: Any) -> Any:
            out = forward(*args, **kwargs)
            prof = self.profiler
            if prof is None or not model.training or not torch.is_grad_enabled():
                return out
            task_losses = out.get("task_losses") if isinstance(out, Mapping) else None
            if not isinstance(task_losses, Mapping):
                raise GradlensError(
                    "The model's forward should return a dict (or ModelOutput) with 'loss' and "
                    "'task_losses' (task -> scalar loss) for GradlensTrainerCallback; found "
                    + (
                        f"keys {sorted(out)}"
                        if isinstance(out, Mapping)
                        else f"{type(out).__name__}"
                    )
                    + "."
                )
            snap = prof.observe(
                task_losses,
                out.get("task_weights"),
                features=out.get("features") if prof.engine == "features" else None,
            )
            if snap is not None:
                self.snapshots.append(snap)
            return out

        return observed


def _forwards_done(state: Any, args: Any, loader: Any) -> int:
    """Training forwards (micro-batches) run before ``state.global_step`` optimizer steps: an
    epoch of ``n`` batches makes ``ceil(n / accumulation)`` steps, its last one from the
    remaining batches (as ``Trainer`` does)."""
    steps = int(state.global_step)
    accumulation = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
    try:
        n = len(loader)
    except TypeError:  # no length (an iterable dataset): whole accumulation groups
        return steps * accumulation
    per_epoch = max(1, math.ceil(n / accumulation))
    return (steps // per_epoch) * n + (steps % per_epoch) * accumulation
