"""Graphs a batched (vmap) backward cannot run, though a backward per task can: dropout inside a
non-reentrant activation checkpoint (recomputed under vmap), ``.item()`` or a branch on a value in
a custom Function's backward, anomaly mode. ``auto`` drops the candidates that raise for that
graph shape and serves the same probe with the next one (``loop`` last), exactly; ``batched`` and
``gramian`` called directly raise a GradlensError naming the cause and the fix, writing nothing."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradlens as gl
import gradlens.engines.auto as auto_module
from gradlens.engines._unbatchable import UnbatchableGraphError, cause_of
from gradlens.engines.batched import BatchedEngine
from gradlens.engines.gramian import GramianEngine
from gradlens.engines.loop import LoopEngine
from gradlens.store import load_run
from gradlens.testing import reference_grams
from tests._auto import force_auto
from tests.zoo import assert_gram_close

TASKS = ["a", "b", "c"]
W = {"a": 0.2, "b": 0.5, "c": 0.3}


class CheckpointedDropout(nn.Module):
    """A block with dropout inside a non-reentrant checkpoint: the backward recomputes it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Dropout(0.3))
        self.out = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(checkpoint(self.block, h, use_reentrant=False))


class ItemInBackward(torch.autograd.Function):
    """A data-dependent gradient clip: ``.item()`` in the backward."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        n = g.norm().item()
        return g * (0.5 if n > 1e-3 else 1.0)


class BranchInBackward(torch.autograd.Function):
    """A branch on a gradient's value in the backward."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        return g * 0.5 if g.norm() > 1e-3 else g


class WithFunction(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.fn = fn
        self.inp = nn.Linear(6, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fn.apply(torch.tanh(self.inp(x))))


@contextmanager
def anomaly_mode() -> Iterator[None]:
    """Anomaly mode on, its notices (it warns when switched on, and with the forward's
    traceback when a backward fails) silenced for the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autograd.set_detect_anomaly(True):
            yield


CASES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "checkpointed-dropout": (CheckpointedDropout, "random-op"),
    "item-in-backward": (lambda: WithFunction(ItemInBackward), "item"),
    "branch-in-backward": (lambda: WithFunction(BranchInBackward), "data-dependent"),
    "anomaly-mode": (
        lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8)),
        "anomaly-mode",
    ),
}


def _setup(case: str) -> tuple[nn.Module, nn.ModuleList, str]:
    torch.manual_seed(0)
    make, reason = CASES[case]
    trunk = make().double().train()
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in TASKS]).double()
    return trunk, heads, reason


def _losses(trunk: nn.Module, heads: nn.ModuleList) -> dict[str, torch.Tensor]:
    z = trunk(torch.randn(10, 6, dtype=torch.float64))
    return {t: h(z).pow(2).mean() for t, h in zip(TASKS, heads)}


def _spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the calls of the vmap engines' compute."""
    calls = {"batched": 0, "gramian": 0}
    for cls in (BatchedEngine, GramianEngine):
        real = cls.compute

        def compute(self: object, ctx: object, real: Callable[..., object] = real) -> object:
            calls[self.name] += 1  # type: ignore[attr-defined]  # an engine
            return real(self, ctx)

        monkeypatch.setattr(cls, "compute", compute)
    return calls


@pytest.mark.parametrize("accumulate", [False, True], ids=["fresh", "accumulating"])
@pytest.mark.parametrize("case", list(CASES))
def test_auto_drops_a_candidate_that_cannot_run_the_graph(
    case, accumulate, tmp_path, monkeypatch
):
    trunk, heads, reason = _setup(case)
    params = [*trunk.parameters(), *heads.parameters()]
    calls = _spy(monkeypatch)
    notes, engines, counted = [], [], []
    with anomaly_mode() if case == "anomaly-mode" else warnings.catch_warnings():
        with gl.Profiler(trunk, TASKS, store=tmp_path / "run") as prof:
            for _step in range(5):
                before = [torch.randn_like(p) if accumulate else None for p in params]
                for p, g in zip(params, before):
                    p.grad = None if g is None else g.clone()
                losses = _losses(trunk, heads)
                # the references on the same forward: the checkpoint recomputes the same masks
                ref = reference_grams(losses, trunk)
                plain = torch.autograd.grad(
                    sum(W[t] * v for t, v in losses.items()), params, retain_graph=True
                )
                snap = prof.backward(losses, W)
                assert_gram_close(snap.gram, ref.gram, 1e-10)
                assert list(snap.layer_grams) == list(ref.layer_grams)
                for layer, g in ref.layer_grams.items():
                    assert_gram_close(snap.layer_grams[layer], g, 1e-10)
                for p, g, b in zip(params, plain, before):
                    # the failed candidates' writes undone: nothing counted twice
                    want = g if b is None else b + g
                    torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-14)
                notes.append(snap.notes)
                engines.append(snap.engine)
                counted.append(dict(calls))
            described = repr(prof)
    dropped = [f"auto-dropped:{n}:{reason}" for n in ("batched", "gramian", "gramian-vmap")]
    # probe 0 timed loop; probe 1 tried batched, then gramian, both dropped, and loop served it
    assert engines == ["loop"] * 5
    assert list(notes[1]) == [*dropped, "auto-chose:loop"]
    assert not any("auto-dropped" in n for ns in (notes[0], *notes[2:]) for n in ns)
    # later probes of this graph shape do not retry the dropped candidates
    assert counted[1] == counted[-1] == {"batched": 1, "gramian": 1}
    assert f"chose='loop (dropped batched: {reason}, gramian: {reason}" in described
    (decision,) = load_run(tmp_path / "run").meta["auto"]
    assert decision["winner"] == "loop"
    assert decision["dropped"] == dict.fromkeys(["batched", "gramian", "gramian-vmap"], reason)


