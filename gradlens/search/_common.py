"""Helpers shared by sweeps and PBT: tasks, JSON state files, the directory lock, summaries."""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradlens._errors import GradlensError, GradlensWarning, StoreError
from gradlens.search._config import ExecutorSpec, SearchConfig
from gradlens.search.executors import Executor, make_executor
from gradlens.store.files import TMP_PREFIX, RunLock, atomic_write_bytes

__all__: list[str] = []

#: Version of index.json / pbt.json written by this gradlens.
STATE_FORMAT = 1


def check_train(train: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the ``[train]`` table with the harness's own ``TrainConfig.from_dict``."""
    from gradlens.train import TrainConfig

    return TrainConfig.from_dict(dict(train)).to_dict()


def refuse_train_weights(train: Mapping[str, Any], table: str) -> None:
    """A sweep or PBT sets every run's weights itself: ``[train]`` weights would be ignored."""
    set_here = [k for k in ("weights", "weight_schedule") if train.get(k) is not None]
    if set_here:
        raise GradlensError(
            f"`train.{set_here[0]}` should not be set in a {table} configuration: the [{table}] "
            f"table gives every run its weights, so it would be ignored; found "
            f"{train[set_here[0]]!r:.80}. Remove it from [train]."
        )


def resolve_tasks(train: Mapping[str, Any]) -> tuple[str, ...]:
    """The tasks (or domains) a ``[train]`` table trains on: its ``tasks`` or the dataset's."""
    tasks = train.get("tasks")
    if tasks:
        return tuple(tasks)
    from gradlens.data import load_dataset

    opts = dict(train.get("dataset_options") or {})
    root = opts.pop("root", None)
    data_seed = opts.pop("seed", int(train.get("seed", 0)))
    ds = load_dataset(train.get("dataset", "multidigits"), "val", seed=data_seed, root=root, **opts)
    return tuple(ds.tasks)


def json_roundtrip(obj: Any) -> Any:
    """``obj`` through JSON and back, so tuples compare equal to lists read from a state file."""
    return json.loads(json.dumps(obj))


def out_dir_for(config: SearchConfig, out: str | os.PathLike[str] | None) -> Path:
    """``out``, else ``[executor].storage``, else ``runs/<config file stem>``."""
    if out is not None:
        return Path(out)
    if config.executor.storage is not None:
        return Path(config.executor.storage)
    stem = config.source.stem if config.source is not None else "search"
    return Path("runs") / stem


def pin_data_seed(train: Mapping[str, Any]) -> dict[str, Any]:
    """``train`` with ``dataset_options.seed`` set, so runs with other seeds share the same data.

    The harness derives the data (its splits) from ``seed`` unless ``dataset_options.seed`` is
    given; sweeps and PBT vary ``seed`` for the initialisation and batch order only.
    """
    d = dict(train)
    opts = dict(d.get("dataset_options") or {})
    opts.setdefault("seed", int(d.get("seed", 0)))
    d["dataset_options"] = opts
    return d


def pin_threads(train: Mapping[str, Any]) -> dict[str, Any]:
    """``train`` with ``threads`` set (1 when unset): a run's numbers depend on its torch thread
    count, so every run of a sweep or PBT trains with the same one, recorded in its config,
    whatever the executor's ``workers`` (a resumed sweep reproduces its numbers).

    Example:
        >>> pin_threads({"epochs": 1})["threads"], pin_threads({"threads": 4})["threads"]
        (1, 4)
    """
    d = dict(train)
    if d.get("threads") is None:
        d["threads"] = 1
    return d


def pin_task_option(train: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """``train`` with the dataset's task option set to ``tasks`` when ``dataset_options`` lacks it.

    Datasets that select their tasks through an option (``tasks``, ``attributes`` or
    ``domains``) receive ``[train].tasks`` through it, and a dataset's samples may depend on that
    list (DomainDigits draws other samples of ``original`` when it is loaded alone). Pinning the
    option to the sweep's tasks makes a run on some of them (a single-task baseline,
    ``tasks = [t]``) load the same data as the joint runs and keep its tasks' part of it; for the
    joint runs the data is unchanged (the harness would pass the same list).

    Example:
        >>> d = pin_task_option({"dataset": "domain_digits"}, ["original", "rotated"])
        >>> d["dataset_options"]
        {'domains': ['original', 'rotated']}
        >>> pin_task_option({"dataset": "multidigits"}, ["left", "right"])["dataset_options"]
        {}
    """
    from gradlens.data import dataset_options
    from gradlens.train import TASK_OPTIONS

    d = dict(train)
    opts = dict(d.get("dataset_options") or {})
    valid = dataset_options(d.get("dataset", "multidigits"))
    for key in TASK_OPTIONS:
        if key in valid:
            opts.setdefault(key, list(tasks))
            break
    d["dataset_options"] = opts
    return d


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temp file, fsync, rename)."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, allow_nan=True).encode("utf-8"))


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GradlensError(f"The {what} {path} cannot be read as JSON ({exc}).") from None
    if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT:
        raise GradlensError(
            f"The {what} {path} should be a gradlens {what} of format {STATE_FORMAT}; found "
            f"format {obj.get('format') if isinstance(obj, dict) else obj!r}."
        )
    return obj


@contextlib.contextmanager
def directory_lock(out: Path, what: str) -> Iterator[None]:
    """Hold the writer lock of a sweep / PBT directory; a dead previous driver is taken over."""
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GradlensWarning)
        try:
            lock.acquire()
        except StoreError as exc:
            raise StoreError(
                f"The {what} directory {out} is in use by another live gradlens process: {exc}"
            ) from None
    if caught:
        warnings.warn(
            f"Resuming the {what} in {out}: the process that ran it before is no longer running.",
            GradlensWarning,
            stacklevel=4,
        )
    # with the lock held no other driver writes here: a temp file is what a killed one left
    for tmp in out.glob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    try:
        yield
    finally:
        lock.release()


