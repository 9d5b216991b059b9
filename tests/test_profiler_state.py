"""``Profiler.state_dict`` / ``load_state_dict``: a custom training loop resumed from a checkpoint
goes on as the uninterrupted one (step and schedule, held weights, ``auto``'s decisions), and a
state that does not fit is refused before anything changes."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import gradlens as gl
from gradlens.weightings import make_weighting
from tests._auto import fake_costs, force_auto

TASKS = ["t0", "t1", "t2"]


def _model():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    heads = nn.ModuleList([nn.Linear(5, 1) for _ in TASKS]).double()
    return trunk, heads


def _losses(trunk, heads, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, dtype=torch.float64, generator=g)
    z = trunk(x)
    return {t: (h(z) ** 2).mean() for t, h in zip(TASKS, heads)}


def _run(prof, trunk, heads, steps, weights=None):
    """Snapshots (None when unprobed) and the shared gradients of each step."""
    out = []
    for step in steps:
        for m in (trunk, heads):
            m.zero_grad(set_to_none=True)
        snap = prof.backward(_losses(trunk, heads, step), weights=weights)
        out.append((snap, [p.grad.clone() for p in trunk.parameters()]))
    return out


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # only tensors, dicts, lists, numbers, strings


def _same(a, b):
    for (sa, ga), (sb, gb) in zip(a, b, strict=True):
        assert (sa is None) == (sb is None)
        if sa is not None:
            assert sa.step == sb.step
            assert sa.engine == sb.engine
            torch.testing.assert_close(sa.gram, sb.gram, rtol=0.0, atol=0.0)
        for x, y in zip(ga, gb, strict=True):
            torch.testing.assert_close(x, y, rtol=0.0, atol=0.0)


def test_a_resumed_loop_goes_on_as_the_uninterrupted_one(monkeypatch):
    """auto decides on ``loop`` (fake clock); the resumed profiler would pick ``batched`` if it
    timed again. Held weights of a Gram weighting at every=3 carry over too."""
    # the others beyond CLOSE (3x) of loop: decided after round 1, within the 4 probes before
    # the checkpoint
    costs = {"loop": 1.0, "batched": 4.0, "gramian": 5.0, "gramian-vmap": 5.0}
    fake_costs(monkeypatch, costs)
    mgda = make_weighting("mgda", TASKS)
    trunk, heads = _model()
    with gl.Profiler(trunk, TASKS, every=3) as prof:
        straight = _run(prof, trunk, heads, range(20), mgda)
    trunk, heads = _model()
    with gl.Profiler(trunk, TASKS, every=3) as prof:
        first = _run(prof, trunk, heads, range(10), mgda)
        state = _roundtrip(prof.state_dict())
    assert state["step"] == 10
    assert state["held"] is not None
    assert [d["winner"] for d in state["auto"]["decisions"]] == ["loop"]
    calls = force_auto(monkeypatch, "batched")  # what a fresh timing would choose now
    with gl.Profiler(trunk, TASKS, every=3) as resumed:
        resumed.load_state_dict(state)
        rest = _run(resumed, trunk, heads, range(10, 20), mgda)
    assert calls["batched"] == calls["gramian"] == 0
    assert calls["loop"] == 3  # steps 12, 15 and 18: the schedule goes on
    _same(first + rest, straight)


def test_a_state_that_does_not_fit_is_refused_and_changes_nothing():
    trunk, heads = _model()
    with gl.Profiler(trunk, TASKS, engine="gramian") as prof:
        _run(prof, trunk, heads, range(2))
        good = prof.state_dict()
    with gl.Profiler(trunk, TASKS, every=2) as prof:
        _run(prof, trunk, heads, range(3))
        before = prof.state_dict()
        bad = [
            ({**good, "tasks": ["a", "b", "c"]}, r"saved for tasks \['a', 'b', 'c'\]"),
            ({**good, "format": 7}, r"Profiler.state_dict\(\) \(format 1\); found format 7"),
            ([1, 2], r"found list"),
            ({k: v for k, v in good.items() if k != "held"}, r"missing \['held'\]"),
            ({**good, "step": -1}, r"`state\['step'\]` should be an integer >= 0; found -1"),
            ({**good, "held": {"total": torch.ones(2), "layers": {}}}, r"shape \(3,\)"),
            ({**good, "held": 3}, r"`state\['held'\]` should be None or"),
            ({**good, "auto": {"format": 1, "decisions": [{}]}}, r"AutoEngine.state_dict"),
        ]
        for state, match in bad:
            with pytest.raises(gl.GradlensError, match=match):
                prof.load_state_dict(state)
            after = prof.state_dict()
            assert after["step"] == before["step"] == 3
            assert after["auto"] == before["auto"]


def test_auto_warns_when_the_state_holds_no_decisions():
    trunk, heads = _model()
    with gl.Profiler(trunk, TASKS, engine="loop") as prof:
        _run(prof, trunk, heads, range(2))
        state = prof.state_dict()
    assert state["auto"] is None
    with gl.Profiler(trunk, TASKS) as prof:
        with pytest.warns(gl.GradlensWarning, match=r"saved by engine='loop'.*times its") as w:
            prof.load_state_dict(state)
        assert w[0].filename == __file__
        assert prof.step == 2
        assert prof.backward(_losses(trunk, heads, 2)).step == 2
    with gl.Profiler(trunk, TASKS, engine="batched") as prof:  # a named engine: nothing to load
        prof.load_state_dict(state)
        assert prof.state_dict()["auto"] is None


def test_setting_the_step_moves_the_schedule_and_the_recording():
    """``prof.step = n`` continues a run at step n: the next call is probed as step n would
    be, and an engine that records the forward (gramian) records that step's forward."""
    trunk, heads = _model()
    with gl.Profiler(trunk, TASKS, engine="gramian", every=lambda s: s == 7) as prof:
        with pytest.raises(gl.GradlensError, match=r"`step` should be"):
            prof.step = -1
        assert prof.step == 0
        prof.step = 7  # probed, where step 0 is not: the coming forward must be recorded
        snap = prof.backward(_losses(trunk, heads, 7))
        assert snap.step == 7
        assert "forward-not-recorded" not in snap.notes
        assert set(snap.rules.values()) == {"linear"}
        assert prof.backward(_losses(trunk, heads, 8)) is None


