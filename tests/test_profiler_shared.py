"""The shared set follows the module: parameters replaced after the Profiler was created
(``load_state_dict(..., assign=True)``, ``layer.weight = nn.Parameter(...)``, a submodule
swapped) are measured, not the stale ones; a shared root that is never called itself (a
``ModuleList`` of the trunk's pieces, the whole model while its parts are called one by one) is
recorded by its modules' hooks and keys ``auto``'s decisions by their shapes."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import gradlens as gl
from gradlens.engines.gramian import UNRECORDED
from gradlens.testing import reference_grams
from tests.zoo import assert_gram_close, build, task_losses

TASKS = ["t0", "t1", "t2"]
WEIGHTS = {"t0": 0.2, "t1": 0.5, "t2": 1.3}


def _replace(trunk: nn.Module, how: str) -> None:
    if how == "assign":  # e.g. resuming from a checkpoint after the profiler was built
        sd = {k: v.detach().clone() for k, v in trunk.state_dict().items()}
        trunk.load_state_dict(sd, assign=True)
    else:  # one layer's weight re-initialised as a new Parameter
        lin = next(m for m in trunk.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        lin.weight = nn.Parameter(lin.weight.detach().clone() * 1.5)


def _probe_and_check(prof: gl.Profiler, trunk, heads, x, ys, engine: str) -> gl.Snapshot:
    """One probe: Grams against the reference (parameter-level engines), ``.grad`` of the
    module's current parameters and the heads against the plain weighted backward."""
    for p in [*trunk.parameters(), *heads.parameters()]:
        p.grad = None
    losses, z = task_losses(trunk, heads, x, ys, features=True)
    ref = reference_grams(losses, trunk)
    params = [p for p in [*trunk.parameters(), *heads.parameters()] if p.requires_grad]
    total = sum(WEIGHTS[t] * losses[t] for t in TASKS)
    want = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
    feats = z if engine == "features" else None
    snap = prof.backward(losses, WEIGHTS, features=feats)
    for p, g in zip(params, want):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    if engine != "features":
        assert tuple(snap.layer_grams) == prof.layers == tuple(ref.layer_grams)
        assert_gram_close(snap.gram, ref.gram, 1e-10)
        for name, g in ref.layer_grams.items():
            assert_gram_close(snap.layer_grams[name], g, 1e-10)
    return snap


@pytest.mark.parametrize("engine", ["loop", "batched", "gramian", "auto", "features"])
@pytest.mark.parametrize(
    ("arch", "how"), [("transformer", "assign"), ("mlp", "setattr"), ("cnn_bn", "assign")]
)
def test_parameters_replaced_after_creation_are_measured(engine, arch, how):
    trunk, heads, x, ys = build(arch, len(TASKS))
    with gl.Profiler(trunk, TASKS, engine=engine) as prof:
        _probe_and_check(prof, trunk, heads, x, ys, engine)
        served = set()
        for k in range(12 if engine == "auto" else 3):  # auto: every candidate, then its winner
            old = list(trunk.parameters())
            _replace(trunk, how)
            gone = [o for o in old if all(o is not p for p in trunk.parameters())]
            assert gone
            for o in gone:
                o.grad = None
            snap = _probe_and_check(prof, trunk, heads, x, ys, engine)
            assert all(o.grad is None for o in gone)  # the stale parameters are not measured
            served.add(snap.engine)
            if snap.engine == "gramian":  # the rules read the module's current parameters
                assert set(snap.rules.values()) - {"generic"}
            if engine == "auto" and prof._engine.describe() != "timing" and k >= 4:
                break
        if engine == "auto":  # (loop may lose round 1 on its probe before any replacement)
            assert {"batched", "gramian"} <= served


@pytest.mark.parametrize("engine", ["gramian", "auto"])
def test_parameters_replaced_before_the_first_probe_are_measured(engine):
    trunk, heads, x, ys = build("transformer", len(TASKS))
    with gl.Profiler(trunk, TASKS, engine=engine) as prof:
        _replace(trunk, "assign")
        for _ in range(4):
            snap = _probe_and_check(prof, trunk, heads, x, ys, engine)
            assert not snap.unreached


