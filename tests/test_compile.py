"""torch.compile'd trunks: the loop and features engines work, the vmap engines are refused."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

import gradlens as gl
from gradlens.testing import reference_grams

TASKS = ["a", "b", "c"]
W = {"a": 0.2, "b": 0.5, "c": 0.3}
# importing torch._dynamo (torch.compile) touches torch.jit internals that warn on torch 2.13
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)


def _model() -> tuple[nn.Module, nn.ModuleList]:
    trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8)).double()
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in TASKS]).double()
    return trunk, heads


def _losses(z: torch.Tensor, heads: nn.ModuleList, y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {t: ((h(z).squeeze(1) - y[i]) ** 2).mean() for i, (t, h) in enumerate(zip(TASKS, heads))}


@pytest.mark.parametrize("engine", ["gramian", "batched"])
@pytest.mark.parametrize("how", ["wrapper", "in_place", "submodule"])
def test_vmap_engines_refuse_compiled_modules(engine, how):
    trunk, _ = _model()
    if how == "wrapper":
        shared = torch.compile(trunk)
    elif how == "in_place":
        trunk.compile()
        shared = trunk
    else:
        trunk[2] = torch.compile(trunk[2])
        shared = trunk
    where = {"wrapper": r"\['\(root\)'\]", "in_place": r"\['\(root\)'\]", "submodule": r"\['2'\]"}
    with pytest.raises(
        gl.GradlensError,
        match=rf"`engine='{engine}'` cannot profile a torch.compile'd `shared` module "
        rf"\(compiled: {where[how]}\).*Use engine='loop'",
    ):
        gl.Profiler(shared, TASKS, engine=engine)


@pytest.mark.slow
def test_loop_and_features_engines_on_a_compiled_trunk():
    torch.manual_seed(0)
    trunk, heads = _model()
    compiled = torch.compile(trunk)
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    params = list(trunk.parameters()) + list(heads.parameters())
    for engine in ["loop", "features"]:
        prof = gl.Profiler(compiled, TASKS, engine=engine)
        assert prof.layers == ("0", "2")  # names of the original module, no `_orig_mod.`
        for _ in range(2):
            z = compiled(x)
            losses = _losses(z, heads, y)
            ref = reference_grams(losses, trunk)
            J = torch.stack(
                [torch.autograd.grad(v, z, retain_graph=True)[0].flatten() for v in losses.values()]
            )
            snap = prof.backward(losses, W, features=z if engine == "features" else None)
            got = [p.grad.clone() for p in params]
            for p in params:
                p.grad = None
            sum(W[t] * v for t, v in _losses(trunk(x), heads, y).items()).backward()
            for g, p in zip(got, params):
                torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)
                p.grad = None
            want = J @ J.T if engine == "features" else ref.gram
            torch.testing.assert_close(snap.gram, want, rtol=1e-10, atol=1e-12)
        prof.close()


def _donating(trunk: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """``trunk`` compiled with a dynamic batch dimension (``aot_eager``: aot_autograd's graphs
    without Inductor's code generation), whose backward donates its saved buffers, and its
    input."""
    torch._dynamo.reset()
    compiled = torch.compile(trunk, backend="aot_eager")
    x = torch.randn(10, 6, dtype=torch.float64)
    torch._dynamo.mark_dynamic(x, 0)
    return compiled, x


@pytest.mark.parametrize("engine", ["auto", "loop", "features-observe", "features-retain"])
def test_a_compiled_graph_that_donates_its_buffers_is_refused_before_any_write(engine):
    """A compiled backward that donates its saved buffers runs once per forward (torch raises
    'compiled with non-empty donated buffers' on a second backward or a kept graph, after the
    loop engine had written a task's heads); the probe refuses it first, naming the switch."""
    from gradlens.engines._graph import GraphIndex

    torch.manual_seed(0)
    trunk, heads = _model()
    compiled, x = _donating(trunk)
    y = torch.randn(3, 10, dtype=torch.float64)
    name = engine.split("-")[0]
    prof = gl.Profiler(compiled, TASKS, engine=name)
    z = compiled(x)
    losses = _losses(z, heads, y)
    assert GraphIndex.build(torch.stack(list(losses.values()))).donating()
    feats = z if name == "features" else None
    call = (
        partial(prof.observe, losses, W, features=feats)
        if engine == "features-observe"
        else partial(prof.backward, losses, W, features=feats, retain_graph=name == "features")
    )
    with pytest.raises(gl.GradlensError, match=r"donates its saved buffers.*buffer = False"):
        call()
    assert prof.step == 0
    assert all(p.grad is None for p in [*trunk.parameters(), *heads.parameters()])
    prof.close()
    torch._dynamo.reset()


def test_a_donating_compiled_graph_takes_the_features_engine_and_the_switch_serves_loop():
    """The features engine runs the compiled backward once (exact against the plain backward);
    with ``torch._functorch.config.donated_buffer = False`` the loop engine is exact on the
    same dynamically compiled trunk."""
    torch.manual_seed(0)
    trunk, heads = _model()
    y = torch.randn(3, 10, dtype=torch.float64)
    params = [*trunk.parameters(), *heads.parameters()]
    for engine in ["features", "loop"]:
        with torch._functorch.config.patch(donated_buffer=engine == "features"):
            compiled, x = _donating(trunk)
            with gl.Profiler(compiled, TASKS, engine=engine) as prof:
                for b in (10, 7):  # a new batch size: the dynamic graph serves it
                    xb = x[:b]
                    z = compiled(xb)
                    losses = _losses(z, heads, y[:, :b])
                    J = torch.stack(
                        [torch.autograd.grad(v, z, retain_graph=True)[0].flatten()
                         for v in losses.values()]
                    )  # fmt: skip
                    ref = reference_grams(losses, trunk) if engine == "loop" else None
                    snap = prof.backward(losses, W, features=z if engine == "features" else None)
                    got = [p.grad.clone() for p in params]
                    for p in params:
                        p.grad = None
                    sum(W[t] * v for t, v in _losses(trunk(xb), heads, y[:, :b]).items()).backward()
                    for g, p in zip(got, params):
                        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)
                        p.grad = None
                    want = J @ J.T if ref is None else ref.gram
                    torch.testing.assert_close(snap.gram, want, rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()


class _Whole(nn.Module):
    """A model compiled as a whole around its trunk (`torch.compile(model)`), the Profiler on
    `model.trunk`: the trunk itself is no compiled module."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.heads = _model()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return _losses(self.trunk(x), self.heads, y)


@pytest.mark.parametrize("engine", ["auto", "batched", "gramian"])
# dynamo traces the gramian engine's forward hooks inside the compiled model and warns on what it
# inspects of their tensors (a warning only, outside a test that makes warnings errors)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_a_compiled_model_around_the_shared_module(engine):
    """The vmap engines cannot run through the compiled graph that reads the trunk's parameters
    (torch's raw 'Cannot access data pointer' before); `batched`/`gramian` refuse it at the
    probe, nothing written; `auto` serves it with `loop`, exact, and notes why."""
    torch.manual_seed(0)
    model = _Whole()
    torch._dynamo.reset()
    whole = torch.compile(model, backend="aot_eager")
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    params = list(model.parameters())
    prof = gl.Profiler(model.trunk, TASKS, engine=engine)
    for _ in range(3):
        losses = whole(x, y)
        if engine != "auto":
            with pytest.raises(gl.GradlensError, match=r"torch.compile'd model.*engine='loop'"):
                prof.backward(losses, W)
            assert prof.step == 0
            assert all(p.grad is None for p in params)
            break
        ref = reference_grams(losses, model.trunk)
        snap = prof.backward(losses, W)
        assert snap.engine == "loop"
        assert snap.notes == ("auto-loop:compiled",)
        torch.testing.assert_close(snap.gram, ref.gram, rtol=1e-10, atol=1e-12)
        got = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        sum(W[t] * v for t, v in model(x, y).items()).backward()
        for g, p in zip(got, params):
            torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)
            p.grad = None
    prof.close()
    torch._dynamo.reset()
