"""Reading a run's chunks back with every inconsistency named: the reader side of the store.

The writer gives each chunk a header (its index, row count, first and last step, the task and
layer labels it may use; checked against the table on every read, see ``read_chunk``) and
keeps a commit record (``commits.json``: how many steps and evals chunks are committed). The
reader checks, per chunk: that it is readable, that its header's index is its file name's (a
chunk copied over another is caught), that its steps follow the previous chunk's (no duplicated
steps), that its tasks are the run's (a mismatch is always an error: the Grams would carry the
wrong labels), and, per run, that no chunk below the committed count is missing. Each problem
but the task mismatch is a :class:`GradlensWarning` naming the file (the chunk is skipped), or a
:class:`StoreError` in strict mode.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradlens._errors import GradlensWarning, StoreError
from gradlens.store._io import (
    EVALS_SCHEMA,
    PROBES_SCHEMA,
    SCALARS_SCHEMA,
    STEPS_SCHEMA,
    ChunkError,
    atomic_write_bytes,
    chunk_header,
    list_chunks,
    read_chunk,
    step_range,
)

__all__: list[str] = []

#: The commit record of a run directory.
COMMITS_NAME = "commits.json"


class Problems:
    """Where the reader reports what it skips: warnings, or a StoreError in strict mode."""

    def __init__(self, strict: bool) -> None:
        self.strict = bool(strict)

    def report(self, message: str) -> None:
        if self.strict:
            raise StoreError(message + " (strict mode)")
        warnings.warn(message, GradlensWarning, stacklevel=5)


def write_commits(run_dir: Path, steps: int, evals: int) -> None:
    """Record that ``steps`` steps chunks and ``evals`` evals chunks are committed."""
    data = json.dumps({"format": 1, "steps": steps, "evals": evals}).encode("utf-8")
    atomic_write_bytes(run_dir / COMMITS_NAME, data)


def read_commits(run_dir: Path, problems: Problems) -> dict[str, int]:
    """The commit record (``{}`` if absent: a run written before records existed)."""
    path = run_dir / COMMITS_NAME
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.report(
            f"The commit record {path} is unreadable ({type(exc).__name__}); missing chunks "
            f"are detected only between chunks that are present."
        )
        return {}
    ok = isinstance(rec, dict) and all(
        isinstance(rec.get(k), int) and not isinstance(rec.get(k), bool) and rec[k] >= 0
        for k in ("steps", "evals")
    )
    if not ok:
        problems.report(
            f"The commit record {path} should hold non-negative integer counts `steps` and "
            f"`evals`; found {rec!r:.80}. Missing chunks are detected only between chunks that "
            f"are present."
        )
        return {}
    return {"steps": rec["steps"], "evals": rec["evals"]}


def report_missing(
    directory: Path, present: dict[int, Path], committed: int | None, what: str, problems: Problems
) -> None:
    """Report every chunk index below the committed count (or below the highest present) absent."""
    top = max([*present, -1]) + 1
    n = max(top, committed or 0)
    missing = [i for i in range(n) if i not in present]
    if missing:
        names = ", ".join(str(directory / f"chunk-{i:06d}.parquet") for i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        problems.report(
            f"The run {directory.parent} is missing the committed {what} chunk(s) {names}{more} "
            f"({n} were committed): the {what} they held are not in this run."
        )


def _dictionary(table: pa.Table, column: str) -> list[str]:
    col = table.column(column)
    found: list[str] = []
    for chunk in col.chunks:
        found += [str(x) for x in chunk.dictionary.to_pylist() if str(x) not in found]
    return found


def _check_chunk_tasks(path: Path, table: pa.Table, column: str, tasks: tuple[str, ...]) -> None:
    header = chunk_header(table) or {}
    found = header.get("tasks")
    if not isinstance(found, list):
        found = _dictionary(table, column)
    if sorted(map(str, found)) != sorted(tasks):
        raise StoreError(
            f"The chunk {path} holds the tasks {found}; the run's meta.json says {list(tasks)}. "
            f"The Grams cannot be labelled: fix meta.json's `tasks` (or restore the chunk)."
        )


def _read_probes(
    path: Path | None, index: int, expected: bool, problems: Problems
) -> pa.Table | None:
    """The probes chunk of steps chunk ``index``, or None (reported if ``expected``): a missing
    or damaged probes chunk loses the probes' notes and timings, never the Grams."""
    if path is None:
        if expected:
            problems.report(
                f"The probes chunk {index} of the run is missing: the notes, timings, rules and "
                f"per-layer weights of its steps are not in this run."
            )
        return None
    try:
        table = read_chunk(path, PROBES_SCHEMA)
        header = chunk_header(table) or {}
    except (ChunkError, ValueError) as exc:
        problems.report(f"Skipping {exc}. The Grams of its steps are read without their probes.")
        return None
    if "chunk" in header and header["chunk"] != index:
        problems.report(
            f"Skipping the probes chunk {path}: its header says it is chunk {header['chunk']}."
        )
        return None
    return table


