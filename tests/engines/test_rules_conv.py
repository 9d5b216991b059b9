"""The convolution rule's two routes (gradlens/engines/rules/conv.py) against explicit per-task
weight gradients in float64, the route each layer takes, and the engine on a CNN whose late
layers take the kernel route against the loop reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradlens as gl
from gradlens.engines.rules import conv as conv_mod
from gradlens.engines.rules import rule_for
from tests.zoo import assert_gram_close, probe_matches_reference

BIG = 1 << 30


def _explicit(conv: nn.Module, xs: list[torch.Tensor], ds: list[torch.Tensor]) -> torch.Tensor:
    """Each task's gradient of (weight, bias) by autograd, one task at a time: T x P."""
    T = ds[0].shape[0]
    params = [p for p in conv.parameters() if p.requires_grad]
    rows = []
    for t in range(T):
        out = sum((conv(x) * d[t]).sum() for x, d in zip(xs, ds))
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params)]))
    return torch.stack(rows)


CASES = {
    "2d, 3x3, padding 1, bias": (lambda: nn.Conv2d(16, 6, 3, padding=1), [(1, 16, 2, 3)]),
    "2d, stride 2, dilation 2, no bias": (
        lambda: nn.Conv2d(16, 5, 3, stride=2, dilation=2, padding=2, bias=False),
        [(2, 16, 3, 2)],
    ),
    "2d, padding (1, 0), kernel (3, 1)": (
        lambda: nn.Conv2d(24, 4, (3, 1), padding=(1, 0)),
        [(1, 24, 2, 2)],
    ),
    "2d, pointwise, stride 2": (lambda: nn.Conv2d(40, 7, 1, stride=2), [(2, 40, 3, 1)]),
    "2d, called twice on two map sizes": (
        lambda: nn.Conv2d(16, 4, 3, padding=1),
        [(1, 16, 2, 1), (1, 16, 1, 3)],
    ),
    "1d, stride 2, padding 1": (lambda: nn.Conv1d(10, 6, 3, stride=2, padding=1), [(2, 10, 4)]),
    "1d, pointwise": (lambda: nn.Conv1d(16, 5, 1), [(2, 16, 2)]),
}


@pytest.mark.parametrize("weights", [True, False], ids=["weighted", "gram-only"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_route_matches_explicit_task_gradients(case, weights):
    torch.manual_seed(0)
    make, shapes = CASES[case]
    conv = make().double()
    T = 3
    xs = [torch.randn(*s, dtype=torch.float64) for s in shapes]
    ds = [torch.randn(T, *conv(x).shape, dtype=torch.float64) for x in xs]
    assert conv_mod._kernel_route(conv, xs, ds, BIG) is not None  # the route under test
    w = torch.tensor([0.2, 0.5, 1.3], dtype=torch.float64) if weights else None
    G, grads = rule_for(conv).fn(conv, xs, ds, w, BIG)
    J = _explicit(conv, xs, ds)
    assert_gram_close(G, J @ J.T, 1e-12)
    if w is None:
        assert grads == {}
        return
    want = w @ J
    got = torch.cat([grads["weight"].reshape(-1)] + ([grads["bias"]] if "bias" in grads else []))
    assert set(grads) == {n for n, p in conv.named_parameters() if p.requires_grad}
    assert grads["weight"].shape == conv.weight.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_weight_route_where_the_kernel_costs_more_or_does_not_apply():
    torch.manual_seed(0)
    T = 3

    def route(conv: nn.Module, x_shape: tuple[int, ...], budget: int = BIG) -> object:
        x = torch.randn(*x_shape)
        return conv_mod._kernel_route(conv, [x], [torch.randn(T, *conv(x).shape)], budget)

    assert route(nn.Conv2d(16, 6, 3, padding=1), (1, 16, 2, 3)) is not None
    # many output positions for few inputs per channel: the weight gradients are cheaper
    assert route(nn.Conv2d(3, 8, 3, padding=1), (4, 3, 16, 16)) is None
    assert route(nn.Conv2d(16, 16, 3, padding=1, groups=2), (1, 16, 2, 3)) is None  # grouped
    assert route(nn.Conv3d(16, 4, 3, padding=1), (1, 16, 1, 1, 2)) is None  # no 3-d unfold
    assert route(nn.Conv2d(16, 6, 3, padding=1), (1, 16, 2, 3), budget=1024) is None  # memory
    conv = nn.Conv2d(16, 6, 3, padding=1)
    x = torch.randn(16, 2, 3)  # one unbatched call
    assert conv_mod._kernel_route(conv, [x], [torch.randn(T, *conv(x).shape)], BIG) is None


def test_a_frozen_weight_takes_the_bias_only_gram():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 6, 3, padding=1).double()
    conv.weight.requires_grad_(False)
    x = torch.randn(1, 16, 2, 3, dtype=torch.float64)
    d = torch.randn(3, *conv(x).shape, dtype=torch.float64)
    w = torch.ones(3, dtype=torch.float64)
    G, grads = rule_for(conv).fn(conv, [x], [d], w, BIG)
    J = _explicit(conv, [x], [d])
    assert_gram_close(G, J @ J.T, 1e-12)
    assert set(grads) == {"bias"}


class _LateStages(nn.Module):
    """A small CNN whose late layers have a few output positions for many inputs (the kernel
    route) and whose first layer has many (the weight route)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.late = nn.Conv2d(16, 16, 3, padding=1)
        self.point = nn.Conv2d(16, 24, 1, stride=2)
        self.norm = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.norm(self.down(h)))
        h = torch.relu(self.late(h)) + h
        return self.point(h).mean((2, 3))


@pytest.mark.parametrize("engine", ["gramian", "auto"])
def test_the_engine_on_late_stages_matches_the_loop_reference(engine, monkeypatch):
    taken: list[bool] = []
    route = conv_mod._kernel_route

    def spy(*args, **kwargs):
        got = route(*args, **kwargs)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(conv_mod, "_kernel_route", spy)
    torch.manual_seed(0)
    trunk = _LateStages().double()
    heads = nn.ModuleList([nn.Linear(24, 1) for _ in range(3)]).double()
    names = ["a", "b", "c"]
    w = {"a": 0.2, "b": 0.3, "c": 0.5}
    params = [*trunk.parameters(), *heads.parameters()]
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with gl.Profiler(trunk, names, engine=engine) as prof:
        for _ in range(4 if engine == "auto" else 1):  # auto: its deciding probes, each exact
            for p in params:
                p.grad = None
            z = trunk(x)
            losses = {n: (h(z) ** 2).mean() * (1 + t) for t, (n, h) in enumerate(zip(names, heads))}
            snap = probe_matches_reference(prof, trunk, losses, w, params)
    assert True in taken, taken  # the kernel route ran (late stages)
    assert False in taken, taken  # and the weight route (the stem)
    if engine == "gramian":
        assert snap.rules["late"] == snap.rules["point"] == "conv"
