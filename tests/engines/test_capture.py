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


# -- the heads' split reused across probes by graph signature (engines._graph.GraphIndex.memo) --


def _graph_and_split(make, batch: int, use_index: bool = True):
    """Index the stacked losses of ``make(x)`` and split its heads (through the index, whose
    memo serves a graph of a known signature, or by a fresh walk)."""
    from gradlens.engines._graph import GraphIndex

    z, losses = make(torch.randn(batch, 3))
    L = torch.stack(losses)
    g = GraphIndex.build(L)
    e = get_gradient_edge(z)
    split = split_heads(losses, [e], g.uses, [z.dtype], g if use_index else None)
    return g, split, (z, losses)


def _as_positions(g, split):
    return (
        sorted((g.pos[n], t, tuple(s)) for n, (t, s) in split.consumers.items()),
        sorted(id(p) for p in split.leaves),
    )


def test_a_split_is_reused_for_the_same_signature_and_rebound_to_the_new_nodes():
    from gradlens.engines import _graph

    torch.manual_seed(0)
    trunk, heads = nn.Linear(3, 4), nn.ModuleList([nn.Linear(4, 1) for _ in range(3)])

    def make(x):
        z = trunk(x)
        return z, [h(z).pow(2).mean() for h in heads]

    _graph._DERIVED.clear()
    g1, s1, _ = _graph_and_split(make, 5)
    n = len(_graph._DERIVED)
    g2, s2, _ = _graph_and_split(make, 7)  # another batch: the same shape
    assert g1.signature == g2.signature
    assert len(_graph._DERIVED) == n  # served from the memo
    assert s1 is not None
    assert s2 is not None
    assert set(s2.consumers) <= g2.node_set  # the new graph's nodes, none of the old one's
    assert not set(s2.consumers) & g1.node_set
    assert _as_positions(g2, s2) == _as_positions(g1, s1)
    _, fresh, _ = _graph_and_split(make, 7, use_index=False)
    assert fresh is not None
    assert sorted(id(p) for p in fresh.leaves) == sorted(id(p) for p in heads.parameters())
    assert _as_positions(g2, s2)[1] == sorted(id(p) for p in fresh.leaves)


def test_a_graph_of_another_structure_is_split_anew():
    torch.manual_seed(0)
    trunk, heads = nn.Linear(3, 4), nn.ModuleList([nn.Linear(4, 1) for _ in range(2)])
    shared_head = [False]

    def make(x):
        z = trunk(x)
        out = [h(z) for h in heads]
        if shared_head[0]:  # task 1 also reads task 0's head: no per-task split exists
            out[1] = out[1] + out[0]
        return z, [o.pow(2).mean() for o in out]

    g1, s1, _ = _graph_and_split(make, 5)
    shared_head[0] = True
    g2, s2, _ = _graph_and_split(make, 5)
    assert g1.signature != g2.signature
    assert s1 is not None
    assert s2 is None
    shared_head[0] = False
    g3, s3, _ = _graph_and_split(make, 6)
    assert s3 is not None
    assert set(s3.consumers) <= g3.node_set


def test_none_entries_of_next_functions_are_part_of_the_signature():
    """``z * c`` and ``c * z`` (c a constant) have the same node types and edges, but z's
    gradient is the node's output 0 in one and 1 in the other: the hook slot must follow."""
    torch.manual_seed(0)
    trunk, c = nn.Linear(3, 4), torch.randn(4)
    left = [True]

    def make(x):
        z = trunk(x)
        return z, [(z * c if left[0] else c * z).sum(), z.pow(2).sum()]

    g1, s1, _ = _graph_and_split(make, 5)
    left[0] = False
    g2, s2, (z, losses) = _graph_and_split(make, 5)
    assert g1.types == g2.types
    assert g1.edges == g2.edges
    assert g1.signature != g2.signature
    _, fresh, _ = _graph_and_split(make, 5, use_index=False)
    assert s2 is not None
    assert fresh is not None
    assert sorted(s for _, s in s2.consumers.values()) == sorted(
        s for _, s in fresh.consumers.values()
    )
    ((slot, _),) = next(s for t, s in s2.consumers.values() if t == 0)
    assert slot == 1


def test_the_heads_dtypes_are_checked_at_every_probe_of_a_known_signature():
    """A head casting to float64 or to bfloat16 records the same graph shape; only the
    bfloat16 one has no weight-independent split (see split_heads)."""
    torch.manual_seed(0)
    trunk, heads = nn.Linear(3, 4), nn.ModuleList([nn.Linear(4, 1) for _ in range(2)])
    dtype = [torch.float64]

    def make(x):
        z = trunk(x)
        return z, [h(z).to(dtype[0]).float().pow(2).mean() for h in heads]

    g1, s1, _ = _graph_and_split(make, 5)
    dtype[0] = torch.bfloat16
    g2, s2, _ = _graph_and_split(make, 5)
    assert g1.signature == g2.signature
    assert s1 is not None
    assert s2 is None


@pytest.mark.parametrize("shared_node", [False, True])
def test_features_computed_from_one_another_give_the_same_rows_whatever_the_weights(
    shared_node,
):
    """features=[z, f(z)], f inside the shared part: each row is the task's gradient at the
    features as the heads' inputs, for a zero weight (computed alone before: its total
    gradient at z, the flow back through f included) as for the others."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(5, 4).double()
    heads = torch.nn.ModuleList(
        [torch.nn.Linear(8, 3)] if shared_node else [torch.nn.Linear(8, 1) for _ in range(3)]
    ).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    grams = []
    for w in ({"a": 1.0, "b": 0.5, "c": 2.0}, {"a": 0.0, "b": 0.5, "c": 2.0}):
        with gl.Profiler(trunk, list(w), engine="features") as prof:
            z = trunk(x)
            z2 = torch.tanh(z)
            h = torch.cat([z, z2], 1)
            ys = heads[0](h).unbind(1) if shared_node else [m(h).squeeze(1) for m in heads]
            losses = {t: (y**2).mean() * (i + 1) for i, (t, y) in enumerate(zip(w, ys))}
            # the rows as the heads' inputs: the losses again from detached copies of z, z2
            cut = [z.detach().requires_grad_(), z2.detach().requires_grad_()]
            hc = torch.cat(cut, 1)
            yc = heads[0](hc).unbind(1) if shared_node else [m(hc).squeeze(1) for m in heads]
            J = torch.stack([
                torch.cat([
                    g.flatten()
                    for g in torch.autograd.grad((y**2).mean() * (i + 1), cut, retain_graph=True)
                ])
                for i, y in enumerate(yc)
            ])  # fmt: skip
            snap = prof.backward(losses, w, features=[z, z2])
        assert_gram_close(snap.gram, J @ J.T, 1e-10)
        grams.append(snap.gram)
    torch.testing.assert_close(grams[1], grams[0], rtol=1e-12, atol=0.0)
