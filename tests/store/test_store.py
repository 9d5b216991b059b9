"""Tests of the run store: round trips, chunking, crash safety, the writer lock, load_runs."""

from __future__ import annotations

import doctest
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradlens.store._lock
import gradlens.store.writer
from gradlens import TOTAL_LAYER, GradlensError, GradlensWarning, Snapshot, StoreError
from gradlens.metrics import metrics_frame
from gradlens.store import FORMAT_VERSION, RunWriter, load_run, load_runs

# The child process of the SIGKILL tests: trains a small two-task model forever under
# gradlens.Profiler(..., engine="loop", every=1, store=RunWriter(RUN_DIR, flush_every=...))
# and prints "flushed <step>" each time a chunk ending at <step> is committed (the writer
# flushes synchronously inside prof.backward at every FLUSH_EVERY-th probed step).
CHILD_SOURCE = """
from __future__ import annotations

import math
import sys

import torch

import gradlens as gl
from gradlens.store import RunWriter


def main() -> None:
    path, flush_every = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh()
    )
    heads = torch.nn.ModuleDict({"a": torch.nn.Linear(32, 1), "b": torch.nn.Linear(32, 1)})
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = torch.optim.SGD(params, lr=1e-2)
    writer = RunWriter(path, flush_every=flush_every, flush_seconds=math.inf)
    prof = gl.Profiler(trunk, tasks=["a", "b"], engine="loop", every=1, store=writer)
    print("ready", flush=True)
    step = 0
    while True:
        x = torch.randn(64, 8)
        z = trunk(x)
        losses = {
            "a": (heads["a"](z).squeeze(1) - x[:, 0]).pow(2).mean(),
            "b": (heads["b"](z).squeeze(1) - x[:, 1] * x[:, 2]).pow(2).mean(),
        }
        opt.zero_grad()
        prof.backward(losses, weights={"a": 0.25, "b": 0.75})
        opt.step()
        if (step + 1) % flush_every == 0:
            print(f"flushed {step}", flush=True)
        step += 1


if __name__ == "__main__":
    main()
"""


def _psd(rng: np.random.Generator, t: int) -> np.ndarray:
    a = rng.standard_normal((t, 5))
    return a @ a.T


def _snapshots(
    n: int,
    tasks: tuple[str, ...] = ("a", "b", "c"),
    layers: tuple[str, ...] = ("l1", "l2"),
    seed: int = 0,
    start: int = 0,
    stride: int = 1,
) -> list[Snapshot]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        lg = {name: torch.from_numpy(_psd(rng, len(tasks))) for name in layers}
        total = sum(lg.values()) if lg else torch.from_numpy(_psd(rng, len(tasks)))
        w = torch.from_numpy(rng.uniform(0.1, 1.0, len(tasks)))
        losses = {t: float(rng.uniform()) for t in tasks}
        out.append(Snapshot(start + k * stride, tasks, total, lg, w, losses=losses))
    return out


def _write(path: Path, snaps: list[Snapshot], **kw: object) -> None:
    with RunWriter(path, meta={"tasks": list(snaps[0].tasks)}, **kw) as w:  # type: ignore[arg-type]
        for s in snaps:
            w.add_snapshot(s)


# ---- round trip -------------------------------------------------------------------------------


