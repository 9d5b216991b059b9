"""Profiler behaviour: trajectories unchanged, schedules, hooks, bad input, Gram laws."""

from __future__ import annotations

import gc
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradlens as gl
from gradlens.schedules import Every, First, LogSpaced, Union, as_schedule
from gradlens.weightings import make_weighting
from tests.zoo import build, task_losses

ENGINES = ["loop", "batched", "gramian", "features"]


def _train(model: str, engine: str | None, every: int, steps: int = 30):
    torch.manual_seed(1)
    trunk, heads, x, ys = build(model, 3, torch.float64, batch=8)
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    w = {"t0": 0.2, "t1": 0.5, "t2": 0.3}
    prof = None if engine is None else gl.Profiler(trunk, list(w), engine=engine, every=every)
    probed = []
    for _ in range(steps):
        opt.zero_grad()
        losses, z = task_losses(trunk, heads, x, ys, features=True)
        if prof is None:
            sum(w[t] * v for t, v in losses.items()).backward()
        else:
            snap = prof.backward(losses, w, features=z if engine == "features" else None)
            if snap is not None:
                probed.append(snap.step)
        opt.step()
    if prof is not None:
        prof.close()
    return [p.detach().clone() for p in params], probed


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model", ["mlp", "cnn_bn", "dropout"])
def test_profiling_never_changes_the_trajectory(model, engine, every):
    plain, _ = _train(model, None, every)
    profiled, probed = _train(model, engine, every)
    assert probed == list(range(0, 30, every))
    for a, b in zip(plain, profiled):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_schedules():
    assert [s for s in range(10) if Every(4, offset=1)(s)] == [1, 5, 9]
    assert [s for s in range(5) if First(3)(s)] == [0, 1, 2]
    logs = [s for s in range(1001) if LogSpaced(1)(s)]
    assert logs == [0, 1, 10, 100, 1000]
    assert [s for s in range(7) if Union(First(1), Every(3))(s)] == [0, 3, 6]
    assert as_schedule(lambda s: s == 2)(2)
    with pytest.raises(gl.GradlensError, match="`every` should be a positive int"):
        as_schedule(0)
    with pytest.raises(gl.GradlensError, match="`every` should be a positive int or a callable"):
        as_schedule("often")
    assert [s for s in range(7) if as_schedule(np.int64(3))(s)] == [0, 3, 6]  # numpy's ints


def test_a_schedule_that_fails_on_step_0_is_refused_before_the_store_exists(tmp_path):
    """``every=lambda: True`` (no step argument) raised a raw TypeError after the run store was
    made, so the corrected retry with the same ``store=`` was refused ('already holds a run')."""
    trunk, *_ = build("mlp", 2)
    with pytest.raises(gl.GradlensError, match=r"calling it on step 0 raised TypeError"):
        gl.Profiler(trunk, ["a", "b"], every=lambda: True, store=tmp_path / "run")  # type: ignore[arg-type,misc]
    assert not (tmp_path / "run").exists()
    assert not trunk._forward_hooks
    gl.Profiler(trunk, ["a", "b"], every=lambda step: step % 2 == 0, store=tmp_path / "run").close()


def test_retain_graph_is_a_bool():
    trunk, heads, x, ys = build("mlp", 2)
    with gl.Profiler(trunk, ["t0", "t1"]) as prof:
        with pytest.raises(gl.GradlensError, match="`retain_graph` should be a bool; found str"):
            prof.backward(task_losses(trunk, heads, x, ys), retain_graph="yes")  # type: ignore[arg-type]
        assert prof.step == 0
        prof.backward(task_losses(trunk, heads, x, ys), retain_graph=None)  # type: ignore[arg-type]  # torch's own default
        assert prof.step == 1


def test_callable_schedule_and_will_probe():
    trunk, heads, x, ys = build("mlp", 2)
    with gl.Profiler(trunk, ["t0", "t1"], every=lambda s: s in (1, 2)) as prof:
        got = []
        for _ in range(4):
            assert prof.will_probe() == (prof.step in (1, 2))
            got.append(prof.backward(task_losses(trunk, heads, x, ys)) is not None)
    assert got == [False, True, True, False]


def _n_hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


