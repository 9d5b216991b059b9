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


class _FailingBackward(torch.autograd.Function):
    """Doubles its input; its backward raises ``error`` while one is set (a user's bug, an
    out-of-memory error, an interrupt in the middle of a probe)."""

    error: BaseException | None = None

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        if _FailingBackward.error is not None:
            raise _FailingBackward.error
        return g * 2


class _FailingTrunk(torch.nn.Module):
    """Linear layers below and above a custom Function: the gramian engine's first stage (the
    heads) and the layers above it are done before the backward reaches the Function."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(4, 8), torch.nn.Linear(8, 8),
                                  torch.nn.Linear(8, 8))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _FailingBackward.apply(torch.tanh(self.a(x)))
        return self.c(torch.tanh(self.b(h)))


@pytest.mark.parametrize("error", [RuntimeError("user error in a backward"), KeyboardInterrupt()],
                         ids=["error", "interrupt"])  # fmt: skip
@pytest.mark.parametrize("accumulate", [False, True], ids=["fresh", "accumulating"])
@pytest.mark.parametrize("weighting", [False, True], ids=["weights", "gram-weighting"])
@pytest.mark.parametrize("engine", [*ENGINES, "auto"])
def test_a_probe_that_fails_in_a_backward_writes_no_grad(engine, weighting, accumulate, error):
    """A failure inside the probe's backward passes, after some ``.grad`` were written (the
    gramian engine writes the heads' and the top layers' on the way), leaves every ``.grad`` as
    it was and the step where it was; the retry then gives the plain weighted backward."""
    torch.manual_seed(0)
    trunk = _FailingTrunk().double()
    heads = torch.nn.ModuleList([torch.nn.Linear(8, 1) for _ in range(3)]).double()
    params = [*trunk.parameters(), *heads.parameters()]
    x = torch.randn(5, 4, dtype=torch.float64)
    w = {"a": 0.2, "b": 0.3, "c": 0.5}
    # a Gram weighting (here one whose weights are fixed): its writes come after the Grams
    arg = (lambda G: torch.tensor([0.2, 0.3, 0.5], dtype=G.dtype)) if weighting else w

    def losses() -> dict[str, torch.Tensor]:
        z = trunk(x)
        return {t: (h(z) ** 2).mean() * (1 + i) for i, (t, h) in enumerate(zip("abc", heads))}

    with gl.Profiler(trunk, ["a", "b", "c"], engine=engine) as prof:
        for _ in range(5 if engine == "auto" else 1):  # auto: past its deciding probes
            prof.backward(losses(), arg)
        for p in params:
            p.grad = torch.randn_like(p) if accumulate else None
        before = [None if p.grad is None else p.grad.clone() for p in params]
        step = prof.step
        _FailingBackward.error = error
        try:
            with pytest.raises(type(error)):
                prof.backward(losses(), arg)
        finally:
            _FailingBackward.error = None
        assert prof.step == step
        for p, g in zip(params, before):
            if g is None:
                assert p.grad is None
            else:
                assert torch.equal(p.grad, g)  # untouched, not recomputed
        ls = losses()
        plain = torch.autograd.grad(sum(w[t] * v for t, v in ls.items()), params, retain_graph=True)
        prof.backward(ls, arg)  # the retry
    assert prof.step == step + 1
    for p, g0, g in zip(params, before, plain):
        torch.testing.assert_close(p.grad, g if g0 is None else g0 + g, rtol=1e-10, atol=1e-12)


def test_a_warning_raised_as_an_error_after_the_writes_leaves_no_grad():
    """Under warnings-as-errors, the zero-gradient warning raised after the probe wrote
    ``.grad`` rolls the writes back: the retry (the warning is given once) counts them once."""
    trunk, head = _model()
    x = torch.randn(5, 3)
    with gl.Profiler(trunk, tasks=["a", "b"], engine="gramian") as prof:
        z = trunk(x)
        losses = {"a": head(z)[:, 0].mean(), "b": head.weight.sum() * 0 + z.sum() * 0}
        with pytest.raises(GradlensWarning, match="zero gradient"):
            prof.backward(losses)
        assert prof.step == 0
        assert all(p.grad is None for p in [*trunk.parameters(), *head.parameters()])
        z = trunk(x)
        losses = {"a": head(z)[:, 0].mean(), "b": head.weight.sum() * 0 + z.sum() * 0}
        params = list(trunk.parameters())
        want = torch.autograd.grad(sum(losses.values()), params, retain_graph=True)
        prof.backward(losses)
    assert prof.step == 1
    for p, g in zip(trunk.parameters(), want):
        torch.testing.assert_close(p.grad, g)


def test_hooks_on_a_head_see_the_accumulated_grad_as_autograd_gives_it():
    """The probe's writes go into the ``.grad`` already there, in place: a post-accumulate-grad
    hook on a head sees the sum (as with a plain backward), and a hook that frees ``.grad``
    (an optimizer step in the backward) leaves it freed."""
    seen: dict[str, torch.Tensor] = {}
    for run in ("plain", "probe"):
        trunk, head = _model()
        head.weight.grad = torch.ones_like(head.weight)
        handle = head.weight.register_post_accumulate_grad_hook(
            lambda p, run=run: seen.__setitem__(run, p.grad.clone())
        )
        z = trunk(torch.randn(5, 3, generator=torch.Generator().manual_seed(1)))
        losses = {"a": head(z)[:, 0].mean(), "b": head(z)[:, 1].pow(2).mean()}
        if run == "plain":
            sum(losses.values()).backward()
        else:
            with gl.Profiler(trunk, tasks=["a", "b"], engine="batched") as prof:
                prof.backward(losses)
        handle.remove()
    torch.testing.assert_close(seen["probe"], seen["plain"])
    trunk, head = _model()
    head.weight.grad = torch.ones_like(head.weight)
    head.weight.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    z = trunk(torch.randn(5, 3))
    with gl.Profiler(trunk, tasks=["a", "b"], engine="batched") as prof:
        prof.backward({"a": head(z)[:, 0].mean(), "b": head(z)[:, 1].pow(2).mean()})
    assert head.weight.grad is None


@pytest.mark.parametrize("engine", ["batched", "gramian", "auto"])
def test_a_second_profiler_is_not_served_what_another_model_taught(engine):
    """Two models of one structure whose custom Function differs by a flag (a sparse or a
    dense gradient): what the first profiler learned is its own."""

    class Rows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, table, idx, sparse):
            ctx.save_for_backward(idx)
            ctx.shape, ctx.sparse = table.shape, sparse
            return table[idx]

        @staticmethod
        def backward(ctx, g):
            (idx,) = ctx.saved_tensors
            if not ctx.sparse:  # (dense throughout: a batched engine's vmap runs this)
                return g.new_zeros(ctx.shape).index_add(0, idx, g), None, None
            grad = torch.sparse_coo_tensor(idx.unsqueeze(0), g, ctx.shape, check_invariants=True)
            return grad, None, None

    class Lookup(torch.nn.Module):
        def __init__(self, sparse: bool) -> None:
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(10, 4, dtype=torch.float64))
            self.sparse = sparse

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return Rows.apply(self.table, idx, self.sparse)

    for sparse in (True, False, True):
        torch.manual_seed(0)
        trunk = Lookup(sparse)
        table = trunk.table
        head = torch.nn.Linear(4, 2).double()
        with gl.Profiler(trunk, ["a", "b"], engine=engine) as prof:
            z = trunk(torch.tensor([1, 2, 2]))
            losses = {"a": head(z)[:, 0].mean(), "b": head(z)[:, 1].pow(2).mean()}
            if sparse and engine != "auto":
                with pytest.raises(GradlensError, match="sparse"):
                    prof.backward(losses)
                assert table.grad is None
                continue
            want = torch.autograd.grad(sum(losses.values()), table, retain_graph=True)[0]
            prof.backward(losses)
        assert table.grad.is_sparse == sparse
        torch.testing.assert_close(table.grad.to_dense(), want.to_dense())


def test_a_failed_write_of_a_gram_weighting_holds_no_weights():
    """A step probed only because no weights are held yet, whose write fails: the retry is
    probed again (the weights are held once a probe succeeded)."""
    torch.manual_seed(0)
    trunk = _FailingTrunk().double()
    heads = torch.nn.ModuleList([torch.nn.Linear(8, 1) for _ in range(3)]).double()
    x = torch.randn(5, 4, dtype=torch.float64)

    def losses() -> dict[str, torch.Tensor]:
        z = trunk(x)
        return {t: (h(z) ** 2).mean() for t, h in zip("abc", heads)}

    calls: list[int] = []

    class WriteFailedError(RuntimeError):
        pass

    def weighting(G: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        _FailingBackward.error = WriteFailedError("the write's backward fails")  # after the Grams
        return torch.full((3,), 1 / 3, dtype=G.dtype)

    # a tiny budget: no blocks kept, the update is a second backward through the trunk
    with gl.Profiler(trunk, ["a", "b", "c"], engine="gramian", every=2, memory_budget=1) as prof:
        prof.step = 1  # not a scheduled probe: probed because no weights are held
        try:
            with pytest.raises(WriteFailedError):
                prof.backward(losses(), weighting)
        finally:
            _FailingBackward.error = None
        assert prof.step == 1
        assert all(p.grad is None for p in trunk.parameters())
        _FailingBackward.error = None
        with pytest.warns(GradlensWarning, match="no weights held yet"):  # as the first did
            snap = prof.backward(losses(), lambda G: torch.full((3,), 1 / 3, dtype=G.dtype))
    assert snap is not None  # probed again
    assert calls == [1]


def test_a_failing_sink_says_the_step_itself_succeeded():
    """A sink that fails after the probe wrote ``.grad`` and advanced the step: the error says
    so (repeating the backward would count its gradients twice), with the sink's error chained."""

    class FullDisk:
        def add_snapshot(self, snap: gl.Snapshot) -> None:
            raise OSError("no space left on device")

        def close(self) -> None:
            pass

    trunk, head = _model()
    with gl.Profiler(trunk, tasks=["a", "b"], engine="gramian", sinks=[FullDisk()]) as prof:
        z = trunk(torch.randn(5, 3))
        losses = {"a": head(z)[:, 0].mean(), "b": head(z)[:, 1].pow(2).mean()}
        params = list(trunk.parameters())
        want = torch.autograd.grad(sum(losses.values()), params, retain_graph=True)
        with pytest.raises(GradlensError, match=r"succeeded .* Do not repeat the backward") as err:
            prof.backward(losses)
        assert isinstance(err.value.__cause__, OSError)
        assert prof.step == 1
    for p, g in zip(trunk.parameters(), want):
        torch.testing.assert_close(p.grad, g)


