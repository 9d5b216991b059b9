"""Fuzzing: clear gradlens error or exact data, never a traceback, never silent loss.

Byte flips and truncations of every file kind in a run directory, hypothesis-generated task
names and configurations, and kill -9 at random points of a writer that is then resumed in
append mode. The exhaustive variants are marked slow.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradlens.store
from gradlens import GradlensError, GradlensWarning, Snapshot, StoreError
from gradlens.search import ExecutorSpec, PBTSpec, SearchConfig, SweepSpec, plan_sweep
from gradlens.store import RunWriter, load_run
from gradlens.train import TrainConfig

_FIXTURE = HealthCheck.function_scoped_fixture  # the fixtures used are read-only templates
TASKS = ("a", "b")
STEPS = list(range(6))  # three chunks of two steps
FILES = [
    "meta.json",
    "commits.json",
    "steps/chunk-000001.parquet",
    "scalars/chunk-000001.parquet",
    "probes/chunk-000001.parquet",
    "evals/chunk-000000.parquet",
]


def _gram(step: int) -> torch.Tensor:
    return torch.tensor([[2.0 + step, -1.0 / (step + 1)], [-1.0 / (step + 1), 3.0]]).double()


def _write_template(path: Path) -> None:
    with RunWriter(path, meta={"tasks": list(TASKS), "seed": 3}, flush_every=2) as w:
        for s in STEPS:
            g = _gram(s)
            w.add_snapshot(Snapshot(s, TASKS, g, {"fc": g}, torch.tensor([0.25, 0.75]),
                                    losses={"a": s / 10, "b": 1.0}, notes=(f"n{s}",),
                                    timings={"loop": s / 8}))  # fmt: skip
            if s in (1, 4):
                w.add_eval({"a": {"acc": s / 10}}, split="val", point=f"e{s}", step=s)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "run"
    _write_template(path)
    return path


def _check_outcome(run_dir: Path) -> str:
    """Load a damaged run: a StoreError, or exact data with a warning for anything missing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = load_run(run_dir)
            probes = run.probes  # read on first access: its problems are reported here
        except StoreError:
            return "error"
    assert all(issubclass(w.category, GradlensWarning) for w in caught), [
        str(w.message) for w in caught
    ]
    steps = run.probed_steps.tolist()
    assert set(steps) <= set(STEPS)  # nothing invented
    grams = run.all_grams()
    for k, s in enumerate(steps):  # every step read back is exactly the step written
        np.testing.assert_array_equal(grams[k, 0], _gram(s).numpy())
        np.testing.assert_array_equal(grams[k, 1], _gram(s).numpy())
    np.testing.assert_array_equal(run.weights(), np.tile([0.25, 0.75], (len(steps), 1)))
    assert set(run.scalars.step) == set(steps)
    evals = sorted(run.evals.step.dropna().astype(int).tolist())
    assert set(evals) <= {1, 4}
    assert set(probes.step) <= set(steps)
    for step, notes, timings in zip(probes.step, probes.notes, probes.timings):
        assert (list(notes), list(timings)) == ([f"n{step}"], [("loop", step / 8)])
    lost = len(steps) < len(STEPS) or len(evals) < 2 or len(probes) < len(steps)
    if lost:  # never silent loss
        assert caught, "steps or evals are missing without a warning"
        return "warned"
    return "exact"


def _flip(path: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))


def _damaged_copy(template: Path, where: Path) -> Path:
    run_dir = where / "run"
    shutil.copytree(template, run_dir)
    return run_dir


