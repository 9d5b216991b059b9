"""Observe-only mode: Grams from the losses, ``.grad`` untouched, the caller's backward intact."""

from __future__ import annotations

import pytest
import torch

import gradlens as gl
from gradlens.testing import reference_grams
from tests.zoo import build, task_losses

ENGINES = ["loop", "batched", "gramian", "features"]
W = {"t0": 0.2, "t1": 0.5, "t2": 0.3}


def _params(trunk, heads):
    return list(trunk.parameters()) + list(heads.parameters())


def _gram_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    d = ref.diagonal().clamp(min=0).sqrt()
    return ((got - ref).abs() / (d[:, None] * d[None, :]).clamp(min=1e-300)).max().item()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model", ["mlp", "cnn_bn", "transformer", "twice", "tied", "frozen"])
def test_observe_leaves_grad_alone_and_matches_the_reference(model, engine):
    trunk, heads, x, ys = build(model, 3, torch.float64)
    params = _params(trunk, heads)
    # earlier accumulated gradients on half of the parameters, None on the others
    old = {}
    for i, p in enumerate(params):
        if i % 2 == 0 and p.requires_grad:
            p.grad = torch.randn_like(p)
            old[id(p)] = (p.grad, p.grad.clone())
    state = torch.random.get_rng_state()
    prof = gl.Profiler(trunk, list(W), engine=engine)  # before the forward: hooks see it
    losses, z = task_losses(trunk, heads, x, ys, features=True)
    ref = reference_grams(losses, trunk)
    J = torch.stack(
        [torch.autograd.grad(v, z, retain_graph=True)[0].flatten() for v in losses.values()]
    )
    with prof:
        snap = prof.observe(losses, W, features=z if engine == "features" else None)
    for p in params:
        if id(p) in old:
            assert p.grad is old[id(p)][0]  # the very same tensor
            torch.testing.assert_close(p.grad, old[id(p)][1], rtol=0, atol=0)
        else:
            assert p.grad is None
    want = J @ J.T if engine == "features" else ref.gram
    assert _gram_err(snap.gram, want) <= 1e-10
    # the framework's own backward still works on the same graph and gives the plain gradients
    sum(W[t] * v for t, v in losses.items()).backward()
    got = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = old[id(p)][1].clone() if id(p) in old else None
    torch.random.set_rng_state(state)
    sum(W[t] * v for t, v in task_losses(trunk, heads, x, ys).items()).backward()
    for g, p in zip(got, params):
        if p.grad is None:
            assert g is None
        else:
            torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_observed_training_follows_the_plain_trajectory(engine, tmp_path):
    def train(observe: bool) -> tuple[list[torch.Tensor], list[int]]:
        torch.manual_seed(1)
        trunk, heads, x, ys = build("dropout", 3, torch.float64, batch=8)
        params = _params(trunk, heads)
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        prof = None
        if observe:
            prof = gl.Profiler(trunk, list(W), engine=engine, every=3, store=tmp_path / engine)
        seen = []
        for _ in range(7):
            opt.zero_grad()
            losses, z = task_losses(trunk, heads, x, ys, features=True)
            if prof is not None:
                snap = prof.observe(losses, W, features=z if engine == "features" else None)
                if snap is not None:
                    seen.append(snap.step)
            sum(W[t] * v for t, v in losses.items()).backward()
            opt.step()
        if prof is not None:
            prof.close()
        return [p.detach().clone() for p in params], seen

    plain, _ = train(False)
    observed, seen = train(True)
    assert seen == [0, 3, 6]
    for a, b in zip(plain, observed):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert list(gl.load_run(tmp_path / engine).probed_steps) == [0, 3, 6]


def test_observe_with_grad_scale_unscales_the_grams():
    trunk, heads, x, ys = build("mlp", 3, torch.float64)
    prof = gl.Profiler(trunk, list(W), engine="gramian")
    losses = task_losses(trunk, heads, x, ys)
    ref = reference_grams(losses, trunk)
    with prof:
        snap = prof.observe(losses, W, grad_scale=256.0)
    assert _gram_err(snap.gram, ref.gram) <= 1e-10
    assert all(p.grad is None for p in trunk.parameters())


def test_observe_validates_like_backward():
    trunk, heads, x, ys = build("mlp", 2, torch.float64)
    prof = gl.Profiler(trunk, ["t0", "t1"])
    with pytest.raises(gl.GradlensError, match=r"`losses` is missing tasks \['t1'\]"):
        prof.observe({"t0": task_losses(trunk, heads, x, ys)["t0"]})
    prof.close()
    with pytest.raises(gl.GradlensError, match="`observe` was called on a closed Profiler"):
        prof.observe(task_losses(trunk, heads, x, ys))
