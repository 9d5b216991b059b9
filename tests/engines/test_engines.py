"""Every engine against the loop reference on the zoo: Grams (total and per layer) and .grad."""

from __future__ import annotations

import pytest
import torch

import gradlens as gl
from gradlens.testing import reference_grams
from tests.zoo import ZOO, assert_gram_close, build, task_losses

PARAM_ENGINES = ["loop", "batched", "gramian"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _weights(n: int) -> dict[str, float]:
    return {f"t{t}": 0.25 + 0.5 * ((t * 7) % 5) / 4 for t in range(n)}


def _all_params(trunk, heads):
    return list(trunk.parameters()) + list(heads.parameters())


def _plain_grads(trunk, heads, x, ys, w):
    state = torch.random.get_rng_state()
    losses = task_losses(trunk, heads, x, ys)
    sum(w[t] * v for t, v in losses.items()).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in _all_params(trunk, heads)]
    for p in _all_params(trunk, heads):
        p.grad = None
    return grads, state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n_tasks", [1, 2, 8, pytest.param(40, marks=pytest.mark.slow)])
@pytest.mark.parametrize("engine", PARAM_ENGINES)
@pytest.mark.parametrize("model", sorted(ZOO))
def test_engine_matches_reference(model, engine, n_tasks, dtype):
    _check_engine(model, engine, n_tasks, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("model", ["mlp", "cnn_bn", "transformer", "twice"])
def test_gramian_matches_reference_at_40_tasks(model, dtype):
    _check_engine(model, "gramian", 40, dtype)


def _check_engine(model, engine, n_tasks, dtype):
    trunk, heads, x, ys = build(model, n_tasks, dtype)
    w = _weights(n_tasks)
    plain, state = _plain_grads(trunk, heads, x, ys, w)
    # same dropout masks / batch statistics: replay the RNG state of the plain forward
    torch.random.set_rng_state(state)
    with gl.Profiler(trunk, tasks=list(w), engine=engine) as prof:
        losses = task_losses(trunk, heads, x, ys)  # forward with the profiler attached
        ref = reference_grams(losses, trunk)
        snap = prof.backward(losses, weights=w)
    assert snap is not None
    if engine == "gramian":  # every zoo trunk has Linear or Conv layers served by a rule
        assert {"linear", "conv"} & set(snap.rules.values()), snap.rules
    assert snap.gram.dtype == torch.float64
    assert snap.gram.shape == (n_tasks, n_tasks)
    # exact symmetry is a property of the code (Snapshot symmetrizes), not of the BLAS
    assert all(torch.equal(g, g.T) for g in [snap.gram, *snap.layer_grams.values()])
    assert_gram_close(snap.gram, ref.gram, TOL[dtype])
    assert list(snap.layer_grams) == list(ref.layer_grams)
    for layer, g in ref.layer_grams.items():
        assert_gram_close(snap.layer_grams[layer], g, TOL[dtype])
    torch.testing.assert_close(sum(snap.layer_grams.values()), snap.gram, rtol=1e-12, atol=0.0)
    # .grad equals the plain weighted backward's, heads included
    for p, g in zip(_all_params(trunk, heads), plain):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g, rtol=TOL[dtype], atol=TOL[dtype] * 1e-2)


def test_gramian_uses_rules_and_falls_back_per_module():
    trunk, heads, x, ys = build("transformer", 2)
    with gl.Profiler(trunk, tasks=["t0", "t1"], engine="gramian") as prof:
        snap = prof.backward(task_losses(trunk, heads, x, ys))
    assert snap.rules["embed"] == "linear"
    assert snap.rules["block.linear1"] == "linear"
    assert snap.rules["norm"] == "norm"
    assert snap.rules["block.norm1"] == "norm"
    # attention's own parameters: no rule by default (the in_proj rule is opt-in, see
    # tests/engines/test_rules_mha.py); its out_proj (a Linear subclass) is called
    # functionally, so its hook records nothing: exact generic path for both
    assert snap.rules["block.self_attn"] == "generic"
    assert snap.rules["block.self_attn.out_proj"] == "generic"


def test_gramian_detects_weight_used_outside_forward():
    trunk, heads, x, ys = build("tied", 2)
    with gl.Profiler(trunk, tasks=["t0", "t1"], engine="gramian") as prof:
        snap = prof.backward(task_losses(trunk, heads, x, ys))
    assert snap.rules == {"a": "generic", "b": "linear"}


def test_twice_used_module_is_served_by_its_rule():
    trunk, heads, x, ys = build("twice", 3)
    with gl.Profiler(trunk, tasks=["t0", "t1", "t2"], engine="gramian") as prof:
        snap = prof.backward(task_losses(trunk, heads, x, ys))
    assert snap.rules["mid"] == "linear"


@pytest.mark.parametrize("n_tasks", [1, 3, 12])
def test_batched_engine_chunks_under_a_small_budget(n_tasks):
    trunk, heads, x, ys = build("cnn_bn", n_tasks)
    losses = task_losses(trunk, heads, x, ys)
    ref = reference_grams(losses, trunk)
    n_params = sum(p.numel() for p in trunk.parameters())
    # room for ~3 tasks per chunk (two chunks live at once)
    budget = 2 * 3 * n_params * 8
    with gl.Profiler(trunk, tasks=list(losses), engine="batched", memory_budget=budget) as prof:
        snap = prof.backward(losses)
    assert_gram_close(snap.gram, ref.gram, 1e-10)


