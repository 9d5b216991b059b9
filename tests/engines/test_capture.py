"""Rows captured at the shared outputs from one weighted backward (gradlens.engines._capture)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

import gradlens as gl
from gradlens.engines import features as features_mod
from gradlens.engines import gramian as gramian_mod
from gradlens.engines._capture import split_heads, task_scales
from gradlens.testing import reference_grams
from tests.zoo import assert_gram_close, build, task_losses

ENGINES = ["gramian", "features"]


def _run(engine, trunk, heads, make_losses, w):
    """Plain weighted .grad, then the profiler's snapshot and .grad, and the reference Grams."""
    params = [*trunk.parameters(), *heads.parameters()]
    losses, z = make_losses()
    plain = torch.autograd.grad(sum(w[t] * v for t, v in losses.items()), params)
    with gl.Profiler(trunk, tasks=list(w), engine=engine) as prof:
        losses, z = make_losses()
        if engine == "features":
            J = torch.stack(
                [
                    torch.autograd.grad(v, z, retain_graph=True)[0].reshape(-1)
                    for v in losses.values()
                ]
            )
            ref = J @ J.T
        else:
            ref = reference_grams(losses, trunk).gram
        snap = prof.backward(losses, weights=w, features=z if engine == "features" else None)
    assert_gram_close(snap.gram, ref, 1e-10)
    for p, g in zip(params, plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    return snap


def _no_per_task(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("per-task backward used where one weighted backward suffices")

    monkeypatch.setattr(gramian_mod, "per_task_grad", refuse)
    monkeypatch.setattr(features_mod, "per_task_grad", refuse)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model", ["mlp", "cnn_bn", "transformer"])
def test_own_heads_are_captured_in_one_backward(monkeypatch, engine, model):
    _no_per_task(monkeypatch)
    trunk, heads, x, ys = build(model, 5)
    w = {f"t{t}": 0.2 + 0.3 * t for t in range(5)}
    _run(engine, trunk, heads, lambda: task_losses(trunk, heads, x, ys, features=True), w)


@pytest.mark.parametrize("engine", ENGINES)
def test_zero_and_tiny_weights_are_computed_alone(engine):
    trunk, heads, x, ys = build("mlp", 4)
    w = {"t0": 0.0, "t1": 1e-300, "t2": 0.7, "t3": 2.5}
    snap = _run(engine, trunk, heads, lambda: task_losses(trunk, heads, x, ys, features=True), w)
    assert snap.gram[0, 0] > 0  # not zeroed by its weight
    assert snap.gram[1, 1] > 0


def test_task_scales():
    u, v, alone = task_scales(torch.tensor([0.0, 1e-12, 0.5, 2.0], dtype=torch.float64))
    assert alone == [0, 1]
    assert u.tolist() == [1.0, 1.0, 0.5, 2.0]
    assert v.tolist() == [0.0, 1e-12, 1.0, 1.0]
    assert torch.equal(u * v, torch.tensor([0.0, 1e-12, 0.5, 2.0], dtype=torch.float64))


@pytest.mark.parametrize("engine", ENGINES)
def test_head_node_shared_by_tasks_falls_back(engine):
    # one Linear computes every task's output, then each task takes its column
    trunk, _, x, ys = build("mlp", 3)
    head = nn.Linear(5, 3).double()

    def make():
        z = trunk(x)
        out = head(z)
        return {f"t{t}": ((out[:, t] - ys[t]) ** 2).mean() for t in range(3)}, z

    losses, z = make()
    assert split_heads(list(losses.values()), [get_gradient_edge(z)], {}, [z.dtype]) is None
    _run(engine, trunk, nn.ModuleList([head]), make, {"t0": 0.5, "t1": 1.0, "t2": 2.0})


@pytest.mark.parametrize("engine", ENGINES)
def test_head_that_uses_the_features_twice(monkeypatch, engine):
    _no_per_task(monkeypatch)
    trunk, heads, x, ys = build("mlp", 3)

    def make():
        losses, z = task_losses(trunk, heads, x, ys, features=True)
        return {t: v + 0.1 * (i + 1) * (z * z).mean() for i, (t, v) in enumerate(losses.items())}, z

    _run(engine, trunk, heads, make, {"t0": 0.5, "t1": 1.0, "t2": 2.0})


@pytest.mark.parametrize("engine", ENGINES)
def test_leaf_used_above_and_below_the_shared_outputs(engine):
    # a free scale used on the input and in one loss: its .grad needs the whole graph
    trunk, heads, x, ys = build("mlp", 3)
    s = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))
    holder = nn.ModuleList([*heads])
    holder.register_parameter("s", s)

    def make():
        losses, z = task_losses(trunk, heads, x * s, ys, features=True)
        losses["t1"] = losses["t1"] + s**2
        return losses, z

    _run(engine, trunk, holder, make, {"t0": 0.5, "t1": 1.0, "t2": 2.0})


def test_half_precision_outputs_are_not_split():
    trunk, heads, x, ys = build("mlp", 2)
    losses, z = task_losses(trunk, heads, x, ys, features=True)
    edge = [get_gradient_edge(z)]
    assert split_heads(list(losses.values()), edge, {}, [torch.bfloat16]) is None
    assert split_heads(list(losses.values()), edge, {}, [torch.float64]) is not None


@pytest.mark.parametrize("n_tasks", [1, 2])
@pytest.mark.parametrize("engine", ENGINES)
def test_retain_graph_keeps_it_and_default_frees_it(engine, n_tasks):
    trunk, heads, x, ys = build("mlp", n_tasks)
    with gl.Profiler(trunk, [f"t{i}" for i in range(n_tasks)], engine=engine) as prof:
        losses, z = task_losses(trunk, heads, x, ys, features=True)
        feats = z if engine == "features" else None
        prof.backward(losses, features=feats, retain_graph=True)
        sum(losses.values()).backward()  # the graph is still there
        losses, z = task_losses(trunk, heads, x, ys, features=True)
        prof.backward(losses, features=z if engine == "features" else None)
        # freed, the shared part's saved tensors included, as a plain backward frees them
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            z.sum().backward()
