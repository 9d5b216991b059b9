"""The training harness: train one multi-task or multi-domain model with the profiler attached.

A run is described by a :class:`TrainConfig` (dataset, tasks, model family and size, loss weights
or sampling probabilities, optimizer, epochs, seed, profiler engine and schedule). :func:`train`
runs it end to end; :class:`Trainer` exposes the pieces that sweeps and population-based training
build on (train a few epochs, change the weights, evaluate, checkpoint, clone).

Scalarization, as in Royer et al. (2023):

- multi-task datasets (one head per task): the loss is ``sum_t w_t L_t`` with ``w`` the loss
  weights normalised to the simplex; ``L_t`` is the mean cross-entropy (classification) or mean
  squared error (regression) of task ``t`` on the batch.
- multi-domain datasets (one head, the tasks are the domains): ``w`` are sampling probabilities.
  Each sample of a batch draws its domain ``t`` with probability ``p_t`` and then a training sample
  of that domain uniformly (resampling, with replacement) and the plain batch mean loss is
  minimised. The profiler receives the per-domain losses ``L_t`` (mean over the batch's samples of
  domain ``t``) with weights ``n_t / B`` (each domain's share of the batch), so that
  ``sum_t (n_t / B) L_t`` is exactly the batch mean loss; the snapshots store these shares.

Example:
    >>> import tempfile
    >>> from gradlens.train import train
    >>> res = train({"dataset": "multidigits", "dataset_options": {"n": 256}, "width": 0.25,
    ...              "epochs": 1, "batch_size": 64, "every": 2},
    ...             run_dir=tempfile.mkdtemp() + "/run", progress=False)
    >>> sorted(res.metrics), sorted(res.metrics["test"]), res.epochs_run
    (['test', 'val'], ['left', 'right'], 1)
    >>> sorted(res.metrics["val"]["left"])
    ['accuracy', 'loss']
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from tqdm import tqdm

from gradlens._errors import GradlensError, GradlensWarning
from gradlens._paths import check_name
from gradlens.data import DATASETS
from gradlens.engines import ENGINES
from gradlens.models import DEFAULT_DEPTH, FAMILIES, build_model
from gradlens.profiler import Profiler
from gradlens.schedules import LogSpaced, Schedule
from gradlens.store import RunWriter
from gradlens.train._data import (
    TrainData,
    epoch_batches,
    evaluate,
    load_train_data,
    multidomain_losses,
    multitask_losses,
    resample_batch,
    steps_per_epoch,
)
from gradlens.train._limits import (
    check_device_available,
    check_model_size,
    torch_threads,
)
from gradlens.weightings import GRAM_METHODS, METHODS, LossWeighting, make_weighting, per_layer

__all__ = ["OPTIMIZERS", "TrainConfig", "TrainResult", "Trainer", "score", "train"]

Optimizer = Literal["sgd", "adam"]
#: Optimizers accepted by :attr:`TrainConfig.optimizer`.
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
#: Tag separating the data-order random stream from the model initialisation (same seed).
_TAG_BATCHES = 7001
_SPLITS = ("train", "val", "test")
_LOG_EVERY = re.compile(r"^log(?::(\d+))?$")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that defines a training run (all fields have defaults).

    Attributes:
        dataset: a name from :data:`gradlens.data.DATASETS`.
        dataset_options: the dataset's own options (see :func:`gradlens.data.dataset_options`),
            plus ``root`` (folder of an on-disk dataset) and ``seed`` (the data seed, which fixes
            the splits; default: :attr:`seed`).
        tasks: the tasks (multi-domain: domains) to train on; None means all of the dataset's.
            One task is the single-task baseline.
        model: a family from :data:`gradlens.models.FAMILIES`.
        width: the family's width multiplier.
        depth: the family's depth; None means the family default
            (:data:`gradlens.models.DEFAULT_DEPTH`).
        weights: task -> loss weight (multi-task) or sampling probability (multi-domain);
            normalised to the simplex; None means uniform.
        weight_schedule: piecewise-constant weights: a list of ``{"epoch": e, "weights": {...}}``
            applied at the start of epoch ``e`` (0-based); None for static weights.
        optimizer: ``"adam"`` or ``"sgd"``.
        lr: learning rate.
        momentum: SGD momentum (unused by Adam).
        weight_decay: L2 weight decay of the optimizer.
        batch_size: training batch size (an epoch is ``floor(n_train / batch_size)`` steps).
        steps_per_epoch: training steps per epoch; None: ``floor(n_train / batch_size)``. Sweeps
            set it on single-task baselines so that they get the joint runs' compute (a
            single-domain baseline's own split is smaller than the joint training set).
        epochs: number of training epochs (:func:`train`).
        seed: seeds the model initialisation and the batch order (and the data by default).
        engine: the profiler engine, one of :data:`gradlens.engines.ENGINES`.
        every: the probe schedule: probe every k-th step (an int), or ``"log"`` /
            ``"log:N"`` for log-spaced steps with N per decade (default 10).
        early_stopping: patience in epochs on the mean validation score (:func:`score`); None
            disables it. The model of the best epoch is restored before the final evaluation.
        weighting: a multi-task optimization method from
            :data:`gradlens.weightings.METHODS` instead of static ``weights`` (multi-task only):
            a Gram method (``"upgrad"``, ``"mgda"``, ``"cagrad"``, ``"nash_mtl"``...) recomputes
            the weights from the Gram at every probed step and holds them in between (``every=1``
            for the exact method); a loss-based one (``"uncertainty"``, ``"rlw"``, ``"dwa"``)
            sets them from the losses every step. Its state is in :meth:`Trainer.state_dict`.
        per_layer: apply a Gram ``weighting`` to each layer's own Gram (``gl.per_layer``).
        device: a torch device string.
        threads: torch CPU threads while this run trains and evaluates (restored after); None
            leaves torch's setting. Part of the run's recorded configuration because the
            numbers depend on it; sweeps and PBT set 1 when it is None, whatever ``workers``.
        config: free-form user fields, stored with the run (``meta["config"]["config"]``).

    Example:
        >>> cfg = TrainConfig.from_dict({"tasks": ["left"], "epochs": 3})
        >>> cfg.tasks, cfg.epochs, cfg.optimizer
        (['left'], 3, 'adam')
        >>> TrainConfig.from_dict({"epoch": 3})
        Traceback (most recent call last):
        ...
        gradlens._errors.GradlensError: Unknown TrainConfig field(s) ['epoch']; valid fields: ...
    """

    dataset: str = "multidigits"
    dataset_options: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] | None = None
    model: str = "mlp"
    width: float = 1.0
    depth: int | None = None
    weights: dict[str, float] | None = None
    weight_schedule: list[dict[str, Any]] | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    steps_per_epoch: int | None = None
    epochs: int = 10
    seed: int = 0
    engine: str = "gramian"
    every: int | str = 10
    early_stopping: int | None = None
    weighting: str | None = None
    per_layer: bool = False
    device: str = "cpu"
    threads: int | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_choice("dataset", self.dataset, DATASETS)
        self.dataset_options = dict(_check_json("dataset_options", self.dataset_options, dict))
        if self.tasks is not None:
            if isinstance(self.tasks, str) or not isinstance(self.tasks, Sequence):
                raise GradlensError(
                    f"`tasks` should be a list of task names or None; found {self.tasks!r}."
                )
            tasks = list(self.tasks)
            if (
                not tasks
                or not all(isinstance(t, str) and t for t in tasks)
                or len(set(tasks)) != len(tasks)
            ):
                raise GradlensError(
                    f"`tasks` should be a non-empty list of distinct task names; found {tasks!r}."
                )
            for t in tasks:  # task names become file names (a sweep's baseline run ids)
                check_name(t, "tasks[]")
            self.tasks = tasks
        _check_choice("model", self.model, FAMILIES)
        self.width = _check_number("width", self.width, low=0.0, strict=True)
        if self.depth is not None:
            self.depth = _check_int("depth", self.depth, low=1, none_ok=False)
        if self.weights is not None:
            self.weights = _check_weight_map("weights", self.weights)
        if self.weight_schedule is not None:
            self.weight_schedule = _check_schedule(self.weight_schedule)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        self.lr = _check_number("lr", self.lr, low=0.0, strict=True)
        self.momentum = _check_number("momentum", self.momentum, low=0.0, high=1.0)
        self.weight_decay = _check_number("weight_decay", self.weight_decay, low=0.0)
        self.batch_size = _check_int("batch_size", self.batch_size, low=1, none_ok=False)
        self.steps_per_epoch = _check_int(
            "steps_per_epoch", self.steps_per_epoch, low=1, none_ok=True
        )
        self.epochs = _check_int("epochs", self.epochs, low=0, none_ok=False)
        self.seed = _check_int("seed", self.seed, low=0, none_ok=False)
        _check_choice("engine", self.engine, tuple(sorted(ENGINES)))
        _probe_schedule(self.every)
        if self.early_stopping is not None:
            self.early_stopping = _check_int(
                "early_stopping", self.early_stopping, low=1, none_ok=False
            )
        if self.threads is not None:
            self.threads = _check_int("threads", self.threads, low=1, none_ok=False)
        _check_weighting(self)
        if not isinstance(self.device, str):
            raise GradlensError(f"`device` should be a torch device string; found {self.device!r}.")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise GradlensError(
                f"`device` should be a torch device string such as 'cpu' or 'cuda:0'; found "
                f"{self.device!r}."
            ) from None
        self.config = dict(_check_json("config", self.config, dict))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build a config from a mapping (a TOML table, a JSON object, ``to_dict()``'s output).

        Raises:
            GradlensError: naming unknown keys and listing the valid ones, or a bad value.

        Example:
            >>> TrainConfig.from_dict({"model": "resnet", "width": 0.5}).width
            0.5
        """
        if isinstance(d, TrainConfig):
            return cls(**d.to_dict())
        if not isinstance(d, Mapping):
            raise GradlensError(
                f"`config` should be a TrainConfig or a mapping of its fields; found "
                f"{type(d).__name__}."
            )
        valid = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in d if k not in valid)
        if unknown:
            raise GradlensError(f"Unknown TrainConfig field(s) {unknown}; valid fields: {valid}.")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field (``from_dict`` reads it back).

        Example:
            >>> TrainConfig().to_dict()["engine"]
            'gramian'
        """
        return json.loads(json.dumps(asdict(self)))


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """One model, its optimizer and profiler, trained epoch by epoch.

    Args:
        config: a :class:`TrainConfig` or a mapping of its fields.
        run_dir: the run directory to write (meta, probed Grams, evals); None keeps nothing.
        progress: show a tqdm bar per epoch with the running losses (only on a terminal).
        overwrite: replace a run already stored in ``run_dir``.
        yes: confirm a model beyond the size bound (:data:`MAX_DEPTH` blocks or
            :data:`PARAMS_WITHOUT_YES` parameters), which is otherwise refused before it is built.
        append: continue the run stored in ``run_dir`` (see ``RunWriter(append=True)``): load
            the checkpoint it was resumed from with :meth:`load_state_dict`, which drops the
            steps and evals the run stored after that checkpoint and keeps every one before.

    The run's ``meta.json`` holds ``tasks``, ``kind``, ``scalarization``, ``weights`` (the initial
    normalised weights), ``weight_schedule`` (the weights in use from each ``{"epoch", "step"}``
    on: the first entry holds the initial weights, and a change at a step that already has an
    entry replaces it), ``model`` (``family``, ``width``,
    ``depth``, ``n_params``, ``n_shared_params``), ``seed``, ``config`` (``TrainConfig.to_dict()``,
    user fields under ``config``), ``dataset`` (name, kind, options, sizes) and, from the
    profiler, ``engine``, ``layers``, ``every``. Evals: ``point="epoch:k"`` after each epoch
    (``val`` metrics, and the epoch's mean training loss per task as ``train``), ``"final"`` from
    :meth:`finish` (``val`` and ``test``).

    Example:
        >>> t = Trainer({"dataset": "synthetic", "dataset_options": {"n": 200}, "width": 0.25,
        ...              "batch_size": 50}, progress=False)
        >>> t.tasks, t.epoch
        (('task0', 'task1'), 0)
        >>> sorted(t.fit_epochs(1)["task0"]), t.epoch, t.step
        (['loss', 'mse', 'r2'], 1, 4)
        >>> t.weights = {"task0": 3.0, "task1": 1.0}
        >>> t.weights
        {'task0': 0.75, 'task1': 0.25}
        >>> t.close()
    """

    def __init__(
        self,
        config: TrainConfig | Mapping[str, Any],
        run_dir: str | Path | None = None,
        *,
        progress: bool = True,
        overwrite: bool = False,
        append: bool = False,
        yes: bool = False,
    ) -> None:
        cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        self.config = cfg
        self.progress = bool(progress)
        self.device = check_device_available(cfg.device)
        self.data: TrainData = load_train_data(
            cfg.dataset, cfg.dataset_options, cfg.tasks, cfg.seed, self.device
        )
        self.tasks: tuple[str, ...] = self.data.tasks
        self.multidomain = self.data.kind == "multidomain"
        depth = DEFAULT_DEPTH[cfg.model] if cfg.depth is None else cfg.depth
        check_model_size(cfg, self.data.heads, self.data.input_shape, depth, yes)
        self.model = build_model(
            cfg.model,
            self.data.heads,
            self.data.input_shape,
            width=cfg.width,
            depth=depth,
            seed=cfg.seed,
        ).to(self.device)
        self.optimizer = _make_optimizer(cfg, self.model)
        self.weighting = _make_trainer_weighting(cfg, self.data.tasks, self.data.kind)
        if isinstance(self.weighting, LossWeighting) and self.weighting.parameters():
            self.optimizer.add_param_group({"params": self.weighting.parameters()})
        self._gen = torch.Generator().manual_seed(_derived_seed(cfg.seed, _TAG_BATCHES))
        if self.multidomain:
            dom = self.data.splits["train"].Y["domain"].cpu()
            self._pools = [torch.nonzero(dom == k).flatten() for k in range(len(self.tasks))]
        self._weights = _normalise(cfg.weights, self.tasks, "weights")
        self._check_feasible(self._weights, "weights")
        if cfg.weight_schedule:
            for entry in cfg.weight_schedule:
                self._check_feasible(
                    _normalise(entry["weights"], self.tasks, "weight_schedule"), "weight_schedule"
                )
        self.epoch = 0
        self.step = 0
        self._total_epochs: int | None = None
        self._finished = False
        self._train_seconds = 0.0
        self._train_steps = 0
        self._log: list[dict[str, Any]] = [{"epoch": 0, "step": 0, "weights": dict(self._weights)}]
        n_params = self.model.n_params()
        meta = {
            "tasks": list(self.tasks),
            "kind": self.data.kind,
            "scalarization": "resampling" if self.multidomain else "loss_weights",
            "weights": dict(self._weights),
            "weight_schedule": copy.deepcopy(self._log),
            "model": {
                "family": cfg.model,
                "width": cfg.width,
                "depth": depth,
                "n_params": n_params["total"],
                "n_shared_params": n_params["trunk"],
            },
            "seed": cfg.seed,
            # the method as an arm label: "upgrad", "upgrad/per_layer"; None for static weights
            "weighting": (
                None if cfg.weighting is None else cfg.weighting + "/per_layer" * cfg.per_layer
            ),
            "config": cfg.to_dict(),
            "dataset": self.data.describe(),
            "device": str(self.device),
        }
        writer = None
        self._stored_log: list[dict[str, Any]] | None = None
        if run_dir is not None:
            if append and (Path(run_dir) / "meta.json").is_file():
                from gradlens.store.reader import read_meta

                stored = read_meta(Path(run_dir)).get("weight_schedule")
                self._stored_log = list(stored) if isinstance(stored, list) else None
            writer = RunWriter(run_dir, meta=meta, overwrite=overwrite, append=append)
        self.run_dir: Path | None = None if writer is None else writer.path
        try:
            self.profiler = Profiler(
                self.model.trunk,
                tasks=self.tasks,
                engine=cfg.engine,
                every=_probe_schedule(cfg.every),
                store=writer,
            )
        except BaseException:
            if writer is not None:
                writer.close()
            raise

    # -- weights -------------------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, float]:
        """The normalised weights in use (loss weights, or sampling probabilities).

        Setting them (a mapping task -> non-negative number, normalised to the simplex) takes
        effect from the next step and is recorded in ``meta["weight_schedule"]``; set before the
        first step, they also replace ``meta["weights"]``.
        """
        return dict(self._weights)

    @weights.setter
    def weights(self, value: Mapping[str, float]) -> None:
        self._check_open("set the weights")
        if value is None:
            raise GradlensError(
                "`weights` should be a mapping task -> weight; found None (use equal values for "
                "uniform weights)."
            )
        self._set_weights(_normalise(value, self.tasks, "weights"))

    def _set_weights(self, w: dict[str, float]) -> None:
        self._check_feasible(w, "weights")
        self._weights = w
        entry = {"epoch": self.epoch, "step": self.step, "weights": dict(w)}
        if self._log[-1]["step"] == self.step and self._log[-1]["epoch"] == self.epoch:
            self._log[-1] = entry  # the replaced weights were in use for no step
        else:
            self._log.append(entry)
        if self.store is not None:
            fields: dict[str, Any] = {"weight_schedule": self._log}
            if self.step == 0:
                fields["weights"] = dict(w)  # set before training: these are the initial ones
            self.store.update_meta(**fields)

    def _check_feasible(self, w: Mapping[str, float], name: str) -> None:
        if not self.multidomain:
            return
        counts = [len(p) for p in self._pools]
        bad = [t for t, c in zip(self.tasks, counts) if c == 0 and w[t] > 0]
        if bad:  # pragma: no cover - load_train_data rejects domains without training samples
            raise GradlensError(f"`{name}` gives domains {bad} a probability but they are empty.")

    # -- public --------------------------------------------------------------------------------
    @property
    def store(self) -> RunWriter | None:
        """The run writer (None without ``run_dir``)."""
        return self.profiler.store  # type: ignore[return-value]

    def fit_epochs(self, n: int) -> dict[str, dict[str, float]]:
        """Train ``n`` epochs; after each, evaluate on ``val`` and record it as ``epoch:k``.

        Returns:
            The last epoch's validation metrics ``{task: {metric: value}}``.
        """
        self._check_open("train")
        n = _check_int("n", n, low=1, none_ok=False)
        val: dict[str, dict[str, float]] = {}
        for _ in range(n):
            with torch_threads(self.config.threads):
                bar, train_losses = self._train_epoch()
            val = self.evaluate("val")
            if bar is not None:
                bar.set_postfix_str(_postfix(train_losses, val), refresh=True)
                bar.close()
            if self.store is not None:
                point = f"epoch:{self.epoch}"
                self.store.add_eval(val, split="val", point=point, epoch=self.epoch, step=self.step)
                seen = {t: {"loss": v} for t, v in train_losses.items() if math.isfinite(v)}
                if seen:
                    self.store.add_eval(
                        seen, split="train", point=point, epoch=self.epoch, step=self.step
                    )
        return val

    def evaluate(self, split: str) -> dict[str, dict[str, float]]:
        """Per-task metrics on ``"train"``, ``"val"`` or ``"test"`` (nothing is recorded).

        Classification tasks: ``accuracy`` and ``loss`` (mean cross-entropy); regression tasks:
        ``loss`` and ``mse`` (both the mean squared error) and ``r2``; multi-domain: per domain.
        """
        if split not in _SPLITS:
            raise GradlensError(f"`split` should be one of {_SPLITS}; found {split!r}.")
        with torch_threads(self.config.threads):
            return evaluate(self.model, self.data, split)

    def finish(self) -> dict[str, dict[str, dict[str, float]]]:
        """Evaluate ``val`` and ``test``, record them as point ``"final"``, close the run.

        Returns:
            ``{split: {task: {metric: value}}}`` for ``val`` and ``test``.
        """
        self._check_open("finish")
        final = {s: self.evaluate(s) for s in ("val", "test")}
        if self.store is not None:
            for split, values in final.items():
                self.store.add_eval(
                    values, split=split, point="final", epoch=self.epoch, step=self.step
                )
            self.store.update_meta(
                epochs_run=self.epoch,
                steps_run=self.step,
                # wall time of this trainer's training steps (not evaluation), per step
                seconds_per_step=self._train_seconds / max(1, self._train_steps),
            )
        self.close()
        return final

    def state_dict(self) -> dict[str, Any]:
        """A snapshot of the training state (copied, so later training does not change it).

        Holds ``model``, ``optimizer``, ``weights``, ``weight_schedule``, ``epoch``, ``step``,
        ``rng`` (the batch-order generator) and ``tasks``: only tensors, dicts, lists, numbers
        and strings, so ``torch.load(..., weights_only=True)`` reads a saved one back.
        """
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "weights": dict(self._weights),
                "weight_schedule": self._log,
                "epoch": self.epoch,
                "step": self.step,
                "rng": self._gen.get_state(),
                "tasks": list(self.tasks),
                "weighting": self._weighting_state(),
            }
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (of this trainer or another with the same tasks and model).

        Training then continues exactly as the saved trainer would have. A change of weights is
        recorded in this run's ``weight_schedule``; the profiler continues from the loaded step.
        """
        self._check_open("load a state")
        need = ("model", "optimizer", "weights", "epoch", "step", "rng", "tasks")
        if not isinstance(state, Mapping) or any(k not in state for k in need):
            found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise GradlensError(
                f"`state` should be a Trainer.state_dict() with keys {list(need)}; found {found}."
            )
        if list(state["tasks"]) != list(self.tasks):
            raise GradlensError(
                f"`state` was saved for tasks {list(state['tasks'])}; this trainer has "
                f"{list(self.tasks)}."
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._gen.set_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.profiler.step = self.step
        w = _normalise(state["weights"], self.tasks, "state['weights']")
        if self.store is not None:  # the run continues at the loaded step
            self.store.rewind(self.step)
        if self._stored_log is not None:  # a reopened run: its schedule up to the loaded step
            kept = [e for e in self._stored_log if int(e.get("step", 0)) <= self.step]
            self._log, self._stored_log = kept or self._log, None
            if self.store is not None:
                self.store.update_meta(weight_schedule=self._log)
        if w != self._weights:
            self._set_weights(w)
        self._load_weighting_state(state.get("weighting"))

    def close(self) -> None:
        """Close the profiler (removes its hooks) and the run store; idempotent."""
        if not self._finished:
            self._finished = True
            self.profiler.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Trainer(dataset={self.config.dataset!r}, tasks={list(self.tasks)}, "
            f"model={self.config.model!r}, epoch={self.epoch}, step={self.step})"
        )

    # -- internals -----------------------------------------------------------------------------
    def _check_open(self, what: str) -> None:
        if self._finished:
            raise GradlensError(
                f"Cannot {what}: this Trainer is finished or closed; create a new one (or load "
                "its state_dict into a new one)."
            )

    def _weighting_state(self) -> dict[str, Any] | None:
        """A weighting's state: a loss-based one's own, a Gram one's held weights."""
        if self.weighting is None:
            return None
        out: dict[str, Any] = {"method": self.config.weighting}
        if isinstance(self.weighting, LossWeighting):
            out["state"] = self.weighting.state_dict()
        held = self.profiler._held
        if held is not None:
            out["held"] = {"total": held[0], "layers": dict(held[1])}
        return out

    def _load_weighting_state(self, state: Mapping[str, Any] | None) -> None:
        if self.weighting is None:
            return
        if state is None or state.get("method") != self.config.weighting:
            found = None if state is None else state.get("method")
            raise GradlensError(
                f"`state` should hold the state of weighting {self.config.weighting!r}; found "
                f"{found!r}."
            )
        if isinstance(self.weighting, LossWeighting):
            self.weighting.load_state_dict(state["state"])
        held = state.get("held")
        self.profiler._held = (
            None if held is None else (held["total"].clone(), dict(held["layers"]))
        )

    def _apply_schedule(self) -> None:
        for entry in self.config.weight_schedule or ():
            if entry["epoch"] == self.epoch:
                w = _normalise(entry["weights"], self.tasks, "weight_schedule")
                if w != self._weights:
                    self._set_weights(w)

    def _train_epoch(self) -> tuple[Any, dict[str, float]]:
        self._apply_schedule()
        self.model.train()
        split = self.data.splits["train"]
        n_steps = self.config.steps_per_epoch or steps_per_epoch(len(split), self.config.batch_size)
        batches = None
        if not self.multidomain:  # passes over fresh permutations until n_steps batches
            batches = epoch_batches(len(split), self.config.batch_size, self._gen)
            while len(batches) < n_steps:
                batches += epoch_batches(len(split), self.config.batch_size, self._gen)
        total = self._total_epochs
        bar = tqdm(
            total=n_steps,
            desc=f"epoch {self.epoch + 1}" + (f"/{total}" if total else ""),
            unit="step",
            disable=None if self.progress else True,
            leave=True,
            dynamic_ncols=True,
        )
        sums = np.zeros(len(self.tasks))
        counts = np.zeros(len(self.tasks))
        t0 = time.perf_counter()
        for k in range(n_steps):
            if batches is None:
                losses = self._step_multidomain(split)
            else:
                losses = self._step_multitask(split, batches[k])
            for i, v in enumerate(losses):
                if v is not None:
                    sums[i] += v
                    counts[i] += 1
            if not bar.disable:
                bar.update(1)
                bar.set_postfix_str(_loss_text(self.tasks, sums, counts), refresh=False)
        self._train_seconds += time.perf_counter() - t0  # includes the progress bar's updates
        self._train_steps += n_steps
        self.epoch += 1
        if isinstance(self.weighting, LossWeighting):
            self.weighting.end_epoch()
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums / counts
        return (None if bar.disable else bar), dict(zip(self.tasks, means.tolist()))

    def _step_multitask(self, split: Any, idx: torch.Tensor) -> list[float | None]:
        self.optimizer.zero_grad(set_to_none=True)
        idx = idx.to(self.device)
        losses, z = multitask_losses(
            self.model, split.X[idx], {t: split.Y[t][idx] for t in self.tasks}, self.data
        )
        feats = z if self.config.engine == "features" else None
        lw = self.weighting
        if lw is None:
            self.profiler.backward(losses, weights=self._weights, features=feats)
        elif isinstance(lw, LossWeighting):
            self.profiler.backward(losses, weights=lw.weights(losses), features=feats)
            lw.backward(losses)
        else:
            self.profiler.backward(losses, weights=lw, features=feats)
        self.optimizer.step()
        self.step += 1
        return [float(losses[t].detach()) for t in self.tasks]

    def _step_multidomain(self, split: Any) -> list[float | None]:
        self.optimizer.zero_grad(set_to_none=True)
        p = torch.tensor([self._weights[t] for t in self.tasks], dtype=torch.float64)
        idx, dom = resample_batch(self._pools, p, self.config.batch_size, self._gen)
        idx, dom = idx.to(self.device), dom.to(self.device)
        per_domain, shares, z = multidomain_losses(
            self.model, split.X[idx], split.Y["label"][idx], dom, len(self.tasks)
        )
        absent = [t for t, v in zip(self.tasks, per_domain) if v is None]
        zero = z.sum() * 0.0  # a domain absent from the batch: no samples, zero gradient
        losses = {t: zero if v is None else v for t, v in zip(self.tasks, per_domain)}
        feats = z if self.config.engine == "features" else None
        with warnings.catch_warnings():
            if absent:
                warnings.filterwarnings("ignore", "tasks .* zero gradient", GradlensWarning)
            self.profiler.backward(
                losses, weights=dict(zip(self.tasks, shares.tolist())), features=feats
            )
        self.optimizer.step()
        self.step += 1
        return [None if v is None else float(v.detach()) for v in per_domain]