def test_gramian_linear_gradient_path_under_a_small_budget():
    # a budget too small for the N x N kernel forces the chunked gradient path
    trunk, heads, x, ys = build("mlp", 5, batch=40)
    with gl.Profiler(trunk, [f"t{i}" for i in range(5)], "gramian", memory_budget=512) as prof:
        losses = task_losses(trunk, heads, x, ys)
        ref = reference_grams(losses, trunk)
        snap = prof.backward(losses)
    assert set(snap.rules.values()) == {"linear"}
    assert_gram_close(snap.gram, ref.gram, 1e-10)
    for layer, g in ref.layer_grams.items():
        assert_gram_close(snap.layer_grams[layer], g, 1e-10)


@pytest.mark.parametrize("model", ["mlp", "cnn_bn", "transformer"])
def test_features_engine_is_the_representation_gram(model):
    trunk, heads, x, ys = build(model, 4)
    w = _weights(4)
    plain, state = _plain_grads(trunk, heads, x, ys, w)
    torch.random.set_rng_state(state)
    losses, z = task_losses(trunk, heads, x, ys, features=True)
    J = torch.stack(
        [torch.autograd.grad(v, z, retain_graph=True)[0].reshape(-1) for v in losses.values()]
    )
    with gl.Profiler(trunk, tasks=list(losses), engine="features") as prof:
        snap = prof.backward(losses, weights=w, features=z)
    assert snap.level == "features"
    assert list(snap.layer_grams) == ["features"]
    assert_gram_close(snap.gram, J @ J.T, 1e-10)
    for p, g in zip(_all_params(trunk, heads), plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", [*PARAM_ENGINES, "features"])
def test_grad_accumulates_into_existing_grad(engine):
    trunk, heads, x, ys = build("mlp", 2)
    params = _all_params(trunk, heads)
    for p in params:
        p.grad = torch.ones_like(p)
    prof = gl.Profiler(trunk, tasks=["t0", "t1"], engine=engine)  # before the forward
    losses, z = task_losses(trunk, heads, x, ys, features=True)
    expected = torch.autograd.grad(sum(losses.values()), params, retain_graph=True)
    with prof:
        prof.backward(losses, features=z if engine == "features" else None)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g + 1, rtol=1e-12, atol=1e-12)


def test_named_parameters_as_shared():
    trunk, heads, x, ys = build("mlp", 3)
    losses = task_losses(trunk, heads, x, ys)
    ref = reference_grams(losses, trunk)
    named = [(n, p) for n, p in trunk.named_parameters()]
    with gl.Profiler(named, tasks=list(losses), engine="gramian") as prof:
        snap = prof.backward(losses)
    assert_gram_close(snap.gram, ref.gram, 1e-10)
    assert list(snap.layer_grams) == list(ref.layer_grams)


@pytest.mark.parametrize("engine", PARAM_ENGINES)
def test_head_that_reuses_a_shared_weight(engine):
    # the head reaches a shared parameter without passing through the shared part's output
    trunk, heads, x, ys = build("mlp", 3)
    with gl.Profiler(trunk, tasks=["t0", "t1", "t2"], engine=engine) as prof:
        losses, z = task_losses(trunk, heads, x, ys, features=True)
        losses["t1"] = losses["t1"] + (z @ trunk[4].weight).pow(2).mean()
        ref = reference_grams(losses, trunk)
        expected = torch.autograd.grad(
            sum(losses.values()), list(trunk.parameters()), retain_graph=True
        )
        snap = prof.backward(losses)
    assert_gram_close(snap.gram, ref.gram, 1e-10)
    for p, g in zip(trunk.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_tasks", [1, 4])
def test_shared_part_that_is_a_single_rule_module(n_tasks):
    # the shared root's output edge is also its only layer's output edge
    lin = torch.nn.Linear(5, 3).double()
    heads = torch.nn.ModuleList([torch.nn.Linear(3, 1).double() for _ in range(n_tasks)])
    x = torch.randn(7, 5, dtype=torch.float64)
    names = [f"t{i}" for i in range(n_tasks)]
    with gl.Profiler(lin, tasks=names, engine="gramian") as prof:
        z = lin(x)  # forward after the profiler attached its hooks
        losses = {t: h(torch.tanh(z)).pow(2).mean() for t, h in zip(names, heads)}
        ref = reference_grams(losses, lin)
        snap = prof.backward(losses)
    assert snap.rules == {"(root)": "linear"}
    assert_gram_close(snap.gram, ref.gram, 1e-10)


def test_gramian_hooks_are_on_only_for_a_probed_forward():
    """A module with a forward hook takes torch's slower call path even when the hook returns
    at once: between probes (``every=3``) the gramian engine's hooks are off, and each probed
    forward is still recorded (served by the rules, exact)."""
    trunk, heads, x, ys = build("transformer", 2)
    hooked = [m for m in trunk.modules() if type(m).__name__ in ("Linear", "LayerNorm")]

    def n_hooks() -> int:
        return sum(len(m._forward_hooks) for m in hooked)

    with gl.Profiler(trunk, tasks=["t0", "t1"], engine="gramian", every=3) as prof:
        for step in range(7):
            assert (n_hooks() > 0) == (step % 3 == 0), step  # on before a probed forward only
            losses = task_losses(trunk, heads, x, ys)
            ref = reference_grams(losses, trunk) if step % 3 == 0 else None
            snap = prof.backward(losses)
            if ref is not None:
                assert "forward-not-recorded" not in snap.notes
                assert snap.rules["block.linear1"] == "linear"
                assert_gram_close(snap.gram, ref.gram, 1e-10)
            for p in _all_params(trunk, heads):
                p.grad = None
    assert n_hooks() == 0  # and none left once the profiler is closed
    with gl.Profiler(trunk, tasks=["t0", "t1"], engine="gramian") as prof:  # every step probed
        for _ in range(3):
            prof.backward(task_losses(trunk, heads, x, ys))
            assert n_hooks() > 0