@settings(max_examples=60, suppress_health_check=[_FIXTURE])
@given(name=st.sampled_from(FILES), offset=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_a_bit_flip_in_any_file_is_an_error_or_exact_data(template, name, offset, bit):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = _damaged_copy(template, Path(tmp))
        _flip(run_dir / name, offset, bit)
        _check_outcome(run_dir)


@settings(max_examples=60, suppress_health_check=[_FIXTURE])
@given(name=st.sampled_from(FILES), fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_a_truncation_of_any_file_is_an_error_or_exact_data(template, name, fraction):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = _damaged_copy(template, Path(tmp))
        path = run_dir / name
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
        outcome = _check_outcome(run_dir)
        assert outcome != "exact" or name in ("commits.json",)  # a cut file never passes


@pytest.mark.parametrize("name", [*FILES, "steps", "evals", "meta.json+steps"])
def test_a_deleted_file_is_an_error_or_a_warning(template, tmp_path, name):
    run_dir = _damaged_copy(template, tmp_path)
    for part in name.split("+"):
        target = run_dir / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    outcome = _check_outcome(run_dir)
    assert outcome in ("error", "warned") or name == "commits.json"


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_every_single_bit_flip_exhaustively(template, tmp_path, name):
    size = (template / name).stat().st_size
    outcomes: dict[str, int] = {}
    run_dir = _damaged_copy(template, tmp_path)
    original = (run_dir / name).read_bytes()
    for offset in range(size):
        for bit in range(8):
            _flip(run_dir / name, offset, bit)
            out = _check_outcome(run_dir)
            outcomes[out] = outcomes.get(out, 0) + 1
            (run_dir / name).write_bytes(original)
    assert sum(outcomes.values()) == 8 * size


# ---- hypothesis: task names and configurations ---------------------------------------------------


@settings(max_examples=80, suppress_health_check=[_FIXTURE])
@given(name=st.text(max_size=30))
def test_any_task_name_round_trips_or_is_refused(tmp_path, name):
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        path = Path(tmp) / "r"
        try:
            w = RunWriter(path, meta={"tasks": [name, "b"]})
        except StoreError:
            assert name in ("", "b")
            return
        g = _gram(0)
        with w:
            w.add_snapshot(Snapshot(0, (name, "b"), g, {}, torch.ones(2)))
        run = load_run(path, strict=True)
        assert run.tasks == (name, "b")
        np.testing.assert_array_equal(run.gram(0), g.numpy())
        # nothing was written outside the run directory, whatever the name
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["r"]


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


def _table(keys: list[str]) -> st.SearchStrategy[dict[str, object]]:
    return st.dictionaries(st.sampled_from([*keys, "nosuch"]), _VALUES, max_size=5)


_SWEEP_KEYS = ["p", "grid", "random", "random_seed", "alpha", "sizes", "seeds", "baselines"]
_PBT_KEYS = ["population", "interval_epochs", "epochs", "quantile", "replace", "metric", "mode",
             "perturb_factors", "resample_probability", "seed", "alpha", "init"]  # fmt: skip
_TRAIN_KEYS = ["dataset", "tasks", "model", "width", "depth", "weights", "lr", "epochs", "seed",
               "batch_size", "every", "device", "threads", "engine", "early_stopping"]  # fmt: skip


@settings(max_examples=150)
@given(
    sweep=_table(_SWEEP_KEYS),
    pbt=_table(_PBT_KEYS),
    train=_table(_TRAIN_KEYS),
    executor=_table(["kind", "workers", "address", "storage"]),
)
def test_any_configuration_is_valid_or_a_clear_error(sweep, pbt, train, executor):
    builders = [(SweepSpec.from_dict, sweep), (PBTSpec.from_dict, pbt),
                (TrainConfig.from_dict, train), (ExecutorSpec.from_dict, executor)]  # fmt: skip
    for build, d in builders:
        try:
            spec = build(d)
        except GradlensError as exc:
            message = str(exc)
            assert message
            assert "\n" not in message
            continue
        if isinstance(spec, SweepSpec):
            n = spec.n_runs(2)
            assert isinstance(n, int)
            assert n >= 1
            if n <= 200:  # the count stated up front is the number of runs planned
                try:
                    planned = plan_sweep(SearchConfig.from_dict({"train": {}, "sweep": d}), "ab")
                except GradlensError:
                    continue
                assert len(planned) == n


# ---- kill -9 at random points of a writer, resumed in append mode --------------------------------

CHILD = """
import math, sys
import torch
from gradlens import Snapshot
from gradlens.store import RunWriter

w = RunWriter(sys.argv[1], meta={"tasks": ["a", "b"]}, flush_every=3, flush_seconds=math.inf,
              append=True)
step = 0 if w._state.last_step is None else w._state.last_step + 1
print("ready", step, flush=True)
while True:
    g = torch.tensor([[2.0 + step, -1.0 / (step + 1)], [-1.0 / (step + 1), 3.0]]).double()
    w.add_snapshot(Snapshot(step, ("a", "b"), g, {"fc": g}, torch.tensor([0.25, 0.75])))
    if step % 4 == 0:
        w.add_eval({"a": {"acc": 0.5}}, split="val", point=f"e{step}", step=step)
    step += 1
"""


def _kill_at_random(path: Path, rng: np.random.Generator) -> None:
    script = path.with_name("child.py")
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(gradlens.store.__file__).parents[2])}
    with subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("ready"), proc.stderr.read() if proc.stderr else ""
            time.sleep(float(rng.uniform(0.0, 0.3)))  # anywhere: mid-chunk, mid-rename
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.slow
def test_kill_9_at_random_points_then_append_keeps_every_flushed_step(tmp_path):
    path = tmp_path / "run"
    rng = np.random.default_rng()
    flushed = 0
    for _ in range(8):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradlensWarning)  # the stale lock taken over
            _kill_at_random(path, rng)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run = load_run(path, strict=True)  # nothing torn, nothing missing, ever
        steps = run.probed_steps
        assert len(steps) >= flushed  # what was flushed before is still there
        np.testing.assert_array_equal(steps, np.arange(len(steps)))
        for k, s in enumerate(steps.tolist()):
            np.testing.assert_array_equal(run.grams()[k], _gram(s).numpy())
        assert len(steps) % 3 == 0  # whole chunks only
        assert set(run.evals.step.astype(int)) <= set(range(0, len(steps) + 4, 4))
        flushed = len(steps)
    assert math.isfinite(float(flushed))
