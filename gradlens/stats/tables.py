"""Tables of runs: one row per run (:func:`runs_table`), per-run summaries over training
(:func:`run_summary`), per-epoch series (:func:`epoch_table`), and strict JSON of any result
(:func:`to_json`). Re-exported by :mod:`gradlens.stats`.

Example:
    >>> from gradlens.stats.tables import to_json
    >>> to_json([1.0, float("nan")], indent=None)
    '[1.0, null]'
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError
from gradlens._types import TOTAL_LAYER
from gradlens.stats import _args

if TYPE_CHECKING:
    from gradlens.store import Run

__all__ = ["epoch_table", "run_summary", "runs_table", "to_json"]

_SUMMARY_COLUMNS = ["phase", "metric", "task_i", "task_j", "value", "n"]


def _metrics_of(run: Any) -> pd.DataFrame:
    frame = getattr(run, "metrics", None)
    if not isinstance(frame, pd.DataFrame):
        raise GradlensError(
            "`run` should have a `.metrics` DataFrame [step, layer, metric, task_i, task_j, "
            f"value] (a gradlens.store.Run); found {type(run).__name__} without one."
        )
    return frame


def _evals_of(run: Any) -> pd.DataFrame:
    frame = getattr(run, "evals", None)
    if not isinstance(frame, pd.DataFrame):
        raise GradlensError(
            "`run` should have an `.evals` DataFrame [point, epoch, step, split, task, metric, "
            f"value]; found {type(run).__name__} without one."
        )
    return frame


def _meta_of(run: Any) -> dict[str, Any]:
    meta = getattr(run, "meta", None)
    if not isinstance(meta, Mapping):
        raise GradlensError(
            f"`run` should have a `.meta` dict; found {type(run).__name__} without one."
        )
    return dict(meta)


def _layer_rows(run: Any, layer: str) -> pd.DataFrame:
    m = _metrics_of(run)
    rows = m[m["layer"].astype(str) == layer]
    if rows.empty and not m.empty:
        raise GradlensError(
            f"`layer` should be one of {sorted(m['layer'].astype(str).unique())}; found {layer!r}."
        )
    out = rows[["step", "metric", "task_i", "task_j", "value"]].copy()
    for col in ("metric", "task_i", "task_j"):
        out[col] = out[col].astype(str)
    out["step"] = out["step"].astype(np.int64)
    out["value"] = out["value"].astype(np.float64)
    return out


def _aggregate(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean per key, frequency of ``value > 0`` for ``conflict`` (renamed ``conflict_freq``)."""
    rows = rows[np.isfinite(rows["value"].to_numpy())].copy()
    is_conflict = rows["metric"] == "conflict"
    rows.loc[is_conflict, "value"] = (rows.loc[is_conflict, "value"] > 0).astype(np.float64)
    rows.loc[is_conflict, "metric"] = "conflict_freq"
    out = rows.groupby(keys, sort=False, observed=True)["value"].agg(["mean", "count"])
    return out.reset_index().rename(columns={"mean": "value", "count": "n"})


def _phase_labels(steps: np.ndarray, phases: int) -> np.ndarray:
    if steps.size == 0:
        return np.empty(0, dtype=np.int64)
    s0, s1 = int(steps.min()), int(steps.max())
    if s1 == s0:
        return np.ones(steps.size, dtype=np.int64)
    k = np.floor((steps - s0) / (s1 - s0) * phases).astype(np.int64) + 1
    return np.minimum(k, phases)