def test_hooks_removed_on_close_context_and_gc():
    trunk, heads, x, ys = build("cnn_bn", 2)
    prof = gl.Profiler(trunk, ["t0", "t1"], engine="gramian")
    assert _n_hooks(trunk) > 0
    prof.close()
    assert _n_hooks(trunk) == 0
    prof.close()  # idempotent
    with gl.Profiler(trunk, ["t0", "t1"]):
        assert _n_hooks(trunk) > 0
    assert _n_hooks(trunk) == 0
    prof = gl.Profiler(trunk, ["t0", "t1"])
    assert _n_hooks(trunk) > 0
    del prof
    gc.collect()
    assert _n_hooks(trunk) == 0


def test_closed_profiler_refuses_backward():
    trunk, heads, x, ys = build("mlp", 2)
    prof = gl.Profiler(trunk, ["t0", "t1"])
    prof.close()
    with pytest.raises(gl.GradlensError, match="closed Profiler"):
        prof.backward(task_losses(trunk, heads, x, ys))


def test_unprobed_steps_record_nothing():
    trunk, heads, x, ys = build("mlp", 2)
    with gl.Profiler(trunk, ["t0", "t1"], every=2) as prof:
        prof.backward(task_losses(trunk, heads, x, ys))
        task_losses(trunk, heads, x, ys)  # forward of unprobed step 1
        assert prof._engine.candidates["gramian"]._records == {}


# -- bad input -------------------------------------------------------------------------------
@pytest.fixture
def setup():
    trunk, heads, x, ys = build("mlp", 2)
    prof = gl.Profiler(trunk, ["t0", "t1"], engine="gramian")
    yield prof, (lambda: task_losses(trunk, heads, x, ys))
    prof.close()


def test_non_scalar_loss(setup):
    prof, make = setup
    losses = make()
    losses["t0"] = losses["t0"].expand(3)
    with pytest.raises(gl.GradlensError, match=r"`losses\['t0'\]` should be a scalar.*\(3,\)"):
        prof.backward(losses)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss(setup, bad):
    prof, make = setup
    losses = make()
    losses["t1"] = losses["t1"] * bad
    with pytest.raises(gl.GradlensError, match=r"`losses` should be finite; found .*t1"):
        prof.backward(losses)


def test_unprobed_steps_do_not_read_the_losses_on_the_host():
    # a non-finite loss on an unprobed step behaves as in plain training (no host sync per step)
    trunk, heads, x, ys = build("mlp", 2)
    with gl.Profiler(trunk, ["t0", "t1"], engine="gramian", every=2) as prof:
        prof.backward(task_losses(trunk, heads, x, ys))  # step 0: probed
        losses = task_losses(trunk, heads, x, ys)
        losses["t1"] = losses["t1"] * float("nan")
        assert prof.backward(losses) is None  # step 1: unprobed, no error
        assert torch.isnan(trunk[0].weight.grad).all()
        losses = task_losses(trunk, heads, x, ys)
        losses["t1"] = losses["t1"] * float("nan")
        with pytest.raises(gl.GradlensError, match="`losses` should be finite"):
            prof.backward(losses)  # step 2: probed


def test_weights_tensor_is_reused_while_the_values_repeat(setup):
    prof, make = setup
    L = torch.zeros(2, dtype=torch.float64)
    a = prof._weights_on({"t0": 0.5, "t1": 1.0}, L)
    assert prof._weights_on({"t0": 0.5, "t1": 1.0}, L) is a
    b = prof._weights_on({"t0": 0.25, "t1": 1.0}, L)
    assert b is not a
    assert b.tolist() == [0.25, 1.0]
    assert prof._weights_on(None, L).tolist() == [1.0, 1.0]
    assert prof._weights_on(None, L.float()).dtype == torch.float32


def test_undeclared_and_missing_tasks(setup):
    prof, make = setup
    losses = make()
    with pytest.raises(gl.GradlensError, match=r"undeclared tasks \['t9'\]"):
        prof.backward({**losses, "t9": losses["t0"]})
    with pytest.raises(gl.GradlensError, match=r"missing tasks \['t1'\]"):
        prof.backward({"t0": losses["t0"]})


