"""Sweeps: planning, the index, resume (also after SIGKILL), failures, the CLI, Ray."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlens import GradlensError, GradlensWarning, load_run, load_runs, stats
from gradlens.cli import main
from gradlens.search import SearchConfig, load_config, plan_sweep, run_sweep, simplex_grid
from gradlens.search import sweep as sweep_mod
from gradlens.train._data import load_train_data
from tests._auto import PINNED, pinned_toml
from tests._tiny import TINY_SEARCH
from tests.search._kill import kill_when

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "sweep.toml"
TINY = {**TINY_SEARCH, "epochs": 1}


def _cfg(sweep: dict, workers: int = 1, **train: object) -> SearchConfig:
    return SearchConfig.from_dict(
        {"train": {**TINY, **train}, "sweep": sweep, "executor": {"workers": workers}}
    )


def _index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def _created(out: Path) -> dict[str, str]:
    return {p.name: load_run(p).meta["created"] for p in out.iterdir() if p.is_dir()}


# -- planning ---------------------------------------------------------------------------------


def test_plan_crosses_weights_sizes_seeds_and_adds_baselines():
    cfg = _cfg({"p": [0.1, 0.9], "sizes": [{"width": 0.5}, {"width": 1, "depth": 2}],
                "seeds": [3, 4], "baselines": True})  # fmt: skip
    runs = plan_sweep(cfg, ("left", "right"))
    assert len(runs) == (2 + 2) * 2 * 2
    assert len({r.id for r in runs}) == len(runs)
    first = runs[0]
    assert first.id == "w0.1-0.9_width0.5_seed3"
    assert first.weights == {"left": 0.1, "right": 0.9}
    assert (first.width, first.depth, first.seed, first.baseline_of) == (0.5, None, 3, None)
    assert runs[3].id == "w0.1-0.9_width1_depth2_seed4"
    base = [r for r in runs if r.baseline_of]
    assert len(base) == 8
    assert {r.baseline_of for r in base} == {"left", "right"}
    for r in base:
        assert r.weights == {r.baseline_of: 1.0}
    d = base[0].train_dict({**cfg.train, "tasks": ["left", "right"]}, "s")
    assert d["config"] == {"sweep": "s", "run_id": base[0].id, "baseline_of": "left"}
    assert d["tasks"] == ["left"]  # the harness's single-task run
    assert d["weights"] == {"left": 1.0}
    assert d["seed"] == 3
    assert "tasks" not in first.train_dict(cfg.train, "s")


def test_plan_grid_and_random():
    runs = plan_sweep(_cfg({"grid": 3}), ("a", "b", "c"))
    got = np.array([[r.weights[t] for t in "abc"] for r in runs])
    np.testing.assert_array_equal(got, simplex_grid(3, 3))
    assert runs[1].id == "w0-0.5-0.5_seed0"
    rnd = plan_sweep(_cfg({"random": 4, "random_seed": 2}), ("a", "b", "c"))
    again = plan_sweep(_cfg({"random": 4, "random_seed": 2}), ("a", "b", "c"))
    assert [r.weights for r in rnd] == [r.weights for r in again]
    assert [r.id for r in rnd] == ["r000_seed0", "r001_seed0", "r002_seed0", "r003_seed0"]
    for r in rnd:
        assert sum(r.weights.values()) == pytest.approx(1.0)


def test_plan_errors():
    with pytest.raises(GradlensError, match=r"`sweep.p` is for two tasks .* found 3 tasks"):
        plan_sweep(_cfg({"p": [0.5]}), ("a", "b", "c"))
    with pytest.raises(GradlensError, match=r"should plan distinct runs; found duplicates"):
        plan_sweep(_cfg({"p": [0.5], "sizes": [{"width": 1}, {"width": 1.0}]}), ("a", "b"))
    with pytest.raises(GradlensError, match=r"should hold a \[sweep\] table"):
        plan_sweep(SearchConfig.from_dict({}), ("a", "b"))


def test_bad_train_table_is_reported_before_anything_runs(tmp_path):
    cfg = SearchConfig.from_dict({"train": {"epoch": 1}, "sweep": {"p": [0.5]}})
    with pytest.raises(GradlensError, match=r"Unknown TrainConfig field\(s\) \['epoch'\]"):
        run_sweep(cfg, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


# -- running and resuming ---------------------------------------------------------------------


def test_cli_sweep_end_to_end_then_rerun_skips_everything(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", str(EXAMPLE), "--out", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    plan = plan_sweep(load_config(EXAMPLE), ("left", "right"))
    assert len(plan) == 4
    for r in plan:
        assert r.id in table
    idx = _index(out)
    assert [r["id"] for r in idx["runs"]] == [r.id for r in plan]
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in idx["runs"])
    assert sorted(p.name for p in out.iterdir()) == sorted([*(r.id for r in plan), "index.json"])
    df = load_runs(out)
    assert len(df) == 4
    row = df.set_index("run_id").loc["single-left_width0.125_depth1_seed0"]
    assert row["config.config.baseline_of"] == "left"
    assert json.loads(row["tasks"]) == ["left"]
    assert row["weights.left"] == 1.0
    assert np.isnan(row["weights.right"])
    assert np.isnan(row["final.test.right.accuracy"])
    # the index records the same final numbers as the run store
    for rec in idx["runs"]:
        for task, m in rec["final"]["test"].items():
            acc = df.set_index("run_id").loc[rec["id"], f"final.test.{task}.accuracy"]
            assert m["accuracy"] == acc
    before = _created(out)
    assert main(["sweep", str(EXAMPLE), "--out", str(out), "--no-progress"]) == 0
    assert _created(out) == before
    assert all(r["attempts"] == 1 for r in _index(out)["runs"])


def test_baselines_are_single_task_runs_that_joint_gain_finds(tmp_path):
    out = tmp_path / "s"
    df = run_sweep(_cfg({"p": [0.5], "baselines": True}), out, progress=False)
    assert (df["status"] == "done").all()
    table = stats.runs_table(out)
    single = table[table["n_tasks"] == 1].set_index("tasks")
    assert sorted(single.index) == ["left", "right"]
    assert single.loc["left", "config.config.baseline_of"] == "left"
    # one head: the single-task model is smaller, so match sizes on width and depth
    assert (single["model.n_params"] < table[table["n_tasks"] == 2]["model.n_params"].min()).all()
    g = stats.joint_gain(table, size_cols=["model.width", "model.depth"])
    assert sorted(g["task"]) == ["left", "right"]
    assert np.isfinite(g[["gain", "single_mean"]].to_numpy()).all()
    # One seed per side: a t interval needs two, so there is none (not a zero-width one).
    assert g[["ci_low", "ci_high", "p_value"]].isna().all().all()
    assert (g["note"] == "").all()
    np.testing.assert_allclose(g["gain"], g["joint_mean"] - g["single_mean"], rtol=0, atol=1e-12)
    for _, r in g.iterrows():
        assert r["single_mean"] == single.loc[r["task"], f"accuracy.{r['task']}"]


def test_rerun_redoes_a_done_run_whose_record_differs_from_the_plan(tmp_path):
    # a baseline of an older sweep (weight 1 on its task, 0 on the other, both tasks trained)
    cfg = _cfg({"p": [0.5], "baselines": True})
    out = tmp_path / "s"
    run_sweep(cfg, out, progress=False)
    idx = _index(out)
    for r in idx["runs"]:  # a redone run's directory is removed first: its mark goes
        (out / r["id"] / "mark").write_text("")
    old = next(r for r in idx["runs"] if r["id"] == "single-left_seed0")
    old["weights"] = {"left": 1.0, "right": 0.0}
    (out / "index.json").write_text(json.dumps(idx))
    df = run_sweep(cfg, out, progress=False)
    assert (df["status"] == "done").all()
    kept = sorted(r["id"] for r in idx["runs"] if (out / r["id"] / "mark").exists())
    assert kept == ["single-right_seed0", "w0.5-0.5_seed0"]
    recs = {r["id"]: r for r in _index(out)["runs"]}
    assert recs["single-left_seed0"]["weights"] == {"left": 1.0}
    assert [recs[i]["attempts"] for i in sorted(recs)] == [2, 1, 1]


def test_multidomain_baseline_trains_on_its_domain_only(tmp_path):
    # DomainDigits draws other samples of a domain loaded alone: the sweep pins `domains` to the
    # sweep's tasks, so the baseline keeps exactly the joint runs' samples of its domain
    cfg = _cfg({"p": [0.5], "baselines": True}, dataset="domain_digits",
               dataset_options={"sizes": 32}, tasks=["original", "rotated"],
               batch_size=32)  # fmt: skip
    out = tmp_path / "d"
    df = run_sweep(cfg, out, progress=False).set_index("id")
    assert (df["status"] == "done").all()
    joint = load_run(out / "w0.5-0.5_seed0").meta
    dev = torch.device("cpu")

    def data(meta: dict) -> object:
        c = meta["config"]
        return load_train_data(c["dataset"], c["dataset_options"], c["tasks"], c["seed"], dev)

    joint_data = data(joint)
    for k, dom in enumerate(("original", "rotated")):
        meta = load_run(out / f"single-{dom}_seed0").meta
        assert meta["tasks"] == [dom]
        assert meta["dataset"]["options"]["domains"] == ["original", "rotated"]
        assert meta["dataset"]["domain_counts"]["train"] == {dom: 32}
        one = data(meta)
        for split in ("train", "val", "test"):
            mask = joint_data.splits[split].Y["domain"] == k
            assert torch.equal(one.splits[split].X, joint_data.splits[split].X[mask])
            assert torch.equal(one.splits[split].Y["label"],
                               joint_data.splits[split].Y["label"][mask])  # fmt: skip
        assert set(df.loc[f"single-{dom}_seed0", ["val", "test"]].notna()) == {True}


def test_broken_runs_are_redone_and_only_they(tmp_path):
    cfg = _cfg({"p": [0.2, 0.5, 0.8]})
    out = tmp_path / "s"
    df = run_sweep(cfg, out, progress=False)
    assert df["status"].tolist() == ["done"] * 3
    assert df["metric"].tolist() == ["accuracy"] * 3
    assert df["val"].between(0, 1).all()
    before = _created(out)
    ids = df["id"].tolist()
    # a run left "running" by a killed driver, and a "done" run whose final eval is missing
    idx = _index(out)
    idx["runs"][0]["status"] = "running"
    (out / "index.json").write_text(json.dumps(idx))
    for chunk in (out / ids[1] / "evals").iterdir():
        chunk.unlink()
    df2 = run_sweep(cfg, out, progress=False)
    assert df2["status"].tolist() == ["done"] * 3
    after = _created(out)
    assert after[ids[2]] == before[ids[2]]
    assert after[ids[0]] >= before[ids[0]]
    assert after[ids[1]] >= before[ids[1]]
    assert [r["attempts"] for r in _index(out)["runs"]] == [2, 2, 1]
    # a different plan in the same directory is refused
    with pytest.raises(GradlensError, match=r"holds a different sweep: its \[sweep\] differ"):
        run_sweep(_cfg({"p": [0.3]}), out, progress=False)


def test_a_failing_run_is_recorded_and_retried(tmp_path, monkeypatch):
    real = sweep_mod._train_trial

    def flaky(train: dict, run_dir: str, yes: bool = False, checkpoint: str | None = None) -> dict:
        if train["weights"]["left"] == 0.5:
            raise RuntimeError("boom")
        return real(train, run_dir, yes, checkpoint)

    monkeypatch.setattr(sweep_mod, "_train_trial", flaky)
    out = tmp_path / "s"
    df = run_sweep(_cfg({"p": [0.5, 0.9]}), out, progress=False)
    assert df["status"].tolist() == ["failed", "done"]
    assert df["error"].iloc[0] == "RuntimeError: boom"
    monkeypatch.setattr(sweep_mod, "_train_trial", real)
    df = run_sweep(_cfg({"p": [0.5, 0.9]}), out, progress=False)
    assert df["status"].tolist() == ["done", "done"]
    assert [r["attempts"] for r in _index(out)["runs"]] == [2, 1]


@pytest.mark.slow
def test_sigkill_mid_sweep_then_rerun_gives_every_run_exactly_once(tmp_path):
    cfg = tmp_path / "kill.toml"
    cfg.write_text(EXAMPLE.read_text().replace("p = [0.25, 0.75]", "p = [0.1, 0.3, 0.5, 0.7, 0.9]"))
    out = tmp_path / "out"

    def ready() -> bool:
        try:
            runs = _index(out)["runs"]
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        done = sum(r["status"] == "done" for r in runs)
        return done >= 2 and any(r["status"] == "running" for r in runs)

    kill_when(["sweep", str(cfg), "--out", str(out), "--workers", "1", "--no-progress"], ready)
    runs = _index(out)["runs"]
    statuses = [r["status"] for r in runs]
    assert 2 <= statuses.count("done") < len(runs)
    assert "running" in statuses
    with pytest.warns(GradlensWarning, match="Resuming the sweep"):
        df = run_sweep(load_config(cfg), out, progress=False)
    plan = [r.id for r in plan_sweep(load_config(cfg), ("left", "right"))]
    assert df["id"].tolist() == plan
    assert (df["status"] == "done").all()
    idx = _index(out)
    assert [r["id"] for r in idx["runs"]] == plan
    assert sorted(p.name for p in out.iterdir()) == sorted([*plan, "index.json"])
    table = load_runs(out)
    assert sorted(table["run_id"]) == sorted(plan)
    for rid in plan:
        run = load_run(out / rid)
        assert (run.evals["point"] == "final").sum() > 0
        assert run.meta["epochs_run"] == 1


@pytest.mark.slow
def test_sweep_on_a_local_process_pool(tmp_path):
    sweep = {"p": [0.2, 0.8], "seeds": [0, 1]}
    df = run_sweep(_cfg(sweep, workers=2, **PINNED), tmp_path, progress=False)
    assert (df["status"] == "done").all()
    assert len(df) == 4
    serial = run_sweep(_cfg(sweep, **PINNED), tmp_path / "b", progress=False)
    # the same trial function in another process gives the same numbers
    np.testing.assert_allclose(df["val"], serial["val"], rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_on_ray_local(tmp_path, capsys):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    example = tmp_path / "sweep.toml"
    example.write_text(pinned_toml(EXAMPLE.read_text()))
    argv = ["sweep", str(example), "--out", str(out), "--executor", "ray", "--workers", "2",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    sys.stderr.write(capsys.readouterr().out)
    assert all(r["status"] == "done" for r in _index(out)["runs"])
    run_sweep(load_config(example), tmp_path / "local", progress=False)
    ray_rows = {r["id"]: r["final"] for r in _index(out)["runs"]}
    for rec in _index(tmp_path / "local")["runs"]:
        assert ray_rows[rec["id"]] == rec["final"]


def test_domain_baselines_get_the_joint_runs_steps_per_epoch(tmp_path):
    # a single-domain baseline's split is smaller than the joint one: it is given the joint
    # runs' steps per epoch, so it gets the same compute
    from gradlens.data import load_dataset

    base = {
        "dataset": "domain_digits",
        "batch_size": 64,
        "epochs": 1,
        "dataset_options": {"domains": ["original", "rotated"]},
    }
    steps = sweep_mod._joint_steps(base)
    n = len(load_dataset("domain_digits", "train", seed=0, domains=["original", "rotated"]))
    assert steps == n // 64
    run = sweep_mod.PlannedRun(
        "single-rotated", {"rotated": 1.0}, None, None, 0, baseline_of="rotated"
    )
    d = run.train_dict(base, "s", steps)
    assert d["steps_per_epoch"] == steps
    joint = sweep_mod.PlannedRun("p0.5", {"original": 0.5, "rotated": 0.5}, None, None, 0)
    assert "steps_per_epoch" not in joint.train_dict(base, "s", steps)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_continues_the_run_from_its_checkpoint(tmp_path):
    """kill -9 of a sweep while its run trains, after its first checkpoint: the rerun keeps
    every step flushed before the kill, continues the run (append mode) and ends with the
    results of an uninterrupted sweep."""
    cfg_path = tmp_path / "kill.toml"
    cfg_path.write_text(
        "[train]\n"
        'dataset = "synthetic"\n'
        "dataset_options = { n = 2000, angle = 120.0 }\n"
        'model = "mlp"\nwidth = 0.05\ndepth = 1\noptimizer = "sgd"\nlr = 0.05\n'
        "batch_size = 50\nepochs = 40\nevery = 1\n"
        'engine = "gramian"\n'  # compared with a run in another process (tests/_auto.py)
        "[sweep]\np = [0.3]\n"
        '[executor]\nkind = "local"\nworkers = 1\n'
    )
    out = tmp_path / "out"
    rid = "w0.3-0.7_seed0"
    ckpt = out / "checkpoints" / f"{rid}.pt"
    first_seen: list[float] = []

    def ready() -> bool:  # 0.3 s after the first checkpoint: into the following epochs
        if not first_seen and ckpt.is_file():
            first_seen.append(time.monotonic())
        return bool(first_seen) and time.monotonic() - first_seen[0] > 0.3

    kill_when(["sweep", str(cfg_path), "--out", str(out), "--no-progress"], ready)
    assert _index(out)["runs"][0]["status"] == "running"
    assert ckpt.is_file()
    with warnings.catch_warnings():  # the run's writer died: reading it may warn
        warnings.simplefilter("ignore", GradlensWarning)
        flushed = load_run(out / rid).probed_steps.tolist()
    assert flushed, "nothing was flushed before the kill"
    with pytest.warns(GradlensWarning, match="Resuming the sweep"):
        df = run_sweep(load_config(cfg_path), out, progress=False)
    assert df["status"].tolist() == ["done"]
    assert sorted(p.name for p in out.iterdir()) == sorted([rid, "index.json"])
    straight = run_sweep(load_config(cfg_path), tmp_path / "straight", progress=False)
    np.testing.assert_allclose(df[["val", "test"]], straight[["val", "test"]], rtol=1e-10)
    run = load_run(out / rid, strict=True)
    ref = load_run(tmp_path / "straight" / rid, strict=True)
    assert set(flushed) <= set(run.probed_steps.tolist())  # nothing flushed was lost
    assert len(run.meta["resumes"]) == 1
    assert run.meta["resumes"][0]["after_step"] >= flushed[-1]
    assert 0 < run.meta["resumes"][0]["after_step"] < ref.probed_steps[-1]  # mid-training
    np.testing.assert_array_equal(run.probed_steps, ref.probed_steps)
    torch.testing.assert_close(run.all_grams(), ref.all_grams(), rtol=1e-10, atol=1e-14)
    assert run.meta["epochs_run"] == ref.meta["epochs_run"] == 40
