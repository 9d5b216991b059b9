"""The run store: one directory per run, written crash-safe while training, read back as pandas.

Layout of a run directory (format version :data:`FORMAT_VERSION`)::

    meta.json                      tasks, engine, layers, weights, seed, model, config, versions ...
    steps/chunk-000000.parquet     [step, layer, task_i, task_j, gram]: upper triangle (i <= j) of
                                   every layer's Gram, layer ``"__all__"`` for the total
    scalars/chunk-000000.parquet   [step, task, weight, loss]: the same steps' weights and losses
    evals/chunk-000000.parquet     [point, epoch, step, split, task, metric, value]
    commits.json                   how many steps and evals chunks are committed
    .lock                          the live writer's pid, host and start time

:class:`RunWriter` buffers the current chunk of probed steps in memory and writes it every
``flush_every`` steps or ``flush_seconds`` seconds; each file is written under a temporary name and
renamed into place, and a ``scalars`` chunk is always renamed before its ``steps`` chunk, which is
the commit point. A run killed at any instant therefore reads back every step of its last committed
chunk and nothing torn. Evals are written as soon as they are added. Each chunk carries a header
(index, tasks, steps) that the reader checks against its file name, ``meta.json`` and the commit
record (see :mod:`gradlens.store._check`); ``RunWriter(..., append=True)`` continues a run whose
writer died and :meth:`RunWriter.rewind` cuts one back to a step (:mod:`gradlens.store._append`).

:func:`load_run` reads one run (also while it is being written), :func:`load_runs` tabulates many
runs (meta flattened + final evals) for cross-run analysis; ``gradlens.stats`` builds its tables
from these two.

Example:
    >>> import tempfile, torch
    >>> from gradlens import Snapshot
    >>> d = tempfile.mkdtemp()
    >>> with RunWriter(d + "/run", meta={"tasks": ["a", "b"], "seed": 0}) as w:
    ...     for step in range(3):
    ...         g = torch.tensor([[4.0, -2.0], [-2.0, 1.0 + step]], dtype=torch.float64)
    ...         w.add_snapshot(Snapshot(step, ("a", "b"), g, {"fc": g}, torch.ones(2)))
    ...     w.add_eval({"a": {"accuracy": 0.9}, "b": {"accuracy": 0.7}}, split="val", point="final")
    >>> run = load_run(d + "/run")
    >>> run.tasks, run.layers, len(run.steps)
    (('a', 'b'), ('__all__', 'fc'), 18)
    >>> run.gram(2).tolist()
    [[4.0, -2.0], [-2.0, 3.0]]
    >>> load_runs(d)[["run_id", "seed", "final.val.b.accuracy"]].to_dict("records")
    [{'run_id': 'run', 'seed': 0, 'final.val.b.accuracy': 0.7}]
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob as _glob
import json
import math
import os
import platform
import shutil
import time
import weakref
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from gradlens._errors import GradlensError, StoreError
from gradlens.snapshot import TOTAL_LAYER, Snapshot
from gradlens.store._append import committed_state, truncate_after
from gradlens.store._check import (
    COMMITS_NAME,
    Problems,
    header_for,
    read_commits,
    read_eval_chunks,
    read_step_chunks,
    write_commits,
)
from gradlens.store._io import EVALS_SCHEMA as _EVALS_SCHEMA
from gradlens.store._io import SCALARS_SCHEMA as _SCALARS_SCHEMA
from gradlens.store._io import STEPS_SCHEMA as _STEPS_SCHEMA
from gradlens.store._io import (
    TMP_PREFIX,
    atomic_write_bytes,
    atomic_write_table,
    chunk_name,
    with_header,
)
from gradlens.store._lock import RunLock

__all__ = ["FORMAT_VERSION", "Run", "RunWriter", "load_run", "load_runs"]

#: Version of the run directory format written by this gradlens; readers refuse newer ones.
FORMAT_VERSION = 1

META_NAME = "meta.json"
_STEPS, _SCALARS, _EVALS = "steps", "scalars", "evals"
_RESERVED_META = ("format_version", "created", "versions")

# --------------------------------------------------------------------------------------------
# meta.json
# --------------------------------------------------------------------------------------------


def _jsonable(obj: Any, key: str) -> Any:
    """Convert ``obj`` to JSON types (numpy/torch scalars and arrays, tuples, paths)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{key}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{key}[{i}]") for i, v in enumerate(obj)]
    raise StoreError(
        f"`meta` should hold JSON-serialisable values (numbers, strings, lists, dicts, numpy or "
        f"torch scalars and arrays); found {type(obj).__name__} at {key!r}."
    )


def _versions() -> dict[str, str]:
    import gradlens

    return {
        "gradlens": gradlens.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
        "python": platform.python_version(),
    }


