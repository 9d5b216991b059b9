"""The ``auto`` engine: every probe exact whichever candidate serves it; the choice is kept per
graph shape, recorded in the Snapshot, the run's meta and ``repr(prof)``."""

from __future__ import annotations

import pytest
import torch

import gradlens as gl
from gradlens.engines import gramian as gramian_mod
from gradlens.engines.auto import CANDIDATES, MAX_ROUNDS
from gradlens.store import load_run
from gradlens.testing import reference_grams
from tests.zoo import ZOO, assert_gram_close, build, task_losses


@pytest.mark.parametrize(
    "model", ["mlp", "cnn_bn", pytest.param("transformer", marks=pytest.mark.slow)]
)  # transformers in the fast suite: tests/engines/test_zoo_hf.py (BERT, GPT-2...)
def test_auto_is_exact_on_every_probe_and_settles(model, tmp_path, monkeypatch):
    if model == "cnn_bn":  # every segment "large": the gramian default loops them on CPU
        monkeypatch.setattr(gramian_mod, "LOOP_ABOVE", 0)
    trunk, heads, x, ys = build(model, 3)
    w = {"t0": 0.2, "t1": 0.5, "t2": 0.3}
    params = list(trunk.parameters()) + list(heads.parameters())
    used = []
    with gl.Profiler(trunk, list(w), store=tmp_path / "run") as prof:
        assert prof.engine == "auto"
        # at most MAX_ROUNDS rounds of every candidate (4 on CPU), then two probes of the winner
        settled = 0
        for _ in range(MAX_ROUNDS * 4 + 2):
            settled += prof._engine.describe() != "timing"
            if settled > 2:
                break
            losses = task_losses(trunk, heads, x, ys)
            ref = reference_grams(losses, trunk)
            plain = torch.autograd.grad(
                sum(w[t] * v for t, v in losses.items()), params, retain_graph=True
            )
            snap = prof.backward(losses, w)
            assert_gram_close(snap.gram, ref.gram, 1e-10)
            assert list(snap.layer_grams) == list(ref.layer_grams) == list(prof.layers)
            for layer, g in ref.layer_grams.items():
                assert_gram_close(snap.layer_grams[layer], g, 1e-10)
            for p, g in zip(params, plain):
                torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
                p.grad = None
            used.append(snap.engine)
            assert set(snap.timings) <= {*(c.name for c in CANDIDATES), "gramian-vmap"}
        assert settled > 2
        chosen = prof._engine.describe()
        assert f"chose={chosen!r}" in repr(prof)
    # round 1 times every candidate, loop first (on CPU the gramian engine with each of its
    # second stages, unless its default vmaps every segment already: small blocks); then the
    # winner serves every probe
    assert used[:3] == ["loop", "batched", "gramian"]
    if model != "cnn_bn":
        assert snap.timings["gramian-vmap"] == snap.timings["gramian"]
    else:
        assert used[3] == "gramian"
    assert used[-1] == chosen.removesuffix("-vmap")
    assert snap.timings[chosen] == min(snap.timings.values())
    meta = load_run(tmp_path / "run").meta
    assert meta["engine"] == "auto"
    (decision,) = meta["auto"]
    assert decision["winner"] == chosen
    assert decision["tasks"] == 3
    assert decision["seconds"] == pytest.approx(snap.timings)


def test_auto_decides_anew_for_a_new_batch_shape():
    trunk, heads, x, ys = build("mlp", 2, batch=6)
    with gl.Profiler(trunk, ["t0", "t1"]) as prof:
        while prof._engine.describe() == "timing":
            prof.backward(task_losses(trunk, heads, x, ys))
        assert len(prof._engine.decisions) == 1
        small_x, small_y = x[:3], ys[:, :3]
        losses = task_losses(trunk, heads, small_x, small_y)
        ref = reference_grams(losses, trunk)
        snap = prof.backward(losses)
        assert len(prof._engine.decisions) == 2
        assert snap.engine == "loop"  # a new shape starts round 1 again
        assert_gram_close(snap.gram, ref.gram, 1e-10)
        # the first shape's decision is kept
        snap = prof.backward(task_losses(trunk, heads, x, ys))
        first = next(iter(prof._engine.decisions.values()))
        assert snap.engine == first.winner.removesuffix("-vmap")


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_auto_with_a_compiled_trunk_times_loop_only():
    trunk, _, _, _ = build("mlp", 2)
    trunk.compile()  # the vmap engines cannot run through it
    with gl.Profiler(trunk, ["t0", "t1"]) as prof:
        assert list(prof._engine.candidates) == ["loop"]
    with gl.Profiler(build("mlp", 2)[0], ["t0", "t1"]) as prof:
        assert list(prof._engine.candidates) == ["loop", "batched", "gramian"]