def executor_for(spec: ExecutorSpec) -> Executor:
    return make_executor(spec.kind, workers=spec.workers, address=spec.address)


def has_final(run_dir: Path) -> bool:
    """Whether a run directory holds a readable ``"final"`` eval (the harness's completion mark)
    and no damaged or missing evals chunk (a damaged run is redone, silently)."""
    from gradlens.store.files import Problems
    from gradlens.store.reader import read_evals

    if not (run_dir / "meta.json").is_file():
        return False
    try:
        evals = read_evals(run_dir, Problems(strict=True))
    except (StoreError, OSError):
        return False
    return bool((evals["point"] == "final").any())


def plain_final(final: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """``{split: {task: {metric: float}}}`` with plain floats (numpy / torch scalars converted)."""
    return {
        str(split): {
            str(task): {str(m): float(v) for m, v in metrics.items()}
            for task, metrics in per_task.items()
        }
        for split, per_task in final.items()
    }


def summary_metric(per_task: Mapping[str, Mapping[str, float]]) -> str:
    """``"accuracy"`` when the tasks report it, else ``"loss"`` (regression)."""
    if per_task and all("accuracy" in m for m in per_task.values()):
        return "accuracy"
    return "loss"


def mean_metric(
    per_task: Mapping[str, Mapping[str, float]], metric: str, tasks: Sequence[str] | None = None
) -> float:
    """Mean of ``metric`` over ``tasks`` (all by default); NaN when none reports it."""
    names = list(per_task) if tasks is None else list(tasks)
    vals = [float(per_task[t][metric]) for t in names if t in per_task and metric in per_task[t]]
    return math.fsum(vals) / len(vals) if vals else math.nan


def format_weights(weights: Mapping[str, float]) -> str:
    return " ".join(f"{t}={w:.3g}" for t, w in weights.items())


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned text table (floats to 4 decimals)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)
