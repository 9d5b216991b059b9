"""The vmapped second stage on CPU (gradlens.engines._batching): its attention batching rule and
the chunked backward against one backward per task."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import get_gradient_edge
from torch.nn import functional as F

from gradlens.engines._batching import (
    _SDPA_CPU_BACKWARD,
    LEGACY_FAST,
    batching_rules,
    vmapped_grad_from,
)

B, H, S, E, T = 2, 2, 5, 4, 3


def _per_task(out: torch.Tensor, cot: torch.Tensor, inputs: list[torch.Tensor]) -> list:
    rows = [torch.autograd.grad(out, inputs, c, retain_graph=True) for c in cot]
    return [torch.stack(gs) for gs in zip(*rows)]


def _registered() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        f"aten::{_SDPA_CPU_BACKWARD}", "FuncTorchBatched"
    )


@pytest.mark.parametrize(
    ("mask", "causal", "scale"),
    [
        (None, False, None),
        (None, True, 0.3),
        ((S, S), False, None),  # float, broadcast over batch and heads
        ((B, 1, S, S), False, None),  # per batch element
        ((1, H, S, S), False, 0.5),  # per head
        ("bool", False, None),
    ],
)
def test_attention_rule_matches_one_backward_per_task(mask, causal, scale):
    torch.manual_seed(0)
    x = torch.randn(B, S, 3 * H * E, dtype=torch.float64, requires_grad=True)
    q, k, v = (t.view(B, S, H, E).transpose(1, 2) for t in x.split(H * E, dim=-1))  # strided
    if mask == "bool":
        m = torch.rand(B, H, S, S) > 0.3
        m[..., 0] = True  # no fully masked row
    else:
        m = None if mask is None else torch.randn(*mask, dtype=torch.float64)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, scale=scale)
    assert type(out.grad_fn).__name__.startswith("ScaledDotProductFlashAttentionForCpu")
    cot = torch.randn(T, *out.shape, dtype=torch.float64)
    want = _per_task(out, cot, [x])
    # torch's slow path (one call per task) would warn here, and warnings are errors
    torch._C._functorch._set_vmap_fallback_warning_enabled(True)
    try:
        got = vmapped_grad_from([get_gradient_edge(out)], [cot], [x])
    finally:
        torch._C._functorch._set_vmap_fallback_warning_enabled(False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    assert not _registered()  # the rule is gone once the backward returns


def _check_chunks(out: torch.Tensor, used: list, x: torch.Tensor, chunk, **kw) -> None:
    """``vmapped_grad_from`` by ``chunk`` tasks at a time against one backward per task: the
    same gradients, contiguous, None for an unreached input, the graph freed by the last
    chunk."""
    unused = torch.randn(3, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(T, *out.shape, dtype=torch.float64)
    want = _per_task(out, cot, used)
    got = vmapped_grad_from(
        [get_gradient_edge(out)], [cot], [*used, unused], retain_graph=False, chunk=chunk, **kw
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        assert g.is_contiguous()
    assert got[-1] is None
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(out, x, cot[0])  # the last chunk freed the graph, as asked


@pytest.mark.parametrize("chunk", [1, 2, None])
def test_chunks_and_unreached_inputs(chunk):
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4).double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    h = torch.nn.functional.gelu(torch.nn.functional.layer_norm(lin(x), (4,)))
    _check_chunks(h, [x, lin.weight], x, chunk)


def test_nested_registrations_share_one():
    assert not _registered()
    with batching_rules():
        with batching_rules():
            assert _registered()
        assert _registered()
    assert not _registered()


def test_without_the_rule_vmap_falls_back_exactly_and_quietly(monkeypatch):
    """A torch whose private API refuses the registration (or batches the op itself): the
    vmapped backward still matches one backward per task, and torch's slow-path warning, on
    here and an error under the test settings, is silenced inside the call only."""
    import gradlens.engines._batching as batching

    monkeypatch.setattr(batching, "_register", lambda: None)
    torch.manual_seed(1)
    x = torch.randn(B, H, S, E, dtype=torch.float64, requires_grad=True)
    out = F.scaled_dot_product_attention(x, x, x)
    cot = torch.randn(T, *out.shape, dtype=torch.float64)
    want = _per_task(out, cot, [x])
    with batching_rules() as registered:
        assert not registered
    torch._C._functorch._set_vmap_fallback_warning_enabled(True)
    try:
        got = vmapped_grad_from([get_gradient_edge(out)], [cot], [x])
    finally:
        torch._C._functorch._set_vmap_fallback_warning_enabled(False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)


# -- autograd's own (legacy) batching for graphs of LEGACY_FAST node types ----------------------


def _legacy_graph(x: torch.Tensor, lin: torch.nn.Linear, w2: torch.Tensor) -> torch.Tensor:
    """A graph of LEGACY_FAST's Linear-and-ReLU types: Linear with a bias (addmm, t) and on a
    3-d input without one (mm, unsafe view), ReLU, sigmoid, add, mul, views."""
    h = torch.relu(lin(x)).view(-1, 2, 4)
    return h + torch.sigmoid(F.linear(h, w2)) * h


def _types(out: torch.Tensor) -> set[str]:
    """The node types below ``out`` but the leaves' (as ``GraphIndex.types_between`` lists
    them: a backward to the leaves stops at their accumulators)."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo += [n for n, _ in fn.next_functions]
    return {type(fn).__name__ for fn in seen} - {"AccumulateGrad"}