def run_summary(run: Run | Any, *, phases: int = 3, layer: str = TOTAL_LAYER) -> pd.DataFrame:
    """Summaries of one run's interference over training, overall and per phase.

    Phase ``"k/P"`` holds the probed steps in the k-th of ``P`` equal spans of the probed step
    range ``[first, last]`` (the last step belongs to the last phase), phase ``"all"`` every
    probed step. Per metric and pair (or task): the mean over probed steps of ``cosine``,
    ``gms``, ``norm``, ``cos_to_update``, ``norm_ratio``, ``norm_cv``, and ``conflict_freq``, the
    fraction of probed steps in conflict (``cos < 0``). NaN values (a task with a zero gradient)
    are left out; ``n`` counts the values used. An empty phase has no rows.

    Args:
        run: A ``gradlens.store.Run`` (anything with ``.metrics`` in the long format).
        phases: Number of phases of training (>= 1).
        layer: The layer to summarise; the total over shared parameters by default.

    Returns:
        Tidy ``[phase, metric, task_i, task_j, value, n]``.

    Example:
        >>> import pandas as pd, gradlens as gl
        >>> from types import SimpleNamespace
        >>> m = pd.DataFrame({"step": [0, 10, 20, 30], "layer": gl.TOTAL_LAYER,
        ...                   "metric": "cosine",
        ...                   "task_i": "a", "task_j": "b", "value": [0.5, -0.1, 0.3, -0.2]})
        >>> s = run_summary(SimpleNamespace(metrics=m), phases=2)
        >>> s[s.phase == "all"][["metric", "value", "n"]].values.tolist()
        [['cosine', 0.125, 4]]
        >>> s[s.phase == "2/2"].value.round(3).tolist()
        [0.05]
    """
    phases = _args.count(phases, "phases", minimum=1)
    rows = _layer_rows(run, layer)
    if rows.empty:
        return pd.DataFrame(
            {
                c: pd.Series(
                    dtype=object if c in ("phase", "metric", "task_i", "task_j") else float
                )
                for c in _SUMMARY_COLUMNS
            }
        )
    keys = ["metric", "task_i", "task_j"]
    whole = _aggregate(rows, keys)
    whole.insert(0, "phase", "all")
    parts = [whole]
    labels = _phase_labels(rows["step"].to_numpy(), phases)
    for k in range(1, phases + 1):
        sel = rows[labels == k]
        if sel.empty:
            continue
        agg = _aggregate(sel, keys)
        agg.insert(0, "phase", f"{k}/{phases}")
        parts.append(agg)
    out = pd.concat(parts, ignore_index=True)[_SUMMARY_COLUMNS]
    out["n"] = out["n"].astype(np.int64)
    return out


def _summary_wide(summary: pd.DataFrame, phase: str) -> dict[str, float]:
    sel = summary[summary["phase"] == phase]
    out: dict[str, float] = {}
    pair_means: dict[str, list[float]] = {}
    for metric, ti, tj, value in zip(sel["metric"], sel["task_i"], sel["task_j"], sel["value"]):
        if ti and tj:
            # every pair metric is symmetric: one name per pair whatever the run's task order
            a, b = sorted((str(ti), str(tj)))
            out[f"{metric}.{a}|{b}"] = float(value)
            pair_means.setdefault(metric, []).append(float(value))
        elif ti:
            out[f"{metric}.{ti}"] = float(value)
        else:
            out[metric] = float(value)
    for metric, values in pair_means.items():
        out[f"{metric}.mean"] = float(np.mean(values))
    return out


def _final_scores(run: Any, tasks: Sequence[str], split: str, metric: str) -> dict[str, float]:
    ev = _evals_of(run)
    sel = ev[(ev["point"] == "final") & (ev["split"] == split) & (ev["metric"] == metric)]
    out: dict[str, float] = {}
    values = []
    for task in tasks:
        v = sel.loc[sel["task"] == task, "value"]
        val = float(v.iloc[-1]) if len(v) else math.nan
        out[f"{metric}.{task}"] = val
        values.append(val)
    finite = [v for v in values if math.isfinite(v)]
    out[f"{metric}.mean"] = (
        float(np.mean(values)) if len(finite) == len(values) and values else math.nan
    )
    return out