# --------------------------------------------------------------------------------------------
# train()
# --------------------------------------------------------------------------------------------


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
) -> TrainResult:
    """Train ``config.epochs`` epochs (with early stopping if configured), then :meth:`finish`.

    ``yes`` confirms a model beyond the size bound (see :class:`Trainer`).

    With ``early_stopping = k``, training stops after ``k`` epochs without a new best mean
    validation :func:`score`, and the model of the best epoch is restored before the final
    evaluation (``meta["early_stopping"]`` records the best epoch and score).

    Example:
        >>> res = train({"dataset": "synthetic", "dataset_options": {"n": 200}, "width": 0.25,
        ...              "epochs": 2, "batch_size": 50}, progress=False)
        >>> res.run_dir is None, res.epochs_run, res.stopped_early
        (True, 2, False)
    """
    trainer = Trainer(config, run_dir, progress=progress, overwrite=overwrite, yes=yes)
    try:
        cfg = trainer.config
        trainer._total_epochs = cfg.epochs
        stopped = False
        if cfg.early_stopping is None:
            if cfg.epochs:
                trainer.fit_epochs(cfg.epochs)
        else:
            best, best_epoch, best_state, bad = -math.inf, 0, None, 0
            for _ in range(cfg.epochs):
                s = score(trainer.fit_epochs(1))
                if s > best:
                    best, best_epoch, bad = s, trainer.epoch, 0
                    best_state = copy.deepcopy(trainer.model.state_dict())
                else:
                    bad += 1
                    if bad >= cfg.early_stopping:
                        stopped = True
                        break
            if best_state is not None and best_epoch != trainer.epoch:
                trainer.model.load_state_dict(best_state)
            if trainer.store is not None:
                trainer.store.update_meta(
                    early_stopping={
                        "patience": cfg.early_stopping,
                        "best_epoch": best_epoch,
                        "best_score": best if math.isfinite(best) else None,
                        "stopped_early": stopped,
                    }
                )
        final = trainer.finish()
    finally:
        trainer.close()
    return TrainResult(trainer.run_dir, final, trainer.epoch, stopped)