#: The chunks read by :func:`read_step_chunks`: their index and the steps each holds.
Held = list[tuple[int, pa.Array]]


def read_probe_chunks(
    run_dir: Path, held: Held, expected: bool, problems: Problems
) -> list[pa.Table]:
    """The probes chunks of the steps chunks ``held`` (as :func:`read_step_chunks` returned
    them), each cut to the steps its steps chunk holds. A probes chunk missing (where
    ``expected``: format 2 runs) or damaged is reported and its steps have no probes."""
    chunks = list_chunks(run_dir / "probes")
    out: list[pa.Table] = []
    for index, steps in held:
        pr = _read_probes(chunks.get(index), index, expected, problems)
        if pr is not None:
            out.append(pr.filter(pc.is_in(pr.column("step"), value_set=steps)))
    return out


def read_step_chunks(
    run_dir: Path, tasks: tuple[str, ...] | None, problems: Problems, commits: dict[str, int]
) -> tuple[list[pa.Table], list[pa.Table], Held]:
    """The committed (steps, scalars) chunk pairs of ``run_dir`` that pass every check, and the
    index and steps of each (for :func:`read_probe_chunks`)."""
    steps_dir, scalars_dir = run_dir / "steps", run_dir / "scalars"
    step_chunks = list_chunks(steps_dir)
    scalar_chunks = list_chunks(scalars_dir)
    report_missing(steps_dir, step_chunks, commits.get("steps"), "steps", problems)
    steps: list[pa.Table] = []
    scalars: list[pa.Table] = []
    held_steps: Held = []
    last: int | None = None
    for index, path in step_chunks.items():
        if index not in scalar_chunks:
            problems.report(
                f"Skipping the chunk {path}: its scalars chunk {scalars_dir / path.name} is "
                f"missing."
            )
            continue
        try:
            st = read_chunk(path, STEPS_SCHEMA)
            sc = read_chunk(scalar_chunks[index], SCALARS_SCHEMA)
            header = chunk_header(st) or {}
        except (ChunkError, ValueError) as exc:
            problems.report(
                f"Skipping {exc}. The rest of the run is read; the steps of this chunk are missing."
            )
            continue
        if "chunk" in header and header["chunk"] != index:
            problems.report(
                f"Skipping the chunk {path}: its header says it is chunk {header['chunk']} (a "
                f"file copied over another?); its steps would be duplicated."
            )
            continue
        if tasks is not None:
            _check_chunk_tasks(path, st, "task_i", tasks)
            _check_chunk_tasks(scalar_chunks[index], sc, "task", tasks)
        col = st.column("step")
        if len(col) == 0:
            continue
        first, top = int(pc.min(col).as_py()), int(pc.max(col).as_py())
        if last is not None and first <= last:
            problems.report(
                f"Skipping the chunk {path}: its steps {first}..{top} overlap the previous "
                f"chunks' (up to step {last}); it duplicates steps already read."
            )
            continue
        last = top
        # a rewind cut short may leave scalars of steps its steps chunk no longer holds
        held = pa.array(np.unique(col.to_numpy()))
        steps.append(st)
        scalars.append(sc.filter(pc.is_in(sc.column("step"), value_set=held)))
        held_steps.append((index, held))
    return steps, scalars, held_steps


def read_eval_chunks(
    run_dir: Path, problems: Problems, commits: dict[str, int] | None = None
) -> list[pa.Table]:
    """The committed evals chunks of ``run_dir`` that are readable."""
    evals_dir = run_dir / "evals"
    chunks = list_chunks(evals_dir)
    if commits is None:
        commits = read_commits(run_dir, problems)
    report_missing(evals_dir, chunks, commits.get("evals"), "evals", problems)
    out = []
    for path in chunks.values():
        try:
            out.append(read_chunk(path, EVALS_SCHEMA))
        except ChunkError as exc:
            problems.report(
                f"Skipping {exc}. The rest of the run is read; the evals it held are missing."
            )
    return out


def header_for(index: int, table: pa.Table, **fields: Any) -> dict[str, Any]:
    """The header of chunk ``index`` holding ``table``: its index, row count, first and last
    step (if it has steps) and ``fields`` (``tasks``, ``layers``: the labels it may use)."""
    header: dict[str, Any] = {"chunk": index, "rows": table.num_rows}
    steps = step_range(table)
    if steps is not None:
        header["steps"] = steps
    header.update(fields)
    return header