def _parse_phase(phase: str) -> tuple[str, int]:
    if phase == "all":
        return phase, 1
    match = re.fullmatch(r"(\d+)/(\d+)", phase) if isinstance(phase, str) else None
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise GradlensError(f"`phase` should be 'all' or 'k/P' with 1 <= k <= P; found {phase!r}.")
    return phase, int(match.group(2))


def _iter_runs(runs: Any) -> list[tuple[str, Any]]:
    if isinstance(runs, (str, os.PathLike)):
        from gradlens.store import load_run, load_runs

        index = load_runs(runs)
        return [(str(rid), load_run(p)) for rid, p in zip(index["run_id"], index["path"])]
    if isinstance(runs, pd.DataFrame) or not isinstance(runs, Iterable):
        raise GradlensError(
            "`runs` should be a sweep directory or an iterable of runs (gradlens.store.Run or run "
            f"directories); found {type(runs).__name__}."
        )
    out: list[tuple[str, Any]] = []
    for i, run in enumerate(runs):
        if isinstance(run, (str, os.PathLike)):
            from gradlens.store import load_run

            run = load_run(run)
        meta = _meta_of(run)
        path = getattr(run, "path", None)
        rid = meta.get("run_id") or (Path(path).name if path is not None else f"run{i}")
        out.append((str(rid), run))
    return out


def runs_table(
    runs: Iterable[Run | Any] | str | os.PathLike[str],
    *,
    phase: str = "all",
    layer: str = TOTAL_LAYER,
    split: str = "test",
    eval_metric: str = "accuracy",
    progress: bool = False,
) -> pd.DataFrame:
    """One row per run: configuration, interference summaries and final scores.

    Columns: ``run_id``; ``tasks`` (joined with ``"|"``) and ``n_tasks``; the metadata flattened
    with dots (``weights.<task>``, ``model.family``, ``model.width``, ``model.depth``,
    ``model.n_params``, ``seed``, ``config.*``; lists as JSON strings); the summaries of
    :func:`run_summary` for ``phase``, wide: ``cosine.<i>|<j>``, ``conflict_freq.<i>|<j>``,
    ``gms.<i>|<j>`` (and ``<metric>.mean`` over pairs), ``norm.<task>``,
    ``cos_to_update.<task>``, ``norm_ratio``, ``norm_cv``; the final ``eval_metric`` on ``split``
    per task, ``<eval_metric>.<task>``, and their mean over the run's tasks,
    ``<eval_metric>.mean`` (NaN if a task has none). Runs with other tasks leave NaN in columns
    they do not have.

    Args:
        runs: Runs (objects with ``.meta``, ``.metrics``, ``.evals``), run directories, or a sweep
            directory (read with ``gradlens.store.load_runs`` / ``load_run``). ``run_id`` is the
            store's id for a directory, else ``meta["run_id"]``, the run path's name, or
            ``run<i>``.
        phase: ``"all"`` or ``"k/P"`` (e.g. ``"3/3"``, the last third of training).
        layer: Layer whose summaries are tabulated.
        split: Split of the final evals (``"test"`` or ``"val"``).
        eval_metric: Eval metric to tabulate.
        progress: Show a progress bar while reading runs.

    Example:
        >>> import pandas as pd, gradlens as gl
        >>> from types import SimpleNamespace
        >>> m = pd.DataFrame({"step": [0, 1], "layer": gl.TOTAL_LAYER, "metric": "cosine",
        ...                   "task_i": "a", "task_j": "b", "value": [0.2, 0.4]})
        >>> ev = pd.DataFrame({"point": "final", "epoch": pd.array([None, None], "Int64"),
        ...     "step": pd.array([None, None], "Int64"), "split": "test", "task": ["a", "b"],
        ...     "metric": "accuracy", "value": [0.9, 0.7]})
        >>> run = SimpleNamespace(meta={"tasks": ["a", "b"], "weights": {"a": 0.5, "b": 0.5},
        ...                             "seed": 1}, metrics=m, evals=ev)
        >>> t = runs_table([run])
        >>> t[["run_id", "weights.a", "cosine.a|b", "accuracy.mean"]].round(3).values.tolist()
        [['run0', 0.5, 0.3, 0.8]]
    """
    from tqdm.auto import tqdm

    from gradlens.store.reader import flatten_meta  # as load_runs flattens it

    phase, n_phases = _parse_phase(phase)
    items = _iter_runs(runs)
    rows: list[dict[str, Any]] = []
    for rid, run in tqdm(items, desc="runs", disable=not progress):
        meta = _meta_of(run)
        tasks = [str(t) for t in meta.get("tasks", [])]
        # the task set, not the run's order of it: runs on [b, a] and [a, b] are analysed together
        row: dict[str, Any] = {
            "run_id": rid, "tasks": "|".join(sorted(tasks)), "n_tasks": len(tasks)
        }  # fmt: skip
        row.update(flatten_meta({k: v for k, v in meta.items() if k not in ("tasks", "run_id")}))
        row.update(_summary_wide(run_summary(run, phases=n_phases, layer=layer), phase))
        row.update(_final_scores(run, tasks, split, eval_metric))
        rows.append(row)
    return pd.DataFrame(rows)