def score(metrics: Mapping[str, Mapping[str, float]]) -> float:
    """The mean over tasks of ``accuracy`` (classification) or ``r2`` (regression).

    Higher is better; used for early stopping, and by sweeps and PBT to rank models.

    Example:
        >>> score({"a": {"accuracy": 0.9, "loss": 0.3}, "b": {"accuracy": 0.7, "loss": 0.8}})
        0.8
    """
    if not isinstance(metrics, Mapping) or not metrics:
        raise GradlensError(
            f"`metrics` should be a non-empty mapping {{task: {{metric: value}}}}; found "
            f"{metrics!r:.80}."
        )
    vals = []
    for task, m in metrics.items():
        key = "accuracy" if "accuracy" in m else "r2" if "r2" in m else None
        if key is None:
            raise GradlensError(
                f"`metrics[{task!r}]` should hold 'accuracy' or 'r2'; found {sorted(m)}."
            )
        vals.append(float(m[key]))
    return float(np.mean(vals))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _derived_seed(seed: int, tag: int) -> int:
    return int(np.random.SeedSequence([seed, tag]).generate_state(1, np.uint64)[0] >> 1)


def _make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _check_weighting(cfg: TrainConfig) -> None:
    if cfg.weighting is not None:
        _check_choice("weighting", cfg.weighting, METHODS)
        if cfg.weights is not None or cfg.weight_schedule is not None:
            raise GradlensError(
                f"`weighting` ({cfg.weighting!r}) chooses the weights; found `weights` or "
                "`weight_schedule` set as well. Set one of them."
            )
    if not isinstance(cfg.per_layer, bool):
        raise GradlensError(f"`per_layer` should be a bool; found {cfg.per_layer!r}.")
    if cfg.per_layer and cfg.weighting not in GRAM_METHODS:
        raise GradlensError(
            f"`per_layer` applies a Gram weighting per layer: `weighting` should be one of "
            f"{sorted(GRAM_METHODS)}; found {cfg.weighting!r}."
        )
    if cfg.per_layer and cfg.engine == "features":
        raise GradlensError(
            "`per_layer` needs per-layer parameter Grams; found engine='features', whose Gram is "
            "representation-level. Use another engine or per_layer=False."
        )


