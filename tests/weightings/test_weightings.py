"""Gram weightings through ``prof.backward(weights=callable)``: exact updates and weights.

``.grad`` must equal ``J^T w(G)`` (whole model) or ``J_l^T w(G_l)`` (per layer) on the shared
parameters, and ``J_head^T w(G)`` on the heads, with ``J`` from the loop reference's per-task
gradients; the recorded weights must equal the weighting's on the reference Gram.
"""

from __future__ import annotations

import pytest
import torch

import gradlens as gl
from gradlens.engines.loop import loop_task_grads
from gradlens.testing import reference_grams
from gradlens.weightings import GRAM_METHODS, Signed, make_weighting
from tests.zoo import ZOO, build, task_losses

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("torchjd")
pytest.importorskip("scipy")  # CAGrad

ENGINES = ["loop", "batched", "gramian"]
#: Weights' tolerance against the weighting on the reference Gram: 1e-10, or the solver's
#: (CAGrad: SLSQP's ftol on the objective, which bounds the weights far more loosely).
WTOL = {"cagrad": 1e-5}
QUICK_MODELS = ["mlp", "transformer"]


def _seeded(fn, G, seed=1):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.as_tensor(fn(G), dtype=torch.float64)


def _check(
    model: str,
    engine: str,
    method: str,
    per_layer: bool,
    n_tasks: int = 3,
    budget: int = 256 * 2**20,
    path: str = "kept_blocks",
) -> None:
    trunk, heads, x, ys = build(model, n_tasks, torch.float64)
    every = list(trunk.parameters()) + list(heads.parameters())
    params = [p for p in every if p.requires_grad]
    state = torch.random.get_rng_state()
    losses = task_losses(trunk, heads, x, ys)
    tasks = list(losses)
    grads = loop_task_grads(list(losses.values()), params)  # grads[t][k]
    ref = reference_grams(losses, trunk)
    torch.random.set_rng_state(state)  # the same dropout masks
    fn = make_weighting(method, tasks)
    arg = gl.per_layer(fn) if per_layer else fn
    with gl.Profiler(trunk, tasks=tasks, engine=engine, memory_budget=budget) as prof:
        losses = task_losses(trunk, heads, x, ys)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            snap = prof.backward(losses, weights=arg)
    assert snap is not None
    w = snap.weights
    # the weights: the method's own on the same Gram (same random stream for PCGrad), to 1e-10
    # or the solver's tolerance; on the reference Gram to what the Gram's conditioning allows
    raw = fn.weighting if isinstance(fn, Signed) else fn
    tol = WTOL.get(method, 1e-10)
    for G, t in ((snap.gram, tol), (ref.gram, max(tol, 1e-6))):
        torch.testing.assert_close(w, _seeded(raw, G), atol=t, rtol=t)
    if per_layer:
        assert set(snap.layer_weights) == set(ref.layer_grams)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            raw(snap.gram)  # the total's call comes first in the profiler
            exp_lw = {
                n: torch.as_tensor(raw(g), dtype=torch.float64) for n, g in snap.layer_grams.items()
            }
        for n, lw in snap.layer_weights.items():
            torch.testing.assert_close(lw, exp_lw[n], atol=tol, rtol=tol)
    name = repr(fn) if fn is not raw else type(fn).__name__
    assert snap.weighting == (f"per_layer({name})" if per_layer else name)
    assert snap.weighting_path == path
    # .grad = J^T w with the weights actually used (exact: 1e-10)
    shared = {id(p) for p in trunk.parameters()}
    layer_of = {id(p): n.rpartition(".")[0] or "(root)" for n, p in trunk.named_parameters()}
    assert all(p.grad is None for p in every if not p.requires_grad)
    for k, p in enumerate(params):
        wk = snap.layer_weights[layer_of[id(p)]] if per_layer and id(p) in shared else w
        expected = sum(float(wk[t]) * grads[t][k] for t in range(n_tasks))
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("per_layer", [False, True], ids=["whole", "per_layer"])
@pytest.mark.parametrize("method", sorted(GRAM_METHODS))
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model", QUICK_MODELS)
def test_weighted_grad_is_exact(model, engine, method, per_layer):
    _check(model, engine, method, per_layer)


@pytest.mark.slow
@pytest.mark.parametrize("per_layer", [False, True], ids=["whole", "per_layer"])
@pytest.mark.parametrize("method", sorted(GRAM_METHODS))
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model", sorted(set(ZOO) - set(QUICK_MODELS)))
def test_weighted_grad_is_exact_on_the_whole_zoo(model, engine, method, per_layer):
    _check(model, engine, method, per_layer)


@pytest.mark.parametrize("per_layer", [False, True], ids=["whole", "per_layer"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_blocks_over_the_budget_fall_back_to_a_backward(model, engine, per_layer):
    """Blocks that do not fit ``memory_budget``: a second backward (whole model) or batched
    backwards over task chunks (per layer); the loop engine holds its T x P gradients anyway."""
    fallback = "per_layer_batched" if per_layer else "second_backward"
    path = "kept_blocks" if engine == "loop" else fallback
    _check(model, engine, "upgrad", per_layer, budget=64, path=path)


@pytest.mark.parametrize("per_layer", [False, True], ids=["whole", "per_layer"])
@pytest.mark.parametrize("model", ["twice", "tied", "cnn_bn"])
def test_gramian_kept_blocks_on_reused_and_tied_modules(model, per_layer):
    """A module called twice (its rule rewrites from the kept blocks), a weight used outside its
    module (generic path) and convolutions with BatchNorm, by default; the rest of the zoo under
    ``-m slow``."""
    _check(model, "gramian", "upgrad", per_layer)
