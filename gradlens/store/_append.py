"""Reopening a run whose writer died, and cutting a run back to a step: the writer's append mode.

:func:`committed_state` reads what a run directory holds (strictly: a damaged or missing chunk is
an error, since appending after it would hide it) and removes what the dead writer left uncommitted
(temporary files, a scalars or probes chunk without its steps chunk). :func:`truncate_after` drops
every stored step and eval after a given step, in an order that keeps the directory readable at
every instant: the commit record is lowered first, then chunks are removed from the last one
backwards (a steps chunk before its scalars chunk), and a chunk holding steps on both sides is
rewritten (steps chunk first; the reader ignores scalars rows whose step its steps chunk does not
hold).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradlens.store._check import Problems, read_commits, read_step_chunks, write_commits
from gradlens.store._io import (
    EVALS_SCHEMA,
    PROBES_SCHEMA,
    SCALARS_SCHEMA,
    STEPS_SCHEMA,
    TMP_PREFIX,
    atomic_write_table,
    chunk_header,
    list_chunks,
    read_chunk,
    with_header,
)

__all__: list[str] = []


def committed_state(run_dir: Path, tasks: tuple[str, ...] | None) -> tuple[int, int | None, int]:
    """``(steps chunks, last committed step, evals chunks)`` of a run, after cleaning leftovers.

    Raises:
        StoreError: If a chunk is unreadable, missing, duplicated or has other tasks.
    """
    for p in run_dir.glob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    problems = Problems(strict=True)
    commits = read_commits(run_dir, problems)
    n_chunks = len(read_step_chunks(run_dir, tasks, problems, commits)[0])
    steps = list_chunks(run_dir / "steps")
    last: int | None = None
    if steps:
        col = read_chunk(steps[max(steps)], STEPS_SCHEMA).column("step")
        last = int(pc.max(col).as_py()) if len(col) else None
    for sub in ("scalars", "probes"):
        for index, path in list_chunks(run_dir / sub).items():
            if index >= n_chunks:  # written by a flush that was cut before its commit point
                path.unlink()
    evals = list_chunks(run_dir / "evals")
    for path in evals.values():
        read_chunk(path, EVALS_SCHEMA)  # raises ChunkError (a StoreError) naming a broken one
    n_evals = max(evals) + 1 if evals else 0
    if len(evals) != n_evals:
        missing = sorted(set(range(n_evals)) - set(evals))
        problems.report(f"The run {run_dir} is missing the evals chunks {missing}.")
    return n_chunks, last, n_evals


def truncate_after(
    run_dir: Path, step: int, n_chunks: int, n_evals: int, eval_step: int | None = None
) -> tuple[int, int | None, int, int]:
    """Drop the stored probed steps after ``step`` and the evals from the first one recorded
    with a step after ``eval_step`` (default ``step``) on.

    Returns:
        ``(steps chunks, last step kept, evals chunks, steps dropped)``.
    """
    steps_dir, scalars_dir, evals_dir = run_dir / "steps", run_dir / "scalars", run_dir / "evals"
    probes_dir = run_dir / "probes"
    eval_step = step if eval_step is None else eval_step
    tables = {i: read_chunk(steps_dir / p.name, STEPS_SCHEMA)
              for i, p in list_chunks(steps_dir).items() if i < n_chunks}  # fmt: skip
    keep_chunks, last, dropped, straddle = n_chunks, None, 0, None
    for i in sorted(tables, reverse=True):
        s = np.unique(tables[i].column("step").to_numpy())
        if len(s) and s[0] > step:
            keep_chunks, dropped = i, dropped + len(s)
            continue
        if len(s) and s[-1] > step:
            straddle, dropped = i, dropped + int((s > step).sum())
            last = int(s[s <= step][-1])
        elif len(s):
            last = int(s[-1])
        break
    keep_evals = n_evals
    for i, path in sorted(list_chunks(evals_dir).items()):
        col = read_chunk(path, EVALS_SCHEMA).column("step")
        if any(v is not None and v > eval_step for v in col.to_pylist()):
            keep_evals = i
            break
    write_commits(run_dir, keep_chunks, keep_evals)
    for i in range(n_chunks - 1, keep_chunks - 1, -1):
        for d in (steps_dir, scalars_dir, probes_dir):  # the steps chunk (the commit point) first
            with contextlib.suppress(FileNotFoundError):
                (d / f"chunk-{i:06d}.parquet").unlink()
    for i in range(n_evals - 1, keep_evals - 1, -1):
        with contextlib.suppress(FileNotFoundError):
            (evals_dir / f"chunk-{i:06d}.parquet").unlink()
    if straddle is not None:
        name = f"chunk-{straddle:06d}.parquet"
        for d, schema in (
            (steps_dir, STEPS_SCHEMA),
            (scalars_dir, SCALARS_SCHEMA),
            (probes_dir, PROBES_SCHEMA),
        ):
            if not (d / name).exists():  # a run of format 1 has no probes
                continue
            table = read_chunk(d / name, schema)
            header = chunk_header(table) or {"chunk": straddle}
            kept = table.filter(pc.less_equal(table.column("step"), pa.scalar(step, pa.int64())))
            header["steps"] = [int(pc.min(kept.column("step")).as_py()), last]
            header["rows"] = kept.num_rows
            atomic_write_table(d / name, with_header(kept, header))
    return keep_chunks, last, keep_evals, dropped
