"""The reader side of the run store: :func:`load_run` (one run, as a :class:`Run`),
:func:`load_runs` (many runs tabulated), and the pieces other packages build on:
:func:`read_meta`, :func:`read_evals`, :func:`flatten_meta`.

Runs of store format 1 (total layer ``"__all__"``, no probes chunks) read as format 2 runs: the
total is renamed ``gradlens.TOTAL_LAYER`` on reading.

Example:
    >>> import tempfile, torch
    >>> from gradlens import Snapshot
    >>> from gradlens.store import RunWriter
    >>> with RunWriter(tempfile.mkdtemp() + "/run") as w:
    ...     w.add_snapshot(Snapshot(0, ("a",), torch.ones(1, 1), {}, torch.ones(1)))
    >>> load_run(w.path).layers
    ('total',)
"""

from __future__ import annotations

import glob as _glob
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from gradlens._errors import GradlensError, GradlensWarning, StoreError
from gradlens._types import RENAMED_TOTAL, TOTAL_LAYER
from gradlens._validate import check_tasks
from gradlens.snapshot import Snapshot
from gradlens.store._check import (
    Problems,
    read_commits,
    read_eval_chunks,
    read_probe_chunks,
    read_step_chunks,
)
from gradlens.store._io import (
    EVALS_SCHEMA,
    FORMAT_VERSION,
    LEGACY_TOTAL,
    META_NAME,
    PROBES_SCHEMA,
    SCALARS_SCHEMA,
    STEPS_SCHEMA,
)

__all__ = [
    "RENAMED_TOTAL",
    "Run",
    "flatten_meta",
    "load_run",
    "load_runs",
    "read_evals",
    "read_meta",
]


def read_meta(run_dir: Path) -> dict[str, Any]:
    """The checked contents of a run's ``meta.json``.

    Raises:
        StoreError: If it is missing, unreadable, not a JSON object, written by a newer format
            version, or names invalid tasks.
    """
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
            check_tasks(meta["tasks"], "meta['tasks']", StoreError)
        except StoreError as exc:
            raise StoreError(f"The run metadata {path} is invalid: {exc}") from None
    return meta


def read_evals(
    run_dir: Path, problems: Problems | None = None, commits: dict[str, int] | None = None
) -> pd.DataFrame:
    """The run's evals ``[point, epoch, step, split, task, metric, value]`` (problems warned
    about, or raised in strict mode, as :func:`load_run` does)."""
    tables = read_eval_chunks(run_dir, problems or Problems(False), commits)
    table = pa.concat_tables(tables) if tables else EVALS_SCHEMA.empty_table()
    df = table.to_pandas()
    for col in ("epoch", "step"):
        df[col] = df[col].astype("Int64")
    return df.reset_index(drop=True)


def _read_steps(
    run_dir: Path, meta: dict[str, Any], problems: Problems, commits: dict[str, int]
) -> tuple[pd.DataFrame, pd.DataFrame, Callable[[], pd.DataFrame]]:
    """Steps and scalars, and a function reading the probes (on first use of ``Run.probes``)."""
    tasks = tuple(meta["tasks"]) if "tasks" in meta else None
    version = meta["format_version"]
    steps, scalars, held = read_step_chunks(run_dir, tasks, problems, commits)
    # A scalars chunk without its steps chunk is a flush cut short: not committed, not read.
    st_df = _by_step(_concat(steps, STEPS_SCHEMA).to_pandas())
    sc_df = _by_step(_concat(scalars, SCALARS_SCHEMA).to_pandas())
    if version < 2:
        st_df["layer"] = st_df["layer"].cat.rename_categories(_legacy_layer_names(st_df, run_dir))

    def probes() -> pd.DataFrame:
        tables = read_probe_chunks(run_dir, held, version >= 2, problems)
        return _by_step(_concat(tables, PROBES_SCHEMA).to_pandas())

    return st_df, sc_df, probes



def _legacy_layer_names(steps: pd.DataFrame, run_dir: Path) -> dict[str, str]:
    """Format 1 named the total ``"__all__"``: read it as :data:`TOTAL_LAYER`. A layer the user
    named ``"total"`` in such a run is read as :data:`RENAMED_TOTAL`, with a warning, never merged
    with the total."""
    found = {str(c) for c in steps["layer"].cat.categories}
    rename = {LEGACY_TOTAL: TOTAL_LAYER} if LEGACY_TOTAL in found else {}
    if TOTAL_LAYER in found:
        warnings.warn(
            f"The run {run_dir} (store format 1) has a layer named {TOTAL_LAYER!r}, which is now "
            f"the total's name; that layer is read as {RENAMED_TOTAL!r}.",
            GradlensWarning,
            stacklevel=4,
        )
        rename[TOTAL_LAYER] = RENAMED_TOTAL
    return rename


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    if not tables:
        return schema.empty_table()
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])


