"""Weight sweeps: a grid or random sample of the simplex x model sizes x seeds (+ baselines).

Layout of a sweep directory::

    index.json        every planned run: id, weights, width, depth, seed, baseline_of, status
                      ("planned", "running", "done", "failed"), attempts, error, final, and
                      its cost: seconds (wall) and cpu_seconds (CPU time of its process)
    <run id>/         one gradlens run directory per run (written by gradlens.train)
    checkpoints/      the training state of each unfinished run (removed once all are done)
    .lock             the live driver's pid

The driver is the only writer of ``index.json`` and rewrites it atomically after every status
change. A run checkpoints its training state after every epoch under
``checkpoints/<run id>.pt``, with its run store flushed first (the file is removed when the run
is done). A rerun of the same configuration skips every run whose status is ``"done"``, whose
record matches its planned run (weights, size, seed, baseline_of) and whose directory holds the
``"final"`` eval; a run killed mid-training (status ``"planned"`` or ``"running"``, a matching
record, its directory and a checkpoint) is reopened in append mode, cut back to the checkpoint's
step and continued from it (every step flushed before the checkpoint is kept, the ones flushed
after it are trained again); every other run is redone from scratch (its directory and
checkpoint are removed first). So a sweep killed at any instant resumes to exactly one complete
run per planned run, with the numbers of an uninterrupted sweep. (Baselines of sweeps written
before they trained with ``tasks = [task]`` were weight-1/0 runs over every task: their records
differ from the plan, so a rerun redoes them.)

Example:
    >>> from gradlens.search import SearchConfig, plan_sweep
    >>> cfg = SearchConfig.from_dict({"train": {"seed": 0},
    ...                               "sweep": {"p": [0.25, 0.75], "baselines": True}})
    >>> [r.id for r in plan_sweep(cfg, ("left", "right"))]
    ['w0.25-0.75_seed0', 'w0.75-0.25_seed0', 'single-left_seed0', 'single-right_seed0']
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
    has_final,
    json_roundtrip,
    mean_metric,
    out_dir_for,
    pin_data_seed,
    pin_task_option,
    pin_threads,
    plain_final,
    read_json,
    refuse_train_weights,
    resolve_tasks,
    summary_metric,
    write_json,
)
from gradlens.search._config import SearchConfig, SweepSpec
from gradlens.search.executors import Executor
from gradlens.search.simplex import dirichlet_weights, simplex_grid

__all__ = ["INDEX_NAME", "PlannedRun", "format_sweep", "plan_sweep", "run_sweep"]

#: A sweep planning more runs than this needs ``yes=True`` (``--yes``): it is stated up front.
RUNS_WITHOUT_YES = 1000
#: No sweep plans more runs than this (their list alone would hold gigabytes).
MAX_RUNS = 1_000_000

#: The sweep's index file, inside the sweep directory.
INDEX_NAME = "index.json"
_STATUSES = ("planned", "running", "done", "failed")
#: The folder of the unfinished runs' checkpoints, inside the sweep directory.
CHECKPOINTS = "checkpoints"
#: Epochs between two checkpoints of a sweep run.
CHECKPOINT_EVERY = 1


@dataclass(frozen=True)
class PlannedRun:
    """One training of a sweep.

    Attributes:
        id: The run's directory name inside the sweep directory (unique, readable).
        weights: Task -> weight (on the simplex); a baseline's is ``{task: 1.0}``.
        width: Model width; ``None``: the ``[train]`` value.
        depth: Model depth; ``None``: the ``[train]`` value.
        seed: The training seed.
        baseline_of: The task of a single-task baseline (trained with ``tasks = [task]``: one
            head, or one domain's samples), else None.
        method: A multi-task optimization method (``"upgrad"``, ``"mgda/per_layer"``...) that
            chooses the weights of this run (``TrainConfig.weighting``), else None.
    """

    id: str
    weights: dict[str, float]
    width: float | None
    depth: int | None
    seed: int
    baseline_of: str | None = None
    method: str | None = None

    def train_dict(
        self, base: Mapping[str, Any], sweep: str, joint_steps: int | None = None
    ) -> dict[str, Any]:
        """The ``[train]`` table of this run: ``base`` with its weights, size, seed and tags.

        The data seed (``dataset_options.seed``) is pinned to ``base``'s, so every run of a
        sweep sees the same data whatever its training seed. A baseline trains with
        ``tasks = [baseline_of]`` (the harness's single-task run); :func:`run_sweep` also pins
        the dataset's task option (``tasks`` / ``attributes`` / ``domains``) to the sweep's tasks
        in ``base`` so that a baseline loads the same data as the joint runs, and passes
        ``joint_steps`` (the joint runs' steps per epoch), which a baseline takes as its
        ``steps_per_epoch`` so that it gets the same compute (a single-domain baseline's own
        training split is smaller than the joint one).

        Example:
            >>> r = PlannedRun("a", {"x": 0.5, "y": 0.5}, 2.0, None, 3)
            >>> d = r.train_dict({"epochs": 1}, "s")
            >>> d["weights"], d["width"], d["seed"], d["config"]["sweep"], d["dataset_options"]
            ({'x': 0.5, 'y': 0.5}, 2.0, 3, 's', {'seed': 0})
            >>> b = PlannedRun("single-x", {"x": 1.0}, None, None, 0, baseline_of="x")
            >>> d = b.train_dict({"tasks": ["x", "y"]}, "s")
            >>> d["tasks"], d["weights"], d["config"]["baseline_of"]
            (['x'], {'x': 1.0}, 'x')
        """
        d = pin_threads(pin_data_seed(base))
        d["weights"] = dict(self.weights)
        if self.method is not None:
            name, _, suffix = self.method.partition("/")
            del d["weights"]
            d["weighting"], d["per_layer"] = name, suffix == "per_layer"
        if self.baseline_of is not None:
            d["tasks"] = [self.baseline_of]
            if joint_steps is not None and d.get("steps_per_epoch") is None:
                d["steps_per_epoch"] = joint_steps  # the joint runs' compute per epoch
        d["seed"] = self.seed
        if self.width is not None:
            d["width"] = self.width
        if self.depth is not None:
            d["depth"] = self.depth
        d["config"] = {
            **dict(base.get("config") or {}),
            "sweep": sweep,
            "run_id": self.id,
            "baseline_of": self.baseline_of,
        }
        return d


def _joint_steps(base: Mapping[str, Any]) -> int | None:
    """Steps per epoch of the sweep's joint runs (None: set by ``[train].steps_per_epoch``)."""
    from gradlens.data import load_dataset
    from gradlens.train import TrainConfig, steps_per_epoch

    cfg = TrainConfig.from_dict(dict(base))
    if cfg.steps_per_epoch is not None:
        return None
    opts = dict(cfg.dataset_options)
    root = opts.pop("root", None)
    data_seed = opts.pop("seed", cfg.seed)
    n = len(load_dataset(cfg.dataset, "train", seed=data_seed, root=root, **opts))
    return steps_per_epoch(n, cfg.batch_size)


def _weight_vectors(spec: SweepSpec, tasks: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    T = len(tasks)
    if spec.p is not None:
        if T != 2:
            raise GradlensError(
                f"`sweep.p` is for two tasks (weights p and 1 - p); found {T} tasks {list(tasks)}."
                f" Use `sweep.grid` or `sweep.random` instead."
            )
        rows = [np.array([p, 1.0 - p]) for p in spec.p]
    elif spec.grid is not None:
        rows = list(simplex_grid(T, spec.grid))
    elif spec.random is None:  # methods only (SweepSpec.from_dict: at most one of the three)
        return []
    else:
        draws = dirichlet_weights(T, int(spec.random or 0), spec.random_seed, alpha=spec.alpha)
        return [(f"r{k:03d}", w) for k, w in enumerate(draws)]
    return [("w" + "-".join(f"{v:.4g}" for v in w), w) for w in rows]


def plan_sweep(
    config: SearchConfig, tasks: Sequence[str], *, yes: bool = False
) -> list[PlannedRun]:
    """Every run of the sweep ``config.sweep``, in order (weights, then sizes, then seeds).

    Args:
        config: A configuration with a ``[sweep]`` table.
        tasks: The tasks the weights are over, in order (``p`` is the first one's weight).
        yes: Confirm a sweep of more than :data:`RUNS_WITHOUT_YES` runs.

    Raises:
        GradlensError: If there is no ``[sweep]`` table, ``sweep.p`` is used with T != 2, or the
            sweep plans more than :data:`RUNS_WITHOUT_YES` runs without ``yes`` (more than
            :data:`MAX_RUNS` in any case); the count is computed before anything is enumerated.

    Example:
        >>> cfg = SearchConfig.from_dict({"train": {}, "sweep": {
        ...     "grid": 3, "sizes": [{"width": 0.5}, {"width": 1.0}], "seeds": [0, 1]}})
        >>> runs = plan_sweep(cfg, ("a", "b"))
        >>> len(runs), runs[0].id, runs[0].weights
        (12, 'w0-1_width0.5_seed0', {'a': 0.0, 'b': 1.0})
    """
    spec = config.sweep
    if spec is None:
        raise GradlensError("`config` should hold a [sweep] table; found none.")
    tasks = tuple(tasks)
    if not tasks or len(set(tasks)) != len(tasks):
        raise GradlensError(f"`tasks` should be distinct task names; found {list(tasks)}.")
    for t in tasks:
        check_name(t, "tasks[]")
    n_runs = spec.n_runs(len(tasks))
    if n_runs > MAX_RUNS or (n_runs > RUNS_WITHOUT_YES and not yes):
        fix = (
            "reduce sweep.grid / sweep.random, sizes or seeds"
            if n_runs > MAX_RUNS
            else "pass --yes (yes=True) to run them all, or reduce sweep.grid / sweep.random"
        )
        bound = MAX_RUNS if n_runs > MAX_RUNS else RUNS_WITHOUT_YES
        raise GradlensError(
            f"`sweep` plans {n_runs:,} runs over {len(tasks)} tasks, more than {bound:,}: {fix}."
        )
    train = config.train
    sizes = list(spec.sizes) if spec.sizes is not None else [{}]
    seeds = list(spec.seeds) if spec.seeds is not None else [int(train.get("seed", 0))]
    points: list[tuple[str, dict[str, float], str | None, str | None]] = [
        (name, {t: float(v) for t, v in zip(tasks, w)}, None, None)
        for name, w in _weight_vectors(spec, tasks)
    ]
    if spec.baselines:  # the harness's single-task run: tasks = [t]
        points += [(f"single-{t}", {t: 1.0}, t, None) for t in tasks]
    uniform = {t: 1.0 / len(tasks) for t in tasks}  # a method's starting weights
    points += [(f"m-{m.replace('/', '-')}", uniform, None, m) for m in spec.methods or ()]
    runs = [
        PlannedRun(
            id=_run_id(name, size, seed),
            weights=dict(w),
            width=size.get("width"),
            depth=size.get("depth"),
            seed=seed,
            baseline_of=baseline,
            method=method,
        )
        for name, w, baseline, method in points
        for size in sizes
        for seed in seeds
    ]
    ids = [check_name(r.id, "run id") for r in runs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise GradlensError(
            f"`sweep` should plan distinct runs; found duplicates {dup[:3]} (repeated sizes or "
            f"weights that coincide at 4 significant digits)."
        )
    return runs


def _run_id(name: str, size: Mapping[str, Any], seed: int) -> str:
    """``<weights>[_width<w>][_depth<d>]_seed<s>``."""
    parts = [name]
    if "width" in size:
        parts.append(f"width{size['width']:g}")
    if "depth" in size:
        parts.append(f"depth{size['depth']}")
    parts.append(f"seed{seed}")
    return "_".join(parts)


def _train_trial(
    train: dict[str, Any], run_dir: str, yes: bool = False, checkpoint: str | None = None
) -> dict[str, Any]:
    """One sweep run, in a worker: train to the end (continuing from ``checkpoint`` if that file
    exists, saving it every :data:`CHECKPOINT_EVERY` epochs) and return what the index records."""
    from gradlens.train import TrainConfig
    from gradlens.train import train as train_fn

    t0, c0 = time.perf_counter(), time.process_time()
    result = train_fn(
        TrainConfig.from_dict(train), run_dir, progress=False, yes=yes, checkpoint=checkpoint,
        checkpoint_every=CHECKPOINT_EVERY,
    )  # fmt: skip
    return {
        "final": plain_final(result.metrics),
        "epochs_run": int(result.epochs_run),
        "stopped_early": bool(result.stopped_early),
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }


def _plan_identity(spec: SweepSpec, train: Mapping[str, Any], tasks: Sequence[str]) -> Any:
    return {
        "train": dict(train),
        "sweep": dataclasses.asdict(spec),
        "tasks": list(tasks),
    }


def _load_index(path: Path, identity: dict[str, Any]) -> dict[str, dict[str, Any]]:
    index = read_json(path, "sweep index")
    old = index.get("plan", {})
    new = json_roundtrip(identity)
    if old != new:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise GradlensError(
            f"`out` {path.parent} holds a different sweep: its [{', '.join(changed)}] differ from "
            f"this configuration's. Resume with the same configuration, or choose a new --out."
        )
    return {r["id"]: r for r in index.get("runs", [])}


def run_sweep(
    config: SearchConfig,
    out: str | os.PathLike[str] | None = None,
    *,
    executor: Executor | None = None,
    progress: bool = True,
    yes: bool = False,
) -> pd.DataFrame:
    """Run (or resume) a sweep; one run directory per planned run under ``out``.

    Args:
        config: A configuration with ``[train]`` and ``[sweep]`` tables.
        out: The sweep directory; ``None``: ``[executor].storage``, else
            ``runs/<config file stem>``.
        executor: Where to run; ``None``: the one ``[executor]`` describes (closed at the end).
        progress: Show a progress bar over runs (on stderr).
        yes: Confirm a sweep of more than :data:`RUNS_WITHOUT_YES` runs, and runs whose model
            exceeds the harness's size bound (see :class:`gradlens.train.Trainer`).

    Returns:
        One row per planned run, in plan order: ``id``, ``weights`` (text), ``width``, ``depth``,
        ``seed``, ``baseline_of``, ``status``, ``metric`` (``accuracy``, or ``loss`` for
        regression), ``val`` and ``test`` (its final mean over the tasks; a baseline's own task
        only), ``seconds``, ``error``.

    A run that raises is recorded as ``"failed"`` with its error, the others go on; a rerun
    retries it. Killing the process at any point loses at most the runs in flight.

    Example:
        >>> import tempfile
        >>> cfg = SearchConfig.from_dict({
        ...     "train": {"dataset": "synthetic", "model": "mlp", "width": 0.05, "depth": 1,
        ...               "epochs": 1, "batch_size": 250, "every": 1000, "device": "cpu"},
        ...     "sweep": {"p": [0.2, 0.8]}, "executor": {"workers": 1}})
        >>> df = run_sweep(cfg, tempfile.mkdtemp(), progress=False)
        >>> df[["id", "status"]].values.tolist()
        [['w0.2-0.8_seed0', 'done'], ['w0.8-0.2_seed0', 'done']]
    """
    if config.sweep is None:
        raise GradlensError("`config` should hold a [sweep] table; found none.")
    check_train(config.train)
    refuse_train_weights(config.train, "sweep")
    out_dir = out_dir_for(config, out)
    tasks = resolve_tasks(config.train)
    plan = plan_sweep(config, tasks, yes=yes)
    identity = _plan_identity(config.sweep, config.train, tasks)
    with directory_lock(out_dir, "sweep"):
        index_path = out_dir / INDEX_NAME
        old = _load_index(index_path, identity) if index_path.exists() else {}
        records, todo = _records(plan, old, out_dir)

        def save() -> None:
            write_json(
                index_path,
                {"format": STATE_FORMAT, "kind": "sweep", "plan": json_roundtrip(identity),
                 "runs": [records[r.id] for r in plan]},
            )  # fmt: skip

        _prepare(out_dir, todo, old, save)
        own = executor is None
        ex = executor_for(config.executor) if executor is None else executor
        try:
            _execute(config, tasks, out_dir, plan, todo, records, ex, save, progress, yes)
        finally:
            if own:
                ex.close()
        ckpts = out_dir / CHECKPOINTS
        if ckpts.is_dir() and not any(ckpts.iterdir()):
            ckpts.rmdir()
    return _summary(plan, records)


def _records(
    plan: Sequence[PlannedRun], old: Mapping[str, dict[str, Any]], out_dir: Path
) -> tuple[dict[str, dict[str, Any]], list[PlannedRun]]:
    """The index records of a (re)started sweep, and the runs still to train: a done run that
    matches its plan and holds its final eval keeps its record, every other one is reset."""
    records: dict[str, dict[str, Any]] = {}
    todo: list[PlannedRun] = []
    for run in plan:
        rec = old.get(run.id)
        planned = json_roundtrip(dataclasses.asdict(run))
        matches = rec is not None and all(rec.get(k) == v for k, v in planned.items())
        if (
            matches
            and rec is not None
            and rec.get("status") == "done"
            and has_final(out_dir / run.id)
        ):
            records[run.id] = rec
            continue
        records[run.id] = {
            **planned,
            "status": "planned",
            "attempts": int(rec.get("attempts", 0)) if rec else 0,
            "error": None,
            "seconds": None,
            "final": None,
        }
        todo.append(run)
    return records, todo


def _resumable(run: PlannedRun, rec: Mapping[str, Any] | None, out_dir: Path) -> bool:
    """Whether ``run`` was killed mid-training and continues from its checkpoint: its record
    matches the plan and was not a failure, and both its directory and checkpoint exist."""
    if rec is None or rec.get("status") not in ("planned", "running"):
        return False
    planned = json_roundtrip(dataclasses.asdict(run))
    if any(rec.get(k) != v for k, v in planned.items()):
        return False
    return (out_dir / CHECKPOINTS / f"{run.id}.pt").is_file() and (
        out_dir / run.id / "meta.json"
    ).is_file()


def _prepare(
    out_dir: Path,
    todo: Sequence[PlannedRun],
    old: Mapping[str, dict[str, Any]],
    save: Callable[[], None],
) -> None:
    """Prove every path inside ``out_dir``, write the index, and clear what will be redone from
    scratch (a broken run leaves a partial directory): a resumable run keeps both."""
    for run in todo:
        inside(out_dir, out_dir / run.id, follow=False)
        inside(out_dir, out_dir / CHECKPOINTS / f"{run.id}.pt", follow=False)
    save()
    for run in todo:
        if not _resumable(run, old.get(run.id), out_dir):
            remove_tree(out_dir, out_dir / run.id)
            remove_tree(out_dir, out_dir / CHECKPOINTS / f"{run.id}.pt")


def _execute(
    config: SearchConfig,
    tasks: Sequence[str],
    out_dir: Path,
    plan: Sequence[PlannedRun],
    todo: Sequence[PlannedRun],
    records: dict[str, dict[str, Any]],
    ex: Executor,
    save: Callable[[], None],
    progress: bool,
    yes: bool,
) -> None:
    """Train ``todo`` on ``ex``, recording each run's status in the index as it changes."""
    from tqdm.auto import tqdm

    def on_submit(i: int) -> None:
        rec = records[todo[i].id]
        rec["status"] = "running"
        rec["attempts"] += 1
        save()

    bar = tqdm(
        total=len(plan), initial=len(plan) - len(todo), desc=f"sweep {out_dir.name}",
        unit="run", disable=not progress, dynamic_ncols=True,
    )  # fmt: skip
    try:
        base = pin_task_option(config.train, tasks)
        joint_steps = _joint_steps(base) if any(r.baseline_of for r in todo) else None
        items = [
            (run.train_dict(base, out_dir.name, joint_steps), str(out_dir / run.id), yes,
             str(out_dir / CHECKPOINTS / f"{run.id}.pt"))
            for run in todo
        ]  # fmt: skip
        for i, fut in ex.map_unordered(_train_trial, items, on_submit=on_submit):
            rec = records[todo[i].id]
            exc = fut.exception()
            if exc is None:
                rec.update(fut.result(), status="done", error=None)
            else:
                rec.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                # a failed run is redone from scratch: its checkpoint goes
                remove_tree(out_dir, out_dir / CHECKPOINTS / f"{todo[i].id}.pt")
            save()
            bar.set_postfix_str(f"{todo[i].id}: {rec['status']}", refresh=False)
            bar.update()
    finally:
        bar.close()


def _summary(plan: Sequence[PlannedRun], records: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    rows = []
    for run in plan:
        rec = records[run.id]
        final = rec.get("final") or {}
        only = [run.baseline_of] if run.baseline_of else None
        metric = summary_metric(final.get("val", {})) if final else "accuracy"
        rows.append(
            {
                "id": run.id,
                "weights": (f"method {run.method}" if run.method else format_weights(run.weights)),
                "width": run.width,
                "depth": run.depth,
                "seed": run.seed,
                "baseline_of": run.baseline_of,
                "status": rec["status"],
                "metric": metric,
                "val": mean_metric(final.get("val", {}), metric, only),
                "test": mean_metric(final.get("test", {}), metric, only),
                "seconds": rec.get("seconds"),
                "error": rec.get("error"),
            }
        )
    return pd.DataFrame(rows)


def format_sweep(summary: pd.DataFrame) -> str:
    """The end-of-sweep table: per run its weights, size, seed, status and final val/test mean.

    Example:
        >>> df = pd.DataFrame([{"id": "a", "weights": "x=0.5 y=0.5", "width": None, "depth": None,
        ...     "seed": 0, "baseline_of": None, "status": "done", "metric": "accuracy",
        ...     "val": 0.5, "test": 0.25, "seconds": 1.0, "error": None}])
        >>> print(format_sweep(df))
        id  weights      width  depth  seed  status  val (accuracy)  test (accuracy)
        --  -----------  -----  -----  ----  ------  --------------  ---------------
        a   x=0.5 y=0.5                0     done    0.5000          0.2500
    """
    metric = summary["metric"].iloc[0] if len(summary) else "accuracy"
    rows = []
    for r in summary.to_dict("records"):
        row = dict(r)
        row[f"val ({metric})"] = r["val"]
        row[f"test ({metric})"] = r["test"]
        for k in ("width", "depth"):
            v = r[k]
            row[k] = None if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:g}"
        rows.append(row)
    cols = ["id", "weights", "width", "depth", "seed", "status", f"val ({metric})",
            f"test ({metric})"]  # fmt: skip
    return format_table(rows, cols)
