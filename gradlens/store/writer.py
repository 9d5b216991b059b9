"""The writer side of the run store: :class:`RunWriter` and the state it owns.

See :mod:`gradlens.store` for the layout of a run directory and the crash-safety contract.

Example:
    >>> import tempfile, torch
    >>> from gradlens import Snapshot
    >>> from gradlens.store import load_run
    >>> with RunWriter(tempfile.mkdtemp() + "/run", meta={"tasks": ["a"]}) as w:
    ...     w.add_snapshot(Snapshot(0, ("a",), torch.ones(1, 1), {}, torch.ones(1), notes=("x",)))
    >>> load_run(w.path).snapshot(0).notes
    ('x',)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from gradlens._errors import StoreError
from gradlens._types import TOTAL_LAYER
from gradlens._validate import check_int
from gradlens.snapshot import Snapshot
from gradlens.store._append import committed_state, truncate_after
from gradlens.store._check import COMMITS_NAME, header_for, write_commits
from gradlens.store._io import (
    EVALS,
    EVALS_SCHEMA,
    FORMAT_VERSION,
    LEGACY_TOTAL,
    META_NAME,
    PROBES,
    PROBES_SCHEMA,
    SCALARS,
    SCALARS_SCHEMA,
    STEPS,
    STEPS_SCHEMA,
    TMP_PREFIX,
    atomic_write_bytes,
    atomic_write_table,
    chunk_name,
    with_header,
)
from gradlens.store._lock import RunLock
from gradlens.store._records import (
    check_snapshot,
    eval_rows,
    jsonable,
    meta_tasks,
    probe_row,
    versions,
)
from gradlens.store.reader import read_meta

__all__ = ["RunWriter"]

_RESERVED_META = ("format_version", "created", "versions")
_BUFFERS = ("buf_steps", "buf_codes", "buf_values", "buf_weights", "buf_losses", "buf_probes")


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
        #: The total layer's name in this run: ``LEGACY_TOTAL`` when appending to a format 1 run.
        self.total_name = TOTAL_LAYER
        self._clear()

    def _clear(self) -> None:
        self.buf_steps: list[int] = []
        self.buf_codes: list[np.ndarray] = []
        self.buf_values: list[np.ndarray] = []
        self.buf_weights: list[np.ndarray] = []
        self.buf_losses: list[np.ndarray] = []
        self.buf_probes: list[dict[str, Any]] = []

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

    def _step_table(self, steps: np.ndarray, task_dict: pa.Array) -> pa.Table:
        """The buffered Grams, long format (upper triangle of each layer's Gram)."""
        n_layers = [len(c) for c in self.buf_codes]
        codes = np.concatenate(self.buf_codes)
        values = np.concatenate(self.buf_values)  # (rows, P)
        n_pairs = values.shape[1]
        pair = np.tile(np.arange(n_pairs, dtype=np.int32), len(codes))
        layer_dict = pa.array(list(self.layer_codes), pa.string())
        return pa.Table.from_arrays(
            [
                pa.array(np.repeat(np.repeat(steps, n_layers), n_pairs)),
                pa.DictionaryArray.from_arrays(np.repeat(codes, n_pairs), layer_dict),
                pa.DictionaryArray.from_arrays(self.iu.astype(np.int32)[pair], task_dict),
                pa.DictionaryArray.from_arrays(self.ju.astype(np.int32)[pair], task_dict),
                pa.array(values.reshape(-1)),
            ],
            schema=STEPS_SCHEMA,
        )

    def _scalar_table(self, steps: np.ndarray, task_dict: pa.Array) -> pa.Table:
        n_tasks = len(task_dict)
        return pa.Table.from_arrays(
            [
                pa.array(np.repeat(steps, n_tasks)),
                pa.DictionaryArray.from_arrays(
                    np.tile(np.arange(n_tasks, dtype=np.int32), len(steps)), task_dict
                ),
                pa.array(np.concatenate(self.buf_weights)),
                pa.array(np.concatenate(self.buf_losses)),
            ],
            schema=SCALARS_SCHEMA,
        )

    def flush(self) -> None:
        if not self.buf_steps:
            return
        tasks = self.tasks or ()  # set by the first snapshot, before anything is buffered
        steps = np.asarray(self.buf_steps, dtype=np.int64)
        task_dict = pa.array(list(tasks), pa.string())
        step_table = self._step_table(steps, task_dict)
        scalar_table = self._scalar_table(steps, task_dict)
        probe_table = pa.Table.from_pylist(self.buf_probes, schema=PROBES_SCHEMA)
        name = chunk_name(self.chunk_index)
        i, labels = self.chunk_index, {"tasks": list(tasks)}
        try:
            # scalars and probes first: the steps chunk is the commit point read by load_run
            for sub, table, extra in (
                (SCALARS, scalar_table, labels),
                (PROBES, probe_table, {}),
                (STEPS, step_table, {"layers": list(self.layer_codes), **labels}),
            ):
                header = header_for(i, table, **extra)
                atomic_write_table(self.path / sub / name, with_header(table, header))
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
        >>> from gradlens.store import load_run
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
        flush_every = check_int("flush_every", flush_every, minimum=1, error=StoreError)
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
        user_meta = jsonable(dict(meta or {}), "meta")
        reserved = [k for k in _RESERVED_META if k in user_meta]
        if reserved:
            raise StoreError(f"`meta` should not set {reserved}: the store writes them itself.")
        tasks = meta_tasks(user_meta["tasks"]) if "tasks" in user_meta else None

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
                    "versions": versions(),
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
        meta = read_meta(run_dir)
        if meta["format_version"] < 2:  # keep the run's own name for the total
            state.total_name = LEGACY_TOTAL
        (run_dir / PROBES).mkdir(exist_ok=True)  # a format 1 run has none yet
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
        ours = [run_dir / n for n in (META_NAME, STEPS, SCALARS, PROBES, EVALS, COMMITS_NAME)]
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
        for sub in (STEPS, SCALARS, PROBES, EVALS):
            (run_dir / sub).mkdir()

    # ---- public API ---------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The run directory."""
        return self._state.path

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the metadata as written to ``meta.json``."""
        out: dict[str, Any] = json.loads(json.dumps(self._state.meta))
        return out

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
            st.set_tasks(meta_tasks(tasks))
            st.meta["tasks"] = list(tasks)
            st.write_meta()
        step = check_snapshot(snap, st.tasks or tasks, st.last_step)
        names = (st.total_name, *snap.layer_grams)
        mats = (snap.gram, *snap.layer_grams.values())
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
        st.buf_probes.append(probe_row(step, snap))
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
        epoch = check_int("epoch", epoch, none_ok=True, error=StoreError)
        step = check_int("step", step, none_ok=True, error=StoreError)
        rows = eval_rows(values)
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
            schema=EVALS_SCHEMA,
        )
        try:
            table = with_header(table, header_for(st.eval_index, table))
            atomic_write_table(st.path / EVALS / chunk_name(st.eval_index), table)
            write_commits(st.path, st.chunk_index, st.eval_index + 1)
        except OSError as exc:
            raise StoreError(f"Could not write an eval of the run {st.path} ({exc}).") from exc
        st.eval_index += 1

    def update_meta(self, **fields: Any) -> None:
        """Add or replace top-level metadata fields; ``meta.json`` is rewritten atomically.

        Example:
            >>> import tempfile
            >>> from gradlens.store import load_run
            >>> with RunWriter(tempfile.mkdtemp() + "/r") as w:
            ...     w.update_meta(seed=3, config={"lr": 0.1})
            >>> load_run(w.path).meta["config"]
            {'lr': 0.1}
        """
        st = self._check_open("update the metadata")
        new = jsonable(fields, "meta")
        reserved = [k for k in _RESERVED_META if k in new]
        if reserved:
            raise StoreError(f"`update_meta` should not set {reserved}: the store writes them.")
        if "tasks" in new:
            tasks = meta_tasks(new["tasks"])
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
            >>> from gradlens.store import load_run
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
        for name in _BUFFERS:
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
