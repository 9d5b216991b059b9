"""The :class:`Trainer`: one model, its optimizer and profiler, trained epoch by epoch (see
:mod:`gradlens.train` for the scalarization of multi-task and multi-domain datasets).

Example:
    >>> from gradlens.train import Trainer
    >>> with Trainer({"dataset": "synthetic", "dataset_options": {"n": 200}, "width": 0.25,
    ...               "batch_size": 50}, progress=False) as t:
    ...     _ = t.fit_epochs(1)
    >>> t.epoch, t.step
    (1, 4)
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gradlens._errors import GradlensError, GradlensWarning
from gradlens._profiler_state import FORMAT as PROFILER_STATE_FORMAT
from gradlens._validate import check_choice, check_int
from gradlens.models import DEFAULT_DEPTH, build_model
from gradlens.profiler import Profiler
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
from gradlens.train._format import loss_text, postfix
from gradlens.train._limits import (
    check_device_available,
    check_model_size,
    torch_threads,
)
from gradlens.train.config import TrainConfig, normalise_weights, probe_schedule
from gradlens.weightings import LossWeighting, make_weighting, per_layer

__all__ = ["Trainer"]

#: Tag separating the data-order random stream from the model initialisation (same seed).
_TAG_BATCHES = 7001
_SPLITS = ("train", "val", "test")


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
    profiler, ``engine``, ``layers``, ``every`` and, with the ``auto`` engine, ``auto`` (its
    decisions: which engine serves each graph shape, and the timings). Evals:
    ``point="epoch:k"`` after each epoch (``val`` metrics, and the epoch's mean training loss per
    task as ``train``), ``"final"`` from :meth:`finish` (``val`` and ``test``).

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
        self._build(depth, yes)
        self._init_weights()
        self.epoch = 0
        self.step = 0
        self._total_epochs: int | None = None
        self._finished = False
        self._train_seconds = 0.0
        self._train_steps = 0
        self._log: list[dict[str, Any]] = [{"epoch": 0, "step": 0, "weights": dict(self._weights)}]
        self._stored_log: list[dict[str, Any]] | None = None
        writer = self._open_store(run_dir, self._meta(depth), overwrite, append)
        self.run_dir: Path | None = None if writer is None else writer.path
        try:
            self.profiler = Profiler(
                self.model.trunk,
                tasks=self.tasks,
                engine=cfg.engine,
                every=probe_schedule(cfg.every),
                store=writer,
            )
        except BaseException:
            if writer is not None:
                writer.close()
            raise

    def _build(self, depth: int, yes: bool) -> None:
        """The model (sized before it is built), its optimizer, the weighting, the batch order."""
        cfg = self.config
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

    def _init_weights(self) -> None:
        """The initial weights, and every scheduled one checked against the data."""
        cfg = self.config
        if self.multidomain:
            dom = self.data.splits["train"].Y["domain"].cpu()
            self._pools = [torch.nonzero(dom == k).flatten() for k in range(len(self.tasks))]
        self._weights = normalise_weights(cfg.weights, self.tasks, "weights")
        self._check_feasible(self._weights, "weights")
        for entry in cfg.weight_schedule or ():
            self._check_feasible(
                normalise_weights(entry["weights"], self.tasks, "weight_schedule"),
                "weight_schedule",
            )

    def _meta(self, depth: int) -> dict[str, Any]:
        """The run's ``meta.json`` (see the class docstring)."""
        cfg = self.config
        n_params = self.model.n_params()
        return {
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

    def _open_store(
        self, run_dir: str | Path | None, meta: dict[str, Any], overwrite: bool, append: bool
    ) -> RunWriter | None:
        """The run writer (None without ``run_dir``); a reopened run's stored schedule is kept
        aside until :meth:`load_state_dict` says which part of it still holds."""
        if run_dir is None:
            return None
        if append and (Path(run_dir) / "meta.json").is_file():
            from gradlens.store.reader import read_meta

            stored = read_meta(Path(run_dir)).get("weight_schedule")
            self._stored_log = list(stored) if isinstance(stored, list) else None
        return RunWriter(run_dir, meta=meta, overwrite=overwrite, append=append)

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
        self._set_weights(normalise_weights(value, self.tasks, "weights"))

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
        return self.profiler.store  # type: ignore[return-value]  # the trainer opens a RunWriter

    def fit_epochs(self, n: int) -> dict[str, dict[str, float]]:
        """Train ``n`` epochs; after each, evaluate on ``val`` and record it as ``epoch:k``.

        Returns:
            The last epoch's validation metrics ``{task: {metric: value}}``.
        """
        self._check_open("train")
        n = check_int("n", n, minimum=1)
        val: dict[str, dict[str, float]] = {}
        for _ in range(n):
            with torch_threads(self.config.threads):
                bar, train_losses = self._train_epoch()
            val = self.evaluate("val")
            if bar is not None:
                bar.set_postfix_str(postfix(train_losses, val), refresh=True)
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
        check_choice("split", split, _SPLITS)
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
        ``rng`` (the batch-order generator), ``tasks``, ``weighting`` (a loss-based weighting's
        own state) and ``profiler`` (:meth:`gradlens.Profiler.state_dict`: its step, a Gram
        weighting's held weights, the ``auto`` engine's decisions): only tensors, dicts, lists,
        numbers and strings, so ``torch.load(..., weights_only=True)`` reads a saved one back.
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
                "profiler": self.profiler.state_dict(),
            }
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (of this trainer or another with the same tasks and model).

        Training then continues exactly as the saved trainer would have. A change of weights is
        recorded in this run's ``weight_schedule``; the profiler continues from the loaded step,
        its ``auto`` engine with the saved decisions (a state saved without them, by an older
        gradlens or a trainer with a named engine: ``auto`` times its candidates anew, with a
        :class:`~gradlens.GradlensWarning`, since it may pick another exact engine than the
        saved run did and so differ from it at float rounding).
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
        w = normalise_weights(state["weights"], self.tasks, "state['weights']")
        backup = self._backup()  # a refused part puts everything back
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self._gen.set_state(state["rng"])
            self.epoch = int(state["epoch"])
            self.step = int(state["step"])
            self._load_weighting_state(state.get("weighting"))
            self.profiler.load_state_dict(self._profiler_state(state))
        except BaseException:
            self._restore(backup)
            raise
        if self.store is not None:  # the run continues at the loaded step
            self.store.rewind(self.step)
        if self._stored_log is not None:  # a reopened run: its schedule up to the loaded step
            kept = [e for e in self._stored_log if int(e.get("step", 0)) <= self.step]
            self._log, self._stored_log = kept or self._log, None
            if self.store is not None:
                self.store.update_meta(weight_schedule=self._log)
        if w != self._weights:
            self._set_weights(w)

    def _backup(self) -> dict[str, Any]:
        """What :meth:`load_state_dict` changes before its last check, copied."""
        weighting = self.weighting if isinstance(self.weighting, LossWeighting) else None
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "rng": self._gen.get_state(),
                "epoch": self.epoch,
                "step": self.step,
                "weighting": None if weighting is None else weighting.state_dict(),
                "profiler": self.profiler.state_dict(),
            }
        )

    def _restore(self, backup: Mapping[str, Any]) -> None:
        self.model.load_state_dict(backup["model"])
        self.optimizer.load_state_dict(backup["optimizer"])
        self._gen.set_state(backup["rng"])
        self.epoch, self.step = backup["epoch"], backup["step"]
        if isinstance(self.weighting, LossWeighting):
            self.weighting.load_state_dict(backup["weighting"])
        with warnings.catch_warnings():  # (its own state: nothing to warn about)
            warnings.simplefilter("ignore", GradlensWarning)
            self.profiler.load_state_dict(backup["profiler"])

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
        """A weighting's state (a loss-based one's own; a Gram one's held weights are the
        profiler's, in its state)."""
        if self.weighting is None:
            return None
        out: dict[str, Any] = {"method": self.config.weighting}
        if isinstance(self.weighting, LossWeighting):
            out["state"] = self.weighting.state_dict()
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

    def _profiler_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The profiler's part of a trainer state, at the trainer's step; a state saved by an
        earlier gradlens (``{"auto": ...}`` or nothing, the held weights under ``weighting``)
        in the profiler's own form."""
        saved = state.get("profiler")
        if isinstance(saved, Mapping) and "format" in saved:
            return {**saved, "step": self.step}
        held = (state.get("weighting") or {}).get("held")
        return {
            "format": PROFILER_STATE_FORMAT,
            "step": self.step,
            "tasks": list(self.tasks),
            "engine": None,
            "auto": None if saved is None else saved.get("auto"),
            "held": held,
        }

    def _apply_schedule(self) -> None:
        for entry in self.config.weight_schedule or ():
            if entry["epoch"] == self.epoch:
                w = normalise_weights(entry["weights"], self.tasks, "weight_schedule")
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
                bar.set_postfix_str(loss_text(self.tasks, sums, counts), refresh=False)
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
