"""``nn.MultiheadAttention`` under the gramian engine: no rule serves it (its packed in_proj and
its out_proj are applied inside ``F.multi_head_attention_forward``, out of reach of the module
hooks a rule is fed by; see README "Engines"), so both of its layers take the exact generic
path, whatever its options. Pinned here against the loop reference in float64."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import gradlens as gl
from gradlens.engines.rules import decline_reason, rule_for
from gradlens.testing import reference_grams
from tests.zoo import assert_gram_close


class _Attention(nn.Module):
    """Self-attention (or, with kdim/vdim, attention over keys and values of other widths
    projected from the same input), mean-pooled over positions."""

    def __init__(
        self, batch_first: bool, kdim: int | None = None, vdim: int | None = None, **kw: Any
    ) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.separate = kdim is not None
        self.attn = nn.MultiheadAttention(
            6, 2, batch_first=batch_first, kdim=kdim, vdim=vdim, **kw
        )
        self.to_k = nn.Linear(6, kdim) if kdim is not None else nn.Identity()
        self.to_v = nn.Linear(6, vdim) if vdim is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = v = x  # the same tensor: the packed self-attention path
        if self.separate:
            k, v = self.to_k(x), self.to_v(x)
        y, _ = self.attn(x, k, v, need_weights=False)
        return y.mean(1 if self.batch_first else 0)


OPTIONS = {
    "packed": {},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "kdim_vdim": {"kdim": 3, "vdim": 5},  # separate q/k/v weights
    "kdim_vdim_no_bias": {"kdim": 3, "vdim": 5, "bias": False},
}


@pytest.mark.parametrize("n_tasks", [1, 3])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_multihead_attention_is_exact_through_the_generic_path(option, batch_first, n_tasks):
    torch.manual_seed(0)
    trunk = _Attention(batch_first, **OPTIONS[option]).double()
    x = torch.randn(4, 3, 6, dtype=torch.float64)  # (batch, seq) or (seq, batch)
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(n_tasks)]).double()
    names = [f"t{t}" for t in range(n_tasks)]
    w = {n: 0.3 + 0.4 * t for t, n in enumerate(names)}
    params = [*trunk.parameters(), *heads.parameters()]
    with gl.Profiler(trunk, names, engine="gramian") as prof:
        z = trunk(x)
        losses = {n: (h(z) ** 2).mean() * (1 + t) for t, (n, h) in enumerate(zip(names, heads))}
        ref = reference_grams(losses, trunk)
        plain = torch.autograd.grad(
            sum(w[n] * v for n, v in losses.items()), params, retain_graph=True
        )
        snap = prof.backward(losses, w)
    # the attention's own parameters (in_proj or q/k/v weights, biases, bias_k/bias_v) and its
    # out_proj, whose forward is never called as a module: both generic
    assert snap.rules["attn"] == snap.rules["attn.out_proj"] == "generic"
    if "kdim" in OPTIONS[option]:
        assert snap.rules["to_k"] == snap.rules["to_v"] == "linear"
    assert list(snap.layer_grams) == list(ref.layer_grams) == list(prof.layers)
    assert_gram_close(snap.gram, ref.gram, 1e-10)
    for layer, g in ref.layer_grams.items():
        assert_gram_close(snap.layer_grams[layer], g, 1e-10)
    for p, g in zip(params, plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_multihead_attention_says_why_no_rule_serves_it():
    mha = nn.MultiheadAttention(4, 2)
    assert rule_for(mha) is None
    reason = decline_reason(mha)
    assert reason is not None
    assert "F.multi_head_attention_forward" in reason
    # out_proj alone is a Linear the rule would serve, were its forward called
    assert rule_for(mha.out_proj) is not None
    assert decline_reason(mha.out_proj) is None