@pytest.mark.parametrize("engine", ["batched", "gramian"])
@pytest.mark.parametrize("case", list(CASES))
def test_vmap_engines_name_the_cause_and_write_nothing(case, engine):
    trunk, heads, reason = _setup(case)
    params = [*trunk.parameters(), *heads.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params]
    cause = {
        "random-op": "dropout inside a non-reentrant activation checkpoint",
        "item": r"a backward calls \.item\(\)",
        "data-dependent": "a backward branches on a tensor's value",
        "anomaly-mode": r"anomaly mode \(torch\.autograd\.set_detect_anomaly\(True\)\)",
    }[reason]
    with anomaly_mode() if case == "anomaly-mode" else warnings.catch_warnings():
        with gl.Profiler(trunk, TASKS, engine=engine) as prof:
            losses = _losses(trunk, heads)
            with pytest.raises(gl.GradlensError, match=cause) as err:
                prof.backward(losses, W)
            assert prof.step == 0
            for p, b in zip(params, before):
                assert torch.equal(p.grad, b)
    message = str(err.value)
    assert f"engine={engine!r} cannot measure this graph" in message
    assert "engine='loop'" in message
    assert "engine='auto'" in message
    assert isinstance(err.value, UnbatchableGraphError)
    assert err.value.reason == reason
    assert isinstance(err.value.__cause__, RuntimeError)  # torch's own error, chained


class _UserError(torch.autograd.Function):
    """Its backward raises a user's RuntimeError while ``fail`` is set."""

    fail = False

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        if _UserError.fail:
            raise RuntimeError("a user's own error in a backward")
        return g


def test_a_users_error_under_a_vmap_candidate_propagates_and_drops_nothing():
    torch.manual_seed(0)
    trunk = WithFunction(_UserError).double()
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in TASKS]).double()
    with gl.Profiler(trunk, TASKS) as prof:
        prof.backward(_losses(trunk, heads))  # probe 0: loop, timed
        _UserError.fail = True
        try:
            with pytest.raises(RuntimeError, match="a user's own error") as err:
                prof.backward(_losses(trunk, heads))  # probe 1: batched
        finally:
            _UserError.fail = False
        assert type(err.value) is RuntimeError
        assert prof.step == 1
        (decision,) = prof._engine.decisions.values()
        assert decision.dropped == {}
        snap = prof.backward(_losses(trunk, heads))  # batched, timed as usual
        assert snap.engine == "batched"
        assert not snap.notes