@pytest.mark.parametrize("stage", ["vmap", "looped"])
@pytest.mark.parametrize("model", sorted(ZOO))
def test_gramian_second_stage_either_way_is_exact(model, stage):
    trunk, heads, x, ys = build(model, 3)
    w = {"t0": 0.2, "t1": 0.5, "t2": 0.3}
    params = [p for p in [*trunk.parameters(), *heads.parameters()] if p.requires_grad]
    torch.manual_seed(1)
    losses = task_losses(trunk, heads, x, ys)  # dropout masks of this seed
    plain = torch.autograd.grad(sum(w[t] * v for t, v in losses.items()), params, allow_unused=True)
    with gl.Profiler(trunk, list(w), engine="gramian") as prof:
        prof._engine.stage = stage
        torch.manual_seed(1)
        losses = task_losses(trunk, heads, x, ys)
        ref = reference_grams(losses, trunk)
        snap = prof.backward(losses, w)
    assert_gram_close(snap.gram, ref.gram, 1e-10)
    for layer, g in ref.layer_grams.items():
        assert_gram_close(snap.layer_grams[layer], g, 1e-10)
    for p, g in zip(params, plain):
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("winner", ["batched", "gramian-vmap"])
def test_recording_hooks_run_only_when_their_engine_may_serve(winner):
    trunk, heads, x, ys = build("mlp", 2)
    with gl.Profiler(trunk, ["t0", "t1"]) as prof:
        auto = prof._engine
        gramian = auto.candidates["gramian"]
        assert not gramian._recording  # the first probe of a new shape is timed on loop
        seen = []
        while auto.describe() == "timing":
            recording = gramian._recording  # during this probe's forward
            snap = prof.backward(task_losses(trunk, heads, x, ys))
            seen.append((snap.engine, recording))
        # on for the forward of every probe that gramian serves, off for the others
        assert seen[:3] == [("loop", False), ("batched", False), ("gramian", True)]
        assert all(rec == (engine == "gramian") for engine, rec in seen)
        (decision,) = auto.decisions.values()
        decision.winner = winner  # as if timed so
        prof._engine.set_recording(True)
        assert gramian._recording == (winner == "gramian-vmap")
        # a new shape is timed from its first candidate, exact, and gramian's turn recorded
        small_x, small_y = x[:3], ys[:, :3]
        for expect in ["loop", "batched", "gramian"]:
            losses = task_losses(trunk, heads, small_x, small_y)
            ref = reference_grams(losses, trunk)
            snap = prof.backward(losses)
            assert snap.engine == expect
            assert "forward-not-recorded" not in snap.notes
            assert_gram_close(snap.gram, ref.gram, 1e-10)


def test_candidates_that_lost_free_their_buffers():
    trunk, heads, x, ys = build("mlp", 3)
    with gl.Profiler(trunk, ["t0", "t1", "t2"]) as prof:
        auto = prof._engine
        loop = auto.candidates["loop"]
        prof.backward(task_losses(trunk, heads, x, ys))
        assert loop._workspace._bufs  # its T x P buffer, kept for its next probe
        while auto.describe() == "timing":
            prof.backward(task_losses(trunk, heads, x, ys))
        (decision,) = auto.decisions.values()
        assert bool(loop._workspace._bufs) == (decision.winner == "loop")
        assert not auto.candidates["batched"]._workspace._bufs or decision.winner == "batched"


def test_restored_decisions_switch_the_recording_hooks_before_the_next_forward():
    trunk, heads, x, ys = build("mlp", 2)
    with gl.Profiler(trunk, ["t0", "t1"]) as prof:
        while prof._engine.describe() == "timing":
            prof.backward(task_losses(trunk, heads, x, ys))
        (decision,) = prof._engine.decisions.values()
        decision.winner = "gramian"
        state = prof._engine.state_dict()
    with gl.Profiler(trunk, ["t0", "t1"]) as prof:
        gramian = prof._engine.candidates["gramian"]
        assert not gramian._recording  # a fresh auto times loop first
        prof._engine.load_state_dict(state)
        assert gramian._recording  # the restored winner records its forward
        losses = task_losses(trunk, heads, x, ys)
        ref = reference_grams(losses, trunk)
        snap = prof.backward(losses)
    assert snap.engine == "gramian"
    assert "forward-not-recorded" not in snap.notes
    assert_gram_close(snap.gram, ref.gram, 1e-10)
