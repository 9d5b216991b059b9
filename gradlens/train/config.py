"""The configuration of a training run: :class:`TrainConfig` and the checks of its fields.

Every field is checked when the config is built (``TrainConfig(...)`` or
:meth:`TrainConfig.from_dict`), so a bad value is a :class:`~gradlens.GradlensError` naming the
field before anything is loaded.

Example:
    >>> from gradlens.train import TrainConfig
    >>> TrainConfig(epochs=2, lr=0.01).to_dict()["lr"]
    0.01
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

import torch

from gradlens._errors import GradlensError
from gradlens._paths import check_name
from gradlens._validate import check_choice, check_int, check_number, check_tasks
from gradlens.data import DATASETS
from gradlens.engines import ENGINES
from gradlens.models import FAMILIES
from gradlens.schedules import LogSpaced, Schedule
from gradlens.weightings import GRAM_METHODS, METHODS

__all__ = ["OPTIMIZERS", "TrainConfig"]

Optimizer = Literal["sgd", "adam"]
#: Optimizers accepted by :attr:`TrainConfig.optimizer`.
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
_LOG_EVERY = re.compile(r"^log(?::(\d+))?$")


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
        engine: the profiler engine, one of :data:`gradlens.engines.ENGINES`; default
            ``"auto"``, the fastest exact engine for this model, picked by timing the first
            probes of each graph shape (:mod:`gradlens.engines.auto`; its choice and timings are
            in ``meta["auto"]`` and each Snapshot's ``engine``). Its decisions are in
            :meth:`Trainer.state_dict`, so a run resumed from a checkpoint (sweep, PBT,
            ``train(checkpoint=...)``) keeps the engines of the interrupted run and reproduces
            an uninterrupted run's numbers. Two separate runs of one config time separately and
            may pick different exact engines, whose Grams and ``.grad`` agree up to float
            rounding (~1e-7 relative in float32), not bit for bit: name an engine
            (``"gramian"``...) for bit-identical numbers across runs.
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
    engine: str = "auto"
    every: int | str = 10
    early_stopping: int | None = None
    weighting: str | None = None
    per_layer: bool = False
    device: str = "cpu"
    threads: int | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("dataset", self.dataset, DATASETS)
        self.dataset_options = dict(_json_dict("dataset_options", self.dataset_options, dict))
        if self.tasks is not None:
            tasks = list(check_tasks(self.tasks))
            for t in tasks:  # task names become file names (a sweep's baseline run ids)
                check_name(t, "tasks[]")
            self.tasks = tasks
        check_choice("model", self.model, FAMILIES)
        self.width = check_number("width", self.width, low=0.0, strict_low=True)
        if self.depth is not None:
            self.depth = check_int("depth", self.depth, minimum=1)
        if self.weights is not None:
            self.weights = check_weight_map("weights", self.weights)
        if self.weight_schedule is not None:
            self.weight_schedule = _weight_schedule(self.weight_schedule)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        self.lr = check_number("lr", self.lr, low=0.0, strict_low=True)
        self.momentum = check_number("momentum", self.momentum, low=0.0, high=1.0, strict_high=True)
        self.weight_decay = check_number("weight_decay", self.weight_decay, low=0.0)
        self.batch_size = check_int("batch_size", self.batch_size, minimum=1)
        self.steps_per_epoch = check_int(
            "steps_per_epoch", self.steps_per_epoch, minimum=1, none_ok=True
        )
        self.epochs = check_int("epochs", self.epochs, minimum=0)
        self.seed = check_int("seed", self.seed, minimum=0)
        check_choice("engine", self.engine, sorted(ENGINES))
        probe_schedule(self.every)
        if self.early_stopping is not None:
            self.early_stopping = check_int("early_stopping", self.early_stopping, minimum=1)
        if self.threads is not None:
            self.threads = check_int("threads", self.threads, minimum=1)
        _check_weighting_fields(self)
        if not isinstance(self.device, str):
            raise GradlensError(f"`device` should be a torch device string; found {self.device!r}.")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise GradlensError(
                f"`device` should be a torch device string such as 'cpu' or 'cuda:0'; found "
                f"{self.device!r}."
            ) from None
        self.config = dict(_json_dict("config", self.config, dict))

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
            'auto'
        """
        return json.loads(json.dumps(asdict(self)))


def _check_weighting_fields(cfg: TrainConfig) -> None:
    if cfg.weighting is not None:
        check_choice("weighting", cfg.weighting, METHODS)
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


def probe_schedule(every: object) -> int | Schedule:
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


def normalise_weights(
    weights: Mapping[str, Any] | None, tasks: tuple[str, ...], name: str
) -> dict[str, float]:
    if weights is None:
        return {t: 1.0 / len(tasks) for t in tasks}
    w = check_weight_map(name, weights)
    if set(w) != set(tasks):
        raise GradlensError(
            f"`{name}` should have exactly the tasks {list(tasks)} as keys; found {sorted(w)}."
        )
    total = math.fsum(w.values())
    return {t: w[t] / total for t in tasks}


def check_weight_map(name: str, weights: object) -> dict[str, float]:
    if not isinstance(weights, Mapping) or not weights:
        raise GradlensError(
            f"`{name}` should be a non-empty mapping task -> weight; found {weights!r:.80}."
        )
    out = {}
    for t, v in weights.items():
        out[str(t)] = check_number(f"{name}[{t!r}]", v, low=0.0)
    if not math.fsum(out.values()) > 0:
        raise GradlensError(f"`{name}` should have a positive sum; found all zero: {out}.")
    return out


def _weight_schedule(schedule: object) -> list[dict[str, Any]]:
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
                "epoch": check_int(f"weight_schedule[{i}]['epoch']", entry["epoch"], minimum=0),
                "weights": check_weight_map(f"weight_schedule[{i}]['weights']", entry["weights"]),
            }
        )
    epochs = [e["epoch"] for e in out]
    if len(set(epochs)) != len(epochs):
        raise GradlensError(f"`weight_schedule` should name each epoch once; found {epochs}.")
    return sorted(out, key=lambda e: e["epoch"])


def _json_dict(name: str, value: object, kind: type) -> Any:
    if not isinstance(value, Mapping):
        raise GradlensError(f"`{name}` should be a dict; found {type(value).__name__}.")
    try:
        text = json.dumps(dict(value), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise GradlensError(
            f"`{name}` should hold JSON values (numbers, strings, lists, dicts); found {exc}."
        ) from None
    return kind(json.loads(text))  # tuples become lists: the config equals its JSON round trip
