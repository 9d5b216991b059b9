"""A shared parameter to which a custom ``torch.autograd.Function`` returns a sparse gradient.

No node type says so (unlike ``nn.Embedding(sparse=True)`` or ``gather(sparse_grad=True)``): the
graph index learns it once per graph shape (one backward with a hook on the custom nodes, see
``GraphIndex.sparse_leaves``). ``auto`` (the default) then serves such graphs with ``loop``,
``batched`` and ``gramian`` refuse them before any side effect; every engine crashed with
torch's raw ``NotImplementedError`` (a sparse tensor built under vmap) before, ``gramian``
after writing the heads' ``.grad``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradlens as gl
from gradlens.engines.auto import SPARSE_NOTE
from gradlens.testing import reference_grams
from gradlens.weightings import make_weighting
from tests.zoo import assert_gram_close

W = {"a": 0.3, "b": 0.7}


def _sparse_rows(
    calls: list[int] | None = None, full: bool = False
) -> type[torch.autograd.Function]:
    """A fresh Function (a new node type: a graph shape no earlier test taught the index) whose
    backward returns the table's gradient as a sparse COO tensor (rows: one sparse dimension;
    ``full``: two, which ``t()`` takes); counts its backward calls."""

    class SparseRows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, table, idx):
            ctx.save_for_backward(idx)
            ctx.shape = table.shape
            return table[idx]

        @staticmethod
        def backward(ctx, g):
            if calls is not None:
                calls.append(1)
            (idx,) = ctx.saved_tensors
            grad = torch.sparse_coo_tensor(idx.unsqueeze(0), g, ctx.shape, check_invariants=True)
            return grad.to_dense().to_sparse() if full else grad, None

    return SparseRows


class _Trunk(nn.Module):
    """Rows of ``W`` looked up by the custom Function (repeated indices), then a Linear. Kinds:
    ``plus-dense-use``: ``W`` is also read by a plain slice (its total gradient is then dense);
    ``via-transpose``: ``W`` is stored transposed, the Function reads ``W.t()`` (its sparse
    gradient reaches the leaf through ``t``'s backward)."""

    def __init__(self, fn: type[torch.autograd.Function], kind: str = "sparse") -> None:
        super().__init__()
        shape = (4, 10) if kind == "via-transpose" else (10, 4)
        self.W = nn.Parameter(torch.randn(shape, dtype=torch.float64))
        self.lin = nn.Linear(4, 4).double()
        self.fn, self.kind = fn, kind

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        u = self.fn.apply(self.W.t() if self.kind == "via-transpose" else self.W, idx)
        if self.kind == "plus-dense-use":
            u = u + self.W[: idx.numel()]
        return torch.tanh(self.lin(u))


KINDS = ["sparse", "plus-dense-use", "via-transpose"]


def _setup(kind: str = "sparse", calls: list[int] | None = None):
    torch.manual_seed(0)
    trunk = _Trunk(_sparse_rows(calls, full=kind == "via-transpose"), kind)
    heads = nn.ModuleList([nn.Linear(4, 1).double() for _ in W])

    def losses(idx=None):
        return _losses(trunk, heads, idx)

    return trunk, heads, losses


def _losses(trunk, heads, idx=None):
    z = trunk(torch.tensor([1, 2, 2, 5]) if idx is None else idx)
    return {t: (h(z) ** 2).mean() * (k + 1) for k, (t, h) in enumerate(zip(W, heads))}


def _plain(params, losses, weights):
    """The plain weighted backward's gradients (``autograd.grad``: sparse where autograd's)."""
    w = [float(weights[t]) for t in W]
    return torch.autograd.grad(sum(wt * v for wt, v in zip(w, losses().values())), params)


def _assert_grads(params, plain):
    for p, g in zip(params, plain):
        assert p.grad.layout == g.layout  # sparse exactly where torch's own backward is
        torch.testing.assert_close(p.grad.to_dense(), g.to_dense(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("engine", ["auto", "loop"])
def test_auto_and_loop_serve_a_custom_sparse_gradient_exactly(engine, kind):
    trunk, heads, losses = _setup(kind)
    params = [*trunk.parameters(), *heads.parameters()]
    with gl.Profiler(trunk, list(W), engine=engine) as prof:
        for step in range(4):
            for p in params:
                p.grad = None
            plain = _plain(params, losses, W)
            L = losses()
            ref = reference_grams(L, trunk)
            snap = prof.backward(L, W)
            assert snap.engine == "loop"
            assert (SPARSE_NOTE in snap.notes) == (engine == "auto")
            assert_gram_close(snap.gram, ref.gram, 1e-10)
            for layer, g in ref.layer_grams.items():
                assert_gram_close(snap.layer_grams[layer], g, 1e-10)
            _assert_grads(params, plain)
            assert trunk.W.grad.is_sparse == (kind != "plus-dense-use")
            assert prof.step == step + 1
        assert "chose='loop'" in repr(prof) or engine == "loop"
    if kind != "plus-dense-use":
        torch.optim.SparseAdam([trunk.W]).step()  # a sparse optimizer takes the .grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("engine", ["batched", "gramian"])
def test_the_batched_engines_refuse_it_before_any_side_effect(engine, kind):
    trunk, heads, losses = _setup(kind)
    params = [*trunk.parameters(), *heads.parameters()]
    for p in params:  # gradients of an earlier micro-batch: kept as they are
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params]
    with gl.Profiler(trunk, list(W), engine=engine) as prof:
        with pytest.raises(gl.GradlensError) as err:
            prof.backward(losses(), W)
        assert prof.step == 0
    msg = str(err.value)
    assert f"engine='{engine}'" in msg
    assert "found ['W']" in msg
    assert "SparseRowsBackward" in msg  # the custom Function that makes it sparse
    assert "Use engine='loop' (or 'auto'" in msg
    assert "Nothing was written" in msg
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)  # the trunk's and the heads' alike


@pytest.mark.parametrize("engine", ["auto", "loop", "batched", "gramian"])
def test_a_users_error_in_a_custom_backward_propagates_unchanged_once(engine):
    calls: list[int] = []

    class UserBugError(Exception):
        pass

    class Buggy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, table, idx):
            return table[idx]

        @staticmethod
        def backward(ctx, g):
            calls.append(1)
            raise UserBugError("a user's bug in a custom backward")

    trunk, heads, losses = _setup()
    trunk.fn = Buggy
    params = [*trunk.parameters(), *heads.parameters()]
    with gl.Profiler(trunk, list(W), engine=engine) as prof:
        with pytest.raises(UserBugError, match="a user's bug") as err:
            prof.backward(losses(), W)
        assert type(err.value) is UserBugError  # not wrapped, not replaced
        assert calls == [1]  # run once, not retried by another engine
        assert prof.step == 0
    assert all(p.grad is None for p in params)