def test_round_trip_grams_scalars_and_layout(tmp_path):
    snaps = _snapshots(10, stride=3)
    _write(tmp_path / "r", snaps, flush_every=4)
    assert sorted(p.name for p in (tmp_path / "r" / "steps").iterdir()) == [
        "chunk-000000.parquet",
        "chunk-000001.parquet",
        "chunk-000002.parquet",
    ]
    run = load_run(tmp_path / "r")
    assert run.tasks == ("a", "b", "c")
    assert run.layers == (TOTAL_LAYER, "l1", "l2")
    np.testing.assert_array_equal(run.probed_steps, np.arange(10) * 3)
    assert list(run.steps.columns) == ["step", "layer", "task_i", "task_j", "gram"]
    assert run.steps["step"].dtype == np.int64
    assert run.steps["gram"].dtype == np.float64
    # upper triangle incl. the diagonal, in task order: 6 pairs x 3 layers x 10 steps
    assert len(run.steps) == 10 * 3 * 6
    first = run.steps[(run.steps.step == 0) & (run.steps.layer == "l1")]
    assert list(zip(first.task_i, first.task_j)) == [
        ("a", "a"),
        ("a", "b"),
        ("a", "c"),
        ("b", "b"),
        ("b", "c"),
        ("c", "c"),
    ]
    for layer in run.layers:
        expected = np.stack(
            [
                s.gram.numpy() if layer == TOTAL_LAYER else s.layer_grams[layer].numpy()
                for s in snaps
            ]
        )
        np.testing.assert_array_equal(run.grams(layer), expected)
    np.testing.assert_array_equal(run.gram(27, "l2"), snaps[9].layer_grams["l2"].numpy())
    np.testing.assert_array_equal(run.all_grams()[:, 0], run.grams())
    np.testing.assert_array_equal(run.weights(), np.stack([s.weights.numpy() for s in snaps]))
    assert list(run.scalars.columns) == ["step", "task", "weight", "loss"]
    np.testing.assert_array_equal(
        run.scalars.loss.to_numpy(), [s.losses[t] for s in snaps for t in s.tasks]
    )


def test_metrics_are_metrics_frame_of_the_stored_grams(tmp_path):
    snaps = _snapshots(5)
    _write(tmp_path / "r", snaps, flush_every=2)
    run = load_run(tmp_path / "r")
    grams = np.stack(
        [np.stack([s.gram.numpy(), *(g.numpy() for g in s.layer_grams.values())]) for s in snaps]
    )
    weights = np.stack([s.weights.numpy() for s in snaps])
    expected = metrics_frame(
        grams, run.tasks, weights=weights, steps=np.arange(5), layers=run.layers
    )
    pd.testing.assert_frame_equal(run.metrics, expected)
    assert run.metrics is run.metrics  # cached
    cos = run.metrics.query("metric == 'cosine' and step == 3 and layer == 'l1'")
    g = snaps[3].layer_grams["l1"].numpy()
    assert cos.value.iloc[0] == pytest.approx(g[0, 1] / np.sqrt(g[0, 0] * g[1, 1]), rel=1e-12)


