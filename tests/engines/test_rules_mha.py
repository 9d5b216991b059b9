"""``nn.MultiheadAttention`` under the gramian engine, against the loop reference in float64: by
default through the exact generic path; with the opt-in ``mha_in_proj`` rule
(:func:`gradlens.engines.rules.attention.enable`), its packed in-projection in self-attention is
served by the rule (recorded from the autograd graph); separate q/k/v weights (kdim/vdim),
add_bias_kv and cross-attention take the exact generic path, and so does ``out_proj`` (its
forward is never called as a module)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import gradlens as gl
from gradlens.engines.rules import attention, decline_reason, rule_for
from tests.zoo import probe_matches_reference


@pytest.fixture
def mha_rule():
    """The opt-in rule, for one test."""
    attention.enable()
    yield
    attention.disable()


class _Attention(nn.Module):
    """Self-attention (or, with kdim/vdim, attention over keys and values of other widths
    projected from the same input), mean-pooled over positions."""

    def __init__(
        self,
        batch_first: bool,
        kdim: int | None = None,
        vdim: int | None = None,
        cross: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__()
        self.batch_first, self.cross = batch_first, cross
        self.separate = kdim is not None
        self.attn = nn.MultiheadAttention(
            6, 2, batch_first=batch_first, kdim=kdim, vdim=vdim, **kw
        )
        self.to_k = nn.Linear(6, kdim) if kdim is not None else nn.Identity()
        self.to_v = nn.Linear(6, vdim) if vdim is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = v = x  # the same tensor: self-attention
        if self.separate:
            k, v = self.to_k(x), self.to_v(x)
        elif self.cross:
            k = v = x.flip(0)  # another tensor with the same features
        y, _ = self.attn(x, k, v, need_weights=False)
        return y.mean(1 if self.batch_first else 0)


#: option -> (MultiheadAttention options, the attention layer's rule)
OPTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "packed": ({}, "mha_in_proj"),
    "no_bias": ({"bias": False}, "mha_in_proj"),
    "bias_kv": ({"add_bias_kv": True}, "generic"),
    "cross": ({"cross": True}, "generic"),  # the packed weight split into q and kv chunks
    "kdim_vdim": ({"kdim": 3, "vdim": 5}, "generic"),  # separate q/k/v weights
    "kdim_vdim_no_bias": ({"kdim": 3, "vdim": 5, "bias": False}, "generic"),
}


def _check(trunk: nn.Module, x: torch.Tensor, n_tasks: int) -> gl.Snapshot:
    """One gramian probe against the loop reference (Grams per layer, ``.grad``)."""
    out = trunk(x).shape[-1]
    heads = nn.ModuleList([nn.Linear(out, 1) for _ in range(n_tasks)]).double()
    names = [f"t{t}" for t in range(n_tasks)]
    w = {n: 0.3 + 0.4 * t for t, n in enumerate(names)}
    params = [p for p in (*trunk.parameters(), *heads.parameters()) if p.requires_grad]
    with gl.Profiler(trunk, names, engine="gramian") as prof:
        z = trunk(x)
        losses = {n: (h(z) ** 2).mean() * (1 + t) for t, (n, h) in enumerate(zip(names, heads))}
        snap = probe_matches_reference(prof, trunk, losses, w, params)
    assert list(snap.layer_grams) == list(prof.layers)
    return snap


@pytest.mark.parametrize("enabled", [False, True])
@pytest.mark.parametrize("n_tasks", [1, 3])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_multihead_attention_matches_the_loop_reference(option, batch_first, n_tasks, enabled):
    torch.manual_seed(0)
    kw, rule = OPTIONS[option]
    if not enabled:
        rule = "generic"
    trunk = _Attention(batch_first, **kw).double()
    x = torch.randn(4, 3, 6, dtype=torch.float64)  # (batch, seq) or (seq, batch)
    try:
        if enabled:
            attention.enable()
        snap = _check(trunk, x, n_tasks)
    finally:
        attention.disable()
    assert snap.rules["attn"] == rule
    assert snap.rules["attn.out_proj"] == "generic"  # F.linear on its weight, no module call
    if "kdim" in kw:
        assert snap.rules["to_k"] == snap.rules["to_v"] == "linear"


class _Twice(nn.Module):
    """One attention called twice (the rule writes the weighted gradient itself), with masks."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 3, batch_first=True, dropout=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = torch.zeros(x.shape[:2], dtype=torch.bool)
        pad[0, -1] = True
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        h, _ = self.attn(x, x, x, key_padding_mask=pad, attn_mask=causal)
        h = torch.tanh(h) + x
        y, _ = self.attn(h, h, h)
        return y.mean(1)


def test_the_rule_on_repeated_calls_unbatched_inputs_frozen_bias_and_an_encoder_layer(mha_rule):
    torch.manual_seed(0)
    snap = _check(_Twice().double(), torch.randn(3, 4, 6, dtype=torch.float64), 3)
    assert snap.rules["attn"] == "mha_in_proj"
    unbatched = _Attention(False).double()  # a (seq, features) query: unbatched
    snap = _check(unbatched, torch.randn(5, 6, dtype=torch.float64), 2)
    # torch unsqueezes the query, key and value apart: three tensors, the weight split in three
    assert snap.rules["attn"] == "generic"
    frozen = _Attention(True).double()
    frozen.attn.in_proj_bias.requires_grad_(False)
    snap = _check(frozen, torch.randn(4, 3, 6, dtype=torch.float64), 3)
    assert snap.rules["attn"] == "mha_in_proj"
    layer = nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
    snap = _check(layer.double(), torch.randn(3, 4, 6, dtype=torch.float64), 3)
    assert snap.rules["self_attn"] == "mha_in_proj"


def test_the_rule_is_opt_in():
    assert rule_for(nn.MultiheadAttention(4, 2)) is None
    assert "no rule registered" in decline_reason(nn.MultiheadAttention(4, 2))


def test_which_multihead_attention_the_rule_serves(mha_rule):
    assert rule_for(nn.MultiheadAttention(4, 2)).name == "mha_in_proj"
    assert rule_for(nn.MultiheadAttention(4, 2, bias=False)).name == "mha_in_proj"
    for declined in (
        nn.MultiheadAttention(4, 2, kdim=3, vdim=5),
        nn.MultiheadAttention(4, 2, add_bias_kv=True),
    ):
        assert rule_for(declined) is None
        assert "declines" in decline_reason(declined)
    # out_proj alone is a Linear the rule would serve, were its forward called
    assert rule_for(nn.MultiheadAttention(4, 2).out_proj).name == "linear"