def test_a_closed_profiler_refuses_a_state():
    trunk, heads = _model()
    prof = gl.Profiler(trunk, TASKS, engine="loop")
    state = prof.state_dict()
    prof.close()
    with pytest.raises(gl.GradlensError, match="closed Profiler"):
        prof.load_state_dict(state)


@pytest.mark.parametrize("engine", ["auto", "gramian"])
def test_a_refused_store_leaves_no_hook_on_the_model(tmp_path, engine):
    trunk, heads = _model()
    gl.Profiler(trunk, TASKS, store=tmp_path / "run").close()
    with pytest.raises(gl.StoreError, match="already holds a run"):
        gl.Profiler(trunk, TASKS, engine=engine, store=tmp_path / "run")
    assert all(not m._forward_hooks for m in trunk.modules())


def test_a_resumed_loop_cuts_its_run_store_back_to_the_checkpoint(tmp_path):
    """A crash after the checkpoint at step 6 left probes 6 and 8 flushed in the run; the
    resumed loop reopens the run to append and loads the state: the store is cut back to step
    6, and the resumed probes 6, 8, ... are stored (it failed with 'snap.step should increase
    strictly' at every probe up to the crashed run's last one before)."""
    from gradlens.store import RunWriter, load_run

    trunk, heads = _model()
    run = tmp_path / "run"
    prof = gl.Profiler(trunk, TASKS, engine="loop", every=2, store=run)
    _run(prof, trunk, heads, range(6))
    state = _roundtrip(prof.state_dict())
    _run(prof, trunk, heads, range(6, 9))  # steps 6 and 8 probed and flushed, then a crash
    prof.close()  # (its writer's lock released, as a killed process's is taken over)
    assert list(load_run(run).probed_steps) == [0, 2, 4, 6, 8]
    writer = RunWriter(run, append=True)
    with gl.Profiler(trunk, TASKS, engine="loop", every=2, store=writer) as resumed:
        resumed.load_state_dict(state)
        assert list(load_run(run).probed_steps) == [0, 2, 4]
        _run(resumed, trunk, heads, range(6, 11))
    assert list(load_run(run).probed_steps) == [0, 2, 4, 6, 8, 10]