@pytest.mark.parametrize("engine", ["gramian", "auto", "loop"])
def test_a_swapped_submodule_is_measured_and_hooked(engine):
    """``trunk[2] = nn.Sequential(nn.Linear(...))``: the layer is now ``2.0``. The next probe
    measures it (by the generic path: its forward was not recorded), and the gramian engine
    hooks it for the probes after; ``prof.layers`` follows at once (and the hooks with it)."""
    trunk, heads, x, ys = build("mlp", len(TASKS))
    with gl.Profiler(trunk, TASKS, engine=engine) as prof:
        _probe_and_check(prof, trunk, heads, x, ys, engine)
        assert prof.layers == ("0", "2", "4")
        trunk[2] = nn.Sequential(nn.Linear(10, 9)).to(torch.float64)
        snaps = [_probe_and_check(prof, trunk, heads, x, ys, engine) for _ in range(4)]
        trunk[2] = nn.Linear(10, 9).to(torch.float64)
        assert prof.layers == ("0", "2", "4")  # followed at once: the next forward is recorded
        snaps += [_probe_and_check(prof, trunk, heads, x, ys, engine) for _ in range(2)]
    gramian = [s.rules for s in snaps if s.engine == "gramian"]
    if engine == "gramian":
        assert [r.get("2.0", r.get("2")) for r in gramian] == ["generic", *["linear"] * 5]
    elif engine == "auto":
        assert gramian
        assert gramian[-1].get("2", gramian[-1].get("2.0")) == "linear"


def test_parameters_given_as_a_list_warn_of_a_replacement_once():
    """Given parameters, not a module, a replacement cannot be followed: a warning naming the
    parameter and the fix (once); the probe measures what it reaches (the old parameter's part
    of its layer's Gram zero). Not an error: routing that skips a shared parameter while
    another of its shape is used (mixture of experts, layer drop) looks the same, and is
    measured right."""
    trunk, heads, x, ys = build("mlp", len(TASKS))
    with gl.Profiler(list(trunk.named_parameters()), TASKS, engine="loop") as prof:
        _probe_and_check(prof, trunk, heads, x, ys, "loop")
        trunk[2].weight = nn.Parameter(trunk[2].weight.detach().clone())
        for p in [*trunk.parameters(), *heads.parameters()]:
            p.grad = None
        with pytest.warns(gl.GradlensWarning, match=r"'2\.weight'.*create a new Profiler"):
            snap = prof.backward(task_losses(trunk, heads, x, ys))
        assert snap is not None
        # warned once: a second warning would fail this test (warnings are errors here)
        prof.backward(task_losses(trunk, heads, x, ys))
    # every parameter replaced before the first probe (resuming by assignment)
    with gl.Profiler(list(trunk.named_parameters()), TASKS, engine="gramian") as prof:
        _replace(trunk, "assign")
        with pytest.warns(gl.GradlensWarning) as rec:  # this one, and every Gram zero
            prof.backward(task_losses(trunk, heads, x, ys))
        assert any(re.search(r"'0\.weight'.*create a new Profiler", str(r.message)) for r in rec)
    # a shared parameter no loss uses, next to a head of its shape: flagged (a zero Gram), no
    # error, at the first probe and after
    trunk, heads, x, ys = build("mlp", len(TASKS))
    extra = nn.Parameter(torch.zeros(1, 5, dtype=torch.float64))  # the heads' weight shape
    with gl.Profiler([*trunk.named_parameters(), ("extra", extra)], TASKS, "loop") as prof:
        for _ in range(2):
            snap = prof.backward(task_losses(trunk, heads, x, ys))
            assert snap.unreached == ("extra",)


