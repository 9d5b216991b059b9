"""Store format 2: the total layer named "total", old (format 1) runs read through an alias, and
the Snapshot's other fields (probes) persisted and read back."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlens import GradlensWarning, Snapshot, StoreError
from gradlens._types import TOTAL_LAYER
from gradlens.store import FORMAT_VERSION, RunWriter, load_run
from gradlens.store.reader import RENAMED_TOTAL

FIXTURES = Path(__file__).parent / "fixtures"
TASKS = ("left", "right")
STEPS = (0, 2, 4)


def _fixture_gram(step: int, scale: float) -> np.ndarray:
    """The Gram the fixture script (fixtures/README.md) wrote for one layer at one step."""
    a = np.array([[1.0 + step, 0.5 - step], [0.25 * step, 2.0]]) * scale
    return a @ a.T


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _load_quietly(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_run(path)


def test_total_layer_is_named_total():
    assert TOTAL_LAYER == "total"
    assert FORMAT_VERSION == 2


def test_format1_run_reads_with_the_total_renamed(tmp_path):
    """A run written by gradlens at format 1 (total "__all__") reads with no warning, the total
    under TOTAL_LAYER, every stored value unchanged."""
    run = _load_quietly(_copy("v1_run", tmp_path))
    assert run.meta["format_version"] == 1
    assert run.tasks == TASKS
    assert run.layers == ("total", "fc1", "fc2")
    assert sorted(map(str, run.steps["layer"].cat.categories)) == ["fc1", "fc2", "total"]
    np.testing.assert_array_equal(run.probed_steps, STEPS)
    for k, step in enumerate(STEPS):
        fc1, fc2 = _fixture_gram(step, 1.0), _fixture_gram(step, 2.0)
        np.testing.assert_allclose(run.gram(step, "fc1"), fc1, rtol=1e-15)
        np.testing.assert_allclose(run.gram(step, "fc2"), fc2, rtol=1e-15)
        np.testing.assert_allclose(run.gram(step), fc1 + fc2, rtol=1e-15)
        np.testing.assert_allclose(run.grams("total")[k], fc1 + fc2, rtol=1e-15)
    np.testing.assert_array_equal(run.weights(), [[0.25, 0.75], [2.25, 0.75], [4.25, 0.75]])
    np.testing.assert_allclose(run.scalars["loss"], [1.0, 0.5, 1 / 3, 0.5, 0.2, 0.5])
    final = run.evals[run.evals["point"] == "final"]
    assert dict(zip(final["task"], final["value"])) == {"left": 0.75, "right": 0.5}
    assert set(run.metrics["layer"]) == {"total", "fc1", "fc2"}
    assert run.probes.empty  # format 1 kept no probes
    snap = run.snapshot(2)
    assert (snap.engine, snap.level) == ("loop", "parameters")  # from meta
    assert (snap.notes, snap.timings, snap.layer_weights) == ((), {}, {})
    np.testing.assert_allclose(snap.layer_grams["fc2"].numpy(), _fixture_gram(2, 2.0))
    assert snap.losses == {"left": 1 / 3, "right": 0.5}


def test_format1_user_layer_named_total_is_not_merged_with_the_total(tmp_path):
    """In a format 1 run a user layer named "total" is read under another name, with a warning;
    the total stays the sum of the layers."""
    path = _copy("v1_layer_named_total", tmp_path)
    with pytest.warns(GradlensWarning, match=r"layer named 'total'.*read as 'total \(layer\)'"):
        run = load_run(path)
    assert run.layers == ("total", RENAMED_TOTAL, "fc2")
    for step in STEPS:
        user, fc2 = _fixture_gram(step, 1.0), _fixture_gram(step, 2.0)
        np.testing.assert_allclose(run.gram(step, RENAMED_TOTAL), user, rtol=1e-15)
        np.testing.assert_allclose(run.gram(step), user + fc2, rtol=1e-15)
    assert (run.steps.groupby(["step", "layer"], observed=True).size() == 3).all()


def test_writer_refuses_a_layer_named_like_the_total(tmp_path):
    g = torch.eye(2, dtype=torch.float64)
    with RunWriter(tmp_path / "r") as w:
        for name in ("total", "__all__"):
            bad = Snapshot(0, ("a", "b"), g, {name: g}, torch.ones(2))
            with pytest.raises(StoreError, match=rf"should not hold a layer named 'total'.*{name}"):
                w.add_snapshot(bad)
    assert load_run(tmp_path / "r").probed_steps.size == 0


def test_append_to_a_format1_run_keeps_its_names(tmp_path):
    """Appending to an old run writes its total under the old name, so the run reads as one."""
    path = _copy("v1_run", tmp_path)
    g = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    with RunWriter(path, append=True) as w:
        w.add_snapshot(Snapshot(6, TASKS, 2 * g, {"fc1": g, "fc2": g}, torch.ones(2), notes=("n",)))
    assert json.loads((path / "meta.json").read_text())["format_version"] == 1
    run = _load_quietly(path)
    assert run.layers == ("total", "fc1", "fc2")
    np.testing.assert_array_equal(run.probed_steps, [*STEPS, 6])
    np.testing.assert_array_equal(run.gram(6), 2 * g.numpy())
    np.testing.assert_allclose(run.gram(4), _fixture_gram(4, 1.0) + _fixture_gram(4, 2.0))
    assert run.snapshot(6).notes == ("n",)
    assert run.snapshot(0).notes == ()


def _full_snapshot(step: int) -> Snapshot:
    g = torch.tensor([[4.0, -1.0 - step], [-1.0 - step, 9.0]], dtype=torch.float64)
    return Snapshot(
        step,
        ("a", "b"),
        2 * g,
        {"enc.0": g, "enc.1": g},
        torch.tensor([0.3, 0.7 + step], dtype=torch.float64),
        engine="gramian",
        level="features",
        rules={"enc.0": "linear", "enc.1": "generic"},
        losses={"a": 0.5 + step},
        weighting="mgda" if step % 2 else None,
        weighting_path="kept_blocks" if step % 2 else None,
        layer_weights={"enc.0": torch.tensor([0.25, 0.75 + step], dtype=torch.float64)},
        timings={"loop": 0.5, "gramian": 0.125 * (step + 1)},
        unreached=("head.x",) if step == 1 else (),
        notes=("forward-not-recorded", f"auto-chose:gramian-{step}"),
    )


def test_every_snapshot_field_round_trips(tmp_path):
    snaps = [_full_snapshot(s) for s in range(5)]
    with RunWriter(tmp_path / "r", flush_every=2) as w:
        for s in snaps:
            w.add_snapshot(s)
    run = _load_quietly(tmp_path / "r")
    assert run.meta["format_version"] == FORMAT_VERSION
    assert len(run.probes) == 5
    assert len(list((tmp_path / "r" / "probes").iterdir())) == 3
    back = list(run.snapshots())
    assert [b.step for b in back] == list(range(5))
    for want, got in zip(snaps, back):
        assert got.tasks == want.tasks
        for field in ("engine", "level", "rules", "weighting", "weighting_path", "timings"):
            assert getattr(got, field) == getattr(want, field), field
        assert (got.unreached, got.notes) == (want.unreached, want.notes)
        assert got.losses == {"a": want.losses["a"]}  # b's loss was not given
        torch.testing.assert_close(got.gram, want.gram, rtol=0, atol=0)
        assert set(got.layer_grams) == set(want.layer_grams)
        for name, m in want.layer_grams.items():
            torch.testing.assert_close(got.layer_grams[name], m, rtol=0, atol=0)
        torch.testing.assert_close(got.weights, want.weights, rtol=0, atol=0)
        assert set(got.layer_weights) == {"enc.0"}
        torch.testing.assert_close(
            got.layer_weights["enc.0"], want.layer_weights["enc.0"], rtol=0, atol=0
        )
    with pytest.raises(Exception, match="`step` should be a probed step"):
        run.snapshot(99)


def test_a_missing_probes_chunk_loses_only_the_probes(tmp_path):
    path = tmp_path / "r"
    with RunWriter(path, flush_every=2) as w:
        for s in range(4):
            w.add_snapshot(_full_snapshot(s))
    (path / "probes" / "chunk-000000.parquet").unlink()
    run = _load_quietly(path)  # the probes are read on first use, and reported then
    np.testing.assert_array_equal(run.probed_steps, [0, 1, 2, 3])
    with pytest.warns(GradlensWarning, match="probes chunk 0 of the run is missing"):
        assert run.snapshot(0).notes == ()
    assert run.snapshot(3).notes == _full_snapshot(3).notes
    np.testing.assert_allclose(run.snapshot(1).gram.numpy(), _full_snapshot(1).gram.numpy())
    strict = load_run(path, strict=True)
    with pytest.raises(StoreError, match=r"probes chunk 0 .* missing.*strict"):
        strict.probes  # noqa: B018 - the access reads them


def test_rewind_and_append_keep_probes_in_step(tmp_path):
    path = tmp_path / "r"
    w = RunWriter(path, flush_every=2)
    for s in range(5):
        w.add_snapshot(_full_snapshot(s))
    assert w.rewind(3) == 2  # steps 3 (stored) and 4 (buffered)
    w.close()
    run = _load_quietly(path)
    assert run.probes["step"].tolist() == [0, 1, 2]
    with RunWriter(path, append=True) as w2:
        w2.add_snapshot(_full_snapshot(7))
    run = _load_quietly(path)
    assert run.probes["step"].tolist() == [0, 1, 2, 7]
    assert [s.notes[1] for s in run.snapshots()] == [
        f"auto-chose:gramian-{k}" for k in (0, 1, 2, 7)
    ]


def test_snapshot_lists_the_layers_stored_at_its_step(tmp_path):
    """A layer absent at a step is absent from that Snapshot; one stored with a NaN Gram is not."""
    g = torch.eye(2, dtype=torch.float64)
    nan = torch.full((2, 2), float("nan"), dtype=torch.float64)
    with RunWriter(tmp_path / "r") as w:
        w.add_snapshot(Snapshot(0, ("a", "b"), g, {"x": g, "y": g}, torch.ones(2)))
        w.add_snapshot(Snapshot(1, ("a", "b"), g, {"y": nan}, torch.ones(2)))
    run = _load_quietly(tmp_path / "r")
    assert list(run.snapshot(0).layer_grams) == ["x", "y"]
    one = run.snapshot(1)
    assert list(one.layer_grams) == ["y"]
    assert torch.isnan(one.layer_grams["y"]).all()


def test_a_module_called_total_is_profiled_and_stored_apart_from_the_total(tmp_path):
    """A model whose submodule is named ``total`` gets the layer ``"total (layer)"`` from the
    profiler, so its Gram is stored and read back beside the total, never merged with it."""
    import gradlens as gl

    torch.manual_seed(0)
    trunk = torch.nn.Sequential()
    trunk.add_module("total", torch.nn.Linear(3, 4))
    trunk.add_module("out", torch.nn.Linear(4, 4))
    x = torch.randn(6, 3)
    prof = gl.Profiler(trunk, tasks=["a", "b"], engine="loop")
    z = trunk(x)
    snap = prof.backward({"a": z[:, 0].pow(2).mean(), "b": z[:, 1].mean()})
    prof.close()
    assert set(snap.layer_grams) == {RENAMED_TOTAL, "out"}
    with RunWriter(tmp_path / "r", meta={"tasks": ["a", "b"]}) as w:
        w.add_snapshot(snap)
    run = _load_quietly(tmp_path / "r")
    assert run.layers == (TOTAL_LAYER, RENAMED_TOTAL, "out")
    back = run.snapshot(snap.step)
    torch.testing.assert_close(back.layer_grams[RENAMED_TOTAL], snap.layer_grams[RENAMED_TOTAL])
    torch.testing.assert_close(back.gram, snap.gram)
