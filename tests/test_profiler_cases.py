"""Cases that used to be silent or unclear: parameters unfrozen after the profiler was created,
reentrant checkpointing, a profiler created after the forward, layers that no loss reaches."""

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


@pytest.mark.parametrize("engine", ["auto", "gramian"])
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