@settings(max_examples=25)
@given(
    t=st.integers(1, 5),
    n_layers=st.integers(0, 3),
    n=st.integers(0, 12),
    flush_every=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(tmp_path_factory, t, n_layers, n, flush_every, seed):
    """Whatever the shapes and chunking, the Grams read back are exactly the Grams written."""
    tasks = tuple(f"t{k}" for k in range(t))
    layers = tuple(f"layer.{k}" for k in range(n_layers))
    snaps = _snapshots(n, tasks, layers, seed=seed)
    path = tmp_path_factory.mktemp("prop") / "r"
    with RunWriter(path, meta={"tasks": list(tasks)}, flush_every=flush_every) as w:
        for s in snaps:
            w.add_snapshot(s)
    run = load_run(path)
    assert len(list((path / "steps").iterdir())) == -(-n // flush_every)
    assert len(run.steps) == n * (n_layers + 1) * t * (t + 1) // 2
    expected = np.stack([s.gram.numpy() for s in snaps]) if n else np.empty((0, t, t))
    np.testing.assert_array_equal(run.grams(), expected)
    if n:
        np.testing.assert_array_equal(run.gram(n - 1), snaps[-1].gram.numpy())


def test_layers_may_differ_between_snapshots(tmp_path):
    a = _snapshots(2, layers=("x",))
    b = _snapshots(1, layers=("y",), start=2, seed=1)
    _write(tmp_path / "r", a + b, flush_every=2)
    run = load_run(tmp_path / "r")
    assert run.layers == (TOTAL_LAYER, "x", "y")
    gx = run.grams("x")
    np.testing.assert_array_equal(gx[:2], np.stack([s.layer_grams["x"].numpy() for s in a]))
    assert np.isnan(gx[2]).all()
    with pytest.raises(GradlensError, match=r"`layer` should be one of .*found 'z'"):
        run.grams("z")
    with pytest.raises(GradlensError, match=r"`step` should be a probed step .*found 7"):
        run.gram(7)


# ---- chunking and laziness -------------------------------------------------------------------


def test_no_io_between_chunk_boundaries(tmp_path):
    snaps = _snapshots(7)
    w = RunWriter(tmp_path / "r", flush_every=3)
    steps_dir = tmp_path / "r" / "steps"
    seen = []
    for s in snaps:
        w.add_snapshot(s)
        seen.append(len(list(steps_dir.iterdir())))
    assert seen == [0, 0, 1, 1, 1, 2, 2]
    w.flush()
    assert len(list(steps_dir.iterdir())) == 3
    w.flush()  # nothing buffered: no empty chunk
    assert len(list(steps_dir.iterdir())) == 3
    w.close()
    assert len(load_run(tmp_path / "r").probed_steps) == 7


def test_flush_seconds(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(gradlens.store.writer.time, "monotonic", lambda: clock[0])
    w = RunWriter(tmp_path / "r", flush_every=1000, flush_seconds=5.0)
    snaps = _snapshots(3)
    w.add_snapshot(snaps[0])
    clock[0] += 4.9
    w.add_snapshot(snaps[1])
    assert not list((tmp_path / "r" / "steps").iterdir())
    clock[0] += 0.2
    w.add_snapshot(snaps[2])
    assert len(list((tmp_path / "r" / "steps").iterdir())) == 1
    w.close()


def test_reading_a_live_run_returns_its_flushed_chunks(tmp_path):
    w = RunWriter(tmp_path / "r", flush_every=2)
    for s in _snapshots(5):
        w.add_snapshot(s)
    w.add_eval({"a": {"acc": 0.5}}, split="val", point="epoch", epoch=0)
    run = load_run(tmp_path / "r")
    np.testing.assert_array_equal(run.probed_steps, [0, 1, 2, 3])
    assert run.evals.value.tolist() == [0.5]
    w.close()
    np.testing.assert_array_equal(load_run(tmp_path / "r").probed_steps, np.arange(5))


def test_forgotten_writer_is_flushed_and_unlocked_when_collected(tmp_path):
    w = RunWriter(tmp_path / "r", flush_every=100)
    for s in _snapshots(3):
        w.add_snapshot(s)
    del w
    gc.collect()
    assert not (tmp_path / "r" / ".lock").exists()
    assert len(load_run(tmp_path / "r").probed_steps) == 3


def test_context_manager_flushes_on_error(tmp_path):
    writers = []

    def train() -> None:
        with RunWriter(tmp_path / "r") as w:
            writers.append(w)
            w.add_snapshot(_snapshots(1)[0])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train()
    assert writers[0].closed
    assert len(load_run(tmp_path / "r").probed_steps) == 1


def test_close_is_idempotent_and_final(tmp_path):
    w = RunWriter(tmp_path / "r")
    w.close()
    w.close()
    with pytest.raises(StoreError, match="closed"):
        w.add_snapshot(_snapshots(1)[0])
    with pytest.raises(StoreError, match="closed"):
        w.add_eval({"a": {"acc": 1.0}}, split="val", point="final")


# ---- meta --------------------------------------------------------------------------------------


def test_meta_is_written_with_versions_and_converted_values(tmp_path):
    meta = {
        "tasks": ("a", "b"),
        "seed": np.int64(3),
        "weights": {"a": np.float32(0.25)},
        "model": {"width": 8, "layers": [1, 2]},
        "config": {"lr": torch.tensor(0.5)},
        "out": tmp_path,
    }
    with RunWriter(tmp_path / "r", meta=meta) as w:
        w.update_meta(seed=4, note="hello")
        assert w.meta["seed"] == 4
    on_disk = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert on_disk["format_version"] == FORMAT_VERSION
    assert set(on_disk["versions"]) >= {"gradlens", "torch", "numpy", "python"}
    assert on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["created"].endswith("+00:00")
    assert on_disk["tasks"] == ["a", "b"]
    assert on_disk["seed"] == 4
    assert on_disk["weights"] == {"a": 0.25}
    assert on_disk["config"] == {"lr": 0.5}
    assert on_disk["out"] == str(tmp_path)
    assert on_disk["note"] == "hello"
    assert load_run(tmp_path / "r").meta == on_disk


def test_tasks_come_from_the_first_snapshot_when_meta_has_none(tmp_path):
    with RunWriter(tmp_path / "r") as w:
        w.add_snapshot(_snapshots(1, tasks=("x", "y"))[0])
        assert w.meta["tasks"] == ["x", "y"]
    assert load_run(tmp_path / "r").tasks == ("x", "y")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"meta": {"format_version": 3}}, r"`meta` should not set \['format_version'\]"),
        ({"meta": {"f": object()}}, r"JSON-serialisable .*found object at 'meta.f'"),
        (
            {"meta": {"tasks": ["a", "a"]}},
            r"`meta\['tasks'\]` should be unique; found duplicates \['a'\]",
        ),
        ({"meta": [1]}, r"`meta` should be a mapping or None; found list"),
        ({"flush_every": 0}, r"`flush_every` should be an int >= 1; found 0"),
        ({"flush_seconds": -1.0}, r"`flush_seconds` should be a positive number .*found -1.0"),
    ],
)
def test_writer_argument_errors(tmp_path, kwargs, match):
    with pytest.raises(StoreError, match=match):
        RunWriter(tmp_path / "r", **kwargs)
    assert not (tmp_path / "r" / ".lock").exists()