def test_loss_that_does_not_require_grad(setup):
    prof, make = setup
    losses = make()
    losses["t0"] = losses["t0"].detach()
    with pytest.raises(gl.GradlensError, match="should require grad"):
        prof.backward(losses)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"t0": -1.0, "t1": 1.0}, r"`weights\['t0'\]` should be finite and >= 0; found -1.0"),
        (
            {"t0": float("nan"), "t1": 1.0},
            r"`weights\['t0'\]` should be finite and >= 0; found nan",
        ),
        ({"t0": float("inf"), "t1": 1.0}, r"should be finite and >= 0; found inf"),
        ({"t0": 1.0}, r"`weights` should have exactly the tasks \['t0', 't1'\]"),
        ({"t0": 1.0, "x": 1.0}, r"`weights` should have exactly the tasks"),
        ({"t0": "a", "t1": 1.0}, r"`weights\['t0'\]` should be a real number; found str"),
        ([0.5, 0.5], r"`weights` should be a mapping"),
        (  # a loss weighting given as the weights: the message says how to use it
            make_weighting("dwa", ["t0", "t1"]),
            r"found DWA \(a loss weighting: pass `lw.weights\(losses\)` as the weights",
        ),
        (  # a learned loss weight (uncertainty weighting): its gradient was dropped silently
            {"t0": torch.zeros((), requires_grad=True).exp(), "t1": 1.0},
            r"`weights\['t0'\]` should be a number or a tensor without grad; found a tensor "
            r"that requires grad \(a learned loss weight\)",
        ),
    ],
)
def test_bad_weights(setup, weights, match):
    prof, make = setup
    with pytest.raises(gl.GradlensError, match=match):
        prof.backward(make(), weights)


def test_meta_may_not_reuse_the_runs_own_keys(tmp_path):
    """``meta=vars(args)`` with a field named ``layers`` replaced the profiler's own in
    meta.json silently; one named ``tasks`` failed at the first probe, the step done. Refused
    at construction now, before anything is written or hooked."""
    trunk, *_ = build("mlp", 2)
    for meta, found in [({"layers": 50, "seed": 0}, "['layers']"), ({"tasks": [1]}, "['tasks']")]:
        match = rf"`meta` should not hold .*found {re.escape(found)}"
        with pytest.raises(gl.GradlensError, match=match):
            gl.Profiler(trunk, ["a", "b"], store=tmp_path / "run", meta=meta)
        assert not (tmp_path / "run").exists()
        assert not trunk._forward_hooks
    with gl.Profiler(trunk, ["a", "b"], store=tmp_path / "run", meta={"config": {"layers": 50}}):
        pass
    assert gl.load_run(tmp_path / "run").meta["config"] == {"layers": 50}


def test_bad_constructor_arguments():
    trunk, *_ = build("mlp", 2)
    with pytest.raises(gl.GradlensError, match="`engine` should be one of"):
        gl.Profiler(trunk, ["a"], engine="fast")
    with pytest.raises(gl.GradlensError, match="`tasks` should be unique; found duplicates"):
        gl.Profiler(trunk, ["a", "a"])
    with pytest.raises(gl.GradlensError, match="`tasks` should be a sequence"):
        gl.Profiler(trunk, "ab")
    with pytest.raises(gl.GradlensError, match="`shared` should hold at least one parameter"):
        gl.Profiler(nn.ReLU(), ["a"])
    with pytest.raises(gl.GradlensError, match=r"`shared` should be an nn\.Module or an iterable"):
        gl.Profiler(3, ["a"])
    lazy = nn.Sequential(nn.LazyLinear(4), nn.ReLU())  # torch's raw ValueError before
    with pytest.raises(gl.GradlensError, match=r"lazy ones not initialized yet \['0\.weight'"):
        gl.Profiler(lazy, ["a"])
    lazy(torch.randn(2, 3))  # one forward initializes them
    gl.Profiler(lazy, ["a"]).close()
    w = nn.Parameter(torch.randn(3, 2))
    with pytest.raises(gl.GradlensError, match=r"found 'param0' at position 0, a tensor computed"):
        gl.Profiler([w[0]], ["a"])  # a row of a parameter: its gradient is never a leaf's
    with pytest.raises(gl.GradlensError, match="`memory_budget` should be an int >= 1"):
        gl.Profiler(trunk, ["a"], memory_budget=0)
    with pytest.raises(gl.GradlensError, match="`store` should be a run directory path"):
        gl.Profiler(trunk, ["a"], store=42)