def epoch_table(
    run: Run | Any,
    *,
    metric: str = "conflict",
    eval_metric: str = "accuracy",
    split: str = "val",
    layer: str = TOTAL_LAYER,
    task: str | None = None,
    entry: tuple[str, str] | None = None,
) -> pd.DataFrame:
    """Per-epoch interference next to the per-epoch validation metric of one run.

    Epoch ``k`` (an eval at point ``"epoch:<k>"`` with its ``step``) covers the probed steps in
    ``(step of epoch k-1, step of epoch k]`` (the first epoch starts at the first probe). Its
    interference is the fraction of probed values in conflict for ``metric="conflict"`` (the
    paper's "amount of gradient conflict") and the mean otherwise, over every pair or task of
    ``metric`` unless ``entry=(task_i, task_j)`` picks one (``(task, "")`` for per-task
    metrics, ``("", "")`` for whole-matrix ones). The score is ``eval_metric`` on ``split``,
    averaged over tasks unless ``task`` is given. Epochs without a probe have NaN interference.

    Args:
        run: A ``gradlens.store.Run`` (or anything with ``.metrics`` and ``.evals``).
        metric: Interference metric (``"conflict"``, ``"cosine"``, ``"gms"``, ``"norm_ratio"``...).
        eval_metric: Eval metric (``"accuracy"``, ``"loss"``...).
        split: Eval split.
        layer: Layer of the interference.
        task: Task of the score; ``None`` averages the run's tasks.
        entry: One ``(task_i, task_j)`` entry of the metric; ``None`` averages all.

    Returns:
        ``[epoch, step, interference, score, n_probes]`` sorted by epoch.

    Example:
        >>> import pandas as pd, gradlens as gl
        >>> from types import SimpleNamespace
        >>> m = pd.DataFrame({"step": [5, 10, 15, 20], "layer": gl.TOTAL_LAYER,
        ...                   "metric": "conflict",
        ...                   "task_i": "a", "task_j": "b", "value": [1.0, 0.0, 1.0, 1.0]})
        >>> ev = pd.DataFrame({"point": ["epoch:1", "epoch:2"], "epoch": pd.array([1, 2], "Int64"),
        ...     "step": pd.array([10, 20], "Int64"), "split": "val", "task": "a",
        ...     "metric": "accuracy", "value": [0.6, 0.7]})
        >>> epoch_table(SimpleNamespace(metrics=m, evals=ev))[["epoch", "interference", "score"]
        ...     ].values.tolist()
        [[1.0, 0.5, 0.6], [2.0, 1.0, 0.7]]
    """
    rows = _layer_rows(run, layer)
    rows = rows[rows["metric"] == metric]
    if entry is not None:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise GradlensError(f"`entry` should be a (task_i, task_j) tuple; found {entry!r}.")
        rows = rows[(rows["task_i"] == entry[0]) & (rows["task_j"] == entry[1])]
    per_epoch = _epoch_scores(run, eval_metric, split, task)
    ends = per_epoch["step"].to_numpy()
    idx = np.searchsorted(ends, rows["step"].to_numpy(), side="left")
    rows = rows.assign(epoch_index=idx)
    rows = rows[rows["epoch_index"] < len(ends)]
    agg = _aggregate(rows, ["epoch_index"])
    inter = np.full(len(ends), np.nan)
    counts = np.zeros(len(ends), dtype=np.int64)
    inter[agg["epoch_index"].to_numpy()] = agg["value"].to_numpy()
    counts[agg["epoch_index"].to_numpy()] = agg["n"].to_numpy()
    return pd.DataFrame(
        {
            "epoch": per_epoch["epoch"].to_numpy(),
            "step": ends,
            "interference": inter,
            "score": per_epoch["score"].to_numpy(),
            "n_probes": counts,
        }
    )


