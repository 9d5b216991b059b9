"""``auto``'s decision rule: interleaved rounds, the candidates still close timed again, a
first probe's one-time costs left out; driven by set times (no clock is read)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

import gradlens as gl
from gradlens.engines.auto import CLOSE, MARGIN, MAX_ROUNDS, Decision
from tests._auto import fake_costs
from tests.zoo import assert_gram_close, build, task_losses

ORDER = ["loop", "batched", "gramian"]


def decide(times: Mapping[str, Sequence[float]]) -> tuple[list[str], str]:
    """Run the rule on each candidate's successive probe times: the timed sequence, the winner."""
    d = Decision()
    seq: list[str] = []
    while (name := d.next_candidate(ORDER)) is not None:
        d.times.setdefault(name, []).append(times[name][len(d.times.get(name, []))])
        seq.append(name)
    return seq, d.pick()


def test_rounds_are_interleaved_and_go_on_while_candidates_are_close():
    seq, winner = decide({
        "loop": [10.0],  # more than CLOSE x the best first probe: out after round 1
        "batched": [2.0, 1.0, 1.02, 0.99, 1.0],
        "gramian": [2.2, 1.05, 1.0, 1.03, 1.0],
    })  # fmt: skip
    assert CLOSE * 2.0 < 10.0
    assert seq == ["loop", "batched", "gramian", *["batched", "gramian"] * (MAX_ROUNDS - 1)]
    assert winner == "batched"  # 0.99 against 1.0


def test_a_clear_leader_ends_the_timing_after_round_two():
    seq, winner = decide({"loop": [3.0, 1.4], "batched": [2.0, 1.0], "gramian": [2.2, 1.5]})
    assert MARGIN * 1.0 < 1.4
    assert seq == ORDER * 2
    assert winner == "batched"


def test_a_first_probe_with_one_time_costs_does_not_decide():
    # measured (ResNet, T = 3): loop's first probe 39 ms, its next ones 12 ms; batched 21, 13.5
    seq, winner = decide({"loop": [39.0, 12.0], "batched": [21.0, 13.5], "gramian": [70.0]})
    assert 39.0 > 1.5 * 21.0  # the rule before: loop out after round 1, batched chosen
    assert seq == ["loop", "batched", "gramian", "loop", "batched"]
    assert winner == "loop"


def test_one_slow_probe_of_the_fastest_does_not_decide():
    seq, winner = decide({
        "loop": [9.0, 7.0, 10.5, 7.1, 7.0],
        "batched": [9.0, 7.5, 7.6, 7.4, 7.5],
        "gramian": [12.0, 10.0],
    })  # fmt: skip
    assert seq[:5] == ["loop", "batched", "gramian", "loop", "batched"]
    assert winner == "loop"


def test_probes_are_bounded_when_every_candidate_ties():
    seq, _ = decide(dict.fromkeys(ORDER, [1.0] * MAX_ROUNDS))
    assert seq == ORDER * MAX_ROUNDS


def test_best_leaves_out_the_first_probe():
    d = Decision({"loop": [3.0, 1.2, 1.1], "batched": [0.5]})
    assert d.best() == {"loop": 1.1, "batched": 0.5}
    assert d.pick() == "batched"


def _engines(prof: gl.Profiler, trunk, heads, x, ys, n: int) -> list[str]:
    out = []
    for _ in range(n):
        losses = task_losses(trunk, heads, x, ys)
        snap = prof.backward(losses)
        out.append(snap.engine)
    return out


def test_a_decision_restored_mid_rounds_goes_on_as_the_uninterrupted_one(monkeypatch):
    # within MARGIN of each other: every round is timed; the MLP's gramian default vmaps every
    # segment, so "gramian" and "gramian-vmap" are one run, timed once per round
    calls = fake_costs(
        monkeypatch, {"loop": 1.05, "batched": 1.0, "gramian": 1.02, "gramian-vmap": 1.3}
    )
    trunk, heads, x, ys = build("mlp", 2)
    n = 3 * MAX_ROUNDS + 2
    with gl.Profiler(trunk, ["t0", "t1"]) as prof:
        want = _engines(prof, trunk, heads, x, ys, n)
        (want_d,) = prof._engine.decisions.values()
    assert want[: 3 * MAX_ROUNDS] == ["loop", "batched", "gramian"] * MAX_ROUNDS
    assert want[-2:] == ["batched", "batched"]
    assert calls["gramian-vmap"] == 0
    for cut in (2, 4, 7):
        with gl.Profiler(trunk, ["t0", "t1"]) as prof:
            got = _engines(prof, trunk, heads, x, ys, cut)
            state = prof._engine.state_dict()
        with gl.Profiler(trunk, ["t0", "t1"]) as prof:
            prof._engine.load_state_dict(state)
            got += _engines(prof, trunk, heads, x, ys, n - cut)
            (got_d,) = prof._engine.decisions.values()
        assert got == want
        assert got_d.times == {k: pytest.approx(v) for k, v in want_d.times.items()}
        assert got_d.winner == want_d.winner == "batched"
    assert calls["gramian-vmap"] == 0


def test_every_probe_of_the_rounds_is_exact(monkeypatch):
    fake_costs(monkeypatch, {"loop": 1.05, "batched": 1.0, "gramian": 1.02, "gramian-vmap": 1.03})
    trunk, heads, x, ys = build("cnn_bn", 2)
    with gl.Profiler(trunk, ["t0", "t1"]) as prof:
        while prof._engine.describe() == "timing":
            losses = task_losses(trunk, heads, x, ys)
            ref = gl.testing.reference_grams(losses, trunk)
            snap = prof.backward(losses)
            assert_gram_close(snap.gram, ref.gram, 1e-10)