class _FailsOnCall(torch.autograd.Function):
    """Identity whose backward raises on its ``fail_on``-th call (counted in ``calls``)."""

    calls = 0
    fail_on = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _FailsOnCall.calls += 1
        if _FailsOnCall.calls == _FailsOnCall.fail_on:
            raise RuntimeError("user error in a backward")
        return g


@pytest.mark.parametrize("accumulate", [False, True], ids=["fresh", "accumulating"])
def test_an_unprobed_held_per_layer_write_that_fails_writes_no_grad(accumulate):
    """Held per-layer weights (``gl.per_layer``, ``every=2``) write an unprobed step by batched
    backwards per chunk of tasks, then the heads' by a weighted backward: a failure in that last
    one (a user's Function in a head) left the shared layers written."""
    from gradlens.weightings import make_weighting

    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh()).double()
    heads = torch.nn.ModuleList([torch.nn.Linear(8, 1) for _ in range(3)]).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    params = [*trunk.parameters(), *heads.parameters()]

    def losses() -> dict[str, torch.Tensor]:
        z = trunk(x)
        out = {t: (h(z) ** 2).mean() for t, h in zip("abc", heads)}
        out["c"] = _FailsOnCall.apply(out["c"])
        return out

    weighting = gl.per_layer(make_weighting("upgrad", list("abc")))
    with gl.Profiler(trunk, list("abc"), engine="loop", every=2) as prof:
        prof.backward(losses(), weighting)  # step 0: probed, the weights held
        if not accumulate:
            for p in params:
                p.grad = None
        before = [None if p.grad is None else p.grad.clone() for p in params]
        L = losses()
        _FailsOnCall.calls, _FailsOnCall.fail_on = 0, 2  # the heads' backward, after the trunk's
        try:
            with pytest.raises(RuntimeError, match="user error in a backward"):
                prof.backward(L, weighting)  # step 1: unprobed, the held weights written
        finally:
            _FailsOnCall.fail_on = 0
        assert _FailsOnCall.calls == 2
        assert prof.step == 1
        for p, g in zip(params, before):
            assert (p.grad is None) if g is None else torch.equal(p.grad, g)