def _read_meta(run_dir: Path) -> dict[str, Any]:
    path = run_dir / META_NAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(
            f"`path` should be a gradlens run directory holding {META_NAME}; found no {path}."
        ) from None
    except OSError as exc:
        raise StoreError(f"Cannot read the run metadata {path} ({exc}).") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"The run metadata {path} is not valid JSON ({exc}).") from None
    if not isinstance(meta, dict):
        raise StoreError(f"The run metadata {path} should hold a JSON object; found {meta!r:.80}.")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise StoreError(
            f"The run metadata {path} should hold a positive integer `format_version`; found "
            f"{version!r}."
        )
    if version > FORMAT_VERSION:
        raise StoreError(
            f"The run {run_dir} has store format version {version}; this gradlens reads versions "
            f"up to {FORMAT_VERSION}. Upgrade gradlens (`pip install -U gradlens`) to read it."
        )
    if "tasks" in meta:
        try:
            _check_tasks(meta["tasks"])
        except StoreError as exc:
            raise StoreError(f"The run metadata {path} is invalid: {exc}") from None
    return meta


def _check_tasks(tasks: Any) -> tuple[str, ...]:
    if (
        not isinstance(tasks, (list, tuple))
        or not tasks
        or not all(isinstance(t, str) for t in tasks)
        or len(set(tasks)) != len(tasks)
    ):
        raise StoreError(
            f"`meta['tasks']` should be a non-empty list of distinct strings; found {tasks!r}."
        )
    return tuple(tasks)


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class _WriterState:
    """Everything a writer owns, held apart from :class:`RunWriter` so a finalizer can close it."""

    def __init__(self, path: Path, flush_every: int, flush_seconds: float) -> None:
        self.path = path
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.lock = RunLock(path)
        self.owner_pid = os.getpid()
        self.meta: dict[str, Any] = {}
        self.tasks: tuple[str, ...] | None = None
        self.layer_codes: dict[str, int] = {}
        self.last_step: int | None = None
        self.chunk_index = 0
        self.eval_index = 0
        self.closed = False
        self.last_flush = time.monotonic()
        self.iu: np.ndarray = np.empty(0, dtype=np.int64)
        self.ju: np.ndarray = np.empty(0, dtype=np.int64)
        self._clear()

    def _clear(self) -> None:
        self.buf_steps: list[int] = []
        self.buf_codes: list[np.ndarray] = []
        self.buf_values: list[np.ndarray] = []
        self.buf_weights: list[np.ndarray] = []
        self.buf_losses: list[np.ndarray] = []

    def write_meta(self) -> None:
        text = json.dumps(self.meta, indent=2, allow_nan=True)
        try:
            atomic_write_bytes(self.path / META_NAME, text.encode("utf-8"))
        except OSError as exc:
            raise StoreError(
                f"Could not write the metadata of the run {self.path} ({exc})."
            ) from exc

    def set_tasks(self, tasks: tuple[str, ...]) -> None:
        self.tasks = tasks
        self.iu, self.ju = np.triu_indices(len(tasks))

    def flush(self) -> None:
        if not self.buf_steps:
            return
        tasks = self.tasks or ()  # set by the first snapshot, before anything is buffered
        steps = np.asarray(self.buf_steps, dtype=np.int64)
        n_layers = [len(c) for c in self.buf_codes]
        codes = np.concatenate(self.buf_codes)
        values = np.concatenate(self.buf_values)  # (rows, P)
        n_pairs = values.shape[1]
        rows = len(codes)
        pair = np.tile(np.arange(n_pairs, dtype=np.int32), rows)
        layer_dict = pa.array(list(self.layer_codes), pa.string())
        task_dict = pa.array(list(tasks), pa.string())
        step_table = pa.Table.from_arrays(
            [
                pa.array(np.repeat(np.repeat(steps, n_layers), n_pairs)),
                pa.DictionaryArray.from_arrays(np.repeat(codes, n_pairs), layer_dict),
                pa.DictionaryArray.from_arrays(self.iu.astype(np.int32)[pair], task_dict),
                pa.DictionaryArray.from_arrays(self.ju.astype(np.int32)[pair], task_dict),
                pa.array(values.reshape(-1)),
            ],
            schema=_STEPS_SCHEMA,
        )
        n_tasks = len(tasks)
        scalar_table = pa.Table.from_arrays(
            [
                pa.array(np.repeat(steps, n_tasks)),
                pa.DictionaryArray.from_arrays(
                    np.tile(np.arange(n_tasks, dtype=np.int32), len(steps)), task_dict
                ),
                pa.array(np.concatenate(self.buf_weights)),
                pa.array(np.concatenate(self.buf_losses)),
            ],
            schema=_SCALARS_SCHEMA,
        )
        name = chunk_name(self.chunk_index)
        i, labels = self.chunk_index, {"tasks": list(tasks)}
        step_header = header_for(i, step_table, layers=list(self.layer_codes), **labels)
        try:
            # scalars first: the steps chunk is the commit point read by load_run
            atomic_write_table(
                self.path / _SCALARS / name,
                with_header(scalar_table, header_for(i, scalar_table, **labels)),
            )
            atomic_write_table(self.path / _STEPS / name, with_header(step_table, step_header))
            # then the record: a kill before it leaves one chunk more than recorded, which is read
            write_commits(self.path, self.chunk_index + 1, self.eval_index)
        except OSError as exc:
            raise StoreError(
                f"Could not write chunk {name} of the run {self.path} ({exc}); the "
                f"{len(steps)} buffered steps are kept and written at the next flush."
            ) from exc
        self.chunk_index += 1
        self.last_flush = time.monotonic()
        self._clear()

    def close(self) -> None:
        if self.closed or os.getpid() != self.owner_pid:  # never from a forked child
            return
        try:
            self.flush()
        finally:
            self.closed = True
            self.lock.release()