def _fallbacks(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[str]:
    """The legacy vmap's slow-path notices (a loop over tasks for an op it has no batching rule
    for) in one ``is_grads_batched`` backward of ``out`` (shown only under a debug switch)."""
    import warnings

    cot = torch.ones(T, *out.shape, dtype=out.dtype)
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.autograd.grad(out, inputs, cot, is_grads_batched=True, retain_graph=True)
    finally:
        torch._C._debug_only_display_vmap_fallback_warnings(False)
    return [str(w.message) for w in seen if "performance drop" in str(w.message)]


def test_the_linear_relu_types_have_a_legacy_batching_rule():
    """LEGACY_FAST's Linear, ReLU, add, mul, sigmoid and views: a rule of the legacy vmap each
    (the other listed types are there because whole trunks measured faster, see its doc)."""
    lin = torch.nn.Linear(6, 4).double()
    x = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    out = _legacy_graph(x, lin, w2)
    assert _types(out) <= LEGACY_FAST
    assert len(_types(out)) == 9
    assert _fallbacks(out, [x, lin.weight, lin.bias, w2]) == []
    # the check can fail: GELU has no legacy batching rule
    assert len(_fallbacks(F.gelu(out), [x])) == 1


@pytest.mark.parametrize("chunk", [1, 2, None])
def test_legacy_batching_matches_one_backward_per_task(chunk):
    torch.manual_seed(2)
    lin = torch.nn.Linear(6, 4).double()
    x = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    out = _legacy_graph(x, lin, w2)
    _check_chunks(out, [x, lin.weight, lin.bias, w2], x, chunk, legacy=True, rules=False)


def _transformer_graph(ids: torch.Tensor, emb: torch.nn.Embedding, lin: torch.nn.Linear):
    """A graph of most LEGACY_FAST types: those of the transformer trunks (embedding, layer
    norm, attention, GELU, tanh, softmax, ...)."""
    h = F.layer_norm(emb(ids), (8,))  # (B, S, 8)
    q, k, v = lin(h).split(8, dim=-1)
    b, n = h.shape[:2]
    heads = [t.reshape(b, n, 2, 4).transpose(1, 2) for t in (q, k, v)]
    a = F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(b, n, 8)
    s = torch._safe_softmax(torch.bmm(h, a.transpose(1, 2)), -1)
    g = F.gelu(torch.bmm(s, h)) + torch.tanh(a).pow(2) * 0.5
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6)
    g = torch.cat([g, g.clone().permute(0, 1, 2)], dim=-1)[:, 0]
    return g.unsqueeze(1).expand(b, 2, 16) + torch.sigmoid(g).unsqueeze(1)


def test_legacy_batching_is_exact_on_a_transformer_graph():
    torch.manual_seed(3)
    emb = torch.nn.Embedding(11, 8).double()
    lin = torch.nn.Linear(8, 24).double()
    ids = torch.randint(0, 11, (2, 5))
    out = _transformer_graph(ids, emb, lin)
    types = _types(out)
    assert types <= LEGACY_FAST, types - LEGACY_FAST
    assert len(types) >= 20  # most listed types, the attention's among them
    assert "ScaledDotProductFlashAttentionForCpuBackward0" in types
    cot = torch.randn(T, *out.shape, dtype=torch.float64)
    params = [emb.weight, lin.weight, lin.bias]
    want = _per_task(out, cot, params)
    got = vmapped_grad_from([get_gradient_edge(out)], [cot], params, legacy=True, rules=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
