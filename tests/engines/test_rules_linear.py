"""The Linear rule: chunked kernel path, the fused (torch.compile) path and its exact fallback."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import gradlens as gl
from gradlens._errors import GradlensWarning
from gradlens.engines.rules import _fused, _groups
from gradlens.engines.rules import linear as linear_mod
from gradlens.engines.rules.linear import kernel_chunk, kernel_core
from gradlens.testing import reference_grams
from tests.zoo import assert_gram_close

BATCH, WIDTH = 4, 16


def _trunk(bias: bool) -> nn.Module:
    """Wide layers on a small batch: the rule takes the kernel path (N x N is cheapest)."""
    return nn.Sequential(
        nn.Linear(WIDTH, WIDTH, bias=bias),
        nn.Tanh(),
        nn.Linear(WIDTH, WIDTH, bias=bias),
        nn.ReLU(),
        nn.Linear(WIDTH, 8, bias=bias),
    ).double()



def _profile(trunk: nn.Module, n_tasks: int, budget: int, seed: int = 1):
    """One probed step: (snapshot, reference Grams, .grad of the trunk, plain weighted .grad)."""
    torch.manual_seed(seed)  # same heads and batch for the same seed
    x = torch.randn(BATCH, WIDTH, dtype=torch.float64)
    heads = [nn.Linear(8, 1).double() for _ in range(n_tasks)]
    ys = torch.randn(n_tasks, BATCH, dtype=torch.float64)
    w = {f"t{t}": 0.5 + t for t in range(n_tasks)}

    def losses() -> dict[str, torch.Tensor]:
        z = trunk(x)
        return {f"t{t}": ((h(z).squeeze(1) - ys[t]) ** 2).mean() for t, h in enumerate(heads)}

    plain = torch.autograd.grad(
        sum(w[t] * v for t, v in losses().items()), list(trunk.parameters())
    )
    with gl.Profiler(trunk, tasks=list(w), engine="gramian", memory_budget=budget) as prof:
        ls = losses()
        ref = reference_grams(ls, trunk)
        snap = prof.backward(ls, weights=w)
    grads = [p.grad.clone() for p in trunk.parameters()]
    for p in trunk.parameters():
        p.grad = None
    return snap, ref, grads, plain


@pytest.fixture
def chunks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ``chunk`` each kernel-path call of the Linear rule used (layers one by one: the
    grouped path for same-shaped layers is switched off, see test_grouped_layers_...)."""
    seen: list[int] = []

    def spy(A, D, w, chunk, **flags):
        seen.append(chunk)
        return kernel_core(A, D, w, chunk, **flags)

    monkeypatch.setattr(linear_mod, "kernel_core", spy)
    monkeypatch.setattr(_groups, "linear_group_stacked", lambda *args, **kw: None)
    return seen


@pytest.fixture
def fresh_fused(monkeypatch: pytest.MonkeyPatch) -> _fused.FusedState:
    """A clean fused-path state (no earlier failure, empty cache), restored afterwards."""
    st = _fused.FusedState()
    monkeypatch.setattr(_fused, "state", st)
    monkeypatch.setattr(_fused, "_compiled", {})
    monkeypatch.setenv("GRADLENS_FUSED", "1")  # opt-in
    return st


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n_tasks", [1, 3, 5])
def test_chunked_kernel_path_equals_unchunked_and_reference(chunks, bias, n_tasks):
    trunk = _trunk(bias)
    tiny = BATCH * BATCH * 8  # K fits, one task's K D_t does not: one-task chunks
    small, ref, grads_small, plain = _profile(trunk, n_tasks, tiny)
    assert chunks == [1, 1, 1]  # every layer on the kernel path, in one-task chunks
    chunks.clear()
    big, ref_big, grads_big, _ = _profile(trunk, n_tasks, 1 << 40)
    assert chunks == [n_tasks] * 3
    assert set(small.rules.values()) == set(big.rules.values()) == {"linear"}
    for layer, g in ref.layer_grams.items():
        assert_gram_close(small.layer_grams[layer], g, 1e-10)
        assert_gram_close(big.layer_grams[layer], ref_big.layer_grams[layer], 1e-10)
        torch.testing.assert_close(small.layer_grams[layer], big.layer_grams[layer], rtol=1e-12,
                                   atol=1e-14 * float(g.diagonal().max()))  # fmt: skip
        assert torch.equal(small.layer_grams[layer], small.layer_grams[layer].T)
    for p, g, h in zip(grads_small, grads_big, plain):
        torch.testing.assert_close(p, h, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("has_weight", "has_bias"), [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 7])