def _by_step(df: pd.DataFrame) -> pd.DataFrame:
    if not df["step"].is_monotonic_increasing:  # pragma: no cover - the writer keeps order
        df = df.sort_values("step", kind="stable")
    return df.reset_index(drop=True)


def _rows_of(df: pd.DataFrame, step: int) -> pd.DataFrame:
    """The rows of a table sorted by ``step`` at one step (a binary search, not a scan)."""
    lo, hi = np.searchsorted(df["step"].to_numpy(), [step, step + 1])
    return df.iloc[lo:hi]


def _probe_fields(row: pd.DataFrame, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Snapshot fields from a step's row of :attr:`Run.probes` (none: format 1 defaults)."""
    if row.empty:
        out: dict[str, Any] = {}
        for key in ("engine", "level"):
            if isinstance(meta.get(key), str):
                out[key] = meta[key]
        return out
    r = row.iloc[0]

    def text(value: Any) -> str | None:
        return None if value is None or pd.isna(value) else str(value)

    return {
        "engine": str(r["engine"]),
        "level": str(r["level"]),
        "weighting": text(r["weighting"]),
        "weighting_path": text(r["weighting_path"]),
        "rules": {str(k): str(v) for k, v in r["rules"]},
        "timings": {str(k): float(v) for k, v in r["timings"]},
        "unreached": tuple(str(x) for x in r["unreached"]),
        "notes": tuple(str(x) for x in r["notes"]),
        "layer_weights": {
            str(k): torch.tensor(list(v), dtype=torch.float64) for k, v in r["layer_weights"]
        },
    }


class Run:
    """One stored run, as read by :func:`load_run`.

    Attributes:
        path: The run directory.
        meta: The contents of ``meta.json``.
        steps: Long format ``[step, layer, task_i, task_j, gram]`` (upper triangle, ``i <= j`` in
            task order; ``layer == gradlens.TOTAL_LAYER``, ``"total"``, is the total), sorted by
            step; ``layer``, ``task_i`` and ``task_j`` are categoricals (tasks in task order).
        scalars: ``[step, task, weight, loss]`` per probed step and task (loss NaN if not given).
        evals: ``[point, epoch, step, split, task, metric, value]``, ``epoch``/``step`` nullable.
        probes: one row per probed step: ``[step, engine, level, weighting, weighting_path,
            rules, timings, unreached, notes, layer_weights]`` (the Snapshot's other fields;
            empty for runs of store format 1, which did not keep them); read on first access.

    :meth:`snapshot` rebuilds the :class:`~gradlens.Snapshot` of one probed step.
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
        probes: pd.DataFrame | Callable[[], pd.DataFrame] | None = None,
    ) -> None:
        self.path = path
        self.meta = meta
        self.steps = steps
        self.scalars = scalars
        self.evals = evals
        self._probes = probes

    @cached_property
    def probes(self) -> pd.DataFrame:
        """One row per probed step, the Snapshot's other fields (read on first access: a
        missing or damaged probes chunk is reported then, as :func:`load_run` reports)."""
        probes = self._probes
        if callable(probes):
            probes = probes()
        return PROBES_SCHEMA.empty_table().to_pandas() if probes is None else probes

    @cached_property
    def tasks(self) -> tuple[str, ...]:
        """The run's tasks, in order."""
        if "tasks" in self.meta:
            return tuple(self.meta["tasks"])
        return tuple(str(t) for t in self.steps["task_i"].cat.categories)

    @cached_property
    def layers(self) -> tuple[str, ...]:
        """Layers with stored Grams, the total (``gradlens.TOTAL_LAYER``) first."""
        found = [str(x) for x in self.steps["layer"].cat.categories]
        if not found:
            found = [TOTAL_LAYER, *self.meta.get("layers", [])]
        return (TOTAL_LAYER, *[x for x in found if x != TOTAL_LAYER])

    @cached_property
    def probed_steps(self) -> np.ndarray:
        """The probed steps, sorted: the first axis of :meth:`grams`."""
        out: np.ndarray = np.unique(self.steps["step"].to_numpy())
        return out

    def _codes(self, col: str, names: tuple[str, ...]) -> np.ndarray:
        """Map a categorical column to indices into ``names`` (-1 if absent)."""
        cat = self.steps[col].cat
        lookup = {n: i for i, n in enumerate(names)}
        remap = np.array([lookup.get(str(c), -1) for c in cat.categories] + [-1], dtype=np.int64)
        out: np.ndarray = remap[cat.codes.to_numpy()]
        return out

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
        upper, lower = (*lead, i, j), (*lead, j, i)
        out[upper] = g
        out[lower] = g
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
        mask: np.ndarray = (self.steps["layer"] == layer).to_numpy()
        return mask

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

    def snapshot(self, step: int) -> Snapshot:
        """The :class:`~gradlens.Snapshot` of probed step ``step``, as the profiler made it.

        Its Grams, weights and losses come from :attr:`steps` and :attr:`scalars` (a loss that
        was not given is left out), the rest from :attr:`probes`; for a run of store format 1
        those are the Snapshot's defaults (``engine`` and ``level`` from ``meta`` if there).

        Example:
            >>> import tempfile, torch
            >>> from gradlens import Snapshot
            >>> from gradlens.store import RunWriter
            >>> with RunWriter(tempfile.mkdtemp() + "/r") as w:
            ...     w.add_snapshot(Snapshot(4, ("a", "b"), torch.eye(2), {"fc": torch.eye(2)},
            ...                             torch.ones(2), timings={"loop": 0.25}))
            >>> snap = load_run(w.path).snapshot(4)
            >>> snap.layer_grams["fc"].tolist(), snap.timings
            ([[1.0, 0.0], [0.0, 1.0]], {'loop': 0.25})
        """
        grams, present = self._step_grams(step)
        layer_grams = {self.layers[k]: torch.from_numpy(grams[k]) for k in present if k > 0}
        sc = _rows_of(self.scalars, step)
        lookup = {t: i for i, t in enumerate(self.tasks)}
        weights = np.full(len(self.tasks), np.nan)
        losses: dict[str, float] = {}
        for task, weight, loss in zip(sc["task"], sc["weight"], sc["loss"]):
            if str(task) in lookup:
                weights[lookup[str(task)]] = weight
                if not math.isnan(loss):
                    losses[str(task)] = float(loss)
        fields = _probe_fields(_rows_of(self.probes, step), self.meta)
        return Snapshot(
            step,
            self.tasks,
            torch.from_numpy(grams[0]),
            layer_grams,
            torch.from_numpy(weights),
            losses=losses,
            **fields,
        )

    @cached_property
    def _row_codes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Layer, task_i and task_j of every row of :attr:`steps` as indices (-1: unknown)."""
        return (
            self._codes("layer", self.layers),
            self._codes("task_i", self.tasks),
            self._codes("task_j", self.tasks),
        )

    def _step_grams(self, step: int) -> tuple[np.ndarray, list[int]]:
        """Every layer's Gram at probed step ``step``, ``(L, T, T)`` (NaN for a layer not stored
        there), from its rows only, and the indices of the layers stored there."""
        steps = self.steps["step"].to_numpy()
        lo, hi = np.searchsorted(steps, [step, step + 1])
        if lo == hi:
            self.gram(step)  # raises the error naming the probed steps
        layer, i, j = (c[lo:hi] for c in self._row_codes)
        g = self.steps["gram"].to_numpy()[lo:hi]
        ok = (layer >= 0) & (i >= 0) & (j >= 0)
        layer, i, j, g = layer[ok], i[ok], j[ok], g[ok]
        n = len(self.tasks)
        out = np.full((len(self.layers), n, n), np.nan)
        out[layer, i, j] = g
        out[layer, j, i] = g
        return out, sorted(set(layer.tolist()))

    def snapshots(self) -> Iterator[Snapshot]:
        """The :class:`~gradlens.Snapshot` of every probed step, in step order."""
        for step in self.probed_steps.tolist():
            yield self.snapshot(int(step))

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
        >>> from gradlens.store import RunWriter
        >>> with RunWriter(tempfile.mkdtemp() + "/r", meta={"tasks": ["a", "b"]}) as w:
        ...     pass
        >>> run = load_run(w.path)
        >>> run.tasks, len(run.steps), list(run.steps.columns)
        (('a', 'b'), 0, ['step', 'layer', 'task_i', 'task_j', 'gram'])
    """
    run_dir = Path(path)
    problems = Problems(strict)
    try:
        meta = read_meta(run_dir)
        commits = read_commits(run_dir, problems)
        steps, scalars, probes = _read_steps(run_dir, meta, problems, commits)
        evals = read_evals(run_dir, problems, commits)
    except OSError as exc:
        raise StoreError(f"Cannot read the run {run_dir}: {exc}.") from None
    return Run(run_dir, meta, steps, scalars, evals, probes)


def flatten_meta(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping flattened with dots; lists (and empty mappings) as JSON strings.

    >>> flatten_meta({"model": {"width": 8}, "tasks": ["a", "b"], "seed": 0})
    {'model.width': 8, 'tasks': '["a", "b"]', 'seed': 0}
    """
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_meta(value, name + "."))
        elif isinstance(value, (list, tuple, Mapping)):
            out[name] = json.dumps(value, default=str)
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
        >>> from gradlens.store import RunWriter
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
        meta = read_meta(run_dir)
        row: dict[str, Any] = {"run_id": rel.relative_to(base).as_posix(), "path": str(run_dir)}
        row.update(flatten_meta(meta))
        evals = read_evals(run_dir)
        final = evals[evals["point"] == "final"]
        for split, task, metric, value in zip(
            final["split"], final["task"], final["metric"], final["value"]
        ):
            row[f"final.{split}.{task}.{metric}"] = value
        rows.append(row)
    return pd.DataFrame(rows).sort_values("run_id", kind="stable").reset_index(drop=True)
