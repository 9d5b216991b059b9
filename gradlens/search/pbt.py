"""Population-based training (PBT) of the task weights, locally or on Ray, resumable.

``N`` members train side by side, each a :class:`gradlens.train.Trainer` with its own run
directory and its own weights. Every ``E`` epochs (a *round*):

1. every member trains ``E`` epochs and saves a checkpoint (``Trainer.state_dict()``, via
   ``torch.save``) under ``checkpoints/epoch-XXXX/``;
2. members are ranked by a validation metric (``pbt.metric``; mean accuracy by default);
3. **exploit**: each of the ``Q`` worst copies the state (parameters, optimizer state, batch-order
   generator, weights) of a member drawn uniformly from the ``Q`` best, loaded with
   ``torch.load(path, weights_only=True)``;
4. **explore**: the copied weights are perturbed on the simplex
   (:func:`~gradlens.search.perturb_weights`: each weight times a factor drawn from
   ``pbt.perturb_factors``, renormalised; with probability ``pbt.resample_probability`` a fresh
   Dirichlet draw instead).

After the last round every member runs ``Trainer.finish()`` (final val/test evals).

Layout of a PBT directory::

    pbt.json                     the state after the last completed round (the commit point):
                                 epoch, each member's weights, schedule, lineage, scores, the
                                 checkpoint it resumes from and its training CPU seconds, the
                                 random state, the wall seconds; the summary at the end
    member-000/ ...              one gradlens run directory per member; meta["pbt"] holds its
                                 weight schedule and lineage
    checkpoints/epoch-XXXX/      the checkpoints of the last completed round only

A PBT killed at any point resumes from the last completed round: members restart from the
checkpoints named in ``pbt.json`` and the random state is restored, so the continuation makes
the same choices. A resumed member's run directory is reopened in append mode and cut back to
its checkpoint's step: every step it flushed before the checkpoint is kept, the ones after it
are trained again (a member that had no checkpoint yet starts its run afresh).

Example:
    >>> _select_exploits([0.9, 0.1, 0.5, 0.7], 1, "max", np.random.default_rng(0))
    [(1, 0)]
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError
from gradlens._paths import check_name, inside, remove_tree
from gradlens.search._common import (
    STATE_FORMAT,
    check_train,
    directory_lock,
    executor_for,
    format_table,
    format_weights,
    json_roundtrip,
    mean_metric,
    out_dir_for,
    pin_data_seed,
    pin_threads,
    read_json,
    refuse_train_weights,
    resolve_tasks,
    summary_metric,
    write_json,
)
from gradlens.search._config import PBTSpec, SearchConfig
from gradlens.search._members import _Members
from gradlens.search.executors import Executor
from gradlens.search.simplex import dirichlet_weights, perturb_weights

__all__ = ["STATE_NAME", "format_pbt", "pbt_score", "run_pbt"]

#: The PBT state and summary file, inside the PBT directory.
STATE_NAME = "pbt.json"
_CKPT = "checkpoints"


def pbt_score(metrics: Mapping[str, Mapping[str, float]], metric: str) -> float:
    """The value PBT ranks by, from one evaluation ``{task: {metric: value}}``.

    ``metric`` is ``"score"`` (:func:`gradlens.train.score`: mean accuracy, or mean R^2 for
    regression), a metric name (its mean over tasks) or ``"<task>.<metric>"`` (one task's;
    ``"<task>.score"`` is that task's score).

    Raises:
        GradlensError: If the metric or task is not in ``metrics``.

    Example:
        >>> m = {"a": {"accuracy": 0.9, "loss": 0.2}, "b": {"accuracy": 0.5, "loss": 0.6}}
        >>> pbt_score(m, "score"), pbt_score(m, "loss"), pbt_score(m, "b.accuracy")
        (0.7, 0.4, 0.5)
    """
    from gradlens.train import score

    if "." in metric:
        task, name = metric.split(".", 1)
        if task not in metrics:
            raise GradlensError(
                f"`pbt.metric` names the task {task!r}; found the tasks {sorted(metrics)}."
            )
        if name == "score":
            return score({task: metrics[task]})
        if name not in metrics[task]:
            raise GradlensError(
                f"`pbt.metric` should be a metric the task {task!r} reports, one of "
                f"{sorted(metrics[task])}; found {name!r}."
            )
        return float(metrics[task][name])
    if metric == "score":
        return score(metrics)
    missing = [t for t, m in metrics.items() if metric not in m]
    if missing:
        raise GradlensError(
            f"`pbt.metric` should be a metric every task reports; {metric!r} is missing for "
            f"{missing} (they report {sorted(next(iter(metrics.values())))})."
        )
    return math.fsum(float(m[metric]) for m in metrics.values()) / len(metrics)


def _select_exploits(
    scores: Sequence[float], n_replace: int, mode: str, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """``(loser, donor)`` pairs: the ``n_replace`` worst, each with a donor drawn from the best.

    NaN scores rank last; ties are broken by member index (lower is better), so the choice is
    a deterministic function of the scores and ``rng``.
    """
    sign = -1.0 if mode == "max" else 1.0

    def key(k: int) -> tuple[float, int]:
        s = scores[k]
        return (math.inf if math.isnan(s) else sign * s, k)

    order = sorted(range(len(scores)), key=key)
    top, bottom = order[:n_replace], order[-n_replace:]
    return [(k, int(top[rng.integers(len(top))])) for k in bottom]


def _fresh_state(spec: PBTSpec, tasks: Sequence[str], identity: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng(spec.seed)
    T = len(tasks)
    if spec.init == "uniform":
        init = np.full((spec.population, T), 1.0 / T)
    else:
        init = dirichlet_weights(T, spec.population, rng, alpha=spec.alpha)
    members = []
    for k in range(spec.population):
        w = {t: float(v) for t, v in zip(tasks, init[k])}
        members.append(
            {
                "member": k,
                "run_dir": f"member-{k:03d}",
                "weights": w,
                "schedule": [{"epoch": 0, "weights": w}],
                "lineage": [],
                "scores": [],
                "checkpoint": None,
                "cpu_seconds": 0.0,
                "final": None,
            }
        )
    return {
        "format": STATE_FORMAT,
        "kind": "pbt",
        "plan": identity,
        "status": "running",
        "epoch": 0,
        "round": 0,
        "rng": rng.bit_generator.state,
        "seconds": 0.0,
        "resumed_at": [],
        "members": members,
        "best": None,
    }


def _member_meta(name: str, m: Mapping[str, Any], resumed_at: Sequence[int]) -> dict[str, Any]:
    return {
        "name": name,
        "member": m["member"],
        "schedule": m["schedule"],
        "lineage": m["lineage"],
        "scores": m["scores"],
        "resumed_at": list(resumed_at),
    }


def run_pbt(
    config: SearchConfig,
    out: str | os.PathLike[str] | None = None,
    *,
    executor: Executor | None = None,
    progress: bool = True,
    yes: bool = False,
) -> pd.DataFrame:
    """Run (or resume) population-based training of the task weights (see the module docstring).

    Args:
        config: A configuration with ``[train]`` and ``[pbt]`` tables.
        out: The PBT directory; ``None``: ``[executor].storage``, else
            ``runs/<config file stem>``.
        executor: Where to run; ``None``: the one ``[executor]`` describes (closed at the end).
            Members are spread over ``min(workers, population)`` hosts (processes or Ray
            actors), each training its members one after the other.
        progress: Show a progress bar over rounds (on stderr).
        yes: Confirm members whose model is beyond the size bounds of
            :func:`gradlens.train.train` (over 10^8 parameters or 64 blocks).

    Returns:
        One row per member: ``member``, ``weights`` (final, as text), ``w.<task>``, ``score``
        (``pbt.metric`` on the final val split), ``metric`` (``accuracy``, or ``loss`` for
        regression), ``val`` and ``test`` (its final mean over the tasks), ``copies`` (how often
        it was replaced), ``best`` (the member with the best ``score``). ``pbt.json`` in ``out``
        holds the full state: schedules, lineages and per-round scores.

    Example:
        >>> import tempfile
        >>> cfg = SearchConfig.from_dict({
        ...     "train": {"dataset": "synthetic", "width": 0.05, "depth": 1, "batch_size": 250,
        ...               "every": 1000},
        ...     "pbt": {"population": 2, "epochs": 2, "interval_epochs": 1},
        ...     "executor": {"workers": 1}})
        >>> df = run_pbt(cfg, tempfile.mkdtemp(), progress=False)
        >>> df["member"].tolist(), int(df["best"].sum())
        ([0, 1], 1)
    """
    spec = config.pbt
    if spec is None:
        raise GradlensError("`config` should hold a [pbt] table; found none.")
    train = check_train(config.train)
    refuse_train_weights(config.train, "pbt")
    total = spec.epochs if spec.epochs is not None else int(train["epochs"])
    if total < 1:
        raise GradlensError(f"`pbt.epochs` (or `train.epochs`) should be >= 1; found {total}.")
    out_dir = out_dir_for(config, out)
    tasks = resolve_tasks(config.train)
    identity = json_roundtrip(
        {"train": config.train, "pbt": dataclasses.asdict(spec), "tasks": list(tasks)}
    )
    with directory_lock(out_dir, "PBT"):
        state = _open_state(out_dir, spec, tasks, identity)
        if state["status"] != "done":
            own = executor is None
            ex = executor_for(config.executor) if executor is None else executor
            try:
                pop = _Population(config, spec, int(train["seed"]), out_dir, state, tasks)
                pop.run(ex, total, progress, yes)
            finally:
                if own:
                    ex.close()
    return _summary(state, tasks, spec)


def _open_state(
    out_dir: Path, spec: PBTSpec, tasks: Sequence[str], identity: dict[str, Any]
) -> dict[str, Any]:
    """The PBT state to continue (``pbt.json``, checked to be this configuration's), or a fresh
    one, written at once."""
    state_path = out_dir / STATE_NAME
    if not state_path.exists():
        state = _fresh_state(spec, tasks, identity)
        write_json(state_path, state)
        return state
    state = read_json(state_path, "PBT state")
    if state.get("plan") != identity:
        changed = sorted(k for k in identity if state.get("plan", {}).get(k) != identity[k])
        raise GradlensError(
            f"`out` {out_dir} holds a different PBT: its [{', '.join(changed)}] differ "
            f"from this configuration's. Resume with the same configuration, or choose "
            f"a new --out."
        )
    if state["status"] != "done":
        state["resumed_at"].append(state["epoch"])
    return state


class _Population:
    """The driver's side of one PBT: the state, the hosts and their members, round by round."""

    def __init__(
        self,
        config: SearchConfig,
        spec: PBTSpec,
        seed: int,
        out_dir: Path,
        state: dict[str, Any],
        tasks: Sequence[str],
    ) -> None:
        self.config, self.spec, self.seed, self.out_dir = config, spec, seed, out_dir
        self.state, self.tasks = state, tasks
        self.members: list[dict[str, Any]] = state["members"]
        self.name = out_dir.name
        self.mode = self.spec.resolved_mode
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.t_start = time.perf_counter()
        self.seconds0 = float(state["seconds"])

    def metas(self) -> dict[int, dict[str, Any]]:
        return {
            m["member"]: _member_meta(self.name, m, self.state["resumed_at"]) for m in self.members
        }

    def run(self, ex: Executor, total: int, progress: bool, yes: bool) -> None:
        """Train ``total`` epochs on ``ex`` in rounds, then finish every member."""
        from tqdm.auto import tqdm

        self.ex, self.total, self.yes = ex, total, yes

        n_rounds = math.ceil(self.total / self.spec.interval_epochs)
        bar = tqdm(
            total=n_rounds, initial=min(self.state["round"], n_rounds), desc=f"pbt {self.name}",
            unit="round", disable=not progress, dynamic_ncols=True,
        )  # fmt: skip
        try:
            self.start()
            while self.state["epoch"] < self.total:
                epoch, scores = self.round()
                best = _select_order(scores, self.mode)[0]
                bar.set_postfix_str(
                    f"epoch {epoch}: best {self.spec.metric} {scores[best]:.4f}", refresh=False
                )
                bar.update()
            self.finish()
        finally:
            bar.close()

    def start(self) -> None:
        """Spread the members over ``min(workers, population)`` hosts and start each one, from
        its checkpoint when it has one."""
        n_hosts = min(self.ex.workers, self.spec.population)
        self.hosts = [self.ex.host(_Members) for _ in range(n_hosts)]
        self.assign = [list(range(h, self.spec.population, n_hosts)) for h in range(n_hosts)]
        train, out_dir = self.config.train, self.out_dir
        all_metas = self.metas()
        starts = []
        for m in self.members:
            k = m["member"]
            run_dir = inside(out_dir, out_dir / check_name(m["run_dir"], "run_dir"))
            tdict = pin_threads(pin_data_seed(train))
            tdict.update(
                seed=self.seed + k,
                epochs=self.total,
                weights=m["schedule"][0]["weights"],
                config={**dict(train.get("config") or {}), "pbt": self.name, "pbt_member": k},
            )
            ckpt = None
            if m["checkpoint"] is not None:
                ckpt = str(inside(out_dir, out_dir / m["checkpoint"]))
            starts.append(
                self.hosts[k % n_hosts].call(
                    "start", k, tdict, str(run_dir), ckpt, m["weights"], all_metas[k], self.yes
                )
            )
        for f in starts:
            f.result()

    def round(self) -> tuple[int, list[float]]:
        """Train every member to the next checkpoint, rank them, exploit and explore, and commit
        the round to ``pbt.json``. Returns the round's epoch and scores."""
        state, spec = self.state, self.spec
        n = min(spec.interval_epochs, self.total - state["epoch"])
        epoch = state["epoch"] + n
        ckpt_rel = f"{_CKPT}/epoch-{epoch:04d}"
        futs = [
            h.call("train", self.assign[i], n, str(self.out_dir / ckpt_rel))
            for i, h in enumerate(self.hosts)
        ]
        results: dict[int, dict[str, Any]] = {}
        for f in futs:
            results.update(f.result())
        scores = [pbt_score(results[k]["val"], spec.metric) for k in range(len(self.members))]
        for m, s in zip(self.members, scores):
            m["scores"].append({"epoch": epoch, "score": s})
            m["cpu_seconds"] = m.get("cpu_seconds", 0.0) + results[m["member"]]["cpu_seconds"]
            m["checkpoint"] = f"{ckpt_rel}/member-{m['member']:03d}.pt"
        if epoch < self.total:
            self.exploit(epoch, scores)
        state.update(
            epoch=epoch,
            round=state["round"] + 1,
            rng=self.rng.bit_generator.state,
            seconds=self.seconds0 + time.perf_counter() - self.t_start,
        )
        write_json(self.out_dir / STATE_NAME, state)  # the commit point of the round
        _prune_checkpoints(self.out_dir / _CKPT, keep=f"epoch-{epoch:04d}")
        return epoch, scores

    def exploit(self, epoch: int, scores: Sequence[float]) -> None:
        """Each of the worst copies a donor's checkpoint and perturbs its weights (explore)."""
        spec, members = self.spec, self.members
        moves: dict[int, tuple[str, dict[str, float]]] = {}
        for loser, donor in _select_exploits(scores, spec.n_replace, self.mode, self.rng):
            src = members[donor]
            new = perturb_weights(
                [src["weights"][t] for t in self.tasks],
                self.rng,
                factors=spec.perturb_factors,
                resample_probability=spec.resample_probability,
                alpha=spec.alpha,
            )
            w = {t: float(v) for t, v in zip(self.tasks, new)}
            moves[loser] = (str(self.out_dir / src["checkpoint"]), w)
            dst = members[loser]
            dst["lineage"].append(
                {"epoch": epoch, "from": donor, "score": scores[loser],
                 "donor_score": scores[donor]}
            )  # fmt: skip
            dst["schedule"].append({"epoch": epoch, "weights": w})
            dst["weights"] = w
            dst["checkpoint"] = src["checkpoint"]
        all_metas = self.metas()
        futs = [
            h.call(
                "exploit",
                {k: moves[k] for k in self.assign[i] if k in moves},
                {k: all_metas[k] for k in self.assign[i]},
            )
            for i, h in enumerate(self.hosts)
        ]
        for f in futs:
            f.result()

    def finish(self) -> None:
        """Every member's final evals; the best member; the state marked done."""
        all_metas = self.metas()
        futs = [
            h.call("finish", self.assign[i], {k: all_metas[k] for k in self.assign[i]})
            for i, h in enumerate(self.hosts)
        ]
        finals: dict[int, dict[str, Any]] = {}
        for f in futs:
            finals.update(f.result())
        final_scores = []
        for m in self.members:
            m["final"] = finals[m["member"]]
            final_scores.append(pbt_score(m["final"]["val"], self.spec.metric))
        order = _select_order(final_scores, self.mode)
        self.state.update(
            status="done",
            best=order[0],
            seconds=self.seconds0 + time.perf_counter() - self.t_start,
        )
        write_json(self.out_dir / STATE_NAME, self.state)
        remove_tree(self.out_dir, self.out_dir / _CKPT)


def _select_order(scores: Sequence[float], mode: str) -> list[int]:
    sign = -1.0 if mode == "max" else 1.0
    return sorted(
        range(len(scores)),
        key=lambda k: (math.inf if math.isnan(scores[k]) else sign * scores[k], k),
    )


def _prune_checkpoints(root: Path, keep: str) -> None:
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name != keep:
            remove_tree(root, p)


def _summary(state: Mapping[str, Any], tasks: Sequence[str], spec: PBTSpec) -> pd.DataFrame:
    rows = []
    for m in state["members"]:
        final = m.get("final") or {}
        metric = summary_metric(final.get("val", {})) if final else "accuracy"
        row: dict[str, Any] = {
            "member": m["member"],
            "weights": format_weights(m["weights"]),
        }
        row.update({f"w.{t}": m["weights"][t] for t in tasks})
        row.update(
            score=pbt_score(final["val"], spec.metric) if final else math.nan,
            metric=metric,
            val=mean_metric(final.get("val", {}), metric),
            test=mean_metric(final.get("test", {}), metric),
            copies=len(m["lineage"]),
            best=state.get("best") == m["member"],
        )
        rows.append(row)
    return pd.DataFrame(rows)


def format_pbt(summary: pd.DataFrame, metric: str = "score") -> str:
    """The end-of-PBT table: per member its final weights, score, val/test mean and copies.

    Example:
        >>> df = pd.DataFrame([{"member": 0, "weights": "a=0.6 b=0.4", "score": 0.9,
        ...     "metric": "accuracy", "val": 0.9, "test": 0.8, "copies": 1, "best": True}])
        >>> print(format_pbt(df))
        member  weights      score   val (accuracy)  test (accuracy)  copies  best
        ------  -----------  ------  --------------  ---------------  ------  ----
        0       a=0.6 b=0.4  0.9000  0.9000          0.8000           1       *
    """
    m = summary["metric"].iloc[0] if len(summary) else "accuracy"
    rows = []
    for r in summary.to_dict("records"):
        row = dict(r)
        row[metric] = r["score"]
        row[f"val ({m})"] = r["val"]
        row[f"test ({m})"] = r["test"]
        row["best"] = "*" if r["best"] else ""
        rows.append(row)
    cols = ["member", "weights", metric, f"val ({m})", f"test ({m})", "copies", "best"]
    return format_table(rows, cols)
