"""Profiler entry checks and flags: non-finite vs zero gradients, bad losses, failed calls."""

from __future__ import annotations

import pytest
import torch

import gradlens as gl
from gradlens import GradlensError, GradlensWarning

pytestmark = pytest.mark.usefixtures("one_thread")
ENGINES = ["loop", "batched", "gramian"]


def _model() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)


@pytest.mark.parametrize("engine", ENGINES)
def test_nan_gradient_from_a_finite_loss_is_not_a_zero_gradient(engine):
    trunk, head = _model()
    with gl.Profiler(trunk, tasks=["a", "b"], engine=engine) as prof:
        z = trunk(torch.randn(5, 3))
        losses = {"a": head(z)[:, 0].mean(), "b": (z[:, 0] * 0).sum().sqrt()}  # finite: 0
        with pytest.warns(GradlensWarning, match=r"'b'\] have a non-finite .*gradient") as rec:
            snap = prof.backward(losses)
    assert "b" in snap.nonfinite_tasks
    assert snap.zero_tasks == ()  # NaN is not zero
    assert not any("zero gradient" in str(r.message) for r in rec)


@pytest.mark.parametrize("engine", [*ENGINES, "auto"])
def test_the_healthy_task_is_not_flagged(engine):
    trunk, head = _model()
    with gl.Profiler(trunk, tasks=["a", "b"], engine=engine) as prof:
        z = trunk(torch.randn(5, 3))
        losses = {"a": head(z)[:, 0].mean(), "b": (z[:, 0] * 0).sum().sqrt()}
        with pytest.warns(GradlensWarning, match="non-finite"):
            snap = prof.backward(losses)
    assert snap.nonfinite_tasks == ("b",)
    assert torch.isfinite(snap.gram[0, 0])  # a's own gradient, untouched by b's NaN
    assert snap.gram[0, 0] > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_zero_gradient_is_flagged_as_zero_only(engine):
    trunk, head = _model()
    with gl.Profiler(trunk, tasks=["a", "b"], engine=engine) as prof:
        z = trunk(torch.randn(5, 3))
        losses = {"a": head(z)[:, 0].mean(), "b": head.bias.sum()}  # b does not reach the trunk
        with pytest.warns(GradlensWarning, match=r"\['b'\] have a zero gradient"):
            snap = prof.backward(losses)
    assert snap.zero_tasks == ("b",)
    assert snap.nonfinite_tasks == ()


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_losses_are_refused_before_any_engine_runs(engine):
    trunk, head = _model()
    with gl.Profiler(trunk, tasks=["a", "b"], engine=engine) as prof:
        out = head(trunk(torch.randn(5, 3)))
        cases = [
            ({"a": out[:, 0].mean(), "b": out[:, 1].to(torch.complex64).mean()},
             r"`losses\['b'\]` should be a real floating-point scalar; found dtype .*complex64"),
            ({"a": out[:, 0].mean(), "b": torch.zeros((), device="meta", requires_grad=True)},
             "should all be on one device"),
        ]  # fmt: skip
        for losses, match in cases:
            with pytest.raises(GradlensError, match=match):
                prof.backward(losses)
            assert prof.step == 0  # a refused call changes nothing
        meta = torch.zeros((), device="meta", requires_grad=True)
        with pytest.raises(GradlensError, match="on the device of the shared parameters"):
            prof.backward({"a": meta * 1.0, "b": meta * 2.0})
        assert prof.step == 0
        assert trunk.weight.grad is None


def test_an_engine_error_does_not_advance_the_step(monkeypatch):
    trunk, head = _model()
    with gl.Profiler(trunk, tasks=["a", "b"], engine="batched") as prof:
        out = head(trunk(torch.randn(5, 3)))
        losses = {"a": out[:, 0].mean(), "b": out[:, 1].mean()}

        def broken(ctx: object) -> None:
            raise RuntimeError("engine failure")

        monkeypatch.setattr(prof._engine, "compute", broken)
        with pytest.raises(RuntimeError, match="engine failure"):
            prof.backward(losses, retain_graph=True)
        assert prof.step == 0
        monkeypatch.undo()
        snap = prof.backward(losses)
    assert snap is not None
    assert snap.step == 0
    assert prof.step == 1


@pytest.mark.parametrize("bad", ["0.5", True, b"1"])
def test_weights_that_are_not_numbers_are_refused(bad):
    trunk, head = _model()
    with gl.Profiler(trunk, tasks=["a", "b"], engine="loop") as prof:
        out = head(trunk(torch.randn(5, 3)))
        with pytest.raises(GradlensError, match=r"`weights\['a'\]` should be a real number"):
            prof.backward({"a": out[:, 0].mean(), "b": out[:, 1].mean()}, {"a": bad, "b": 0.5})
        assert prof.step == 0


def test_profiler_on_an_existing_run_names_the_real_keywords(tmp_path):
    trunk, _ = _model()
    gl.Profiler(trunk, tasks=["a", "b"], store=tmp_path / "r").close()
    with pytest.raises(GradlensError, match=r"store=RunWriter\(path, overwrite=True\)"):
        gl.Profiler(trunk, tasks=["a", "b"], store=tmp_path / "r")


@pytest.mark.parametrize("engine", [*ENGINES, "auto"])
def test_losses_of_mixed_dtypes_give_the_plain_backward(engine):
    # a float32 trunk with one float32 head and one float64 head (issue 15, item 8: the batched
    # engine raised torch's "both inputs should have same dtype")
    trunk, head = _model()
    other = torch.nn.Linear(4, 1).double()
    x = torch.randn(5, 3)

    def losses() -> dict[str, torch.Tensor]:
        z = trunk(x)
        return {"a": head(z)[:, 0].pow(2).mean(), "b": other(z.double()).pow(2).mean()}

    params = [*trunk.parameters(), *head.parameters(), *other.parameters()]
    w = {"a": 0.3, "b": 0.7}
    ls = losses()
    plain = torch.autograd.grad(w["a"] * ls["a"] + w["b"] * ls["b"], params)
    ref = gl.testing.reference_grams(losses(), trunk)
    with gl.Profiler(trunk, tasks=["a", "b"], engine=engine) as prof:
        snap = prof.backward(losses(), weights=w)
    torch.testing.assert_close(snap.gram, ref.gram, rtol=1e-5, atol=1e-7)
    for p, g in zip(params, plain, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