def _finalize(state: _WriterState) -> None:
    state.close()


class RunWriter:
    """Write one run directory while training: meta, probed steps in chunks, evals.

    Args:
        path: The run directory; created (with parents) if missing.
        meta: JSON-serialisable facts about the run: ``tasks``, ``engine``, ``level``, ``layers``,
            ``weights`` (or a schedule), ``model`` (a dict describing it), ``seed``, ``config``
            (free-form user config) ... ``format_version``, ``created`` and ``versions`` (gradlens,
            torch, numpy, pandas, pyarrow, python) are added.
        flush_every: Write a chunk every this many probed steps.
        flush_seconds: ... or when this many seconds have passed since the last chunk (checked at
            each ``add_snapshot``; no timer thread).
        overwrite: Replace a run already in ``path``; otherwise that is an error.
        append: Reopen the run already in ``path`` (one whose writer died, or was closed) and
            continue it after its last committed step: its chunks, evals and ``meta.json`` are
            kept (``meta`` updates the stored fields, its ``tasks`` must be the run's), what the
            dead writer left uncommitted is removed, and ``meta["resumes"]`` records the reopening.
            Without a run in ``path`` it starts a new one. See also :meth:`rewind`.

    Raises:
        StoreError: If another live process writes ``path`` (the error names its pid), if ``path``
            already holds a run and neither ``overwrite`` nor ``append`` is set, if a run to
            append to is damaged (an unreadable, missing or duplicated chunk) or has other
            tasks, on a file system error, or on a bad argument.

    A stale lock left by a dead writer on this host is taken over with a ``GradlensWarning``. Only
    the current chunk is kept in memory and nothing touches the disk between chunk boundaries.
    Close the writer (or use it as a context manager); if it is garbage-collected or the
    interpreter exits first, it is flushed and closed then.

    Example:
        >>> import tempfile, torch
        >>> from gradlens import Snapshot
        >>> w = RunWriter(tempfile.mkdtemp() + "/run", meta={"tasks": ["a", "b"]}, flush_every=2)
        >>> for step in range(5):
        ...     g = torch.eye(2, dtype=torch.float64) * (step + 1)
        ...     w.add_snapshot(Snapshot(step, ("a", "b"), g, {}, torch.ones(2), losses={"a": 0.5}))
        >>> sorted(p.name for p in (w.path / "steps").iterdir())  # two full chunks, 1 step buffered
        ['chunk-000000.parquet', 'chunk-000001.parquet']
        >>> w.close()
        >>> load_run(w.path).scalars.loss.tolist()[-2:]
        [0.5, nan]
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        meta: Mapping[str, Any] | None = None,
        *,
        flush_every: int = 100,
        flush_seconds: float = 30.0,
        overwrite: bool = False,
        append: bool = False,
    ) -> None:
        if overwrite and append:
            raise StoreError("`overwrite` and `append` should not both be True; found both.")
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise StoreError(f"`flush_every` should be a positive int; found {flush_every!r}.")
        if (
            isinstance(flush_seconds, bool)
            or not isinstance(flush_seconds, (int, float))
            or not flush_seconds > 0
        ):
            raise StoreError(
                f"`flush_seconds` should be a positive number of seconds (inf allowed); "
                f"found {flush_seconds!r}."
            )
        if meta is not None and not isinstance(meta, Mapping):
            raise StoreError(f"`meta` should be a mapping or None; found {type(meta).__name__}.")
        user_meta = _jsonable(dict(meta or {}), "meta")
        reserved = [k for k in _RESERVED_META if k in user_meta]
        if reserved:
            raise StoreError(f"`meta` should not set {reserved}: the store writes them itself.")
        tasks = _check_tasks(user_meta["tasks"]) if "tasks" in user_meta else None

        run_dir = Path(path)
        try:
            if run_dir.exists() and not run_dir.is_dir():
                raise StoreError(f"`path` should be a run directory; found a file at {run_dir}.")
            run_dir.mkdir(parents=True, exist_ok=True)
            state = _WriterState(run_dir, flush_every, float(flush_seconds))
            state.lock.acquire()
        except OSError as exc:
            raise StoreError(
                f"Cannot open the run directory {run_dir} for writing ({exc})."
            ) from exc
        try:
            if append and (run_dir / META_NAME).exists():
                self._reopen(state, user_meta, tasks)
            else:
                self._prepare_dir(run_dir, overwrite or append)
                state.meta = {
                    "format_version": FORMAT_VERSION,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "versions": _versions(),
                    **user_meta,
                }
                if tasks is not None:
                    state.set_tasks(tasks)
                state.write_meta()
                write_commits(run_dir, 0, 0)
        except OSError as exc:
            state.closed = True
            state.lock.release()
            raise StoreError(f"Cannot prepare the run directory {run_dir} ({exc}).") from exc
        except BaseException:
            state.closed = True
            state.lock.release()
            raise
        self._state = state
        self._finalizer = weakref.finalize(self, _finalize, state)

    @staticmethod
    def _reopen(state: _WriterState, user_meta: dict[str, Any], tasks: Any) -> None:
        run_dir = state.path
        meta = _read_meta(run_dir)
        stored = tuple(meta["tasks"]) if "tasks" in meta else None
        if tasks is not None and stored is not None and tasks != stored:
            raise StoreError(
                f"`meta['tasks']` should be the tasks of the run to append to, {list(stored)}; "
                f"found {list(tasks)}."
            )
        n_chunks, last, n_evals = committed_state(run_dir, stored)
        state.meta = {**meta, **user_meta}
        if "tasks" in state.meta:
            state.set_tasks(tuple(state.meta["tasks"]))
        state.chunk_index, state.last_step, state.eval_index = n_chunks, last, n_evals
        resumes = list(state.meta.get("resumes") or [])
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        resumes.append({"at": now, "after_step": last})
        state.meta["resumes"] = resumes
        state.write_meta()
        write_commits(run_dir, n_chunks, n_evals)

    @staticmethod
    def _prepare_dir(run_dir: Path, overwrite: bool) -> None:
        ours = [run_dir / n for n in (META_NAME, _STEPS, _SCALARS, _EVALS, COMMITS_NAME)]
        if not overwrite and any(p.exists() for p in ours):
            raise StoreError(
                f"`path` {run_dir} already holds a run: replace it with "
                f"RunWriter(path, overwrite=True) (for a Profiler: "
                f"store=RunWriter(path, overwrite=True); `gradlens train`: --overwrite), continue "
                f"it with append=True, or choose a new directory."
            )
        for p in ours:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        for p in run_dir.glob(f"{TMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        for sub in (_STEPS, _SCALARS, _EVALS):
            (run_dir / sub).mkdir()

    # ---- public API ---------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The run directory."""
        return self._state.path

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the metadata as written to ``meta.json``."""
        return json.loads(json.dumps(self._state.meta))

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._state.closed

    def _check_open(self, what: str) -> _WriterState:
        if self._state.closed:
            raise StoreError(f"Cannot {what}: the writer of {self._state.path} is closed.")
        return self._state

    def add_snapshot(self, snap: Snapshot) -> None:
        """Buffer one probed step; writes a chunk when ``flush_every`` or ``flush_seconds`` is hit.

        Steps must increase strictly and keep the run's tasks (from ``meta['tasks']`` or the first
        snapshot). Layers may differ between snapshots (a layer missing at a step reads back as
        NaN in :meth:`Run.grams`).
        """
        st = self._check_open("add a snapshot")
        if not isinstance(snap, Snapshot):
            raise StoreError(f"`snap` should be a gradlens Snapshot; found {type(snap).__name__}.")
        tasks = tuple(snap.tasks)
        if st.tasks is None:
            st.set_tasks(_check_tasks(tasks))
            st.meta["tasks"] = list(tasks)
            st.write_meta()
        elif tasks != st.tasks:
            raise StoreError(
                f"`snap.tasks` should be the run's tasks {list(st.tasks)}; found {list(tasks)} "
                f"at step {snap.step}."
            )
        step = int(snap.step)
        if st.last_step is not None and step <= st.last_step:
            raise StoreError(
                f"`snap.step` should increase strictly; found step {step} after step "
                f"{st.last_step}."
            )
        n = len(tasks)
        names = (TOTAL_LAYER, *snap.layer_grams)
        mats = (snap.gram, *snap.layer_grams.values())
        for name, m in zip(names, mats):
            if tuple(m.shape) != (n, n):
                raise StoreError(
                    f"The Gram of layer {name!r} at step {step} should be {n} x {n} for tasks "
                    f"{list(tasks)}; found shape {tuple(m.shape)}."
                )
        if tuple(snap.weights.shape) != (n,):
            raise StoreError(
                f"`snap.weights` should have shape ({n},); found {tuple(snap.weights.shape)} at "
                f"step {step}."
            )
        codes = np.empty(len(names), dtype=np.int32)
        for k, name in enumerate(names):
            code = st.layer_codes.get(name)
            if code is None:
                code = st.layer_codes[name] = len(st.layer_codes)
            codes[k] = code
        stacked = torch.stack([m.detach() for m in mats]).to("cpu", torch.float64).numpy()
        st.buf_steps.append(step)
        st.buf_codes.append(codes)
        st.buf_values.append(stacked[:, st.iu, st.ju])
        st.buf_weights.append(snap.weights.detach().to("cpu", torch.float64).numpy().copy())
        st.buf_losses.append(
            np.array([float(snap.losses.get(t, math.nan)) for t in tasks], dtype=np.float64)
        )
        st.last_step = step
        if (
            len(st.buf_steps) >= st.flush_every
            or time.monotonic() - st.last_flush >= st.flush_seconds
        ):
            st.flush()

    def add_eval(
        self,
        values: Mapping[str, Mapping[str, float]],
        *,
        split: str,
        point: str,
        epoch: int | None = None,
        step: int | None = None,
    ) -> None:
        """Record per-task metrics at a named point; written to disk before this returns.

        Args:
            values: ``{task: {metric: value}}``, e.g. ``{"left": {"accuracy": 0.9, "loss": 0.3}}``.
            split: The data split, e.g. ``"val"`` or ``"test"``.
            point: When it was measured, e.g. ``"epoch"`` or ``"final"`` (``load_runs`` tabulates
                ``"final"``).
            epoch: The epoch, if any.
            step: The training step, if any.
        """
        st = self._check_open("add an eval")
        for arg, val in (("split", split), ("point", point)):
            if not isinstance(val, str) or not val:
                raise StoreError(f"`{arg}` should be a non-empty string; found {val!r}.")
        for arg, val in (("epoch", epoch), ("step", step)):
            if val is not None and (
                isinstance(val, bool) or not isinstance(val, (int, np.integer))
            ):
                raise StoreError(f"`{arg}` should be an int or None; found {val!r}.")
        if not isinstance(values, Mapping) or not values:
            raise StoreError(
                f"`values` should be a non-empty mapping {{task: {{metric: value}}}}; found "
                f"{values!r:.80}."
            )
        rows: list[tuple[str, str, float]] = []
        for task, metrics in values.items():
            if not isinstance(task, str) or not isinstance(metrics, Mapping):
                raise StoreError(
                    f"`values` should map task names to {{metric: value}} mappings; found "
                    f"{task!r}: {metrics!r:.80}."
                )
            for metric, value in metrics.items():
                try:
                    rows.append((task, str(metric), float(value)))
                except (TypeError, ValueError):
                    raise StoreError(
                        f"`values[{task!r}][{metric!r}]` should be a number; found {value!r:.80}."
                    ) from None
        k = len(rows)
        table = pa.Table.from_arrays(
            [
                pa.array([point] * k, pa.string()),
                pa.array([None if epoch is None else int(epoch)] * k, pa.int64()),
                pa.array([None if step is None else int(step)] * k, pa.int64()),
                pa.array([split] * k, pa.string()),
                pa.array([r[0] for r in rows], pa.string()),
                pa.array([r[1] for r in rows], pa.string()),
                pa.array([r[2] for r in rows], pa.float64()),
            ],
            schema=_EVALS_SCHEMA,
        )
        try:
            table = with_header(table, header_for(st.eval_index, table))
            atomic_write_table(st.path / _EVALS / chunk_name(st.eval_index), table)
            write_commits(st.path, st.chunk_index, st.eval_index + 1)
        except OSError as exc:
            raise StoreError(f"Could not write an eval of the run {st.path} ({exc}).") from exc
        st.eval_index += 1

    def update_meta(self, **fields: Any) -> None:
        """Add or replace top-level metadata fields; ``meta.json`` is rewritten atomically.

        Example:
            >>> import tempfile
            >>> with RunWriter(tempfile.mkdtemp() + "/r") as w:
            ...     w.update_meta(seed=3, config={"lr": 0.1})
            >>> load_run(w.path).meta["config"]
            {'lr': 0.1}
        """
        st = self._check_open("update the metadata")
        new = _jsonable(fields, "meta")
        reserved = [k for k in _RESERVED_META if k in new]
        if reserved:
            raise StoreError(f"`update_meta` should not set {reserved}: the store writes them.")
        if "tasks" in new:
            tasks = _check_tasks(new["tasks"])
            if st.tasks is not None and tasks != st.tasks:
                raise StoreError(
                    f"`tasks` cannot change during a run: it is {list(st.tasks)}; found "
                    f"{list(tasks)}."
                )
        old = st.meta
        st.meta = {**old, **new}
        try:
            st.write_meta()
        except StoreError:
            st.meta = old  # a failed call changes nothing
            raise
        if "tasks" in new and st.tasks is None:
            st.set_tasks(tuple(new["tasks"]))

    def flush(self) -> None:
        """Write the buffered steps as one chunk now (no-op if none are buffered)."""
        self._check_open("flush").flush()

    def rewind(self, step: int) -> int:
        """Continue the run at training step ``step`` (training restored from a checkpoint taken
        after ``step`` steps): every stored or buffered probed step ``>= step`` is dropped, and
        every eval from the first one recorded with a step ``> step`` on (an eval recorded at
        ``step`` was taken at the checkpoint). Returns the number of probed steps dropped.

        Example:
            >>> import tempfile, torch
            >>> from gradlens import Snapshot
            >>> w = RunWriter(tempfile.mkdtemp() + "/r", meta={"tasks": ["a"]}, flush_every=2)
            >>> for s in range(5):
            ...     w.add_snapshot(Snapshot(s, ("a",), torch.ones(1, 1), {}, torch.ones(1)))
            >>> w.rewind(3)
            2
            >>> w.add_snapshot(Snapshot(3, ("a",), torch.ones(1, 1), {}, torch.ones(1)))
            >>> w.close()
            >>> load_run(w.path).probed_steps.tolist()
            [0, 1, 2, 3]
        """
        st = self._check_open("rewind")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise StoreError(f"`step` should be an int; found {step!r}.")
        step = int(step)
        kept = [k for k, s in enumerate(st.buf_steps) if s < step]
        dropped = len(st.buf_steps) - len(kept)
        for name in ("buf_steps", "buf_codes", "buf_values", "buf_weights", "buf_losses"):
            setattr(st, name, [getattr(st, name)[k] for k in kept])
        try:
            n_chunks, last, n_evals, gone = truncate_after(
                st.path, step - 1, st.chunk_index, st.eval_index, eval_step=step
            )
        except OSError as exc:
            raise StoreError(f"Could not rewind the run {st.path} to step {step} ({exc}).") from exc
        st.chunk_index, st.eval_index = n_chunks, n_evals
        st.last_step = st.buf_steps[-1] if st.buf_steps else last
        return dropped + gone

    def close(self) -> None:
        """Flush and release the lock; idempotent."""
        self._finalizer.detach()
        self._state.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        st = self._state
        state = "closed" if st.closed else f"{len(st.buf_steps)} steps buffered"
        return f"RunWriter({str(st.path)!r}, chunks={st.chunk_index}, {state})"


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


def _read_evals(
    run_dir: Path, problems: Problems | None = None, commits: dict[str, int] | None = None
) -> pd.DataFrame:
    tables = read_eval_chunks(run_dir, problems or Problems(False), commits)
    table = pa.concat_tables(tables) if tables else _EVALS_SCHEMA.empty_table()
    df = table.to_pandas()
    for col in ("epoch", "step"):
        df[col] = df[col].astype("Int64")
    return df.reset_index(drop=True)


def _read_steps(
    run_dir: Path, tasks: tuple[str, ...] | None, problems: Problems, commits: dict[str, int]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    steps, scalars = read_step_chunks(run_dir, tasks, problems, commits)
    # A scalars chunk without its steps chunk is a flush cut short: not committed, not read.
    st_df = _concat(steps, _STEPS_SCHEMA).to_pandas()
    sc_df = _concat(scalars, _SCALARS_SCHEMA).to_pandas()
    return _by_step(st_df), _by_step(sc_df)


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    if not tables:
        return schema.empty_table()
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])


def _by_step(df: pd.DataFrame) -> pd.DataFrame:
    if not df["step"].is_monotonic_increasing:  # pragma: no cover - the writer keeps order
        df = df.sort_values("step", kind="stable")
    return df.reset_index(drop=True)


class Run:
    """One stored run, as read by :func:`load_run`.

    Attributes:
        path: The run directory.
        meta: The contents of ``meta.json``.
        steps: Long format ``[step, layer, task_i, task_j, gram]`` (upper triangle, ``i <= j`` in
            task order; ``layer == "__all__"`` is the total), sorted by step; ``layer``, ``task_i``
            and ``task_j`` are categoricals (tasks in task order).
        scalars: ``[step, task, weight, loss]`` per probed step and task (loss NaN if not given).
        evals: ``[point, epoch, step, split, task, metric, value]``, ``epoch``/``step`` nullable.

    ``metrics`` (derived from the Grams and weights by ``gradlens.metrics.metrics_frame``) is
    computed on first access and cached.
    """

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        steps: pd.DataFrame,
        scalars: pd.DataFrame,
        evals: pd.DataFrame,
    ) -> None:
        self.path = path
        self.meta = meta
        self.steps = steps
        self.scalars = scalars
        self.evals = evals

    @cached_property
    def tasks(self) -> tuple[str, ...]:
        """The run's tasks, in order."""
        if "tasks" in self.meta:
            return tuple(self.meta["tasks"])
        return tuple(str(t) for t in self.steps["task_i"].cat.categories)

    @cached_property
    def layers(self) -> tuple[str, ...]:
        """Layers with stored Grams, the total ``"__all__"`` first."""
        found = [str(x) for x in self.steps["layer"].cat.categories]
        if not found:
            found = [TOTAL_LAYER, *self.meta.get("layers", [])]
        return (TOTAL_LAYER, *[x for x in found if x != TOTAL_LAYER])

    @cached_property
    def probed_steps(self) -> np.ndarray:
        """The probed steps, sorted: the first axis of :meth:`grams`."""
        return np.unique(self.steps["step"].to_numpy())

    def _codes(self, col: str, names: tuple[str, ...]) -> np.ndarray:
        """Map a categorical column to indices into ``names`` (-1 if absent)."""
        cat = self.steps[col].cat
        lookup = {n: i for i, n in enumerate(names)}
        remap = np.array([lookup.get(str(c), -1) for c in cat.categories] + [-1], dtype=np.int64)
        return remap[cat.codes.to_numpy()]

    def _fill(
        self, mask: np.ndarray | None, shape: tuple[int, ...], lead: list[np.ndarray]
    ) -> np.ndarray:
        out = np.full(shape, np.nan)
        i = self._codes("task_i", self.tasks)
        j = self._codes("task_j", self.tasks)
        g = self.steps["gram"].to_numpy()
        if mask is not None:
            i, j, g, lead = i[mask], j[mask], g[mask], [x[mask] for x in lead]
        ok = (i >= 0) & (j >= 0)  # a label not in `tasks` never wraps to the last task
        for x in lead:
            ok &= x >= 0
        if not ok.all():
            i, j, g, lead = i[ok], j[ok], g[ok], [x[ok] for x in lead]
        out[(*lead, i, j)] = g
        out[(*lead, j, i)] = g
        return out

    def _step_index(self) -> np.ndarray:
        """Row -> index into :attr:`probed_steps` (``steps`` is sorted by step)."""
        steps = self.steps["step"].to_numpy()
        out = np.zeros(len(steps), dtype=np.int64)
        np.cumsum(steps[1:] != steps[:-1], out=out[1:])
        return out

    def _layer_mask(self, layer: str) -> np.ndarray:
        if layer not in self.layers:
            raise GradlensError(f"`layer` should be one of {list(self.layers)}; found {layer!r}.")
        return (self.steps["layer"] == layer).to_numpy()

    def grams(self, layer: str = TOTAL_LAYER) -> np.ndarray:
        """Full symmetric Grams of one layer at every probed step, shape ``(S, T, T)``.

        Steps follow :attr:`probed_steps`; a layer not stored at some step is NaN there.
        """
        shape = (len(self.probed_steps), len(self.tasks), len(self.tasks))
        return self._fill(self._layer_mask(layer), shape, [self._step_index()])

    def gram(self, step: int, layer: str = TOTAL_LAYER) -> np.ndarray:
        """The full symmetric ``(T, T)`` Gram of ``layer`` at probed step ``step``."""
        steps = self.steps["step"].to_numpy()
        lo, hi = np.searchsorted(steps, [step, step + 1])
        if lo == hi:
            raise GradlensError(
                f"`step` should be a probed step of {self.path} ({len(self.probed_steps)} steps "
                f"from {self.probed_steps[:1].tolist()} to {self.probed_steps[-1:].tolist()}); "
                f"found {step!r}."
            )
        mask = np.zeros(len(steps), dtype=bool)
        mask[lo:hi] = True
        mask &= self._layer_mask(layer)
        n = len(self.tasks)
        return self._fill(mask, (n, n), [])

    def all_grams(self) -> np.ndarray:
        """Grams of every layer at every probed step, shape ``(S, L, T, T)`` (layers as
        :attr:`layers`)."""
        shape = (len(self.probed_steps), len(self.layers), len(self.tasks), len(self.tasks))
        lead = [self._step_index(), self._codes("layer", self.layers)]
        return self._fill(None, shape, lead)

    def weights(self) -> np.ndarray:
        """Task weights at every probed step, shape ``(S, T)`` (NaN where not stored)."""
        out = np.full((len(self.probed_steps), len(self.tasks)), np.nan)
        sc = self.scalars
        s = np.searchsorted(self.probed_steps, sc["step"].to_numpy())
        lookup = {n: i for i, n in enumerate(self.tasks)}
        t = sc["task"].map(lookup).to_numpy(dtype=float)
        ok = (s < len(self.probed_steps)) & ~np.isnan(t)
        s, t = s[ok], t[ok].astype(np.int64)
        ok2 = self.probed_steps[s] == sc["step"].to_numpy()[ok]
        out[s[ok2], t[ok2]] = sc["weight"].to_numpy()[ok][ok2]
        return out

    @cached_property
    def metrics(self) -> pd.DataFrame:
        """Per-step metrics ``[step, layer, metric, task_i, task_j, value]`` (cached)."""
        from gradlens.metrics import metrics_frame

        return metrics_frame(
            self.all_grams(),
            self.tasks,
            weights=self.weights(),
            steps=self.probed_steps,
            layers=self.layers,
        )

    def __repr__(self) -> str:
        return (
            f"Run({str(self.path)!r}, steps={len(self.probed_steps)}, tasks={list(self.tasks)}, "
            f"layers={len(self.layers)}, evals={len(self.evals)})"
        )


