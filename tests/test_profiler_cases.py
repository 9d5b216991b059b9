"""Cases that used to be silent or unclear: parameters unfrozen after the profiler was created,
reentrant checkpointing, a profiler created after the forward, layers that no loss reaches,
sparse embedding gradients (``nn.Embedding(sparse=True)``) in the shared part or a head."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradlens as gl
from gradlens.engines.gramian import UNRECORDED
from gradlens.testing import reference_grams
from tests.zoo import assert_gram_close, build, task_losses

ENGINES = ["auto", "loop", "batched", "gramian"]


@pytest.mark.parametrize("engine", ENGINES)
def test_parameters_unfrozen_after_creation_join_the_grams(engine):
    trunk, heads, x, ys = build("mlp", 3)
    trunk[0].requires_grad_(False)
    with gl.Profiler(trunk, ["t0", "t1", "t2"], engine=engine) as prof:
        assert prof.layers == ("2", "4")
        snap = prof.backward(task_losses(trunk, heads, x, ys))
        assert list(snap.layer_grams) == ["2", "4"]
        trunk[0].requires_grad_(True)
        assert prof.layers == ("0", "2", "4")
        for _ in range(2):
            losses = task_losses(trunk, heads, x, ys)
            ref = reference_grams(losses, trunk)
            snap = prof.backward(losses)
            assert list(snap.layer_grams) == list(ref.layer_grams) == ["0", "2", "4"]
            assert_gram_close(snap.gram, ref.gram, 1e-10)
            assert_gram_close(snap.layer_grams["0"], ref.layer_grams["0"], 1e-10)
        assert trunk[0].weight.grad is not None
        trunk[2].requires_grad_(False)  # and frozen again: it leaves the Grams
        snap = prof.backward(task_losses(trunk, heads, x, ys))
        assert list(snap.layer_grams) == ["0", "4"]


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 5)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.a, x, use_reentrant=self.reentrant)
        return self.b(torch.tanh(h))


@pytest.mark.parametrize("engine", ENGINES)
def test_reentrant_checkpoint_is_refused_before_any_side_effect(engine):
    torch.manual_seed(0)
    trunk = _Checkpointed(reentrant=True).double()
    heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(2)]).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)  # reentrant needs one
    ys = torch.randn(2, 4, dtype=torch.float64)
    with gl.Profiler(trunk, ["t0", "t1"], engine=engine) as prof:
        losses = task_losses(trunk, heads, x, ys)
        with pytest.raises(gl.GradlensError, match=r"use_reentrant=False"):
            prof.backward(losses)
        assert prof.step == 0
        assert all(p.grad is None for p in [*trunk.parameters(), *heads.parameters()])
        trunk.reentrant = False  # the fix the message names works
        losses = task_losses(trunk, heads, x, ys)
        ref = reference_grams(losses, trunk)
        snap = prof.backward(losses)
        assert prof.step == 1
        assert_gram_close(snap.gram, ref.gram, 1e-10)


@pytest.mark.parametrize("engine", ["gramian"])  # auto: see test_profiler_shared.py
def test_profiler_created_after_the_forward_warns_once_and_notes_it(engine):
    trunk, heads, x, ys = build("mlp", 2)
    losses = task_losses(trunk, heads, x, ys)  # forward before the profiler exists
    ref = reference_grams(losses, trunk)
    with gl.Profiler(trunk, ["t0", "t1"], engine=engine) as prof:
        with pytest.warns(gl.GradlensWarning, match=r"Create the Profiler before the first") as w:
            snap = prof.backward(losses)
        assert w[0].filename == __file__  # it points at the user's call
        assert UNRECORDED in snap.notes
        assert_gram_close(snap.gram, ref.gram, 1e-10)  # still exact
        snap = prof.backward(task_losses(trunk, heads, x, ys))  # seen: no note, no warning
        assert UNRECORDED not in snap.notes
        losses = task_losses(trunk, heads, x, ys)
        prof.close()
    # loop and batched need no hooks: nothing to note
    with gl.Profiler(trunk, ["t0", "t1"], engine="batched") as prof:
        assert UNRECORDED not in prof.backward(losses).notes


class _Branches(nn.Module):
    """Layer ``b`` is shared but no loss reaches it at this step (a routed branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.a(x)))