def test_update_meta_errors(tmp_path):
    with RunWriter(tmp_path / "r", meta={"tasks": ["a", "b"]}) as w:
        with pytest.raises(StoreError, match=r"cannot change during a run.*found \['b', 'a'\]"):
            w.update_meta(tasks=["b", "a"])
        with pytest.raises(StoreError, match=r"should not set \['versions'\]"):
            w.update_meta(versions={})
        w.update_meta(tasks=["a", "b"])  # unchanged: fine (the Profiler does this)


def test_snapshot_errors(tmp_path):
    s0, s1 = _snapshots(2)
    with RunWriter(tmp_path / "r", meta={"tasks": ["a", "b", "c"]}) as w:
        w.add_snapshot(s1)
        with pytest.raises(
            StoreError,
            match=r"`snap.step` should increase strictly; found step 0 "
            r"after step 1",
        ):
            w.add_snapshot(s0)
        other = _snapshots(1, tasks=("a", "b"), start=5)[0]
        with pytest.raises(StoreError, match=r"`snap.tasks` should be the run's tasks"):
            w.add_snapshot(other)
        bad = Snapshot(9, ("a", "b", "c"), torch.eye(2, dtype=torch.float64), {}, torch.ones(3))
        with pytest.raises(StoreError, match=r"layer 'total' at step 9 should be 3 x 3"):
            w.add_snapshot(bad)
        with pytest.raises(StoreError, match=r"`snap` should be a gradlens Snapshot; found dict"):
            w.add_snapshot({})  # type: ignore[arg-type]


def test_newer_format_version_is_refused(tmp_path):
    _write(tmp_path / "r", _snapshots(2))
    meta_path = tmp_path / "r" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    msg = (
        rf"format version {FORMAT_VERSION + 1}; this gradlens reads versions up to "
        rf"{FORMAT_VERSION}\. Upgrade gradlens"
    )
    with pytest.raises(StoreError, match=msg):
        load_run(tmp_path / "r")
    with pytest.raises(StoreError, match=msg):
        load_runs(tmp_path)