def _make_trainer_weighting(cfg: TrainConfig, tasks: Sequence[str], kind: str) -> Any:
    """The config's weighting for these tasks (None for static weights)."""
    if cfg.weighting is None:
        return None
    if kind == "multidomain":
        raise GradlensError(
            f"`weighting` ({cfg.weighting!r}) weights task losses; found a multi-domain dataset, "
            "whose weights are sampling probabilities. Drop `weighting` or use a multi-task one."
        )
    w = make_weighting(cfg.weighting, tasks, seed=cfg.seed)
    return per_layer(w) if cfg.per_layer else w


def _probe_schedule(every: object) -> int | Schedule:
    if isinstance(every, int) and not isinstance(every, bool) and every >= 1:
        return every
    if isinstance(every, str):
        m = _LOG_EVERY.match(every)
        if m and (m.group(1) is None or int(m.group(1)) >= 1):
            return LogSpaced() if m.group(1) is None else LogSpaced(int(m.group(1)))
    raise GradlensError(
        f"`every` should be a positive int (probe every k-th step), 'log' or 'log:N' "
        f"(log-spaced, N >= 1 per decade); found {every!r}."
    )


def _normalise(
    weights: Mapping[str, Any] | None, tasks: tuple[str, ...], name: str
) -> dict[str, float]:
    if weights is None:
        return {t: 1.0 / len(tasks) for t in tasks}
    w = _check_weight_map(name, weights)
    if set(w) != set(tasks):
        raise GradlensError(
            f"`{name}` should have exactly the tasks {list(tasks)} as keys; found {sorted(w)}."
        )
    total = math.fsum(w.values())
    return {t: w[t] / total for t in tasks}