def _epoch_scores(run: Any, eval_metric: str, split: str, task: str | None) -> pd.DataFrame:
    """``[epoch, step, score]`` of the per-epoch evals, steps checked to increase."""
    ev = _evals_of(run)
    sel = ev[
        ev["point"].astype(str).str.startswith("epoch:")
        & (ev["split"] == split)
        & (ev["metric"] == eval_metric)
    ]
    if task is not None:
        sel = sel[sel["task"] == task]
    if sel.empty:
        raise GradlensError(
            f"`run.evals` should hold per-epoch evals (point 'epoch:<k>') of {eval_metric!r} on "
            f"split {split!r}{'' if task is None else f' for task {task!r}'}; found none."
        )
    epochs = sel["point"].astype(str).str.slice(len("epoch:")).astype(np.int64)
    if sel["step"].isna().any():
        raise GradlensError(
            "`run.evals` should give the training `step` of each per-epoch eval, to map probed "
            f"steps to epochs; found {int(sel['step'].isna().sum())} without one."
        )
    per_epoch = pd.DataFrame(
        {
            "epoch": epochs.to_numpy(),
            "step": sel["step"].astype(np.int64).to_numpy(),
            "value": sel["value"].to_numpy(np.float64),
        }
    )
    per_epoch = (
        per_epoch.groupby("epoch", sort=True)
        .agg(step=("step", "max"), score=("value", "mean"))
        .reset_index()
    )
    ends = per_epoch["step"].to_numpy()
    if np.any(np.diff(ends) < 0):
        raise GradlensError(
            f"`run.evals` should have steps increasing with the epoch; found {ends.tolist()}."
        )
    return per_epoch


def _jsonable(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, pd.Timestamp):
        return obj.isoformat()
    if isinstance(obj, pd.DataFrame):
        return [_jsonable(r) for r in obj.to_dict(orient="records")]
    if isinstance(obj, pd.Series):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    raise GradlensError(
        f"`obj` should hold tables, dicts, lists, numbers and strings; found {type(obj).__name__}."
    )


def to_json(obj: Any, path: str | os.PathLike[str] | None = None, *, indent: int = 2) -> str:
    """Strict JSON of a statistics result: tables as lists of records, NaN and NA as ``null``.

    Args:
        obj: A DataFrame, a dict (e.g. of several results), a list, or a scalar.
        path: If given, the JSON is also written there.
        indent: Indentation.

    Returns:
        The JSON text.

    Example:
        >>> import pandas as pd
        >>> print(to_json({"t": pd.DataFrame({"a": [1.0, float("nan")]})}, indent=None))
        {"t": [{"a": 1.0}, {"a": null}]}
    """
    text = json.dumps(_jsonable(obj), indent=indent, allow_nan=False)
    if path is not None:
        Path(path).write_text(text + "\n", encoding="utf-8")
    return text
