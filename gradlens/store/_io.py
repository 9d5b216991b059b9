"""Atomic files and checksummed Parquet chunks for the run store.

Every file of a run is written under a temporary name in its final directory, fsynced, then
``os.replace``-d into place and the directory fsynced, so a reader (or a process killed with
SIGKILL at any instant) sees either the whole file or none of it. Parquet chunks carry page CRC
checksums, so a chunk damaged afterwards fails to read instead of being misread.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradlens._errors import StoreError

__all__: list[str] = []

#: Version of the run directory format written by this gradlens; readers refuse newer ones.
#: 1: the total layer is named ``"__all__"``; no ``probes`` chunks. 2: the total layer is
#: ``gradlens.TOTAL_LAYER`` (``"total"``), and each steps chunk has a ``probes`` chunk.
FORMAT_VERSION = 2
#: The name of the total layer in runs of format version 1 (read as ``TOTAL_LAYER``).
LEGACY_TOTAL = "__all__"

META_NAME = "meta.json"
STEPS, SCALARS, PROBES, EVALS = "steps", "scalars", "probes", "evals"

_CHUNK_RE = re.compile(r"^chunk-(\d{6,})\.parquet$")
TMP_PREFIX = ".tmp-"
#: Key of the header every chunk carries in its Parquet schema metadata (JSON: chunk index,
#: tasks, first and last step), checked by the reader against the file name and meta.json.
HEADER_KEY = b"gradlens"

_DICT = pa.dictionary(pa.int32(), pa.string())
STEPS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("layer", _DICT),
        ("task_i", _DICT),
        ("task_j", _DICT),
        ("gram", pa.float64()),
    ]
)
SCALARS_SCHEMA = pa.schema(
    [("step", pa.int64()), ("task", _DICT), ("weight", pa.float64()), ("loss", pa.float64())]
)
#: One row per probed step: what the Snapshot says besides its Grams, weights and losses.
PROBES_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("engine", pa.string()),
        ("level", pa.string()),
        ("weighting", pa.string()),
        ("weighting_path", pa.string()),
        ("rules", pa.map_(pa.string(), pa.string())),
        ("timings", pa.map_(pa.string(), pa.float64())),
        ("unreached", pa.list_(pa.string())),
        ("notes", pa.list_(pa.string())),
        ("layer_weights", pa.map_(pa.string(), pa.list_(pa.float64()))),
    ]
)
EVALS_SCHEMA = pa.schema(
    [
        ("point", pa.string()),
        ("epoch", pa.int64()),
        ("step", pa.int64()),
        ("split", pa.string()),
        ("task", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
    ]
)


def chunk_name(index: int) -> str:
    """File name of chunk ``index`` (``chunk-000012.parquet``)."""
    return f"chunk-{index:06d}.parquet"


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(final: Path) -> Path:
    return final.with_name(f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{final.name}")


def _atomic_write(final: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a temp file beside ``final``, fsync it, rename it over ``final``."""
    tmp = _tmp_path(final)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically (temp file in the same directory, fsync, rename)."""
    _atomic_write(final, lambda fh: fh.write(data))


def atomic_write_table(final: Path, table: pa.Table) -> None:
    """Write ``table`` as a checksummed Parquet file at ``final``, atomically."""
    _atomic_write(
        final,
        lambda fh: pq.write_table(table, fh, write_page_checksum=True, compression="zstd"),
    )


def list_chunks(directory: Path) -> dict[int, Path]:
    """Committed chunks of ``directory`` by index (temporary files are ignored)."""
    if not directory.is_dir():
        return {}
    out: dict[int, Path] = {}
    for entry in directory.iterdir():
        m = _CHUNK_RE.match(entry.name)
        if m:
            out[int(m.group(1))] = entry
    return dict(sorted(out.items()))


class ChunkError(StoreError):
    """A chunk file cannot be read as a chunk of the expected kind (the message names it)."""


def read_chunk(path: Path, schema: pa.Schema) -> pa.Table:
    """Read one chunk and check its columns; raise :class:`ChunkError` naming the file if not."""
    try:
        table = pq.read_table(path, page_checksum_verification=True)
        missing = [f.name for f in schema if f.name not in table.column_names]
        if missing:
            raise ValueError(f"missing columns {missing}")
        header = chunk_header(table)
        table = table.select(schema.names)
        for field in schema:
            found = table.schema.field(field.name).type
            if not found.equals(field.type):
                raise ValueError(f"column {field.name!r} is {found}, expected {field.type}")
        # a damaged page the checksums let through (a dictionary index out of range...) is
        # caught here, not later as a crash in pandas
        table.validate(full=True)
        if header is not None:
            _check_header(table, header)
    except (OSError, ValueError, IndexError, pa.ArrowException) as exc:
        raise ChunkError(f"the unreadable chunk {path} ({type(exc).__name__}: {exc})") from None
    if header is not None:
        table = with_header(table, header)
    return table


def step_range(table: pa.Table) -> list[int] | None:
    """``[first, last]`` step of a table (None without a step column or non-null steps)."""
    if "step" not in table.column_names:
        return None
    mm = pc.min_max(table["step"]).as_py()
    return None if mm["min"] is None else [int(mm["min"]), int(mm["max"])]


def _labels(table: pa.Table, column: str) -> set[str]:
    """The labels a dictionary column's rows use."""
    col = table.column(column).combine_chunks()
    return {str(v) for v in pc.unique(col.dictionary.take(col.indices)).to_pylist()}


def _check_header(table: pa.Table, header: dict[str, object]) -> None:
    """The table agrees with its header: a damaged file footer (no checksum covers it) can
    make Parquet return fewer rows, and a damaged dictionary other labels; both are caught here.

    Raises:
        ValueError: Naming the first disagreement.
    """
    rows = header.get("rows")
    if rows is not None and rows != table.num_rows:
        raise ValueError(f"{table.num_rows} rows read, its header says {rows}")
    steps = header.get("steps")
    if steps is not None and step_range(table) != steps:
        raise ValueError(f"steps {step_range(table)} read, its header says {steps}")
    for key, columns in (("tasks", ("task_i", "task_j", "task")), ("layers", ("layer",))):
        allowed = header.get(key)
        if not isinstance(allowed, list):
            continue
        for column in columns:
            if column in table.column_names:
                extra = _labels(table, column) - {str(a) for a in allowed}
                if extra:
                    raise ValueError(f"labels {sorted(extra)} in {column!r} are not in its header")


def chunk_header(table: pa.Table) -> dict[str, object] | None:
    """The gradlens header of a chunk (None for chunks written before headers existed).

    Raises:
        ValueError: If a header is there but is not a JSON object.
    """
    raw = (table.schema.metadata or {}).get(HEADER_KEY)
    if raw is None:
        return None
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError(f"its header should be a JSON object; found {header!r:.60}")
    return header


def with_header(table: pa.Table, header: dict[str, object]) -> pa.Table:
    """``table`` carrying ``header`` as its gradlens schema metadata."""
    return table.replace_schema_metadata({HEADER_KEY: json.dumps(header).encode("utf-8")})