@pytest.mark.parametrize("engine", ENGINES)
def test_unreached_layer_has_a_zero_gram_listed_and_flagged(engine):
    torch.manual_seed(0)
    trunk = _Branches().double()
    heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(3)]).double()
    x, ys = torch.randn(4, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    with gl.Profiler(trunk, ["t0", "t1", "t2"], engine=engine) as prof:
        losses = task_losses(trunk, heads, x, ys)
        ref = reference_grams(losses, trunk)
        snap = prof.backward(losses)
    assert list(prof.layers) == list(ref.layer_grams) == list(snap.layer_grams) == ["a", "b", "c"]
    assert snap.unreached == ("b",)
    assert torch.count_nonzero(snap.layer_grams["b"]) == 0
    assert torch.count_nonzero(ref.layer_grams["b"]) == 0
    assert_gram_close(snap.gram, ref.gram, 1e-10)
    assert trunk.b.weight.grad is None  # as a plain backward leaves it


class _SparseTrunk(nn.Module):
    """A sparse-gradient embedding (rows looked up twice: repeated indices) and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=True)
        self.out = nn.Linear(12, 5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.out(self.emb(idx).flatten(1)))


def _sparse_setup():
    torch.manual_seed(0)
    trunk = _SparseTrunk().double()
    heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(3)]).double()
    idx = torch.tensor([[1, 2, 1], [3, 1, 7], [2, 2, 9], [0, 1, 3]])

    def losses():
        z = trunk(idx)
        return {f"t{i}": (h(z) ** 2).mean() * (i + 1) for i, h in enumerate(heads)}

    return trunk, heads, losses


W3 = {"t0": 0.2, "t1": 0.3, "t2": 0.5}


@pytest.mark.parametrize("engine", ["auto", "loop"])
@pytest.mark.parametrize("weighting", [None, "mgda"])
def test_a_sparse_embedding_gradient_is_measured_and_written_sparse(engine, weighting):
    from gradlens.weightings import make_weighting

    trunk, heads, losses = _sparse_setup()
    params = [*trunk.parameters(), *heads.parameters()]
    with gl.Profiler(trunk, list(W3), engine=engine) as prof:
        L = losses()
        ref = reference_grams(L, trunk)
        weights = W3 if weighting is None else make_weighting(weighting, list(W3))
        snap = prof.backward(L, weights)
    assert snap.engine == "loop"
    assert_gram_close(snap.gram, ref.gram, 1e-12)
    for layer, g in ref.layer_grams.items():
        assert_gram_close(snap.layer_grams[layer], g, 1e-12)
    w = snap.weights.to(torch.float64)
    L = losses()
    plain = torch.autograd.grad(sum(wt * v for wt, v in zip(w, L.values())), params)
    assert trunk.emb.weight.grad.is_sparse  # as autograd's: a sparse optimizer takes it
    for p, g in zip(params, plain):
        assert p.grad.is_sparse == g.is_sparse
        torch.testing.assert_close(p.grad.to_dense(), g.to_dense(), rtol=1e-12, atol=1e-15)
    torch.optim.SparseAdam([trunk.emb.weight]).step()


@pytest.mark.parametrize("engine", ["batched", "gramian"])
def test_an_engine_without_sparse_gradients_refuses_them_before_any_side_effect(engine):
    trunk, heads, losses = _sparse_setup()
    with gl.Profiler(trunk, list(W3), engine=engine) as prof:
        with pytest.raises(gl.GradlensError, match=r"found \['emb.weight'\]\. Use engine='loop'"):
            prof.backward(losses(), W3)
        assert prof.step == 0
        assert all(p.grad is None for p in [*trunk.parameters(), *heads.parameters()])


def _probe_and_plain(trunk, losses, params, engine):
    """The plain weighted backward's gradients of ``params`` (W3), then one probe of a fresh
    forward by ``engine`` and the reference Grams of that forward: ``(plain, snap, ref)``."""
    plain = torch.autograd.grad(sum(W3[t] * v for t, v in losses().items()), params)
    with gl.Profiler(trunk, list(W3), engine=engine) as prof:
        L = losses()
        ref = reference_grams(L, trunk)
        snap = prof.backward(L, W3)
    return plain, snap, ref


@pytest.mark.parametrize("engine", ["auto", "loop", "batched", "gramian"])
def test_a_sparse_embedding_in_a_head_gets_its_weighted_gradient(engine):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh()).double()
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(3)]).double()
    tag = nn.Embedding(5, 1, sparse=True).double()  # a task-specific bias per example kind
    x, kind = torch.randn(8, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])

    def losses():
        z = trunk(x)
        out = {f"t{i}": (h(z) ** 2).mean() for i, h in enumerate(heads)}
        out["t2"] = ((heads[2](z) + tag(kind)) ** 2).mean()
        return out

    params = [*trunk.parameters(), *heads.parameters(), tag.weight]
    plain, snap, ref = _probe_and_plain(trunk, losses, params, engine)
    assert_gram_close(snap.gram, ref.gram, 1e-10)
    assert tag.weight.grad.is_sparse
    for p, g in zip(params, plain):
        torch.testing.assert_close(p.grad.to_dense(), g.to_dense(), rtol=1e-10, atol=1e-14)


def test_held_per_layer_weights_write_a_sparse_gradient_on_unprobed_steps():
    from gradlens.weightings import make_weighting

    trunk, heads, losses = _sparse_setup()
    params = [*trunk.parameters(), *heads.parameters()]
    with gl.Profiler(trunk, list(W3), every=2) as prof:
        held = prof.backward(losses(), gl.per_layer(make_weighting("mgda", list(W3))))
        for p in params:
            p.grad = None
        assert prof.backward(losses(), gl.per_layer(make_weighting("mgda", list(W3)))) is None
    assert trunk.emb.weight.grad.is_sparse
    L = torch.stack(list(losses().values()))
    for name, p in trunk.named_parameters():
        lw = held.layer_weights[name.rpartition(".")[0]]
        want = torch.autograd.grad(lw @ L, p, retain_graph=True)[0]
        torch.testing.assert_close(p.grad.to_dense(), want.to_dense(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_channels_last_model_gets_grads_laid_out_as_its_parameters(engine):
    """autograd's gradient layout contract (a new .grad has its parameter's strides), which
    DDP's gradient buckets rely on: the engines keep it for a channels-last CNN, its 1 x 1
    convolution too (whose weight is also "contiguous", with other strides: its .grad got the
    contiguous ones before)."""
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
        nn.ReLU(), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).double().to(memory_format=torch.channels_last)
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in W3]).double()
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64).to(memory_format=torch.channels_last)

    def losses():
        z = trunk(x)
        return {t: (h(z) ** 2).mean() for t, h in zip(W3, heads)}

    params = list(trunk.parameters())
    plain, snap, ref = _probe_and_plain(trunk, losses, params, engine)
    assert_gram_close(snap.gram, ref.gram, 1e-12)
    assert trunk[0].weight.stride() != trunk[0].weight.contiguous().stride()
    assert trunk[5].weight.is_contiguous()
    assert trunk[5].weight.stride() == (8, 1, 8, 8)
    for p, g in zip(params, plain):
        assert p.grad.stride() == g.stride() == p.stride()
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)


def test_a_probe_a_weighting_forces_off_schedule_is_named_as_such():
    """A Gram weighting with no held weights forces a probe at a step the schedule skips: its
    forward was not recorded (nothing asked for it), so the hooked engine serves it by the
    exact generic path; the note and the warning say so, not 'created after the forward'."""
    from gradlens.weightings import make_weighting

    trunk, heads, x, ys = build("mlp", 2)
    with gl.Profiler(trunk, ["t0", "t1"], engine="gramian", every=4) as prof:
        assert prof.backward(task_losses(trunk, heads, x, ys)).step == 0
        losses = task_losses(trunk, heads, x, ys)
        ref = reference_grams(losses, trunk)
        with pytest.warns(gl.GradlensWarning, match="made step 1 a probe") as w:
            snap = prof.backward(losses, make_weighting("mgda", ["t0", "t1"]))
        assert w[0].filename == __file__
        assert snap.notes == ("unscheduled-probe",)
        assert_gram_close(snap.gram, ref.gram, 1e-10)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_gradient_kept_in_another_dtype_than_its_parameter(engine):
    """``p.grad_dtype`` (torch 2.9 on; e.g. bfloat16 weights with float32 gradients): every
    engine writes ``.grad`` in that dtype, new and accumulated, as a plain backward does (the
    engines raised torch's raw 'attempting to assign a gradient with dtype' error before)."""
    import copy

    if not hasattr(torch.empty(0), "grad_dtype"):
        pytest.skip("this torch has no Tensor.grad_dtype")
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8),
        nn.LayerNorm(8),
    )
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in W3])
    model = nn.ModuleDict({"trunk": trunk, "heads": heads})
    twin = copy.deepcopy(model)
    for m in (model, twin):
        for p in m.parameters():
            p.grad_dtype = torch.float64
    x = torch.randn(4, 3, 6, 6)

    def losses(m):
        z = m["trunk"](x)
        return {t: (h(z) ** 2).mean() for t, h in zip(W3, m["heads"])}

    with gl.Profiler(trunk, list(W3), engine=engine) as prof:
        for _ in range(2):  # a new .grad, then one accumulated into
            prof.backward(losses(model), W3)
            sum(W3[t] * v for t, v in losses(twin).items()).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.grad.dtype == q.grad.dtype == torch.float64, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
