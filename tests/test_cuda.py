"""Every engine on CUDA against the float64 loop reference; the fused Linear path is taken there.

Skipped without a CUDA device. TF32 is switched off for these tests (cuDNN convolutions use it by
default in float32, which would put the reference itself off by ~1e-3).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import gradlens as gl
from gradlens.engines.rules import _fused
from gradlens.engines.rules import conv as conv_rules
from gradlens.testing import reference_grams
from tests.zoo import assert_gram_close, build, task_losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = torch.device("cuda")
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
N_TASKS = 3  # one task count throughout: the compiled graphs are reused across tests


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("GRADLENS_FUSED", "1")  # opt-in
    with warnings.catch_warnings():  # newer torch may point to its fp32_precision API instead
        warnings.simplefilter("ignore")
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _weights(n: int) -> dict[str, float]:
    return {f"t{t}": 0.25 + 0.5 * ((t * 7) % 5) / 4 for t in range(n)}


def _assert_gram_close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert_gram_close(got.cpu(), ref.cpu(), tol)


def _on_device(model: str, dtype: torch.dtype):
    trunk, heads, x, ys = build(model, N_TASKS, dtype)
    return trunk.to(DEVICE), heads.to(DEVICE), x.to(DEVICE), ys.to(DEVICE)


def _params(trunk: nn.Module, heads: nn.Module) -> list[torch.Tensor]:
    return list(trunk.parameters()) + list(heads.parameters())


def _plain_grads(trunk, heads, x, ys, w) -> list[torch.Tensor | None]:
    losses = task_losses(trunk, heads, x, ys)
    sum(w[t] * v for t, v in losses.items()).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in _params(trunk, heads)]
    for p in _params(trunk, heads):
        p.grad = None
    return grads


def _assert_grads(trunk, heads, plain, tol: float) -> None:
    for p, g in zip(_params(trunk, heads), plain):
        if g is None:
            assert p.grad is None
        else:
            assert p.grad.device.type == DEVICE.type
            torch.testing.assert_close(p.grad, g, rtol=tol, atol=tol * 1e-2)


@DTYPES
@pytest.mark.parametrize("engine", ["loop", "batched", "gramian"])
@pytest.mark.parametrize("model", ["mlp", "cnn_bn", "transformer"])
def test_engine_matches_reference_on_cuda(model, engine, dtype):
    _check_engine(model, engine, dtype)


@DTYPES
@pytest.mark.parametrize("share", [0.0, 1e9], ids=["weight-route", "kernel-route"])
def test_both_conv_routes_on_cuda(share, dtype, monkeypatch):
    """The conv rule's weight route and its kernel route (input patches by unfold), each forced
    on every convolution of the CNN."""
    monkeypatch.setattr(conv_rules, "KERNEL_SHARE", share)
    _check_engine("cnn_bn", "gramian", dtype)


def _check_engine(model: str, engine: str, dtype: torch.dtype) -> None:
    trunk, heads, x, ys = _on_device(model, dtype)
    w = _weights(N_TASKS)
    plain = _plain_grads(trunk, heads, x, ys, w)
    with gl.Profiler(trunk, tasks=list(w), engine=engine) as prof:
        losses = task_losses(trunk, heads, x, ys)
        ref = reference_grams(losses, trunk)
        snap = prof.backward(losses, weights=w)
    assert snap is not None
    assert snap.gram.dtype == torch.float64
    if engine == "gramian":
        assert {"linear", "conv"} & set(snap.rules.values()), snap.rules
    _assert_gram_close(snap.gram, ref.gram, TOL[dtype])
    assert list(snap.layer_grams) == list(ref.layer_grams)
    for layer, g in ref.layer_grams.items():
        _assert_gram_close(snap.layer_grams[layer], g, TOL[dtype])
    _assert_grads(trunk, heads, plain, TOL[dtype])
    assert _fused.state.disabled is None, _fused.state.disabled


@DTYPES
@pytest.mark.parametrize("model", ["mlp", "cnn_bn", "transformer"])
def test_features_engine_on_cuda(model, dtype):
    trunk, heads, x, ys = _on_device(model, dtype)
    w = _weights(N_TASKS)
    plain = _plain_grads(trunk, heads, x, ys, w)
    losses, z = task_losses(trunk, heads, x, ys, features=True)
    J = torch.stack(
        [torch.autograd.grad(v, z, retain_graph=True)[0].reshape(-1) for v in losses.values()]
    ).to(torch.float64)
    with gl.Profiler(trunk, tasks=list(losses), engine="features") as prof:
        snap = prof.backward(losses, weights=w, features=z)
    assert snap.level == "features"
    _assert_gram_close(snap.gram, J @ J.T, TOL[dtype])
    _assert_grads(trunk, heads, plain, TOL[dtype])


def _wide_mlp(dtype: torch.dtype) -> nn.Module:
    """Wide layers on a small batch: every Linear takes the kernel (fused) path."""
    return nn.Sequential(
        nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64, bias=False), nn.Tanh(), nn.Linear(64, 32)
    ).to(DEVICE, dtype)


@pytest.mark.parametrize(
    ("dtype", "budget"),
    [(torch.float64, 1 << 30), (torch.float32, 1 << 30), (torch.float64, 8 * 8 * 8)],
    ids=["f64-one_chunk", "f32-one_chunk", "f64-one_task_chunks"],  # each a compiled graph
)
def test_fused_path_is_taken_for_linear_layers(dtype, budget):
    trunk = _wide_mlp(dtype)
    heads = nn.ModuleList([nn.Linear(32, 1) for _ in range(N_TASKS)]).to(DEVICE, dtype)
    x = torch.randn(8, 64, device=DEVICE, dtype=dtype)
    ys = torch.randn(N_TASKS, 8, device=DEVICE, dtype=dtype)
    w = _weights(N_TASKS)

    def losses() -> dict[str, torch.Tensor]:
        z = trunk(x)
        return {f"t{t}": ((h(z).squeeze(1) - ys[t]) ** 2).mean() for t, h in enumerate(heads)}

    plain = torch.autograd.grad(sum(w[t] * v for t, v in losses().items()), _params(trunk, heads))
    before = _fused.state.calls
    with gl.Profiler(trunk, tasks=list(w), engine="gramian", memory_budget=budget) as prof:
        for _ in range(2):  # the second step reuses the compiled graphs
            for p in _params(trunk, heads):
                p.grad = None
            ls = losses()
            ref = reference_grams(ls, trunk)
            snap = prof.backward(ls, weights=w)
            _assert_gram_close(snap.gram, ref.gram, TOL[dtype])
            for layer, g in ref.layer_grams.items():
                _assert_gram_close(snap.layer_grams[layer], g, TOL[dtype])
            _assert_grads(trunk, heads, list(plain), TOL[dtype])
    assert set(snap.rules.values()) == {"linear"}
    assert _fused.state.disabled is None, _fused.state.disabled
    assert _fused.state.calls - before == 2 * 3  # three Linear layers, two steps