def _check_weight_map(name: str, weights: object) -> dict[str, float]:
    if not isinstance(weights, Mapping) or not weights:
        raise GradlensError(
            f"`{name}` should be a non-empty mapping task -> weight; found {weights!r:.80}."
        )
    out = {}
    for t, v in weights.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise GradlensError(f"`{name}[{t!r}]` should be a finite number >= 0; found {v!r}.")
        out[str(t)] = float(v)
    if not math.fsum(out.values()) > 0:
        raise GradlensError(f"`{name}` should have a positive sum; found all zero: {out}.")
    return out


def _check_schedule(schedule: object) -> list[dict[str, Any]]:
    if isinstance(schedule, (str, Mapping)) or not isinstance(schedule, Sequence):
        raise GradlensError(
            f"`weight_schedule` should be a list of {{'epoch': e, 'weights': {{...}}}}; found "
            f"{schedule!r:.80}."
        )
    out = []
    for i, entry in enumerate(schedule):
        if not isinstance(entry, Mapping) or set(entry) != {"epoch", "weights"}:
            raise GradlensError(
                f"`weight_schedule[{i}]` should be {{'epoch': e, 'weights': {{task: w}}}}; found "
                f"{entry!r:.80}."
            )
        out.append(
            {
                "epoch": _check_int(
                    f"weight_schedule[{i}]['epoch']", entry["epoch"], low=0, none_ok=False
                ),
                "weights": _check_weight_map(f"weight_schedule[{i}]['weights']", entry["weights"]),
            }
        )
    epochs = [e["epoch"] for e in out]
    if len(set(epochs)) != len(epochs):
        raise GradlensError(f"`weight_schedule` should name each epoch once; found {epochs}.")
    return sorted(out, key=lambda e: e["epoch"])


