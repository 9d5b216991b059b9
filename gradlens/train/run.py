"""One whole training run: :func:`train` (epochs, early stopping, checkpoints, final evaluation).

With ``checkpoint=path`` the run saves its state every ``checkpoint_every`` epochs, with the run
store flushed first, so every probed step before a checkpoint is on disk with it. Called again
with the same arguments after the process died, :func:`train` reopens the run directory in
append mode, cuts it back to the checkpoint's step (the steps flushed after it are trained
again) and continues from the checkpoint; the checkpoint file is removed when the run is done.
Sweeps use it to resume a run killed mid-training.

Example:
    >>> import tempfile
    >>> from gradlens.train import train
    >>> d = tempfile.mkdtemp()
    >>> res = train({"dataset": "synthetic", "dataset_options": {"n": 200}, "width": 0.25,
    ...              "epochs": 2, "batch_size": 50}, d + "/run", progress=False,
    ...             checkpoint=d + "/run.pt")
    >>> res.epochs_run, Path(d + "/run.pt").exists()
    (2, False)
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradlens._errors import GradlensError, GradlensWarning
from gradlens._validate import check_int
from gradlens.train._data import score
from gradlens.train.config import TrainConfig
from gradlens.train.trainer import Trainer

__all__ = ["TrainResult", "train"]

#: Version of the checkpoint files :func:`train` writes.
CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: the run directory, or None when nothing was stored.
        metrics: the final metrics ``{split: {task: {metric: value}}}`` (``val`` and ``test``).
        epochs_run: epochs actually trained.
        stopped_early: whether early stopping ended training before ``config.epochs``.
    """

    run_dir: Path | None
    metrics: dict[str, dict[str, dict[str, float]]]
    epochs_run: int
    stopped_early: bool


def train(
    config: TrainConfig | Mapping[str, Any],
    run_dir: str | Path | None = None,
    *,
    progress: bool = True,
    overwrite: bool = False,
    yes: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1,
) -> TrainResult:
    """Train ``config.epochs`` epochs (with early stopping if configured), then :meth:`finish`.

    ``yes`` confirms a model beyond the size bound (see :class:`Trainer`).

    With ``early_stopping = k``, training stops after ``k`` epochs without a new best mean
    validation :func:`score`, and the model of the best epoch is restored before the final
    evaluation (``meta["early_stopping"]`` records the best epoch and score).

    With ``checkpoint`` (a file path), the training state (the :meth:`Trainer.state_dict` and
    the early-stopping state) is saved there every ``checkpoint_every`` epochs with the run
    flushed; if that file exists when :func:`train` starts, the run continues from it (see the
    module docstring). The file is removed once the run is finished.

    Example:
        >>> res = train({"dataset": "synthetic", "dataset_options": {"n": 200}, "width": 0.25,
        ...              "epochs": 2, "batch_size": 50}, progress=False)
        >>> res.run_dir is None, res.epochs_run, res.stopped_early
        (True, 2, False)
    """
    every = check_int("checkpoint_every", checkpoint_every, minimum=1)
    ckpt = None if checkpoint is None else Path(checkpoint)
    resume = ckpt is not None and ckpt.is_file()
    with warnings.catch_warnings():  # resuming means taking over the dead writer's lock
        if resume:
            warnings.filterwarnings("ignore", "Taking over the stale writer lock", GradlensWarning)
        trainer = Trainer(
            config, run_dir, progress=progress, overwrite=overwrite and not resume,
            append=resume, yes=yes,
        )  # fmt: skip
    try:
        cfg = trainer.config
        stopper = None if cfg.early_stopping is None else _EarlyStopping(cfg.early_stopping)
        if resume and ckpt is not None:
            _load_checkpoint(trainer, stopper, ckpt)
        trainer._total_epochs = cfg.epochs
        while trainer.epoch < cfg.epochs and not (stopper is not None and stopper.stopped):
            val = trainer.fit_epochs(1)
            if stopper is not None:
                stopper.update(trainer, score(val))
            if ckpt is not None and trainer.epoch % every == 0 and trainer.epoch < cfg.epochs:
                _save_checkpoint(trainer, stopper, ckpt)
        if stopper is not None:
            stopper.finish(trainer)
        final = trainer.finish()
    finally:
        trainer.close()
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return TrainResult(
        trainer.run_dir, final, trainer.epoch, stopper is not None and stopper.stopped
    )


class _EarlyStopping:
    """Patience on the mean validation score; keeps the best epoch's model."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = -math.inf
        self.best_epoch = 0
        self.best_state: dict[str, Any] | None = None
        self.bad = 0
        self.stopped = False

    def update(self, trainer: Trainer, s: float) -> None:
        if s > self.best:
            self.best, self.best_epoch, self.bad = s, trainer.epoch, 0
            self.best_state = copy.deepcopy(trainer.model.state_dict())
        else:
            self.bad += 1
            self.stopped = self.bad >= self.patience

    def finish(self, trainer: Trainer) -> None:
        """Restore the best epoch's model and record the outcome in the run's meta."""
        if self.best_state is not None and self.best_epoch != trainer.epoch:
            trainer.model.load_state_dict(self.best_state)
        if trainer.store is not None:
            trainer.store.update_meta(
                early_stopping={
                    "patience": self.patience,
                    "best_epoch": self.best_epoch,
                    "best_score": self.best if math.isfinite(self.best) else None,
                    "stopped_early": self.stopped,
                }
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "bad": self.bad,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.best_state = state["best_state"]
        self.bad = int(state["bad"])
        self.stopped = bool(state["stopped"])


def _save_checkpoint(trainer: Trainer, stopper: _EarlyStopping | None, path: Path) -> None:
    """Flush the run, then write the state atomically: every step before it is on disk."""
    if trainer.store is not None:
        trainer.store.flush()
    state = {
        "format": CHECKPOINT_FORMAT,
        "trainer": trainer.state_dict(),
        "early_stopping": None if stopper is None else stopper.state_dict(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(trainer: Trainer, stopper: _EarlyStopping | None, path: Path) -> None:
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise GradlensError(
            f"`checkpoint` {path} should be a checkpoint written by gradlens.train.train; it "
            f"cannot be read ({type(exc).__name__}: {exc}). Delete it to train from scratch."
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise GradlensError(
            f"`checkpoint` {path} should be a training checkpoint of format "
            f"{CHECKPOINT_FORMAT}; found {found!r}."
        )
    trainer.load_state_dict(state["trainer"])
    if stopper is not None and state.get("early_stopping") is not None:
        stopper.load_state_dict(state["early_stopping"])
