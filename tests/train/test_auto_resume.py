"""The ``auto`` engine in training runs: the default, and its decisions checkpointed so that a
resumed run serves its probes with the interrupted run's engines, not freshly timed ones."""

from __future__ import annotations

import pytest
import torch

import gradlens.train.run as run_module
from gradlens import GradlensError, GradlensWarning, load_run
from gradlens.engines.auto import AutoEngine
from gradlens.train import TrainConfig, Trainer, train
from tests._auto import force_auto
from tests._tiny import SYNTH

pytestmark = pytest.mark.usefixtures("one_thread")

# 4 steps an epoch, every one probed: auto decides on steps 0-3 (4 candidates on CPU, or 3 when
# the gramian engine's default second stage vmaps already), before the epoch-2 checkpoint
CFG = {**SYNTH, "epochs": 4}


def _interrupted(monkeypatch: pytest.MonkeyPatch, out, ckpt, at_epoch: int = 2) -> None:
    """``train(checkpoint=ckpt)`` killed right after its checkpoint of epoch ``at_epoch``."""
    real = run_module._save_checkpoint

    def dying(trainer, stopper, path):  # type: ignore[no-untyped-def]
        real(trainer, stopper, path)
        if trainer.epoch == at_epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "_save_checkpoint", dying)
    with pytest.raises(KeyboardInterrupt):
        train(CFG, out, progress=False, checkpoint=ckpt)
    monkeypatch.setattr(run_module, "_save_checkpoint", real)


def test_auto_is_the_default_engine_and_the_run_records_its_choice(tmp_path, monkeypatch):
    assert TrainConfig().engine == "auto"
    assert TrainConfig.from_dict({}).engine == "auto"
    force_auto(monkeypatch, "batched")
    train({**SYNTH, "epochs": 2}, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    assert run.meta["engine"] == "auto"
    assert run.meta["config"]["engine"] == "auto"
    (decision,) = run.meta["auto"]
    assert decision["winner"] == "batched"
    engines = run.probes["engine"].tolist()
    assert engines[:3] == ["loop", "batched", "gramian"]  # the timing round
    assert set(engines[4:]) == {"batched"}  # then the winner serves every probe


def test_a_resumed_run_uses_the_checkpointed_decision_not_a_fresh_one(tmp_path, monkeypatch):
    """The interrupted run's timing picks ``loop``; the resumed process would pick ``batched``
    if it timed again (its fake clock says so). It does not time: it serves every probe with
    ``loop``, and its steps, Grams and evals are the uninterrupted run's."""
    force_auto(monkeypatch, "loop")
    train(CFG, tmp_path / "straight", progress=False)
    ckpt = tmp_path / "run.pt"
    _interrupted(monkeypatch, tmp_path / "resumed", ckpt)
    saved = torch.load(ckpt, weights_only=True)["trainer"]["profiler"]["auto"]
    assert [d["winner"] for d in saved["decisions"]] == ["loop"]
    calls = force_auto(monkeypatch, "batched")  # what a fresh timing would choose now
    train(CFG, tmp_path / "resumed", progress=False, checkpoint=ckpt)
    assert calls["batched"] == calls["gramian"] == calls["gramian-vmap"] == 0
    a, b = load_run(tmp_path / "resumed", strict=True), load_run(tmp_path / "straight")
    steps = b.meta["steps_run"]
    assert steps == 16
    assert calls["loop"] == steps // 2  # epochs 3 and 4, every step probed
    assert a.probes["engine"].tolist() == b.probes["engine"].tolist()
    assert a.meta["auto"] == b.meta["auto"]
    assert a.probed_steps.tolist() == b.probed_steps.tolist() == list(range(steps))
    # the same engines on the same inputs: equal to the last bit on one thread
    torch.testing.assert_close(a.all_grams(), b.all_grams(), rtol=0.0, atol=0.0)
    assert a.evals["value"].tolist() == b.evals["value"].tolist()


def test_a_checkpoint_without_auto_decisions_resumes_and_auto_decides_anew(
    tmp_path, monkeypatch
):
    """A checkpoint of an older gradlens (no ``profiler`` entry) still resumes; auto times its
    candidates again, with a warning that says why the numbers may then differ."""
    force_auto(monkeypatch, "loop")
    ckpt = tmp_path / "run.pt"
    _interrupted(monkeypatch, tmp_path / "run", ckpt)
    state = torch.load(ckpt, weights_only=True)
    del state["trainer"]["profiler"]
    torch.save(state, ckpt)
    calls = force_auto(monkeypatch, "batched")
    with pytest.warns(GradlensWarning, match=r"no decisions of the `auto` engine.*times its"):
        res = train(CFG, tmp_path / "run", progress=False, checkpoint=ckpt)
    assert res.epochs_run == 4
    assert calls["loop"] == calls["gramian"] == 1  # timed again
    run = load_run(tmp_path / "run", strict=True)
    assert run.probes["engine"].tolist()[-1] == "batched"
    assert [d["winner"] for d in run.meta["auto"]] == ["batched"]  # the resumed run's choice


def test_trainer_state_round_trips_the_decisions_and_refuses_a_bad_one(monkeypatch):
    force_auto(monkeypatch, "gramian")
    with Trainer({**SYNTH, "epochs": 2}, progress=False) as t:
        t.fit_epochs(2)
        state = t.state_dict()
        assert isinstance(t.profiler._engine, AutoEngine)
        assert t.profiler._engine.describe() == "gramian"
    with Trainer({**SYNTH, "epochs": 2}, progress=False) as u:
        u.load_state_dict(state)
        engine = u.profiler._engine
        assert isinstance(engine, AutoEngine)
        assert engine.state_dict() == state["profiler"]["auto"]
        with pytest.raises(GradlensError, match=r"`state` should be an AutoEngine.state_dict"):
            engine.load_state_dict({"format": 1, "decisions": [{"shapes": []}]})
        assert engine.state_dict() == state["profiler"]["auto"]  # unchanged
    with Trainer({**SYNTH, "engine": "gramian"}, progress=False) as g:
        assert g.state_dict()["profiler"]["auto"] is None
        g.load_state_dict(state)  # a named engine ignores auto's decisions


def test_a_refused_trainer_state_changes_nothing(monkeypatch):
    """The profiler's part is checked after the model's and optimizer's are loaded: when it is
    refused, the trainer is put back as it was (a failed call changes nothing)."""
    force_auto(monkeypatch, "loop")
    with Trainer({**SYNTH, "epochs": 2}, progress=False) as t:
        t.fit_epochs(1)
        state = t.state_dict()
    state["profiler"]["held"] = {"total": torch.ones(5), "layers": {}}  # not T weights
    with Trainer({**SYNTH, "epochs": 2, "seed": 1}, progress=False) as u:
        before = u.state_dict()
        with pytest.raises(GradlensError, match=r"shape \(2,\)"):
            u.load_state_dict(state)
        after = u.state_dict()
        assert after["step"] == before["step"] == 0
        for k, v in before["model"].items():
            assert torch.equal(after["model"][k], v), k
        assert after["profiler"] == before["profiler"]
