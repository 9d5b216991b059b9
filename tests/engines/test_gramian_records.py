"""The gramian engine's recorded calls are bounded: a forward no probe follows (a validation
loop left with grad enabled) kept its activations and graph alive until the next probe, without
bound (100 such forwards of a tiny BERT: 2,100 records, 31 MB; found by an exploratory run)."""

from __future__ import annotations

import torch
from torch import nn

import gradlens as gl
from gradlens.engines.gramian import KEEP_FORWARDS
from tests.zoo import probe_matches_reference

TASKS = ["a", "b"]
W = {"a": 0.3, "b": 0.7}


def _model() -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.LayerNorm(8)).double()
    return trunk, nn.ModuleList([nn.Linear(8, 1) for _ in TASKS]).double()


def _losses(z: torch.Tensor, heads: nn.ModuleList) -> dict[str, torch.Tensor]:
    return {t: ((h(z) - i) ** 2).mean() for i, (t, h) in enumerate(zip(TASKS, heads))}


def test_forwards_no_probe_follows_are_not_kept_without_bound():
    trunk, heads = _model()
    params = [*trunk.parameters(), *heads.parameters()]
    x = torch.randn(10, 6, dtype=torch.float64)
    with gl.Profiler(trunk, TASKS, engine="gramian") as prof:
        engine = prof._engine
        for _ in range(5 * KEEP_FORWARDS + 3):  # a validation loop with grad enabled
            trunk(torch.randn(10, 6, dtype=torch.float64)).sum()
        kept = {r.forward for recs in engine._records.values() for r in recs}
        assert 0 < len(kept) < 2 * KEEP_FORWARDS
        assert len(engine._boundary) < 2 * KEEP_FORWARDS
        snap = probe_matches_reference(prof, trunk, _losses(trunk(x), heads), W, params)
        assert set(snap.rules.values()) == {"linear", "norm"}  # this step's calls were kept
        assert not engine._records


def test_a_step_of_several_forwards_keeps_every_call():
    """Siamese inputs or multi-crop views: up to KEEP_FORWARDS forwards of one step are all
    served by the rules (a dropped call would send its layer to the generic path)."""
    trunk, heads = _model()
    params = [*trunk.parameters(), *heads.parameters()]
    with gl.Profiler(trunk, TASKS, engine="gramian") as prof:
        n = KEEP_FORWARDS - 4  # the records are trimmed as the step's last forward ends
        for _ in range(2 * KEEP_FORWARDS - n):
            trunk(torch.randn(3, 6, dtype=torch.float64))
        views = [torch.randn(10, 6, dtype=torch.float64) for _ in range(n)]
        z = sum(trunk(v) for v in views) / n
        assert prof._engine._forwards == 2 * KEEP_FORWARDS
        snap = probe_matches_reference(prof, trunk, _losses(z, heads), W, params)
        assert set(snap.rules.values()) == {"linear", "norm"}


def test_a_deep_copy_of_the_model_records_nothing():
    """A deep copy made after the Profiler (an EMA teacher) carries the hooks along: its
    forwards were recorded as the trunk's (activations kept, the 'forward seen' flag set, auto's
    graph-shape key taken from the teacher's input)."""
    import copy

    trunk, heads = _model()
    params = [*trunk.parameters(), *heads.parameters()]
    for engine in ("gramian", "auto"):
        with gl.Profiler(trunk, TASKS, engine=engine) as prof:
            teacher = copy.deepcopy(trunk)
            teacher(torch.randn(7, 6, dtype=torch.float64)).sum()  # with grad, another shape
            hooked = prof._engine if engine == "gramian" else prof._engine.candidates["gramian"]
            assert not hooked._records
            assert not hooked._boundary
            if engine == "auto":  # (the profiler keeps no 'forward seen' flag of its own now)
                assert prof._engine._keys._seen == {}
            x = torch.randn(10, 6, dtype=torch.float64)
            probe_matches_reference(prof, trunk, _losses(trunk(x), heads), W, params)
            for p in params:
                p.grad = None


def test_a_root_that_is_never_called_bounds_its_records_too():
    """``shared = nn.ModuleList([...])`` is never called itself: its forwards are counted at its
    first rule-served module, so a validation loop's records are bounded there as well."""
    trunk, heads = _model()
    shared = nn.ModuleList([trunk[:2], trunk[2:]])
    params = [*trunk.parameters(), *heads.parameters()]
    with gl.Profiler(shared, TASKS, engine="gramian") as prof:
        engine = prof._engine
        for _ in range(5 * KEEP_FORWARDS + 3):  # a validation loop with grad enabled
            trunk(torch.randn(10, 6, dtype=torch.float64)).sum()
        assert 0 < max(len(recs) for recs in engine._records.values()) < 2 * KEEP_FORWARDS
        x = torch.randn(10, 6, dtype=torch.float64)
        snap = probe_matches_reference(prof, shared, _losses(trunk(x), heads), W, params)
        assert set(snap.rules.values()) == {"linear", "norm"}


def test_a_first_module_called_many_times_in_a_forward_counts_one_forward():
    """A root that is never called (a ModuleList) counts forwards at its first module a rule
    serves: called 40 times in one forward (a recurrent block), it counted 40 forwards and the
    bound dropped that forward's own calls (the layer then went generic)."""
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)]).double()
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in TASKS]).double()
    params = [*blocks.parameters(), *heads.parameters()]
    with gl.Profiler(blocks, TASKS, engine="gramian") as prof:
        for _ in range(3):
            h = torch.randn(5, 8, dtype=torch.float64)
            for _ in range(2 * KEEP_FORWARDS + 8):
                h = torch.tanh(blocks[0](h))
            snap = probe_matches_reference(prof, blocks, _losses(blocks[1](h), heads), W, params)
            assert set(snap.rules.values()) == {"linear"}
            for p in params:
                p.grad = None