def test_kernel_core_matches_explicit_task_gradients(has_weight, has_bias, chunk):
    T, N, n_in, n_out = 7, 5, 3, 4
    A = torch.randn(N, n_in, dtype=torch.float64)
    D = torch.randn(T, N, n_out, dtype=torch.float64)
    w = torch.rand(T, dtype=torch.float64)
    G, gW, gb = kernel_core(A, D, w, chunk, has_weight=has_weight, has_bias=has_bias)
    rows = []
    for t in range(T):
        parts = ([(D[t].T @ A).reshape(-1)] if has_weight else []) + (
            [D[t].sum(0)] if has_bias else []
        )
        rows.append(torch.cat(parts))
    J = torch.stack(rows)
    assert G.dtype == torch.float64
    torch.testing.assert_close(G, J @ J.T, rtol=1e-12, atol=1e-12)
    if has_weight:  # the kernel path mirrors its lower blocks: exactly symmetric by construction
        assert torch.equal(G, G.T)
    else:  # S @ S.T: symmetric up to the BLAS's rounding (Snapshot symmetrizes every Gram)
        torch.testing.assert_close(G, G.T, rtol=1e-14, atol=0.0)
    Dw = torch.einsum("t,tno->no", w, D)
    if has_weight:
        torch.testing.assert_close(gW, Dw.T @ A, rtol=1e-12, atol=1e-12)
    else:
        assert gW is None
    if has_bias:
        torch.testing.assert_close(gb, Dw.sum(0), rtol=1e-12, atol=1e-12)
    else:
        assert gb is None


def test_kernel_chunk_is_bounded_by_the_budget():
    T, N, out_f, item = 40, 128, 1536, 4
    per_task = N * (out_f + N) * item
    assert kernel_chunk(T, N, out_f, item, 256 * 2**20) == T
    assert kernel_chunk(T, N, out_f, item, 8 * 2**20) == (8 * 2**20) // per_task == 9
    assert kernel_chunk(T, N, out_f, item, per_task - 1) == 1  # at least one task
    assert kernel_chunk(1, N, out_f, item, 1) == 1


