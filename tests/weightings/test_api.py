"""Gram weightings' contract: errors, held weights, observe, and the hand-written methods."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import gradlens as gl
from gradlens.weightings import (
    DWA,
    CAGrad,
    NashMTL,
    RandomLossWeighting,
    UncertaintyWeighting,
    call_weighting,
    make_weighting,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(T: int = 3):
    trunk = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5))
    heads = torch.nn.ModuleList([torch.nn.Linear(5, 1) for _ in range(T)])
    return trunk.double(), heads.double()


def _losses(trunk, heads, x):
    z = trunk(x)
    return {f"t{i}": (h(z) - i).pow(2).mean() for i, h in enumerate(heads)}


def _grads(mods):
    return [None if p.grad is None else p.grad.clone() for m in mods for p in m.parameters()]


@pytest.mark.parametrize(
    ("fn", "found"),
    [
        (lambda G: torch.ones(2), "shape (2,)"),
        (lambda G: -torch.ones(G.shape[0]), "negative weights"),
        (lambda G: torch.full((G.shape[0],), math.nan), "non-finite"),
        (lambda G: "heavy", "str"),
        (lambda G: 1 / 0, "raised ZeroDivisionError"),
    ],
    ids=["shape", "negative", "nan", "type", "raises"],
)
@pytest.mark.parametrize("per_layer", [False, True])
def test_a_bad_weighting_is_named_and_nothing_is_written(fn, found, per_layer):
    trunk, heads = _model()
    x = torch.randn(8, 4, dtype=torch.float64)
    for p in [*trunk.parameters(), *heads.parameters()]:
        p.grad = torch.full_like(p, 7.0)
    before = _grads([trunk, heads])
    with gl.Profiler(trunk, tasks=["t0", "t1", "t2"]) as prof:
        with pytest.raises(gl.GradlensError, match=f"callable.*<lambda>.*{re.escape(found)}"):
            prof.backward(_losses(trunk, heads, x), weights=gl.per_layer(fn) if per_layer else fn)
    for a, b in zip(before, _grads([trunk, heads])):
        assert torch.equal(a, b)  # untouched, not recomputed: exact comparison is meaningful


def test_per_layer_refuses_a_representation_level_engine():
    trunk, heads = _model()
    z = trunk(torch.randn(8, 4, dtype=torch.float64))
    losses = {f"t{i}": h(z).mean() for i, h in enumerate(heads)}
    with gl.Profiler(trunk, tasks=["t0", "t1", "t2"], engine="features") as prof:
        with pytest.raises(gl.GradlensError, match=r"per_layer.*features"):
            prof.backward(losses, weights=gl.per_layer(NashMTL()), features=z)


@pytest.mark.parametrize("per_layer", [False, True])
def test_every_k_holds_the_last_weights_between_probes(per_layer):
    calls = []

    def w(G):
        calls.append(G)
        return torch.arange(1, G.shape[0] + 1, dtype=G.dtype) / len(calls)

    trunk, heads = _model()
    x = torch.randn(8, 4, dtype=torch.float64)
    arg = gl.per_layer(w) if per_layer else w
    with gl.Profiler(trunk, tasks=["t0", "t1", "t2"], every=3) as prof:
        for step in range(5):
            for m in (trunk, heads):
                m.zero_grad(set_to_none=True)
            snap = prof.backward(_losses(trunk, heads, x), weights=arg)
            assert (snap is not None) == (step % 3 == 0)
            if snap is not None:
                held = snap
                continue
            # an unprobed step: the held weights, exactly as a plain weighted backward gives
            got = _grads([trunk, heads])
            for m in (trunk, heads):
                m.zero_grad(set_to_none=True)
            losses = _losses(trunk, heads, x)
            L = torch.stack(list(losses.values()))
            if per_layer:
                n_shared = len(list(trunk.parameters()))
                for k, (name, p) in enumerate(trunk.named_parameters()):
                    lw = held.layer_weights[name.rpartition(".")[0]]
                    g = torch.autograd.grad(lw @ L, p, retain_graph=True)[0]
                    torch.testing.assert_close(got[k], g, atol=1e-12, rtol=1e-12)
                hw = torch.autograd.grad(held.weights @ L, list(heads.parameters()))
                for a, b in zip(got[n_shared:], hw):
                    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
            else:
                (held.weights @ L).backward()
                for a, b in zip(got, _grads([trunk, heads])):
                    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    n_grams = 1 + (2 if per_layer else 0)  # total (+ the two layers)
    assert len(calls) == 2 * n_grams  # steps 0 and 3 only


def test_a_schedule_that_skips_step_0_still_probes_for_the_first_weights():
    trunk, heads = _model()
    x = torch.randn(8, 4, dtype=torch.float64)
    with gl.Profiler(trunk, tasks=["t0", "t1", "t2"], every=lambda s: s == 2) as prof:
        snaps = [prof.backward(_losses(trunk, heads, x), weights=NashMTL()) for _ in range(3)]
    assert [s is not None for s in snaps] == [True, False, True]


def test_observe_records_the_weights_and_leaves_grad_alone():
    trunk, heads = _model()
    x = torch.randn(8, 4, dtype=torch.float64)
    with gl.Profiler(trunk, tasks=["t0", "t1", "t2"]) as prof:
        losses = _losses(trunk, heads, x)
        snap = prof.observe(losses, weights=NashMTL())
    assert all(p.grad is None for m in (trunk, heads) for p in m.parameters())
    torch.testing.assert_close(snap.weights, NashMTL()(snap.gram), atol=1e-12, rtol=0)
    sum(losses.values()).backward()  # the graph was kept


def test_whole_model_weighting_of_the_representation_gram():
    """engine='features': the weights come from the representation Gram (MGDA-UB's)."""
    trunk, heads = _model()
    x = torch.randn(8, 4, dtype=torch.float64)
    z = trunk(x)
    losses = {f"t{i}": (h(z) - i).pow(2).mean() for i, h in enumerate(heads)}
    with gl.Profiler(trunk, tasks=["t0", "t1", "t2"], engine="features") as prof:
        snap = prof.backward(losses, weights=NashMTL(), features=z)
    got = _grads([trunk, heads])
    for m in (trunk, heads):
        m.zero_grad(set_to_none=True)
    (snap.weights @ torch.stack(list(_losses(trunk, heads, x).values()))).backward()
    for a, b in zip(got, _grads([trunk, heads])):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert snap.level == "features"


def test_weights_are_stored_with_the_run(tmp_path):
    trunk, heads = _model()
    x = torch.randn(8, 4, dtype=torch.float64)
    with gl.Profiler(trunk, tasks=["t0", "t1", "t2"], store=tmp_path / "r") as prof:
        snap = prof.backward(_losses(trunk, heads, x), weights=NashMTL())
    run = gl.load_run(tmp_path / "r")
    np.testing.assert_allclose(run.weights()[0], snap.weights.numpy(), rtol=0, atol=0)


# -- hand-written Gram methods --------------------------------------------------------------


def _cagrad_objective(w, G, c):
    T = G.shape[0]
    b = np.ones(T) / T
    return w @ G @ b + (c * math.sqrt(b @ G @ b + 1e-8) + 1e-8) * math.sqrt(w @ G @ w + 1e-8)


def test_cagrad_inner_problem_against_a_grid():
    """T = 2: the simplex is a segment; a fine grid bounds the SLSQP optimum from above."""
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    for _ in range(5):
        J = rng.normal(size=(2, 7))
        G = J @ J.T
        w = CAGrad(c=0.5).simplex_weights(torch.tensor(G)).numpy()
        a = np.linspace(0, 1, 20001)
        W = np.stack([a, 1 - a], 1)
        b = np.full(2, 0.5)
        c = 0.5 * math.sqrt(b @ G @ b + 1e-8) + 1e-8
        quad = np.einsum("ki,ij,kj->k", W, G, W)
        best = float((W @ G @ b + c * np.sqrt(quad + 1e-8)).min())
        assert _cagrad_objective(w, G, 0.5) <= best + 1e-9
        assert abs(w.sum() - 1) < 1e-9
        assert (w >= 0).all()


def test_cagrad_update_matches_the_official_formula():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(1)
    J = torch.tensor(rng.normal(size=(3, 9)))
    G = J @ J.T
    c = 0.4
    w = CAGrad(c=c).simplex_weights(G)
    g0 = J.mean(0)
    gw = w @ J
    g0_norm = math.sqrt(float(G.mean()) + 1e-8)  # official: sqrt(GG.mean() + 1e-8)
    lam = (c * g0_norm + 1e-8) / (float(gw.norm()) + 1e-8)
    official = (g0 + lam * gw) / (1 + c**2)
    torch.testing.assert_close(CAGrad(c=c)(G) @ J, official, atol=1e-10, rtol=1e-10)


def test_nash_mtl_solves_the_bargaining_condition():
    rng = np.random.default_rng(2)
    for T in (2, 3, 8):
        J = torch.tensor(rng.normal(size=(T, 20)))
        G = J @ J.T
        a = NashMTL()(G)
        H = G / G.norm()
        assert bool((a > 0).all())
        torch.testing.assert_close(H @ a, 1 / a, atol=1e-10, rtol=1e-10)


def test_call_weighting_names_layers():
    with pytest.raises(gl.GradlensError, match="layer 'enc'"):
        call_weighting(lambda G: torch.zeros(3), torch.eye(2), "enc")


# -- loss-based weightings -------------------------------------------------------------------


def test_uncertainty_weighting_gradients_match_kendalls_objective():
    tasks = ["a", "b"]
    uw = UncertaintyWeighting(tasks)
    with torch.no_grad():
        uw.log_var.copy_(torch.tensor([0.3, -1.2], dtype=torch.float64))
    theta = torch.tensor([0.5, -2.0], dtype=torch.float64, requires_grad=True)
    losses = {"a": (theta[0] - 1) ** 2, "b": theta.pow(2).sum()}
    w = uw.weights(losses)
    # the objective LibMTL optimises: sum L_t / (2 e^s_t) + s_t / 2
    s = uw.log_var.detach().clone().requires_grad_(True)
    L = torch.stack([losses["a"], losses["b"]])
    (L / (2 * s.exp()) + s / 2).sum().backward(retain_graph=True)
    g_theta = torch.autograd.grad(sum(w[t] * losses[t] for t in tasks), theta)[0]
    torch.testing.assert_close(g_theta, theta.grad)
    uw.backward({t: v.detach() for t, v in losses.items()})
    torch.testing.assert_close(uw.log_var.grad, s.grad)


def test_loss_weightings_resume_from_their_state():
    losses = [{"a": 1.0 + i, "b": 2.0 / (1 + i)} for i in range(6)]
    for name in ("rlw", "dwa", "uncertainty"):
        a = make_weighting(name, ["a", "b"], seed=3)
        for i, lo in enumerate(losses[:3]):
            a.weights(lo)
            if i % 1 == 0:
                a.end_epoch()
        b = make_weighting(name, ["a", "b"], seed=99)
        b.load_state_dict(a.state_dict())
        for lo in losses[3:]:
            assert a.weights(lo) == b.weights(lo)
            a.end_epoch()
            b.end_epoch()


def test_rlw_and_dwa_follow_their_definitions():
    rlw = RandomLossWeighting(["a", "b", "c"], seed=5)
    g = torch.Generator().manual_seed(5)
    expected = torch.softmax(torch.randn(3, generator=g, dtype=torch.float64), 0).tolist()
    assert list(rlw.weights(dict.fromkeys("abc", 1.0)).values()) == expected
    dwa = DWA(["a", "b"], temp=2.0)
    for means in ([4.0, 2.0], [1.0, 1.0]):  # two steps an epoch, means as given
        dwa.weights({"a": means[0] - 0.5, "b": means[1]})
        dwa.weights({"a": means[0] + 0.5, "b": means[1]})
        dwa.end_epoch()
    r = np.array([1.0 / 4.0, 1.0 / 2.0]) / 2.0
    exp = 2 * np.exp(r) / np.exp(r).sum()
    np.testing.assert_allclose(list(dwa.weights({"a": 1.0, "b": 1.0}).values()), exp, rtol=1e-12)


def test_per_layer_needs_a_plain_callable():
    with pytest.raises(gl.GradlensError, match="`weighting` should be a callable"):
        gl.per_layer(3)
    with pytest.raises(gl.GradlensError, match="found PerLayer"):
        gl.per_layer(gl.per_layer(NashMTL()))