def test_not_a_run(tmp_path):
    with pytest.raises(StoreError, match=r"should be a gradlens run directory holding meta.json"):
        load_run(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(StoreError, match="is not valid JSON"):
        load_run(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(StoreError, match="should be a run directory; found a file"):
        RunWriter(tmp_path / "f")


def test_existing_run_needs_overwrite(tmp_path):
    _write(tmp_path / "r", _snapshots(4))
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"already holds a run: .*overwrite=True.*append=True"):
        RunWriter(tmp_path / "r")
    assert not (tmp_path / "r" / ".lock").exists()
    _write(tmp_path / "r", _snapshots(1, start=50), overwrite=True)
    np.testing.assert_array_equal(load_run(tmp_path / "r").probed_steps, [50])
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"  # only the store's files go


# ---- evals -------------------------------------------------------------------------------------


def test_evals_are_written_immediately_with_nullable_ints(tmp_path):
    w = RunWriter(tmp_path / "r", meta={"tasks": ["left", "right"]})
    w.add_eval(
        {"left": {"accuracy": 0.9, "loss": 0.3}},
        split="val",
        point="epoch",
        epoch=1,
        step=np.int64(40),
    )
    w.add_eval(
        {"left": {"accuracy": 0.95}, "right": {"accuracy": 0.5}}, split="test", point="final"
    )
    ev = load_run(tmp_path / "r").evals  # before close: already on disk
    w.close()
    assert list(ev.columns) == ["point", "epoch", "step", "split", "task", "metric", "value"]
    assert str(ev.epoch.dtype) == "Int64"
    assert str(ev.step.dtype) == "Int64"
    assert ev.epoch.tolist()[:2] == [1, 1]
    assert ev.epoch.isna().tolist() == [False, False, True, True]
    assert ev.value.tolist() == [0.9, 0.3, 0.95, 0.5]
    assert ev.metric.tolist() == ["accuracy", "loss", "accuracy", "accuracy"]


@pytest.mark.parametrize(
    ("values", "kw", "match"),
    [
        ({"a": {"acc": 1.0}}, {"split": "", "point": "final"}, r"`split` should be a non-empty"),
        ({"a": {"acc": 1.0}}, {"split": "val", "point": 3}, r"`point` should be a non-empty"),
        (
            {"a": {"acc": 1.0}},
            {"split": "val", "point": "e", "epoch": 1.5},
            r"`epoch` should be an int or None; found 1.5",
        ),
        ({}, {"split": "val", "point": "final"}, r"`values` should be a non-empty mapping"),
        ({"a": 0.9}, {"split": "val", "point": "final"}, r"map task names to \{metric: value\}"),
        (
            {"a": {"acc": "high"}},
            {"split": "val", "point": "final"},
            r"`values\['a'\]\['acc'\]` should be a number; found 'high'",
        ),
    ],
)
def test_eval_errors(tmp_path, values, kw, match):
    with RunWriter(tmp_path / "r") as w, pytest.raises(StoreError, match=match):
        w.add_eval(values, **kw)


# ---- damaged chunks ----------------------------------------------------------------------------


def _three_chunks(tmp_path: Path) -> Path:
    path = tmp_path / "r"
    _write(path, _snapshots(6), flush_every=2)
    return path


def test_truncated_chunk_is_skipped_with_a_warning(tmp_path):
    path = _three_chunks(tmp_path)
    chunk = path / "steps" / "chunk-000001.parquet"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.warns(GradlensWarning, match=r"Skipping the unreadable chunk .*chunk-000001"):
        run = load_run(path)
    np.testing.assert_array_equal(run.probed_steps, [0, 1, 4, 5])
    np.testing.assert_array_equal(run.scalars.step.unique(), [0, 1, 4, 5])


def test_corrupted_bytes_are_detected_not_misread(tmp_path):
    path = _three_chunks(tmp_path)
    chunk = path / "steps" / "chunk-000002.parquet"
    data = bytearray(chunk.read_bytes())
    # flip bytes inside the column data (after the 4-byte magic, before the footer)
    for k in range(8, len(data) // 2, 7):
        data[k] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.warns(GradlensWarning, match=r"chunk-000002"):
        run = load_run(path)
    np.testing.assert_array_equal(run.probed_steps, [0, 1, 2, 3])


def test_corrupted_scalars_chunk_drops_its_steps_too(tmp_path):
    path = _three_chunks(tmp_path)
    (path / "scalars" / "chunk-000000.parquet").write_bytes(b"garbage")
    with pytest.warns(GradlensWarning, match=r"scalars.chunk-000000"):
        run = load_run(path)
    np.testing.assert_array_equal(run.probed_steps, [2, 3, 4, 5])
    (path / "scalars" / "chunk-000000.parquet").unlink()
    with pytest.warns(GradlensWarning, match=r"its scalars chunk .* is missing"):
        load_run(path)


def test_chunk_with_wrong_columns_is_skipped(tmp_path):
    path = _three_chunks(tmp_path)
    other = path / "scalars" / "chunk-000001.parquet"
    (path / "steps" / "chunk-000001.parquet").write_bytes(other.read_bytes())
    with pytest.warns(GradlensWarning, match=r"missing columns"):
        run = load_run(path)
    np.testing.assert_array_equal(run.probed_steps, [0, 1, 4, 5])


def test_flush_cut_short_leaves_nothing_visible(tmp_path, monkeypatch):
    """A kill between the scalars and the steps rename, or before any rename, shows nothing."""
    path = tmp_path / "r"
    w = RunWriter(path, flush_every=2)
    snaps = _snapshots(4)
    w.add_snapshot(snaps[0])
    w.add_snapshot(snaps[1])
    real = gradlens.store.writer.atomic_write_table

    def dies_on_steps(final: Path, table: object) -> None:
        if final.parent.name == "steps":
            final.with_name(".tmp-123-abcd-" + final.name).write_bytes(b"half a parq")
            raise KeyboardInterrupt  # stands for the kill: the rename never happens
        real(final, table)

    monkeypatch.setattr(gradlens.store.writer, "atomic_write_table", dies_on_steps)
    w.add_snapshot(snaps[2])
    with pytest.raises(KeyboardInterrupt):
        w.add_snapshot(snaps[3])
    assert (path / "scalars" / "chunk-000001.parquet").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = load_run(path)  # no warning: an uncommitted chunk is not damage
    np.testing.assert_array_equal(run.probed_steps, [0, 1])
    np.testing.assert_array_equal(run.scalars.step.unique(), [0, 1])
    monkeypatch.setattr(gradlens.store.writer, "atomic_write_table", real)
    w.close()  # the buffered steps were kept and are written now
    np.testing.assert_array_equal(load_run(path).probed_steps, [0, 1, 2, 3])


# ---- the lock ----------------------------------------------------------------------------------


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    w = RunWriter(tmp_path / "r")
    lock = json.loads((tmp_path / "r" / ".lock").read_text())
    assert lock["pid"] == os.getpid()
    assert lock["host"] == socket.gethostname()
    msg = rf"{tmp_path / 'r'} is being written by pid {os.getpid()}"
    with pytest.raises(StoreError, match=msg):
        RunWriter(tmp_path / "r", overwrite=True)
    w.close()
    assert not (tmp_path / "r" / ".lock").exists()
    RunWriter(tmp_path / "r", overwrite=True).close()


def test_lock_without_hard_links(tmp_path, monkeypatch):
    def no_link(src: object, dst: object) -> None:
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(gradlens.store._lock.os, "link", no_link)
    w = RunWriter(tmp_path / "r")
    assert json.loads((tmp_path / "r" / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(StoreError, match=r"being written by pid"):
        RunWriter(tmp_path / "r", overwrite=True)
    w.close()
    assert not list((tmp_path / "r").glob(".lock*"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _hand_lock(path: Path, pid: int, host: str | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    rec = {"pid": pid, "host": host or socket.gethostname(), "started": "2024-01-01T00:00:00"}
    (path / ".lock").write_text(json.dumps(rec))


def test_stale_lock_is_taken_over_with_a_warning(tmp_path):
    pid = _dead_pid()
    _hand_lock(tmp_path / "r", pid)
    with pytest.warns(GradlensWarning, match=rf"stale writer lock .*pid {pid}.*no longer running"):
        w = RunWriter(tmp_path / "r")
    assert json.loads((tmp_path / "r" / ".lock").read_text())["pid"] == os.getpid()
    w.add_snapshot(_snapshots(1)[0])
    w.close()
    assert len(load_run(tmp_path / "r").probed_steps) == 1


def test_lock_of_a_live_pid_is_refused_even_without_flock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _hand_lock(tmp_path / "r", proc.pid)
        with pytest.raises(StoreError, match=rf"pid {proc.pid} .*that process is alive"):
            RunWriter(tmp_path / "r")
    finally:
        proc.kill()
        proc.wait()


def test_lock_from_another_host_or_unreadable_is_refused(tmp_path):
    _hand_lock(tmp_path / "r", _dead_pid(), host="elsewhere.example")
    with pytest.raises(StoreError, match=r"on elsewhere.example .*another host"):
        RunWriter(tmp_path / "r")
    (tmp_path / "r" / ".lock").write_text("junk")
    with pytest.raises(StoreError, match=r"lock .* is unreadable.*delete the file"):
        RunWriter(tmp_path / "r")


# ---- SIGKILL -----------------------------------------------------------------------------------


def _start_child(path: Path, flush_every: int) -> subprocess.Popen[str]:
    script = path.with_name(f"{path.name}_child.py")
    script.write_text(CHILD_SOURCE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(gradlens.store.__file__).parents[2]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    return subprocess.Popen(
        [sys.executable, str(script), str(path), str(flush_every)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        raise AssertionError(f"child exited early:\n{proc.stderr.read() if proc.stderr else ''}")
    return line.strip()


def _kill_while_training(
    path: Path, flush_every: int, chunks: int, rng: np.random.Generator
) -> tuple[int, int]:
    """Run the child, check a second writer is refused, SIGKILL it; (its pid, last flushed step)."""
    with _start_child(path, flush_every) as proc:
        try:
            assert _read_line(proc) == "ready"
            # a live writer in another process: refused, naming its pid
            with pytest.raises(StoreError, match=rf"being written by pid {proc.pid} .*holds the"):
                RunWriter(path, overwrite=True)
            last = -1
            for _ in range(chunks):
                last = int(_read_line(proc).split()[1])
            time.sleep(0.1 * rng.uniform())  # land anywhere, mid-write included
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        return proc.pid, last


def _check_killed_run(path: Path, flush_every: int, last: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing torn: no chunk is even reported as damaged
        run = load_run(path)
    n = len(run.probed_steps)
    assert n >= last + 1
    assert n % flush_every == 0  # whole chunks only
    np.testing.assert_array_equal(run.probed_steps, np.arange(n))
    assert run.tasks == ("a", "b")
    assert run.meta["engine"] == "loop"
    layers = run.layers
    assert len(layers) == 3  # total + two Linear layers
    assert len(run.steps) == n * len(layers) * 3
    # every step is complete and consistent: the layer Grams sum to the total, Cauchy-Schwarz holds
    g = run.all_grams()
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g[:, 1:].sum(axis=1), g[:, 0], rtol=1e-10)
    d = np.diagonal(g, axis1=-2, axis2=-1)
    assert (np.abs(g[..., 0, 1]) <= np.sqrt(d[..., 0] * d[..., 1]) * (1 + 1e-12)).all()
    np.testing.assert_array_equal(run.weights(), np.tile([0.25, 0.75], (n, 1)))
    assert np.isfinite(run.scalars.loss).all()


def test_sigkill_mid_training_keeps_every_committed_step(tmp_path):
    """Kill -9 a profiled training loop while it writes; every committed chunk reads back whole,
    and the dead writer's lock is recovered by the next writer."""
    path = tmp_path / "run"
    pid, last = _kill_while_training(path, 2, 6, np.random.default_rng())
    _check_killed_run(path, 2, last)
    assert json.loads((path / ".lock").read_text())["pid"] == pid
    with pytest.warns(GradlensWarning, match=rf"stale writer lock .*pid {pid}"):
        w = RunWriter(path, overwrite=True)
    w.close()


@pytest.mark.slow
def test_sigkill_many_times(tmp_path):
    """The same, killed at many random instants (run with -m slow)."""
    rng = np.random.default_rng(12345)
    for k in range(8):
        flush_every = int(rng.integers(1, 5))
        path = tmp_path / f"run{k}"
        _, last = _kill_while_training(path, flush_every, int(rng.integers(2, 20)), rng)
        _check_killed_run(path, flush_every, last)


# ---- load_runs ---------------------------------------------------------------------------------


def _sweep(root: Path) -> None:
    for width in (8, 16):
        for p in (0.25, 0.75):
            meta = {
                "tasks": ["a", "b"],
                "weights": {"a": p, "b": 1 - p},
                "model": {"width": width},
                "seed": 1,
                "config": {"lr": 0.1, "dims": [3, 4]},
            }
            with RunWriter(root / f"w{width}" / f"p{p}", meta=meta) as w:
                w.add_snapshot(_snapshots(1, tasks=("a", "b"))[0])
                w.add_eval({"a": {"acc": 0.1}}, split="val", point="final")
                w.add_eval({"a": {"acc": p * width}, "b": {"acc": 1.0}}, split="val", point="final")
                w.add_eval({"a": {"acc": -1.0}}, split="val", point="epoch", epoch=0)


def test_load_runs_directory(tmp_path):
    _sweep(tmp_path / "sweep")
    df = load_runs(tmp_path / "sweep")
    assert df.run_id.tolist() == ["w16/p0.25", "w16/p0.75", "w8/p0.25", "w8/p0.75"]
    assert df.columns[:2].tolist() == ["run_id", "path"]
    assert df["model.width"].tolist() == [16, 16, 8, 8]
    assert df["weights.a"].tolist() == [0.25, 0.75, 0.25, 0.75]
    assert df["config.lr"].tolist() == [0.1] * 4
    assert df["config.dims"].tolist() == ["[3, 4]"] * 4
    assert df["tasks"].tolist() == ['["a", "b"]'] * 4
    assert df["format_version"].tolist() == [FORMAT_VERSION] * 4
    # the last final eval wins; epoch evals are not tabulated
    assert df["final.val.a.acc"].tolist() == [4.0, 12.0, 2.0, 6.0]
    assert df["final.val.b.acc"].tolist() == [1.0] * 4
    assert not [c for c in df.columns if c.startswith("epoch")]
    assert Path(df.path[0]) == tmp_path / "sweep" / "w16" / "p0.25"


def test_load_runs_glob_list_and_single(tmp_path):
    _sweep(tmp_path)
    g = load_runs(str(tmp_path / "w8" / "*"))
    assert g.run_id.tolist() == ["p0.25", "p0.75"]
    lst = load_runs([tmp_path / "w8" / "p0.25", tmp_path / "w16" / "p0.25"])
    assert lst.run_id.tolist() == ["w16/p0.25", "w8/p0.25"]
    one = load_runs(tmp_path / "w8" / "p0.75")
    assert one.run_id.tolist() == ["p0.75"]


def test_load_runs_errors(tmp_path):
    with pytest.raises(StoreError, match=r"found none"):
        load_runs(tmp_path)
    with pytest.raises(StoreError, match=r"does not exist"):
        load_runs(tmp_path / "nope")
    with pytest.raises(StoreError, match=r"found none"):
        load_runs(str(tmp_path / "*"))


def test_module_doctests():
    result = doctest.testmod(gradlens.store, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