def test_out_of_memory_is_never_a_graph_vmap_cannot_run():
    oom = torch.OutOfMemoryError("Batching rule not implemented for aten::item. (out of memory)")
    assert cause_of(oom) is None
    message = "vmap: called random operation while in randomness error mode"
    assert cause_of(ValueError(message)) is None
    found = cause_of(RuntimeError(message))
    assert found is not None
    assert found[0] == "random-op"
    assert cause_of(RuntimeError("my own error")) is None


def test_dropped_candidates_are_part_of_the_state(tmp_path):
    trunk, heads, _ = _setup("checkpointed-dropout")
    with gl.Profiler(trunk, TASKS) as prof:
        for _ in range(3):
            prof.backward(_losses(trunk, heads))
        state = prof.state_dict()
    torch.save(state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    (saved,) = state["auto"]["decisions"]
    assert saved["dropped"] == dict.fromkeys(["batched", "gramian", "gramian-vmap"], "random-op")
    with gl.Profiler(trunk, TASKS) as resumed:
        resumed.load_state_dict(state)
        snap = resumed.backward(_losses(trunk, heads))
        assert snap.engine == "loop"
        assert not snap.notes
        assert "dropped batched: random-op" in repr(resumed)


def _probe_exact(
    prof: gl.Profiler, trunk: nn.Module, heads: nn.ModuleList, accumulate: bool
) -> gl.Snapshot:
    """One probe, checked against the loop reference and the plain weighted backward on the
    same forward (with an existing ``.grad`` when ``accumulate``)."""
    params = [*trunk.parameters(), *heads.parameters()]
    before = [torch.randn_like(p) if accumulate else None for p in params]
    for p, b in zip(params, before):
        p.grad = None if b is None else b.clone()
    losses = _losses(trunk, heads)
    ref = reference_grams(losses, trunk)
    plain = torch.autograd.grad(
        sum(W[t] * v for t, v in losses.items()), params, retain_graph=True
    )
    snap = prof.backward(losses, W)
    for layer, g in ref.layer_grams.items():
        assert_gram_close(snap.layer_grams[layer], g, 1e-10)
    for p, g, b in zip(params, plain, before):
        torch.testing.assert_close(p.grad, g if b is None else b + g, rtol=1e-12, atol=1e-14)
    return snap


@pytest.mark.parametrize("accumulate", [False, True], ids=["fresh", "accumulating"])
@pytest.mark.parametrize("case", ["checkpointed-dropout", "item-in-backward"])
def test_a_candidate_failing_after_some_writes_is_undone(case, accumulate, monkeypatch):
    """``gramian`` timed before ``batched``: it writes the heads' and the top layer's ``.grad``
    and frees the top of the graph before its second stage fails lower down; the probe is then
    served by ``batched`` (which fails too) and ``loop``, exactly."""
    monkeypatch.setattr(auto_module, "CANDIDATES", (LoopEngine, GramianEngine, BatchedEngine))
    trunk, heads, reason = _setup(case)
    with gl.Profiler(trunk, TASKS) as prof:
        _probe_exact(prof, trunk, heads, accumulate)
        snap = _probe_exact(prof, trunk, heads, accumulate)
        assert snap.engine == "loop"
        assert list(snap.notes) == [
            *(f"auto-dropped:{n}:{reason}" for n in ("gramian", "gramian-vmap", "batched")),
            "auto-chose:loop",
        ]


@pytest.mark.parametrize("accumulate", [False, True], ids=["fresh", "accumulating"])
def test_a_chosen_candidate_that_fails_later_is_dropped(accumulate, monkeypatch):
    """``gramian`` chosen, then anomaly mode switched on: its probe fails part way (after
    writing the heads' ``.grad``); the same probe is served by ``loop``, exactly, and the
    graph shape is not served by ``gramian`` any more."""
    force_auto(monkeypatch, "gramian")
    trunk, heads, _ = _setup("anomaly-mode")
    with gl.Profiler(trunk, TASKS) as prof:
        while prof._engine.describe() == "timing":
            _probe_exact(prof, trunk, heads, accumulate)
        assert prof._engine.describe() == "gramian"
        with anomaly_mode():
            snap = _probe_exact(prof, trunk, heads, accumulate)
            assert snap.engine == "loop"
            dropped = [n for n in snap.notes if n.startswith("auto-dropped")]
            assert dropped == [
                "auto-dropped:gramian:anomaly-mode",
                "auto-dropped:gramian-vmap:anomaly-mode",
            ]
            engines = [_probe_exact(prof, trunk, heads, accumulate).engine for _ in range(3)]
        assert engines == ["loop"] * 3  # batched timed (and dropped), then loop chosen
        assert prof._engine.describe().startswith("loop (dropped gramian: anomaly-mode")


class _ItemWhenSet(torch.autograd.Function):
    """``.item()`` in its backward while ``on`` is set (a backward that changes behaviour)."""

    on = False

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        if _ItemWhenSet.on:
            g.sum().item()
        return g


def test_a_chosen_candidate_that_fails_after_all_says_so(monkeypatch):
    """A candidate that ran on this graph shape before runs as if called directly (no copy of
    the ``.grad``, the graph not kept): where it fails after all (here after writing the heads'
    ``.grad`` and freeing part of the graph), no other candidate can serve the probe; the error
    says so and what to do, nothing is written, and the candidate is dropped."""
    force_auto(monkeypatch, "gramian")
    torch.manual_seed(0)
    trunk = WithFunction(_ItemWhenSet).double()
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in TASKS]).double()
    with gl.Profiler(trunk, TASKS) as prof:
        while prof._engine.describe() == "timing":
            _probe_exact(prof, trunk, heads, accumulate=False)
        assert prof._engine.describe() == "gramian"
        params = [*trunk.parameters(), *heads.parameters()]
        before = [p.grad.clone() for p in params]
        step = prof.step
        _ItemWhenSet.on = True
        try:
            with pytest.raises(gl.GradlensError, match="no other candidate can serve") as err:
                prof.backward(_losses(trunk, heads), W)
            assert "run the step's forward again" in str(err.value)
            assert prof.step == step
            for p, b in zip(params, before):
                assert torch.equal(p.grad, b)
            snap = _probe_exact(prof, trunk, heads, accumulate=False)  # the forward again
        finally:
            _ItemWhenSet.on = False
        assert snap.engine != "gramian"
        (decision,) = prof._engine.decisions.values()
        assert decision.dropped == dict.fromkeys(["gramian", "gramian-vmap"], "item")


@pytest.mark.parametrize("engine", ["loop", "auto"])
def test_held_per_layer_weights_are_written_where_vmap_cannot_run(engine):
    """``gl.per_layer`` with ``every=2``: an unprobed step writes the held per-layer weights
    from per-task gradients (a batched backward, or one backward per task where the graph
    cannot run under vmap), whatever the engine."""
    trunk, heads, _ = _setup("checkpointed-dropout")
    params = [*trunk.parameters(), *heads.parameters()]
    w = torch.tensor([W[t] for t in TASKS], dtype=torch.float64)
    weighting = gl.per_layer(lambda G: w)  # the same weights for every layer: .grad is plain
    with gl.Profiler(trunk, TASKS, engine=engine, every=2) as prof:
        for step in range(4):
            for p in params:
                p.grad = None
            losses = _losses(trunk, heads)
            plain = torch.autograd.grad(
                sum(W[t] * v for t, v in losses.items()), params, retain_graph=True
            )
            snap = prof.backward(losses, weighting)
            assert (snap is None) == (step % 2 == 1)
            for p, g in zip(params, plain):
                torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
