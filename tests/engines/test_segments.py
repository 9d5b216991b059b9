"""The gramian engine's backward, cut between layers (gradlens.engines._segments)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

import gradlens as gl
from gradlens.engines import gramian as gramian_mod
from gradlens.engines._segments import plan_segments
from gradlens.testing import reference_grams
from tests.zoo import assert_gram_close


class _Residual(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.tanh(self.a(x)))


def _edges(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, object]]:
    got: dict[str, object] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(
                lambda m_, a, out, n=name: got.__setitem__(n, get_gradient_edge(out))
            )
    return model(x), got


def test_every_layer_of_a_plain_mlp_is_a_cut():
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    z, e = _edges(mlp, torch.randn(5, 3))
    out = torch.relu(z)  # the shared outputs, above the last layer
    plan = plan_segments([get_gradient_edge(out)], [e["4"], e["2"], e["0"], mlp[0].weight])
    assert plan == [([0], 0), ([1], 1), ([2], 2), ([3], None)]


def test_a_residual_block_is_cut_at_its_ends_only():
    net = nn.Sequential(nn.Linear(3, 4), _Residual(4), nn.Linear(4, 2))
    z, e = _edges(net, torch.randn(5, 3))
    out = torch.tanh(z)
    plan = plan_segments([get_gradient_edge(out)], [e["2"], e["1.b"], e["1.a"], e["0"]])
    # the block's inner layers are bypassed by the skip connection: one segment holds both
    assert plan == [([0], 0), ([1, 2, 3], 3), ([], None)]


def test_a_parameter_used_above_and_below_a_layer_prevents_the_cut():
    first, lin = nn.Linear(3, 4), nn.Linear(4, 4)
    s = nn.Parameter(torch.tensor(0.5))
    h = first(torch.randn(5, 3) * s)
    z = lin(torch.tanh(h) * s)
    plan = plan_segments([get_gradient_edge(z)], [get_gradient_edge(h), s])
    assert plan == [([0, 1], None)]


def _trunk():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
        nn.Linear(8, 5),
    ).double()  # fmt: skip


@pytest.mark.parametrize("n_tasks", [2, 5])
def test_one_backward_per_layer_and_blocks_freed_on_the_way(monkeypatch, n_tasks):
    trunk = _trunk()
    heads = nn.ModuleList([nn.Linear(5, 1).double() for _ in range(n_tasks)])
    x, ys = torch.randn(7, 6, dtype=torch.float64), torch.randn(n_tasks, 7, dtype=torch.float64)
    asked: list[int] = []
    alive: list[int] = []
    blocks: list[weakref.ref] = []
    inner = gramian_mod.batched_grad_from

    def spy(outputs, cotangents, inputs, *rest):
        asked.append(len(inputs))
        alive.append(sum(r() is not None for r in blocks))
        got = inner(outputs, cotangents, inputs, *rest)
        blocks.extend(weakref.ref(g) for g in got if g is not None)
        return got

    monkeypatch.setattr(gramian_mod, "batched_grad_from", spy)
    names = [f"t{i}" for i in range(n_tasks)]
    # a tiny budget: no merging of segments (small blocks would otherwise go in one backward)
    with gl.Profiler(trunk, tasks=names, engine="gramian", memory_budget=8) as prof:
        z = trunk(x)
        losses = {
            t: ((h(z).squeeze(1) - ys[i]) ** 2).mean() for i, (t, h) in enumerate(zip(names, heads))
        }
        ref = reference_grams(losses, trunk)
        snap = prof.backward(losses)
    assert_gram_close(snap.gram, ref.gram, 1e-10)
    for layer, g in ref.layer_grams.items():
        assert_gram_close(snap.layer_grams[layer], g, 1e-10)
    # the shared output is the last layer's: three more layers, one backward each
    assert asked == [1, 1, 1]
    # when a backward starts, only its own cotangent (the block above) is still alive
    assert max(alive) <= 1, alive


def test_small_blocks_share_one_backward(monkeypatch):
    trunk = _trunk()
    heads = nn.ModuleList([nn.Linear(5, 1).double() for _ in range(3)])
    x = torch.randn(7, 6, dtype=torch.float64)
    asked: list[int] = []
    inner = gramian_mod.batched_grad_from

    def spy(outputs, cotangents, inputs, *rest):
        asked.append(len(inputs))
        return inner(outputs, cotangents, inputs, *rest)

    monkeypatch.setattr(gramian_mod, "batched_grad_from", spy)
    names = ["t0", "t1", "t2"]
    with gl.Profiler(trunk, tasks=names, engine="gramian") as prof:  # default budget
        z = trunk(x)
        losses = {t: h(z).pow(2).mean() * (i + 1) for i, (t, h) in enumerate(zip(names, heads))}
        ref = reference_grams(losses, trunk)
        snap = prof.backward(losses)
    assert_gram_close(snap.gram, ref.gram, 1e-10)
    assert asked == [3]