def test_the_custom_backward_is_read_once_per_graph_shape():
    """One backward (the index's) on the first probe of the shape, none after: loop's T = 2
    per probe; a graph of another shape (a new batch size: the same signature) learns nothing
    anew."""
    calls: list[int] = []
    trunk, heads, losses = _setup(calls=calls)
    with gl.Profiler(trunk, list(W)) as prof:
        for step in range(3):
            prof.backward(losses(), W)
            assert len(calls) == 1 + 2 * (step + 1)
        prof.backward(losses(torch.tensor([3, 3])), W)
        assert len(calls) == 1 + 2 * 4


def test_a_custom_function_with_a_dense_gradient_keeps_every_engine():
    """A custom Function whose backward is dense (most are): ``batched`` and ``gramian`` serve
    it, ``auto`` times them as usual; nothing is refused."""

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, table, idx):
            ctx.save_for_backward(table, idx)
            return table[idx] * 2

        @staticmethod
        def backward(ctx, g):
            table, idx = ctx.saved_tensors
            return torch.zeros_like(table).index_add(0, idx, 2 * g), None

    trunk, heads, losses = _setup()
    trunk.fn = Scale
    params = [*trunk.parameters(), *heads.parameters()]
    for engine in ["batched", "gramian", "auto"]:
        with gl.Profiler(trunk, list(W), engine=engine) as prof:
            for _ in range(8):
                for p in params:
                    p.grad = None
                L = losses()
                ref = reference_grams(L, trunk)
                snap = prof.backward(L, W)
                assert_gram_close(snap.gram, ref.gram, 1e-10)
                assert SPARSE_NOTE not in snap.notes
            _assert_grads(params, _plain(params, losses, W))
            if engine == "auto":  # its batched candidates timed, as on any dense graph
                assert {"batched", "gramian"} <= set(snap.timings)
            else:
                assert snap.engine == engine


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("engine", ["auto", "loop"])
def test_a_sparse_gradient_accumulates_into_an_existing_grad_as_autograd_does(engine, layout):
    """An existing dense ``.grad`` plus a sparse gradient: dense, in place; an existing sparse
    one: sparse (autograd's AccumulateGrad)."""
    trunk, heads, losses = _setup()
    twin, twin_heads = copy.deepcopy(trunk), copy.deepcopy(heads)
    g = torch.randn(10, 4, dtype=torch.float64)
    if layout == "sparse":  # rows 0 and 7, one sparse dimension as the Function's gradient
        g = torch.zeros_like(g).index_add(0, torch.tensor([0, 7, 7]), g[:3]).to_sparse(1)
    trunk.W.grad, twin.W.grad = g, g.clone()
    kept = trunk.W.grad
    with gl.Profiler(trunk, list(W), engine=engine) as prof:
        prof.backward(losses(), W)
    sum(W[t] * v for t, v in _losses(twin, twin_heads).items()).backward()  # torch's own
    assert trunk.W.grad.layout == twin.W.grad.layout
    if layout == "dense":
        assert trunk.W.grad is kept  # added in place, as autograd adds
    torch.testing.assert_close(trunk.W.grad.to_dense(), twin.W.grad.to_dense(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("engine", ["auto", "loop"])
def test_observe_measures_it_and_the_callers_backward_is_untouched(engine):
    trunk, heads, losses = _setup()
    params = [*trunk.parameters(), *heads.parameters()]
    plain = _plain(params, losses, W)
    with gl.Profiler(trunk, list(W), engine=engine) as prof:
        L = losses()
        ref = reference_grams(L, trunk)
        snap = prof.observe(L, W)
        assert all(p.grad is None for p in params)
        sum(W[t] * v for t, v in L.items()).backward()  # the framework's own
    assert_gram_close(snap.gram, ref.gram, 1e-10)
    _assert_grads(params, plain)


@pytest.mark.parametrize("per_layer", [False, True], ids=["whole", "per-layer"])
def test_a_gram_weighting_writes_its_update_sparse(per_layer):
    trunk, heads, losses = _setup()
    params = [*trunk.parameters(), *heads.parameters()]
    weighting = make_weighting("mgda", list(W))
    with gl.Profiler(trunk, list(W), every=2) as prof:
        for _ in range(3):  # probed, unprobed (held weights), probed
            for p in params:
                p.grad = None
            L = losses()
            ref = reference_grams(L, trunk)
            snap = prof.backward(L, gl.per_layer(weighting) if per_layer else weighting)
            if snap is not None:
                assert_gram_close(snap.gram, ref.gram, 1e-10)
                held = snap
            assert trunk.W.grad.is_sparse
            if per_layer:
                Ls = torch.stack(list(losses().values()))
                for name, p in trunk.named_parameters():
                    lw = held.layer_weights[name.rpartition(".")[0] or "(root)"]
                    want = torch.autograd.grad(lw.to(Ls.dtype) @ Ls, p, retain_graph=True)[0]
                    torch.testing.assert_close(p.grad.to_dense(), want.to_dense())
            else:
                weights = dict(zip(W, held.weights.tolist()))
                _assert_grads(params, _plain(params, losses, weights))


def test_the_index_reads_each_input_of_a_custom_function_by_its_own_gradient():
    """A Function with a non-tensor argument and two tables, one given a sparse gradient and
    one a dense one: only the first is flagged (the hook's gradients line up with the node's
    inputs), and without the losses nothing is run: what was learned is used."""
    from gradlens.engines._graph import GraphIndex

    class TwoTables(torch.autograd.Function):
        @staticmethod
        def forward(ctx, k, sparse_t, idx, dense_t):
            ctx.save_for_backward(idx)
            ctx.shape, ctx.k = sparse_t.shape, k
            return sparse_t[idx] * k + dense_t[idx]

        @staticmethod
        def backward(ctx, g):
            (idx,) = ctx.saved_tensors
            i = idx.unsqueeze(0)
            sparse = torch.sparse_coo_tensor(i, g * ctx.k, ctx.shape, check_invariants=True)
            return None, sparse, None, g.new_zeros(ctx.shape).index_add(0, idx, g)

    a, b = (torch.randn(6, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def stacked():
        y = TwoTables.apply(2.0, a, torch.tensor([0, 4, 4]), b)
        return torch.stack([y.sum(), y.pow(2).sum()])

    learned: dict[object, dict[int, str]] = {}
    assert GraphIndex.build(stacked()).sparse_leaves(None, learned) == set()  # nothing run yet
    losses = stacked()
    g = GraphIndex.build(losses)
    assert g.sparse_leaves(stacked(), learned) == set()  # another graph's losses: nothing learned
    assert g.sparse_leaves(losses) == set()  # no record to learn into: the nodes' flags only
    assert g.sparse_leaves(losses, learned) == {id(a)}
    assert g.sparse_from == {id(a): "the custom autograd.Function node TwoTablesBackward"}
    same_shape = GraphIndex.build(stacked())
    assert same_shape.sparse_leaves(None, learned) == {id(a)}  # learned for this signature
    assert same_shape.sparse_leaves(None, {}) == set()  # another record (another profiler)
    assert a.grad is None
    assert b.grad is None
