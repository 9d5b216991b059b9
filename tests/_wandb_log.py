"""Read back what wandb wrote to an offline run's ``.wandb`` file (tests only).

wandb >= 0.19 has no Python reader of its transaction log any more (the Go core writes it), so
this reads the documented LevelDB-style log format itself: a 7-byte header ``:W&B`` + magic +
version, then 32 KiB blocks of records ``crc32 (4) | length (2) | type (1) | data``, each CRC
checked, and parses every record with wandb's own protobuf ``Record``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class _TornRecordError(AssertionError):
    """A record not (yet) read whole: cut short by the end of the file, or its CRC wrong."""


def records(path: Path, timeout: float = 60.0) -> list[Any]:
    """Every record of a finished run's ``run-*.wandb`` file, as ``wandb_internal_pb2.Record``.

    ``run.finish()`` can return before wandb's core process has written the file out: wait (up
    to ``timeout`` seconds) for its last record, ``exit``, reading again while the file ends in
    a record written in part (CI once read one whose CRC did not match yet); at the deadline a
    torn record fails the test.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            out = _read(path)
        except _TornRecordError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        if (out and out[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return out
        time.sleep(0.1)


def _read(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    out, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if crc == n == kind == 0:  # block padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + n]
        if len(chunk) < n or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            got = len(chunk)
            raise _TornRecordError(f"{path}: bad CRC at {pos} (record of {n} bytes, {got} read)")
        pos += 7 + n
        buf = chunk if kind in (_FULL, _FIRST) else buf + chunk
        if kind in (_FULL, _LAST):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def history(path: Path) -> list[dict[str, Any]]:
    """The logged rows (one per ``run.log`` call), values decoded from JSON."""
    return [
        {_key(i): json.loads(i.value_json) for i in r.history.item}
        for r in records(path)
        if r.WhichOneof("record_type") == "history"
    ]


def config(path: Path) -> dict[str, Any]:
    """The run's config: the run record's, updated by every config record."""
    out: dict[str, Any] = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        items = {"run": r.run.config.update, "config": r.config.update}.get(kind, [])
        for i in items:
            out[_key(i)] = json.loads(i.value_json)
    return out


def metric_definitions(path: Path) -> list[tuple[str, str, str]]:
    """``(name, glob_name, step_metric)`` of every ``define_metric``."""
    return [
        (r.metric.name, r.metric.glob_name, r.metric.step_metric)
        for r in records(path)
        if r.WhichOneof("record_type") == "metric"
    ]


def run_file(root: Path) -> Path:
    """The single ``run-*.wandb`` file under ``root``."""
    found = sorted(root.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(found) == 1, found
    return found[0]