def test_a_single_parameter_is_one_shared_parameter():
    """``shared=param`` was iterated row by row (non-leaf views: an all-zero Gram and a warning
    blaming the losses); it is one parameter, as ``[param]`` is."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    x = torch.randn(5, 4, dtype=torch.float64)
    with gl.Profiler(w, ["a", "b"], engine="loop") as prof:
        assert prof.layers == ("param0",)
        z = x @ w
        losses = {"a": z[:, 0].pow(2).mean(), "b": z.sum().sin()}
        ga, gb = (torch.autograd.grad(v, w, retain_graph=True)[0].flatten()
                  for v in losses.values())
        snap = prof.backward(losses)
    want = torch.stack([ga, gb]) @ torch.stack([ga, gb]).T
    torch.testing.assert_close(snap.gram, want, rtol=1e-12, atol=1e-14)


def test_features_engine_needs_features():
    trunk, heads, x, ys = build("mlp", 2)
    with gl.Profiler(trunk, ["t0", "t1"], engine="features") as prof:
        losses, z = task_losses(trunk, heads, x, ys, features=True)
        with pytest.raises(gl.GradlensError, match="`features` should be the shared repr"):
            prof.backward(losses)
        with pytest.raises(gl.GradlensError, match="requires_grad=False"):
            prof.backward(losses, features=z.detach())
        # a z the losses were not computed from (an earlier forward's): an all-zero Gram with a
        # warning blaming the losses before
        _, stale = task_losses(trunk, heads, x, ys, features=True)
        with pytest.raises(gl.GradlensError, match=r"features\[0\] outside the losses' graph"):
            prof.backward(losses, features=stale)
        assert prof.step == 0
        assert all(p.grad is None for p in [*trunk.parameters(), *heads.parameters()])
    with gl.Profiler(trunk, ["t0", "t1"], engine="gramian") as prof:
        with pytest.raises(gl.GradlensError, match=r"`features` is used only by engine='features'"):
            prof.backward(losses, features=z)


@pytest.mark.parametrize("engine", ENGINES)
def test_second_backward_through_freed_graph(engine):
    trunk, heads, x, ys = build("mlp", 2)
    with gl.Profiler(trunk, ["t0", "t1"], engine=engine) as prof:
        losses, z = task_losses(trunk, heads, x, ys, features=True)
        feats = z if engine == "features" else None
        prof.backward(losses, features=feats)
        with pytest.raises(gl.GradlensError, match="graph already freed"):
            prof.backward(losses, features=feats)


@pytest.mark.parametrize("engine", ENGINES)
def test_task_that_does_not_reach_the_shared_part_is_flagged(engine):
    trunk, heads, x, ys = build("mlp", 2)
    prof = gl.Profiler(trunk, ["t0", "t1"], engine=engine)
    z = trunk(x)
    extra = nn.Parameter(torch.ones((), dtype=torch.float64))
    losses = {"t0": heads[0](z).pow(2).mean(), "t1": extra * 2.0}
    with prof:
        with pytest.warns(gl.GradlensWarning, match=r"tasks \['t1'\] have a zero gradient") as got:
            snap = prof.backward(losses, features=z if engine == "features" else None)
    assert got[0].filename == __file__  # it points at the user's call
    assert snap.zero_tasks == ("t1",)
    assert snap.gram[1, 1] == 0
    cos = snap.cosine()
    assert torch.isnan(cos[0, 1])
    assert torch.isnan(cos[1, 1])
    assert cos[0, 0] == 1
    assert extra.grad == 2.0  # the non-shared leaf still gets its weighted gradient


# -- Gram laws (hypothesis) ------------------------------------------------------------------
def _gram_of(engine: str, order: list[int], scales: list[float]):
    torch.manual_seed(3)
    trunk, heads, x, ys = build("cnn_bn", 4, batch=5)
    names = [f"t{i}" for i in range(4)]
    with gl.Profiler(trunk, names, engine=engine) as prof:
        losses = task_losses(trunk, heads, x, ys)
        vals = list(losses.values())
        permuted = {names[k]: vals[i] * scales[i] for k, i in enumerate(order)}
        return prof.backward(permuted).gram


@settings(max_examples=10)
@given(
    order=st.permutations(range(4)),
    scales=st.lists(st.floats(0.1, 10.0), min_size=4, max_size=4),
    engine=st.sampled_from(["batched", "gramian"]),
)
def test_permuting_and_scaling_tasks_permutes_and_scales_the_gram(order, scales, engine):
    base = _gram_of(engine, [0, 1, 2, 3], [1.0] * 4)
    got = _gram_of(engine, list(order), scales)
    c = torch.tensor(scales, dtype=torch.float64)
    idx = torch.tensor(list(order))
    expected = base[idx][:, idx] * (c[idx][:, None] * c[idx][None, :])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