class _Model(nn.Module):
    """A trunk and its heads in one module, called part by part by the training loop."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.LayerNorm(8))
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in TASKS})


def _pieces():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16)).double()
    neck = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 8)).double()
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in TASKS]).double()
    return backbone, neck, heads


@pytest.mark.parametrize("engine", ["gramian", "auto"])
def test_a_container_that_is_never_called_is_recorded_by_its_modules(engine):
    """``shared = nn.ModuleList([backbone, neck])``: no note, no warning (the suite turns
    warnings into errors), the rules serve the layers, exact."""
    backbone, neck, heads = _pieces()
    shared = nn.ModuleList([backbone, neck])
    x = torch.randn(10, 6, dtype=torch.float64)
    with gl.Profiler(shared, TASKS, engine=engine) as prof:
        for _ in range(6):
            z = neck(backbone(x))
            losses = {t: h(z).pow(2).mean() for t, h in zip(TASKS, heads)}
            ref = reference_grams(losses, shared)
            snap = prof.backward(losses)
            assert UNRECORDED not in snap.notes
            assert_gram_close(snap.gram, ref.gram, 1e-10)
            if snap.engine == "gramian":
                assert set(snap.rules.values()) == {"linear", "norm"}


def test_auto_keys_a_never_called_root_by_the_shapes_its_modules_see():
    """The whole model as ``shared``, its trunk and heads called one by one: a new batch size
    is a new graph shape, timed anew (the README's promise), each shape keyed by its shapes."""
    torch.manual_seed(0)
    model = _Model().double()
    with gl.Profiler(model, TASKS) as prof:
        auto = prof._engine
        teacher = copy.deepcopy(model)  # (an EMA teacher carries the hooks: they ignore it)
        for batch in (10, 4):
            x = torch.randn(batch, 6, dtype=torch.float64)
            for _ in range(3):
                z = model.trunk(x)
                teacher.trunk(torch.randn(7, 6, dtype=torch.float64))
                losses = {t: model.heads[t](z).pow(2).mean() for t in TASKS}
                ref = reference_grams(losses, model)
                snap = prof.backward(losses)
                assert UNRECORDED not in snap.notes
                assert_gram_close(snap.gram, ref.gram, 1e-10)
        keys = list(auto.decisions)
    assert len(keys) == 2  # one decision per batch size
    assert [k[0][0] for k in keys] == [(10, 6), (4, 6)]  # the trunk's input, then the heads'


def test_auto_notes_an_unrecorded_forward_only_where_gramian_served_it():
    """A forward before the profiler existed, served by ``loop`` (``auto``'s first candidate):
    nothing lost, nothing noted. A forward run while gramian's hooks were off, then served by
    gramian (decisions restored after that forward): noted, and warned once."""
    trunk, heads, x, ys = build("mlp", len(TASKS))
    early = task_losses(trunk, heads, x, ys)
    with gl.Profiler(trunk, TASKS) as prof:
        snap = prof.backward(early)
        assert snap.engine == "loop"
        assert UNRECORDED not in snap.notes
        while prof._engine.describe() == "timing":
            prof.backward(task_losses(trunk, heads, x, ys))
        for d in prof._engine.decisions.values():
            d.winner = "gramian"
        state = prof.state_dict()
    with gl.Profiler(trunk, TASKS) as prof:
        losses = task_losses(trunk, heads, x, ys)  # gramian's hooks are off: loop comes first
        prof.load_state_dict(state)
        with pytest.warns(gl.GradlensWarning, match="Create the Profiler before the first"):
            snap = prof.backward(losses)
        assert snap.engine == "gramian"
        assert UNRECORDED in snap.notes
        assert set(snap.rules.values()) == {"generic"}
        snap = prof.backward(task_losses(trunk, heads, x, ys))  # recorded
        assert snap.engine == "gramian"
        assert UNRECORDED not in snap.notes


def test_held_per_layer_weights_follow_a_replaced_parameter():
    """Between probes (``every=2``) ``gl.per_layer`` writes each layer's held weights: a weight
    replaced before an unprobed step gets its layer's weights, not the total's."""
    trunk, heads, x, ys = build("mlp", len(TASKS))
    weighting = gl.per_layer(lambda G: 1.0 / torch.sqrt(torch.diagonal(G)))
    with gl.Profiler(trunk, TASKS, engine="loop", every=2) as prof:
        snap = prof.backward(task_losses(trunk, heads, x, ys), weighting)
        held = snap.layer_weights
        assert not torch.allclose(held["2"], snap.weights)
        trunk[2].weight = nn.Parameter(trunk[2].weight.detach().clone())
        for p in [*trunk.parameters(), *heads.parameters()]:
            p.grad = None
        losses = task_losses(trunk, heads, x, ys)
        L = torch.stack([losses[t] for t in TASKS])
        want = torch.autograd.grad(held["2"].to(L) @ L, trunk[2].weight, retain_graph=True)[0]
        assert prof.backward(losses, weighting) is None  # unprobed: the held weights
        torch.testing.assert_close(trunk[2].weight.grad, want, rtol=1e-10, atol=1e-12)


def test_auto_keeps_the_hooks_its_key_needs_only():
    """A ModuleList of many blocks never called itself: after the first probe, only the hooks
    of the first ``KEY_MODULES`` called blocks stay (a hook costs every forward); a root that
    is called keeps its own hook only."""
    blocks = nn.ModuleList([nn.Linear(6, 6).double() for _ in range(6)])
    heads = nn.ModuleList([nn.Linear(6, 1).double() for _ in TASKS])
    x = torch.randn(5, 6, dtype=torch.float64)

    def n_hooks(mods) -> int:
        return sum(len(m._forward_hooks) for m in mods)

    with gl.Profiler(blocks, TASKS, engine="loop") as prof:  # (no hooks: a baseline)
        assert n_hooks(blocks) == 0
    with gl.Profiler(blocks, TASKS) as prof:
        assert n_hooks(blocks) == 6
        for _ in range(2):
            z = x
            for b in blocks:
                z = torch.tanh(b(z))
            snap = prof.backward({t: h(z).pow(2).mean() for t, h in zip(TASKS, heads)})
            assert len(prof._engine._keys._handles) == 2
            if snap.engine == "loop":  # (gramian's recording hooks are off before batched's turn)
                assert n_hooks(blocks) == 2
        ((key, _),) = prof._engine.decisions.items()
        assert key[0] == ((5, 6), (5, 6), (5, 6), (5, 6))
    assert n_hooks(blocks) == 0
    trunk, heads, x, ys = build("mlp", len(TASKS))
    with gl.Profiler(trunk, TASKS) as prof:
        assert n_hooks(trunk.modules()) == 6  # the root and its five children
        prof.backward(task_losses(trunk, heads, x, ys))
        assert n_hooks(trunk.modules()) == 1