def load_run(path: str | os.PathLike[str], *, strict: bool = False) -> Run:
    """Read a run directory (also one still being written: its committed chunks are returned).

    A chunk that cannot be read (truncated, corrupted), a committed chunk that is missing (the
    commit record ``commits.json`` counts them), a chunk whose header names another index (a
    file copied over another) or whose steps overlap the previous chunk's is skipped with a
    ``GradlensWarning`` naming the file; it is never misread. With ``strict=True`` each of these
    is a :class:`StoreError` instead.

    Raises:
        StoreError: If ``path`` holds no readable ``meta.json``, was written by a newer format
            version, or a chunk's tasks differ from ``meta.json``'s (the Grams could not be
            labelled); in strict mode, on any problem listed above.

    Example:
        >>> import tempfile
        >>> with RunWriter(tempfile.mkdtemp() + "/r", meta={"tasks": ["a", "b"]}) as w:
        ...     pass
        >>> run = load_run(w.path)
        >>> run.tasks, len(run.steps), list(run.steps.columns)
        (('a', 'b'), 0, ['step', 'layer', 'task_i', 'task_j', 'gram'])
    """
    run_dir = Path(path)
    problems = Problems(strict)
    try:
        meta = _read_meta(run_dir)
        commits = read_commits(run_dir, problems)
        tasks = tuple(meta["tasks"]) if "tasks" in meta else None
        steps, scalars = _read_steps(run_dir, tasks, problems, commits)
        evals = _read_evals(run_dir, problems, commits)
    except OSError as exc:
        raise StoreError(f"Cannot read the run {run_dir}: {exc}.") from None
    return Run(run_dir, meta, steps, scalars, evals)


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        elif isinstance(value, (list, tuple, Mapping)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def _find_runs(root: Path) -> list[Path]:
    if (root / META_NAME).is_file():
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        if META_NAME in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []  # runs do not nest
        else:
            dirnames.sort()
    return found


def load_runs(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> pd.DataFrame:
    """Tabulate many runs, one row each, for cross-run analysis (``gradlens.stats`` uses it).

    Args:
        paths: A directory (every directory below it holding a ``meta.json``, recursively), a glob
            pattern of run directories, or an iterable of run directories.

    Returns:
        Columns ``run_id`` (the path relative to the given directory; for a glob or a list,
        relative to the runs' common parent), ``path``, the metadata flattened with dots
        (``seed``, ``model.width``, ``weights.left``, ``config.lr`` ...; lists as JSON strings),
        and the final evals as ``final.<split>.<task>.<metric>`` (the last one written wins).
        Sorted by ``run_id``. Per-step data is not read: use :func:`load_run` for it.

    Raises:
        StoreError: If nothing matches, or a run cannot be read (see :func:`load_run`).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> for p in (0.3, 0.7):
        ...     with RunWriter(f"{d}/p{p}", meta={"tasks": ["a", "b"], "weights": {"a": p}}) as w:
        ...         w.add_eval({"a": {"acc": p}}, split="val", point="final")
        >>> load_runs(d)[["run_id", "weights.a", "final.val.a.acc"]].values.tolist()
        [['p0.3', 0.3, 0.3], ['p0.7', 0.7, 0.7]]
    """
    if isinstance(paths, (str, os.PathLike)):
        text = os.fspath(paths)
        root = Path(text)
        if root.is_dir():
            runs = _find_runs(root)
            base = root.parent if runs == [root] else root
        elif _glob.has_magic(text):
            runs = sorted(Path(p) for p in _glob.glob(text) if (Path(p) / META_NAME).is_file())
            base = None
        else:
            raise StoreError(
                f"`paths` should be a directory, a glob pattern or an iterable of run "
                f"directories; found {text!r}, which does not exist."
            )
    else:
        runs = [Path(p) for p in paths]
        base = None
    if not runs:
        raise StoreError(
            f"`paths` should lead to at least one run directory; found none in {paths!r}."
        )
    if base is None:
        base = Path(os.path.commonpath([p.absolute().parent for p in runs]))
        runs_rel = [p.absolute() for p in runs]
    else:
        runs_rel = runs
    rows: list[dict[str, Any]] = []
    for run_dir, rel in zip(runs, runs_rel):
        meta = _read_meta(run_dir)
        row: dict[str, Any] = {"run_id": rel.relative_to(base).as_posix(), "path": str(run_dir)}
        row.update(_flatten(meta))
        evals = _read_evals(run_dir)
        final = evals[evals["point"] == "final"]
        for split, task, metric, value in zip(
            final["split"], final["task"], final["metric"], final["value"]
        ):
            row[f"final.{split}.{task}.{metric}"] = value
        rows.append(row)
    return pd.DataFrame(rows).sort_values("run_id", kind="stable").reset_index(drop=True)