def _check_choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise GradlensError(f"`{name}` should be one of {list(valid)}; found {value!r}.")


def _check_number(
    name: str, value: object, *, low: float, high: float | None = None, strict: bool = False
) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > low if strict else v >= low) and (high is None or v < high)
    if not ok:
        rng = f"{'>' if strict else '>='} {low}" + (f" and < {high}" if high is not None else "")
        raise GradlensError(f"`{name}` should be a finite number {rng}; found {value!r}.")
    return float(value)  # type: ignore[arg-type]


def _check_int(name: str, value: object, *, low: int, none_ok: bool) -> Any:
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise GradlensError(f"`{name}` should be an int >= {low}; found {value!r}.")
    return int(value)


def _check_json(name: str, value: object, kind: type) -> Any:
    if not isinstance(value, Mapping):
        raise GradlensError(f"`{name}` should be a dict; found {type(value).__name__}.")
    try:
        text = json.dumps(dict(value), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise GradlensError(
            f"`{name}` should hold JSON values (numbers, strings, lists, dicts); found {exc}."
        ) from None
    return kind(json.loads(text))  # tuples become lists: the config equals its JSON round trip


def _loss_text(tasks: Sequence[str], sums: np.ndarray, counts: np.ndarray) -> str:
    parts = [f"{t}={s / c:.3f}" for t, s, c in zip(tasks, sums, counts) if c > 0]
    return " ".join(parts[:6]) + (" ..." if len(parts) > 6 else "")


def _postfix(train_losses: Mapping[str, float], val: Mapping[str, Mapping[str, float]]) -> str:
    finite = [v for v in train_losses.values() if math.isfinite(v)]
    loss = math.fsum(finite) / len(finite) if finite else math.nan
    return f"train loss {loss:.3f}, val score {score(val):.3f}"
