"""Tests of the TensorBoard sink: what it logs, read back from the event files."""

from __future__ import annotations

import doctest
from pathlib import Path

import numpy as np
import pytest
import torch

import gradlens as gl
import gradlens.sinks
from gradlens import GradlensError, Snapshot
from gradlens.sinks import TensorBoardSink

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
).EventAccumulator


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _snap(step: int, g: np.ndarray, tasks: tuple[str, ...]) -> Snapshot:
    return Snapshot(step, tasks, torch.from_numpy(g), {}, torch.ones(len(tasks)))


def _expected(g: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """Closed forms, written out independently of gradlens.metrics."""
    n = np.sqrt(np.diag(g))
    cos = g / np.outer(n, n)
    iu, ju = np.triu_indices(len(g), k=1)
    pairs = cos[iu, ju]
    return pairs.mean(), (pairs < 0).mean(), n.max() / n.min(), pairs


def test_logs_the_four_quantities_per_step(tmp_path):
    rng = np.random.default_rng(0)
    tasks = ("a", "b", "c", "d")
    grams = []
    sink = TensorBoardSink(tmp_path)
    for step in (0, 5, 10):
        a = rng.standard_normal((4, 6))
        g = a @ a.T
        grams.append(g)
        sink.add_snapshot(_snap(step, g, tasks))
    sink.close()
    logged = _scalars(tmp_path)
    pair_tags = [f"gradlens/cosine/{tasks[i]}|{tasks[j]}" for i, j in zip(*np.triu_indices(4, 1))]
    assert set(logged) == {
        "gradlens/mean_cosine",
        "gradlens/conflict_frequency",
        "gradlens/norm_ratio",
        *pair_tags,
    }
    for k, (step, g) in enumerate(zip((0, 5, 10), grams)):
        mean_cos, freq, ratio, pairs = _expected(g)
        # TensorBoard stores float32
        assert logged["gradlens/mean_cosine"][k] == (step, pytest.approx(mean_cos, abs=1e-6))
        assert logged["gradlens/conflict_frequency"][k] == (step, pytest.approx(freq, abs=1e-7))
        assert logged["gradlens/norm_ratio"][k] == (step, pytest.approx(ratio, rel=1e-6))
        for tag, c in zip(pair_tags, pairs):
            assert logged[tag][k] == (step, pytest.approx(c, abs=1e-6))


def test_pair_limit_and_single_task(tmp_path):
    with TensorBoardSink(tmp_path / "many", pair_limit=2) as sink:
        sink.add_snapshot(_snap(0, np.eye(3), ("a", "b", "c")))
    assert set(_scalars(tmp_path / "many")) == {
        "gradlens/mean_cosine",
        "gradlens/conflict_frequency",
        "gradlens/norm_ratio",
    }
    sink = TensorBoardSink(tmp_path / "one")
    sink.add_snapshot(_snap(0, np.array([[4.0]]), ("a",)))
    assert sink.last == {"gradlens/norm_ratio": 1.0}
    sink.close()


def test_zero_gradient_task_is_left_out_not_zeroed(tmp_path):
    g = np.array([[1.0, -0.5, 0.0], [-0.5, 1.0, 0.0], [0.0, 0.0, 0.0]])
    sink = TensorBoardSink(tmp_path)
    sink.add_snapshot(_snap(0, g, ("a", "b", "z")))
    sink.close()
    assert sink.last["gradlens/mean_cosine"] == pytest.approx(-0.5)
    assert sink.last["gradlens/conflict_frequency"] == 1.0
    assert np.isnan(sink.last["gradlens/norm_ratio"])
    assert np.isnan(sink.last["gradlens/cosine/a|z"])


def test_profiler_feeds_the_sink(tmp_path):
    trunk = torch.nn.Linear(3, 4)
    heads = torch.nn.ModuleList([torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)])
    sink = TensorBoardSink(tmp_path)
    prof = gl.Profiler(trunk, tasks=["a", "b"], engine="loop", every=2, sinks=[sink])
    snaps = []
    for _ in range(5):
        z = trunk(torch.randn(8, 3))
        snaps.append(prof.backward({"a": heads[0](z).mean(), "b": heads[1](z).pow(2).mean()}))
    prof.close()  # closes the sink too
    logged = _scalars(tmp_path)
    probed = [s for s in snaps if s is not None]
    assert [st for st, _ in logged["gradlens/cosine/a|b"]] == [0, 2, 4]
    for (_, v), s in zip(logged["gradlens/cosine/a|b"], probed):
        assert v == pytest.approx(s.cosine()[0, 1].item(), abs=1e-6)


def test_errors(tmp_path):
    with pytest.raises(GradlensError, match=r"`pair_limit` should be a non-negative int; found -1"):
        TensorBoardSink(tmp_path, pair_limit=-1)
    sink = TensorBoardSink(tmp_path)
    sink.close()
    sink.close()
    with pytest.raises(GradlensError, match="closed"):
        sink.add_snapshot(_snap(0, np.eye(2), ("a", "b")))


def test_module_doctests():
    result = doctest.testmod(gradlens.sinks)
    assert result.attempted > 0
    assert result.failed == 0
