"""The gramian engine's rules (norm affine, embedding, grouped conv, HF Conv1D, custom rules)
against the loop reference in float64, and how rules are matched or declined."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradlens as gl
from gradlens.engines import rules as rules_mod
from gradlens.engines.rules import decline_reason, register_rule, rule_for
from gradlens.testing import reference_grams
from tests.zoo import assert_gram_close, probe_matches_reference


class _Seq(nn.Module):
    def __init__(self, *mods: nn.Module, pool: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(*mods)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return h.flatten(1, -2).mean(1) if self.pool else h


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    return {
        "layernorm": (
            _Seq(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.LayerNorm(6), nn.Linear(6, 5),
                 pool=True),
            torch.randn(3, 4, 4),
        ),
        "groupnorm_conv": (
            _Seq(nn.Conv2d(2, 6, 3, groups=2), nn.GroupNorm(3, 6), nn.ReLU(),
                 nn.Conv2d(6, 6, 3, groups=3, bias=False), nn.Flatten(), nn.Linear(6 * 2 * 2, 5)),
            torch.randn(3, 2, 6, 6),
        ),
        "batchnorm_train": (
            _Seq(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(),
                 nn.Linear(4 * 5, 5)),
            torch.randn(4, 2, 7),
        ),
        "batchnorm_eval": (
            _Seq(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 5)).eval(),
            torch.randn(4, 4),
        ),
        "embedding": (
            _Seq(nn.Embedding(13, 5, padding_idx=0), nn.Linear(5, 5), pool=True),
            torch.tensor([[0, 3, 3, 7], [12, 3, 0, 1], [7, 7, 7, 2]]),
        ),
    }


@pytest.mark.parametrize("n_tasks", [1, 3])
@pytest.mark.parametrize("model", sorted(_models()))
def test_rule_matches_the_loop_reference(model, n_tasks):
    torch.manual_seed(0)
    trunk, x = _models()[model]
    trunk = trunk.double()
    if x.is_floating_point():
        x = x.double()
    heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(n_tasks)]).double()
    names = [f"t{t}" for t in range(n_tasks)]
    w = {n: 0.3 + 0.4 * t for t, n in enumerate(names)}
    params = [*trunk.parameters(), *heads.parameters()]
    with gl.Profiler(trunk, names, engine="gramian") as prof:
        z = trunk(x)
        losses = {n: (h(z) ** 2).mean() * (1 + t) for t, (n, h) in enumerate(zip(names, heads))}
        snap = probe_matches_reference(prof, trunk, losses, w, params)
    served = {r for r in snap.rules.values()}
    assert "generic" not in served, snap.rules


def test_rules_are_matched_by_isinstance_and_declined_with_a_reason():
    class MyLinear(nn.Linear):  # keeps Linear.forward: served
        pass

    class Padded(nn.Conv2d):  # transforms its input before the convolution: declined
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    assert rule_for(MyLinear(2, 2)).name == "linear"
    assert rule_for(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2)).name == "linear"
    assert rule_for(Padded(1, 1, 3)) is None
    assert "overrides Conv2d.forward" in decline_reason(Padded(1, 1, 3))
    assert "declines" in decline_reason(nn.Conv2d(1, 1, 3, padding="same"))
    assert "declines" in decline_reason(nn.Embedding(4, 2, sparse=True))
    assert rule_for(nn.BatchNorm2d(3)).name == "norm"
    assert rule_for(nn.SyncBatchNorm(3)) is None  # its own forward


class Scale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_a_custom_rule_serves_its_module_exactly():
    calls = []

    @register_rule(Scale, name="scale")
    def scale_rule(module, inputs, out_grads, weights, budget):
        calls.append(len(inputs))
        g = sum((d * x).reshape(d.shape[0], -1, x.shape[-1]).sum(1)
                for x, d in zip(inputs, out_grads))
        return (g @ g.T).double(), {"scale": weights.to(g.dtype) @ g}

    try:
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), Scale(5)).double()
        heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(3)]).double()
        x = torch.randn(6, 4, dtype=torch.float64)
        with gl.Profiler(trunk, ["a", "b", "c"], engine="gramian") as prof:
            z = trunk(x)
            losses = {n: (h(z) ** 2).mean() for n, h in zip("abc", heads)}
            ref = reference_grams(losses, trunk)
            snap = prof.backward(losses, {"a": 0.2, "b": 0.3, "c": 0.5})
        assert snap.rules == {"0": "linear", "1": "scale", "3": "scale"}
        assert calls == [1, 1]
        for layer, g in ref.layer_grams.items():
            assert_gram_close(snap.layer_grams[layer], g, 1e-10)
    finally:
        rules_mod._RULES.pop(Scale)


def test_hf_conv1d_rule():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    trunk = nn.Sequential(Conv1D(6, 4), nn.GELU(), Conv1D(5, 6)).double()
    assert rule_for(trunk[0]).name == "conv1d"
    heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(3)]).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    params = [*trunk.parameters(), *heads.parameters()]
    with gl.Profiler(trunk, ["a", "b", "c"], engine="gramian") as prof:
        z = trunk(x).mean(1)
        losses = {n: (h(z) ** 2).mean() for n, h in zip("abc", heads)}
        ref = reference_grams(losses, trunk)
        plain = torch.autograd.grad(sum(losses.values()), params, retain_graph=True)
        snap = prof.backward(losses)
    assert snap.rules == {"0": "conv1d", "2": "conv1d"}
    for layer, g in ref.layer_grams.items():
        assert_gram_close(snap.layer_grams[layer], g, 1e-10)
    for p, g in zip(params, plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


# -- same-shaped LayerNorms computed together (gradlens.engines.rules.norm.layer_norm_group) --
@pytest.mark.parametrize(
    ("frozen", "weighted"),
    [((), True), ((), False), (("weight",), True), (("bias",), True)],
    ids=["both", "gram-only", "bias-only", "weight-only"],
)
def test_layer_norm_group_equals_the_rule_layer_by_layer(frozen, weighted):
    from gradlens.engines.rules.norm import layer_norm_group, norm_rule

    torch.manual_seed(7)
    T = 3
    lns = [nn.LayerNorm(6).double() for _ in range(3)]
    for ln in lns:
        with torch.no_grad():
            ln.weight.normal_()
            ln.bias.normal_()
        for name in frozen:
            getattr(ln, name).requires_grad_(False)
    xs = [torch.randn(2, 5, 6, dtype=torch.float64) for _ in lns]
    ds = [torch.randn(T, 2, 5, 6, dtype=torch.float64) for _ in lns]
    w = torch.tensor([0.2, 0.0, 1.5], dtype=torch.float64) if weighted else None
    out = layer_norm_group(lns, xs, ds, w)
    assert out is not None
    G, gw, gb = out
    for k, (ln, x, d) in enumerate(zip(lns, xs, ds)):
        G_ref, ref = norm_rule(ln, [x], [d], w, 1 << 30)
        torch.testing.assert_close(G[k], G_ref, rtol=1e-12, atol=1e-12 * float(G_ref.max()))
        for name, got in (("weight", gw), ("bias", gb)):
            if name in ref:
                assert got is not None
                torch.testing.assert_close(got[k], ref[name], rtol=1e-12, atol=1e-12)
            else:
                assert got is None


def test_layer_norm_group_declines_what_it_does_not_serve():
    from gradlens.engines.rules.norm import layer_norm_group

    lns = [nn.LayerNorm(4), nn.LayerNorm(4, eps=1e-3)]  # eps differs
    xs = [torch.randn(3, 4) for _ in lns]
    ds = [torch.randn(2, 3, 4) for _ in lns]
    assert layer_norm_group(lns, xs, ds, None) is None
    lns[1].eps = lns[0].eps
    assert layer_norm_group(lns, xs, ds, None) is not None
    lns[1].bias.requires_grad_(False)  # the layers' trainable parameters differ
    assert layer_norm_group(lns, xs, ds, None) is None
    assert layer_norm_group([nn.GroupNorm(2, 4)] * 2, xs, ds, None) is None  # LayerNorm only


def test_same_shaped_layer_norms_in_a_probe_are_grouped_and_exact(monkeypatch):
    from gradlens.engines.rules import _groups

    calls: list[int] = []
    group = _groups.layer_norm_group

    def spy(mods, *args):
        out = group(mods, *args)
        calls.append(0 if out is None else len(mods))
        return out

    monkeypatch.setattr(_groups, "layer_norm_group", spy)
    test_rule_matches_the_loop_reference("layernorm", 3)  # the reference, exact per layer
    assert calls == [2]  # the two LayerNorm(6) layers together
