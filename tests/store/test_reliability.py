"""Reliability of the run store: append after a dead writer, rewind, chunk checks, OS errors."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import gradlens.store._append
import gradlens.store._io
import gradlens.store.writer
from gradlens import GradlensWarning, Snapshot, StoreError
from gradlens.store import RunWriter, load_run

# A writer that adds one snapshot per step forever, flushing every 2 steps, and prints
# "flushed <step>" after each committed chunk; killed with SIGKILL by the tests.
WRITER_CHILD = """
import math, sys
import torch
from gradlens import Snapshot
from gradlens.store import RunWriter

w = RunWriter(sys.argv[1], meta={"tasks": ["a", "b"]}, flush_every=2, flush_seconds=math.inf,
              append=sys.argv[2] == "append")
step = int(sys.argv[3])
print("ready", flush=True)
while True:
    g = torch.tensor([[1.0 + step, 0.5], [0.5, 2.0]], dtype=torch.float64)
    w.add_snapshot(Snapshot(step, ("a", "b"), g, {"fc": g}, torch.ones(2)))
    if len(w._state.buf_steps) == 0:
        print(f"flushed {step}", flush=True)
    step += 1
"""


def _snap(step: int, tasks: tuple[str, ...] = ("a", "b")) -> Snapshot:
    t = len(tasks)
    g = torch.eye(t, dtype=torch.float64) * (1.0 + step)
    return Snapshot(step, tasks, g, {"fc": g}, torch.ones(t), losses={tasks[0]: float(step)})


def _write(path: Path, steps: list[int], flush_every: int = 2, **kw: object) -> None:
    with RunWriter(path, meta={"tasks": ["a", "b"]}, flush_every=flush_every, **kw) as w:  # type: ignore[arg-type]
        for s in steps:
            w.add_snapshot(_snap(s))


def _kill_child(path: Path, mode: str, start: int, chunks: int) -> int:
    """Run WRITER_CHILD until it committed ``chunks`` chunks, SIGKILL it; its last flushed step."""
    script = path.with_name("writer_child.py")
    script.write_text(WRITER_CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(gradlens.store.__file__).parents[2])}
    with subprocess.Popen(
        [sys.executable, str(script), str(path), mode, str(start)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            lines = []
            while len(lines) < chunks + 1:
                line = proc.stdout.readline()
                assert line, proc.stderr.read() if proc.stderr else ""
                lines.append(line.split())
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    return int(lines[-1][1])


# ---- item 2: append mode ------------------------------------------------------------------------


def test_append_after_sigkill_keeps_every_flushed_step(tmp_path):
    """Kill -9 a writer twice, reopen with append=True each time: every flushed step survives."""
    path = tmp_path / "r"
    last = _kill_child(path, "new", 0, 3)
    assert load_run(path).probed_steps.max() >= last
    with pytest.warns(GradlensWarning, match="stale writer lock"):
        w = RunWriter(path, meta={"tasks": ["a", "b"]}, append=True)
    resumed_after = w._state.last_step
    assert resumed_after is not None
    assert resumed_after >= last
    w.close()
    last2 = _kill_child(path, "append", resumed_after + 1, 2)
    with pytest.warns(GradlensWarning, match="stale writer lock"):
        w = RunWriter(path, append=True)
    for s in range(w._state.last_step + 1, w._state.last_step + 4):
        w.add_snapshot(_snap(s))
    w.close()
    run = load_run(path, strict=True)
    n = len(run.probed_steps)
    np.testing.assert_array_equal(run.probed_steps, np.arange(n))  # no gap, no duplicate
    assert n >= last2 + 4
    np.testing.assert_array_equal(run.grams()[:, 0, 0], np.arange(n) + 1.0)
    assert [r["after_step"] for r in run.meta["resumes"]] == [resumed_after, resumed_after, n - 4]


def test_append_to_a_closed_run_continues_it_and_keeps_meta(tmp_path):
    path = tmp_path / "r"
    _write(path, [0, 1, 2], flush_every=2)
    with RunWriter(path, meta={"seed": 4}, append=True) as w:
        with pytest.raises(StoreError, match=r"should increase strictly; found step 2 after"):
            w.add_snapshot(_snap(2))
        w.add_snapshot(_snap(5))
        w.add_eval({"a": {"acc": 1.0}}, split="val", point="final")
    run = load_run(path, strict=True)
    np.testing.assert_array_equal(run.probed_steps, [0, 1, 2, 5])
    assert run.meta["seed"] == 4
    assert run.meta["tasks"] == ["a", "b"]
    assert len(run.evals) == 1


def test_append_without_a_run_starts_one_and_refuses_other_tasks(tmp_path):
    with RunWriter(tmp_path / "new", meta={"tasks": ["a", "b"]}, append=True) as w:
        w.add_snapshot(_snap(0))
    assert load_run(tmp_path / "new").probed_steps.tolist() == [0]
    with pytest.raises(StoreError, match=r"tasks of the run to append to, \['a', 'b'\]; found"):
        RunWriter(tmp_path / "new", meta={"tasks": ["b", "a"]}, append=True)
    with pytest.raises(StoreError, match="`overwrite` and `append`"):
        RunWriter(tmp_path / "x", overwrite=True, append=True)
    assert not (tmp_path / "new" / ".lock").exists()  # a refused call holds nothing


def test_append_refuses_a_damaged_run(tmp_path):
    path = tmp_path / "r"
    _write(path, list(range(6)))
    (path / "steps" / "chunk-000001.parquet").unlink()
    with pytest.raises(StoreError, match=r"missing the committed steps chunk.*chunk-000001"):
        RunWriter(path, append=True)


def test_append_removes_an_uncommitted_scalars_chunk(tmp_path):
    path = tmp_path / "r"
    _write(path, list(range(4)))
    sc = path / "scalars"
    shutil.copy(sc / "chunk-000001.parquet", sc / "chunk-000002.parquet")
    with RunWriter(path, append=True) as w:
        w.add_snapshot(_snap(4))
        w.add_snapshot(_snap(5))
    run = load_run(path, strict=True)
    np.testing.assert_array_equal(run.probed_steps, np.arange(6))
    np.testing.assert_array_equal(run.scalars.step.unique(), np.arange(6))


@pytest.mark.parametrize("to", [0, 1, 2, 3, 4, 5, 7, 10])
def test_rewind_drops_steps_and_evals_after_the_step(tmp_path, to):
    path = tmp_path / "r"
    w = RunWriter(path, meta={"tasks": ["a", "b"]}, flush_every=2)
    for s in range(7):  # chunks [0,1] [2,3] [4,5], step 6 buffered
        w.add_snapshot(_snap(s))
        if s % 2:
            w.add_eval({"a": {"acc": s / 10}}, split="val", point=f"e{s}", step=s)
    dropped = w.rewind(to)
    kept = [s for s in range(7) if s < to]
    assert dropped == 7 - len(kept)
    w.add_snapshot(_snap(to))
    w.close()
    run = load_run(path, strict=True)
    np.testing.assert_array_equal(run.probed_steps, [*kept, to])
    np.testing.assert_array_equal(run.scalars.step.unique(), [*kept, to])
    assert run.evals.step.tolist() == [s for s in (1, 3, 5) if s <= to]


def test_rewind_cut_short_still_reads_consistently(tmp_path, monkeypatch):
    """A kill after the steps chunk is rewritten but before its scalars chunk is: no extra rows."""
    path = tmp_path / "r"
    _write(path, list(range(4)), flush_every=4)
    real = gradlens.store._append.atomic_write_table
    calls = []

    def dies_on_scalars(final: Path, table: object) -> None:
        calls.append(final)
        if final.parent.name == "scalars":
            raise KeyboardInterrupt
        real(final, table)

    monkeypatch.setattr(gradlens.store._append, "atomic_write_table", dies_on_scalars)
    w = RunWriter(path, append=True)
    with pytest.raises(KeyboardInterrupt):
        w.rewind(2)
    w.close()
    run = load_run(path, strict=True)
    np.testing.assert_array_equal(run.probed_steps, [0, 1])
    np.testing.assert_array_equal(run.scalars.step.unique(), [0, 1])


# ---- item 3: task labels ----------------------------------------------------------------------


def _set_meta(path: Path, **fields: object) -> None:
    meta = json.loads((path / "meta.json").read_text())
    meta.update(fields)
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("tasks", [["a", "c"], ["a", "b", "c"], ["a"]])
def test_meta_tasks_that_differ_from_the_chunks_are_an_error(tmp_path, tasks):
    path = tmp_path / "r"
    _write(path, [0, 1, 2])
    _set_meta(path, tasks=tasks)
    says = re.escape(repr(tasks))
    with pytest.raises(StoreError, match=r"holds the tasks \[.a., .b.\]; .* says " + says):
        load_run(path)


def test_meta_tasks_in_another_order_label_by_name(tmp_path):
    path = tmp_path / "r"
    with RunWriter(path, meta={"tasks": ["a", "b"]}) as w:
        g = torch.tensor([[4.0, 1.0], [1.0, 9.0]], dtype=torch.float64)
        w.add_snapshot(Snapshot(0, ("a", "b"), g, {}, torch.ones(2)))
    _set_meta(path, tasks=["b", "a"])
    np.testing.assert_array_equal(load_run(path).gram(0), [[9.0, 1.0], [1.0, 4.0]])


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("tasks", "ab", r"`meta\['tasks'\]` should be a sequence of task names; found str"),
        ("tasks", ["a", "a"], r"`meta\['tasks'\]` should be unique; found duplicates \['a'\]"),
        ("tasks", [1, 2], r"`meta\['tasks'\]` should be non-empty strings"),
        ("format_version", True, "positive integer `format_version`; found True"),
        ("format_version", 0, "found 0"),
        ("format_version", -5, "found -5"),
    ],
)
def test_invalid_meta_fields_are_refused(tmp_path, field, value, match):
    path = tmp_path / "r"
    _write(path, [0])
    _set_meta(path, **{field: value})
    with pytest.raises(StoreError, match=match):
        load_run(path)


# ---- item 4: missing and duplicated chunks ------------------------------------------------------


def test_missing_middle_chunk_warns_naming_it_and_strict_raises(tmp_path):
    path = tmp_path / "r"
    _write(path, list(range(6)))
    (path / "steps" / "chunk-000001.parquet").unlink()
    with pytest.warns(GradlensWarning, match=r"missing the committed steps chunk.*chunk-000001"):
        run = load_run(path)
    np.testing.assert_array_equal(run.probed_steps, [0, 1, 4, 5])
    with pytest.raises(StoreError, match=r"chunk-000001.*strict mode"):
        load_run(path, strict=True)


def test_missing_last_chunk_is_caught_by_the_commit_record(tmp_path):
    path = tmp_path / "r"
    _write(path, list(range(6)))
    (path / "steps" / "chunk-000002.parquet").unlink()
    (path / "scalars" / "chunk-000002.parquet").unlink()
    with pytest.warns(GradlensWarning, match=r"chunk-000002.parquet \(3 were committed\)"):
        run = load_run(path)
    np.testing.assert_array_equal(run.probed_steps, [0, 1, 2, 3])


def test_chunk_copied_over_another_is_skipped_not_duplicated(tmp_path):
    path = tmp_path / "r"
    _write(path, list(range(6)))
    for d in ("steps", "scalars"):
        shutil.copy(path / d / "chunk-000000.parquet", path / d / "chunk-000002.parquet")
    with pytest.warns(GradlensWarning, match=r"chunk-000002.*header says it is chunk 0"):
        run = load_run(path)
    np.testing.assert_array_equal(run.probed_steps, [0, 1, 2, 3])
    with pytest.raises(StoreError, match="header says it is chunk 0"):
        load_run(path, strict=True)


def test_overlapping_steps_between_chunks_are_skipped(tmp_path):
    path = tmp_path / "r"
    _write(path, list(range(4)))
    # a chunk without a header (as older writers wrote) that repeats the first chunk's steps
    for d, schema in (("steps", gradlens.store._io.STEPS_SCHEMA),
                      ("scalars", gradlens.store._io.SCALARS_SCHEMA)):  # fmt: skip
        t = gradlens.store._io.read_chunk(path / d / "chunk-000000.parquet", schema)
        gradlens.store._io.atomic_write_table(
            path / d / "chunk-000002.parquet", t.replace_schema_metadata(None)
        )
    with pytest.warns(GradlensWarning, match=r"chunk-000002.*overlap the previous"):
        run = load_run(path)
    np.testing.assert_array_equal(run.probed_steps, [0, 1, 2, 3])


def test_unreadable_evals_chunk_says_evals_are_missing(tmp_path):
    path = tmp_path / "r"
    with RunWriter(path, meta={"tasks": ["a"]}) as w:
        w.add_eval({"a": {"acc": 1.0}}, split="val", point="final")
    (path / "evals" / "chunk-000000.parquet").write_bytes(b"junk")
    with pytest.warns(GradlensWarning, match="the evals it held are missing") as rec:
        load_run(path)
    assert all("steps" not in str(r.message) for r in rec)


def test_a_clean_run_reads_without_any_warning(tmp_path):
    path = tmp_path / "r"
    _write(path, list(range(5)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_run(path, strict=True)


# ---- item 8: OS errors are StoreErrors ---------------------------------------------------------


def test_os_errors_are_store_errors(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="Cannot open the run directory"):
        RunWriter(tmp_path / "file" / "run")  # a path under a file
    (tmp_path / "lockdir" / ".lock").mkdir(parents=True)
    with pytest.raises(StoreError, match=r"Cannot open the run directory .*lockdir"):
        RunWriter(tmp_path / "lockdir")
    (tmp_path / "metadir" / "meta.json").mkdir(parents=True)
    with pytest.raises(StoreError, match="Cannot read the run metadata"):
        load_run(tmp_path / "metadir")

    w = RunWriter(tmp_path / "full", meta={"tasks": ["a", "b"]})

    def disk_full(final: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gradlens.store.writer, "atomic_write_bytes", disk_full)
    with pytest.raises(StoreError, match=r"Could not write the metadata .*No space left"):
        w.update_meta(seed=1)
    assert "seed" not in w.meta  # a failed call changes nothing
    monkeypatch.undo()
    w.close()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_directory_is_a_store_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="Cannot open the run directory"):
            RunWriter(ro / "run")
    finally:
        ro.chmod(0o700)


def test_a_chunk_with_an_out_of_range_dictionary_index_is_skipped(tmp_path):
    """Found by the exhaustive bit-flip fuzz: a flip the page checksums let through left a
    dictionary index out of range, which crashed in pandas instead of being reported."""
    import pyarrow as pa

    path = tmp_path / "r"
    _write(path, list(range(4)))
    name = path / "steps" / "chunk-000001.parquet"
    t = gradlens.store._io.read_chunk(name, gradlens.store._io.STEPS_SCHEMA)
    col = t.column("task_i").combine_chunks()
    bad_codes = pa.array([5] * len(col), pa.int32())  # only 2 tasks in the dictionary
    broken = pa.DictionaryArray.from_arrays(bad_codes, col.dictionary, safe=False)
    t = t.set_column(t.schema.get_field_index("task_i"), "task_i", broken)
    gradlens.store._io.atomic_write_table(name, t)
    with pytest.warns(GradlensWarning, match=r"Skipping the unreadable chunk .*chunk-000001"):
        run = load_run(path)
    np.testing.assert_array_equal(run.probed_steps, [0, 1])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("rows", "8 rows read, its header says 12"),
        ("label", r"labels \['c'\] in 'task_j' are not in its header"),
        ("layer", r"labels \['gc'\] in 'layer' are not in its header"),
    ],
)
def test_a_chunk_that_disagrees_with_its_header_is_skipped(tmp_path, change, match):
    """Found by the exhaustive bit-flip fuzz: a flip in the Parquet footer (no checksum covers
    it) made the reader return 8 of a chunk's 12 rows silently."""
    import pyarrow as pa

    path = tmp_path / "r"
    _write(path, list(range(4)))
    name = path / "steps" / "chunk-000001.parquet"
    t = gradlens.store._io.read_chunk(name, gradlens.store._io.STEPS_SCHEMA)
    header = gradlens.store._io.chunk_header(t)
    if change == "rows":
        t = t.slice(0, 8)
    else:
        column = "task_j" if change == "label" else "layer"
        col = t.column(column).combine_chunks()
        renamed = [("c" if v == "b" else v) if change == "label" else ("gc" if v == "fc" else v)
                   for v in col.dictionary.to_pylist()]  # fmt: skip
        arr = pa.DictionaryArray.from_arrays(col.indices, pa.array(renamed))
        t = t.set_column(t.schema.get_field_index(column), column, arr)
    gradlens.store._io.atomic_write_table(name, gradlens.store._io.with_header(t, header))
    with pytest.warns(GradlensWarning, match=r"Skipping the unreadable chunk .*chunk-000001"):
        run = load_run(path)
    np.testing.assert_array_equal(run.probed_steps, [0, 1])
    with pytest.raises(StoreError, match=match):
        load_run(path, strict=True)