def test_cpu_tensors_take_the_eager_path(fresh_fused, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile must not be called for CPU tensors")

    monkeypatch.setattr(torch, "compile", no_compile)
    snap, ref, _, _ = _profile(_trunk(True), 3, 1 << 30)
    assert_gram_close(snap.gram, ref.gram, 1e-10)
    assert fresh_fused.calls == 0
    assert fresh_fused.disabled is None


def test_fused_path_is_opt_in(fresh_fused, monkeypatch):
    monkeypatch.setattr(_fused, "DEVICES", frozenset({"cpu"}))
    monkeypatch.delenv("GRADLENS_FUSED")
    assert not _fused.enabled_for(torch.device("cpu"))
    monkeypatch.setenv("GRADLENS_FUSED", "1")
    assert _fused.enabled_for(torch.device("cpu"))


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_env_variable_switches_the_fused_path_off(fresh_fused, monkeypatch, value):
    monkeypatch.setattr(_fused, "DEVICES", frozenset({"cpu"}))
    assert _fused.enabled_for(torch.device("cpu"))
    monkeypatch.setenv("GRADLENS_FUSED", value)
    assert not _fused.enabled_for(torch.device("cpu"))

    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile must not be called with GRADLENS_FUSED=0")

    monkeypatch.setattr(torch, "compile", no_compile)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no GradlensWarning either: switched off on purpose
        snap, ref, _, _ = _profile(_trunk(True), 3, 1 << 30)
    assert_gram_close(snap.gram, ref.gram, 1e-10)
    assert fresh_fused.calls == 0
    assert fresh_fused.disabled is None


def _failing_compile(where: str):
    def fake_compile(fn, **kwargs):
        if where == "compile":
            raise RuntimeError("no C++ compiler found")

        def compiled(*args, **kwargs):
            raise RuntimeError("inductor lowering failed")

        return compiled

    return fake_compile


@pytest.mark.parametrize(
    ("where", "message"), [("compile", "no C\\+\\+ compiler"), ("call", "lowering failed")]
)
def test_compile_failure_warns_once_and_stays_exact(fresh_fused, monkeypatch, where, message):
    monkeypatch.setattr(_fused, "DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(torch, "compile", _failing_compile(where))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _profile(_trunk(True), 3, 1 << 30)  # three Linear layers: three rule calls
        second = _profile(_trunk(False), 3, 1 << 30, seed=2)
    ours = [w for w in caught if issubclass(w.category, GradlensWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "switched off for this process" in str(ours[0].message)
    assert fresh_fused.disabled is not None
    assert fresh_fused.calls == 0
    assert not _fused.enabled_for(torch.device("cpu"))
    assert re.search(message, str(ours[0].message))
    for snap, ref, grads, plain in (first, second):
        assert_gram_close(snap.gram, ref.gram, 1e-10)
        for layer, g in ref.layer_grams.items():
            assert_gram_close(snap.layer_grams[layer], g, 1e-10)
        for p, h in zip(grads, plain):
            torch.testing.assert_close(p, h, rtol=1e-10, atol=1e-12)


def test_fused_cache_is_keyed_by_flags_and_dtype(fresh_fused, monkeypatch):
    monkeypatch.setattr(_fused, "DEVICES", frozenset({"cpu"}))
    made: list[object] = []

    def fake_compile(fn, **kwargs):  # "compiles" to the function itself: the same math
        assert kwargs == {"dynamic": True}
        made.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    A64, D64 = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    w64 = torch.ones(2, dtype=torch.float64)
    for _ in range(2):
        for flags in [(True, True), (True, False), (False, True)]:
            for dt in [torch.float64, torch.float32]:
                A, D, w = A64.to(dt), D64.to(dt), w64.to(dt)
                got = _fused.run(kernel_core, A, D, w, 2, has_weight=flags[0], has_bias=flags[1])
                exp = kernel_core(A, D, w, 2, has_weight=flags[0], has_bias=flags[1])
                assert torch.equal(got[0], exp[0])
    assert len(made) == 6  # one per (has_weight, has_bias, dtype), reused on the second pass
    assert fresh_fused.calls == 12


@pytest.mark.slow
def test_compiled_core_on_cpu_matches_eager(fresh_fused, monkeypatch):
    # inductor on CPU (C++ codegen); on CUDA the same function runs, compiled to Triton/cuBLAS
    monkeypatch.setattr(_fused, "DEVICES", frozenset({"cpu"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradlensWarning)  # a compile failure fails the test
        whole = _profile(_trunk(True), 3, 1 << 30)
        chunked = _profile(_trunk(True), 3, BATCH * BATCH * 8)  # one-task chunks, compiled
    assert fresh_fused.disabled is None
    assert fresh_fused.calls == 6  # every Linear layer, both steps
    for snap, ref, grads, plain in (whole, chunked):
        for layer, g in ref.layer_grams.items():
            assert_gram_close(snap.layer_grams[layer], g, 1e-10)
        for p, h in zip(grads, plain):
            torch.testing.assert_close(p, h, rtol=1e-10, atol=1e-12)


# -- same-shaped Linear layers computed together (gradlens.engines.rules.linear.linear_group) --
@pytest.mark.parametrize(("has_weight", "has_bias"), [(True, True), (True, False)])
@pytest.mark.parametrize("weighted", [True, False], ids=["weights", "gram-only"])
def test_linear_group_equals_the_rule_layer_by_layer(has_weight, has_bias, weighted):
    torch.manual_seed(3)
    _check_group_against_rule(4, 4, has_bias, weighted, mirrored=True)


def _check_group_against_rule(
    N: int, n_layers: int, has_bias: bool, weighted: bool, mirrored: bool = False
) -> tuple[list[nn.Linear], list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """``linear_group`` over ``n_layers`` same-shaped layers (``N`` rows, T = 3) against the
    Linear rule layer by layer: Grams (exactly symmetric when ``mirrored``), weighted grads.
    Returns the group's arguments: layers, inputs, output gradients, weights."""
    T = 3
    lins = [nn.Linear(WIDTH, WIDTH, bias=has_bias).double() for _ in range(n_layers)]
    xs = [torch.randn(N, WIDTH, dtype=torch.float64) for _ in lins]
    ds = [torch.randn(T, N, WIDTH, dtype=torch.float64) for _ in lins]
    w = torch.tensor([0.2, 0.0, 1.5], dtype=torch.float64) if weighted else None
    got = linear_mod.linear_group(lins, xs, ds, w, 1 << 30)
    assert got is not None
    for m, x, d, (G, weighted_grads) in zip(lins, xs, ds, got):
        G_ref, ref = linear_mod.linear_rule(m, [x], [d], w, 1 << 30)
        torch.testing.assert_close(G, G_ref, rtol=1e-12, atol=1e-12 * float(G_ref.max()))
        if mirrored:
            assert torch.equal(G, G.T)  # mirrored, exactly symmetric
        assert set(weighted_grads) == set(ref)
        for name, g in ref.items():
            torch.testing.assert_close(weighted_grads[name], g, rtol=1e-12, atol=1e-12)
    return lins, xs, ds, w


def test_linear_group_declines_what_it_does_not_serve():
    lins = [nn.Linear(WIDTH, WIDTH).double() for _ in range(2)]
    xs = [torch.randn(4, WIDTH, dtype=torch.float64) for _ in lins]
    ds = [torch.randn(2, 4, WIDTH, dtype=torch.float64) for _ in lins]
    w = torch.ones(2, dtype=torch.float64)
    assert linear_mod.linear_group(lins, xs, ds, w, 1 << 30) is not None
    assert linear_mod.linear_group(lins, xs, ds, w, 1024) is None  # over the budget
    lins[1].bias.requires_grad_(False)  # the layers' trainable parameters differ
    assert linear_mod.linear_group(lins, xs, ds, w, 1 << 30) is None
    lins[1].bias.requires_grad_(True)
    lins[0].weight.requires_grad_(False)  # no trainable weight: the rule alone (its bias path)
    lins[1].weight.requires_grad_(False)
    assert linear_mod.linear_group(lins, xs, ds, w, 1 << 30) is None


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weights", "gram-only"])
def test_linear_group_gradient_path_equals_the_rule(has_bias, weighted):
    """Rows outnumber the widths (N x N costs more than the weight gradients): the group takes
    the gradient path, every task's weight gradient of every layer from one batched product."""
    torch.manual_seed(5)
    T, N = 3, 64
    lins, xs, ds, w = _check_group_against_rule(N, 3, has_bias, weighted)
    # over the budget for the gradient path's per-task weight gradients: declined
    assert linear_mod.linear_group(lins, xs, ds, w, 3 * T * N * WIDTH * 8) is None


def test_conv1d_group_equals_the_rule():
    """Hugging Face's Conv1D layout (weight stored (in, out)): ``transposed=True``."""
    torch.manual_seed(6)
    T, N, in_f, out_f = 2, 32, WIDTH, 2 * WIDTH
    mods = [nn.Module() for _ in range(2)]
    for m in mods:
        m.weight = nn.Parameter(torch.randn(in_f, out_f, dtype=torch.float64))
        m.bias = nn.Parameter(torch.randn(out_f, dtype=torch.float64))
    xs = [torch.randn(N, in_f, dtype=torch.float64) for _ in mods]
    ds = [torch.randn(T, N, out_f, dtype=torch.float64) for _ in mods]
    w = torch.tensor([0.4, 0.6], dtype=torch.float64)
    out = linear_mod.linear_group_stacked(mods, xs, ds, w, 1 << 30, transposed=True)
    assert out is not None
    G, gW, gb = out
    assert gW is not None
    assert gb is not None
    for k, (m, x, d) in enumerate(zip(mods, xs, ds)):
        G_ref, ref = linear_mod.conv1d_rule(m, [x], [d], w, 1 << 30)
        torch.testing.assert_close(G[k], G_ref, rtol=1e-12, atol=1e-12 * float(G_ref.max()))
        torch.testing.assert_close(gW[k], ref["weight"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gb[k], ref["bias"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_grouped_layers_in_a_probe_equal_the_reference_and_the_plain_grad(monkeypatch, bias):
    calls: list[int] = []
    group = linear_mod.linear_group_stacked

    def spy(mods, *args, **kw):
        out = group(mods, *args, **kw)
        calls.append(0 if out is None else len(mods))
        return out

    monkeypatch.setattr(_groups, "linear_group_stacked", spy)
    snap, ref, grads, plain = _profile(_trunk(bias), 3, 1 << 30)
    assert calls == [2]  # the two 16 x 16 layers together, the 16 x 8 one by its rule
    assert set(snap.rules.values()) == {"linear"}
    for layer, g in ref.layer_grams.items():
        assert_gram_close(snap.layer_grams[layer], g, 1e-10)
    for p, h in zip(grads, plain):
        torch.testing.assert_close(p, h, rtol=1e-10, atol=1e-12)
