"""The ``loop`` and ``batched`` engines' flat ``T x P`` path: chunked Gram products, the reused
buffer, and the reference kept apart from it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradlens as gl
from gradlens.engines import loop
from gradlens.testing import reference_grams
from tests.zoo import assert_gram_close


def _wide(dtype: torch.dtype, n_tasks: int = 3):
    torch.manual_seed(0)
    # 300 x 300 = 90,000 weights: more than one chunk of CHUNK columns
    trunk = nn.Sequential(nn.Linear(20, 300), nn.Tanh(), nn.Linear(300, 300), nn.Tanh()).to(dtype)
    heads = nn.ModuleList([nn.Linear(300, 1) for _ in range(n_tasks)]).to(dtype)
    return trunk, heads, torch.randn(16, 20, dtype=dtype)


def _losses(trunk, heads, x):
    z = trunk(x)
    return {f"t{i}": (h(z) ** 2).mean() for i, h in enumerate(heads)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_a_layer_wider_than_a_chunk_is_exact(engine, dtype):
    assert loop.CHUNK < 300 * 300
    trunk, heads, x = _wide(dtype)
    w = {"t0": 0.2, "t1": 0.5, "t2": 0.3}
    params = [*trunk.parameters(), *heads.parameters()]
    plain = torch.autograd.grad(sum(w[t] * v for t, v in _losses(trunk, heads, x).items()), params)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    with gl.Profiler(trunk, list(w), engine=engine) as prof:
        for _ in range(2):  # the second probe reuses the first one's buffer
            losses = _losses(trunk, heads, x)
            ref = reference_grams(losses, trunk)
            snap = prof.backward(losses, w)
            assert_gram_close(snap.gram, ref.gram, tol)
            for layer, g in ref.layer_grams.items():
                assert_gram_close(snap.layer_grams[layer], g, tol)
            for p, g in zip(params, plain):
                torch.testing.assert_close(p.grad, g, rtol=tol, atol=tol * 1e-2)
                p.grad = None


def test_flat_layer_grams_sums_chunks_in_float64():
    torch.manual_seed(0)
    J = torch.randn(3, 2 * loop.CHUNK + 7, dtype=torch.float64)
    cols = {"a": [(0, 5)], "b": [(5, 2 * loop.CHUNK)], "c": [(2 * loop.CHUNK, 2 * loop.CHUNK + 7)]}
    got = loop.flat_layer_grams(J, cols)
    assert list(got) == ["a", "b", "c"]
    for name, [(a, b)] in cols.items():
        ref = J[:, a:b] @ J[:, a:b].T
        assert got[name].dtype == torch.float64
        torch.testing.assert_close(got[name], ref, rtol=1e-12, atol=0.0)
    # float32 columns: each chunk a float32 product, the chunks summed in float64
    J32 = J.float()
    ((a, b),) = cols["b"]
    chunks = [J32[:, lo : min(b, lo + loop.CHUNK)] for lo in range(a, b, loop.CHUNK)]
    want = sum((c @ c.T).double() for c in chunks)
    torch.testing.assert_close(loop.flat_layer_grams(J32, cols)["b"], want, rtol=1e-12, atol=0.0)


def test_layer_columns_merge_adjacent_parameters_of_a_layer():
    trunk = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    shared = gl.engines._base.resolve_shared(trunk)
    assert loop.layer_columns(shared, shared.params) == {"0": [(0, 16)], "1": [(16, 24)]}
    # the same parameters out of module order: spans kept apart, in the order given
    ps = [trunk[0].bias, trunk[1].weight, trunk[0].weight]
    assert loop.layer_columns(shared, ps) == {"0": [(0, 4), (12, 24)], "1": [(4, 12)]}


def test_the_reference_is_not_the_engine():
    # gradlens.testing keeps the float64 computation of every gradient, apart from the engine's
    trunk, heads, x = _wide(torch.float32)
    ref = reference_grams(_losses(trunk, heads, x), trunk)
    grads = loop.loop_task_grads(list(_losses(trunk, heads, x).values()), list(trunk.parameters()))
    J = loop.flat_grads(grads).double()
    k = 0
    for layer, p_list in [("0", list(trunk[0].parameters())), ("2", list(trunk[2].parameters()))]:
        n = sum(p.numel() for p in p_list)
        torch.testing.assert_close(
            ref.layer_grams[layer], J[:, k : k + n] @ J[:, k : k + n].T, rtol=1e-14, atol=0.0
        )
        k += n


def test_a_buffer_over_keep_is_not_held(monkeypatch):
    monkeypatch.setattr(loop, "KEEP", 0)
    trunk, heads, x = _wide(torch.float32)
    with gl.Profiler(trunk, ["t0", "t1", "t2"], engine="loop") as prof:
        prof.backward(_losses(trunk, heads, x))
        assert prof._engine._workspace._bufs == {}
    monkeypatch.setattr(loop, "KEEP", 64 << 20)
    with gl.Profiler(trunk, ["t0", "t1", "t2"], engine="loop") as prof:
        prof.backward(_losses(trunk, heads, x))
        (buf,) = prof._engine._workspace._bufs.values()
        assert buf.shape == (3, sum(p.numel() for p in trunk.parameters()))
    assert prof._engine._workspace._bufs == {}  # released when the profiler closes


def _with_extra_leaf(dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh()).to(dtype)
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(3)]).to(dtype)
    temp = nn.Parameter(torch.tensor(0.7, dtype=dtype))  # a leaf every task uses
    x = torch.randn(6, 5, dtype=dtype)

    def losses(bad: bool = False):
        z = trunk(x)
        out = {f"t{i}": (h(z) ** 2).mean() * temp for i, h in enumerate(heads)}
        if bad:  # t2's head gets an infinite gradient: d sqrt(u)/du at u = 0
            out["t2"] = (heads[2](z) * 0).abs().sum().sqrt() + out["t2"]
        return out

    return trunk, [*heads.parameters(), temp], losses


@pytest.mark.parametrize("bad", [False, True], ids=["finite", "inf-head"])
def test_loop_writes_the_heads_from_its_own_backward_passes(bad):
    trunk, others, losses = _with_extra_leaf()
    w = {"t0": 0.2, "t1": 0.5, "t2": 0.3}
    params = [*trunk.parameters(), *others]
    plain = torch.autograd.grad(sum(w[t] * v for t, v in losses(bad).items()), params)
    with gl.Profiler(trunk, list(w), engine="loop") as prof:
        L = losses(bad)
        if bad:
            with pytest.warns(gl.GradlensWarning, match=r"\['t2'\] have a non-finite"):
                prof.backward(L, w)
        else:
            prof.backward(L, w)
        # the last per-task backward freed the graph, as the weighted backward would have
        with pytest.raises(gl.GradlensError, match="graph already freed"):
            prof.backward(L, w)
    for p, g in zip(params, plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14, equal_nan=True)
    assert any(not torch.isfinite(p.grad).all() for p in others) == bad


def test_loop_keeps_the_graph_when_asked():
    trunk, others, losses = _with_extra_leaf()
    with gl.Profiler(trunk, ["t0", "t1", "t2"], engine="loop") as prof:
        L = losses()
        prof.backward(L, retain_graph=True)
        first = [p.grad.clone() for p in others]
        prof.backward(L)  # the graph is still there
    for p, g in zip(others, first):
        torch.testing.assert_close(p.grad, 2 * g)


def test_a_gram_plan_never_returns_the_buffer_it_rewrites():
    # float64 columns: the float64 conversion would be a no-op returning the plan's own buffer
    J = torch.randn(3, 10, dtype=torch.float64)
    cols = {"a": [(0, 4)], "b": [(4, 10)]}
    plan = loop.GramPlan(J, cols)
    first = plan.run()
    kept = first.clone()
    J.mul_(2.0)  # the next probe's gradients, in the same buffer
    second = plan.run()
    torch.testing.assert_close(first, kept, rtol=0.0, atol=0.0)
    torch.testing.assert_close(second, 4 * kept, rtol=1e-15, atol=0.0)
    assert plan.layers == ["a", "b"]


def test_the_gram_plan_follows_the_buffer_and_the_parameter_set():
    trunk, heads, x = _wide(torch.float32)
    with gl.Profiler(trunk, ["t0", "t1", "t2"], engine="loop") as prof:
        eng = prof._engine
        for _ in range(2):
            prof.backward(_losses(trunk, heads, x))
        plan = eng._plan
        assert plan is not None
        assert eng._workspace.holds("J", plan.source)
        prof.backward(_losses(trunk, heads, x))
        assert eng._plan is plan  # reused while the buffer and the parameters are the same
        trunk[0].bias.requires_grad_(False)  # another parameter set: another buffer and plan
        snap = prof.backward(_losses(trunk, heads, x))
        assert eng._plan is not plan
        assert eng._plan.source.shape[1] == plan.source.shape[1] - 300
        ref = reference_grams(_losses(trunk, heads, x), trunk)
        for layer, g in ref.layer_grams.items():
            assert_gram_close(snap.layer_grams[layer], g, 1e-4)


def test_a_dense_gradient_adds_to_a_sparse_grad_out_of_place():
    # as autograd does when a sparse .grad meets a dense gradient (a sparse embedding weight
    # also used densely): the sum is dense
    from gradlens.engines._base import accumulate_grad

    p = nn.Parameter(torch.zeros(5, 2, dtype=torch.float64))
    rows = torch.tensor([[1, 3]])
    p.grad = torch.sparse_coo_tensor(rows, torch.ones(2, 2), (5, 2), check_invariants=True).double()
    accumulate_grad(p, torch.full((5, 2), 0.5, dtype=torch.float64))
    assert not p.grad.is_sparse
    assert p.grad.sum().item() == 5 * 2 * 0.5 + 4


class _ConvAndSide(nn.Module):
    """A channels-last convolution, and a layer only task t0's loss reaches (its gradient is
    None in the other tasks' backward passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3).double().to(memory_format=torch.channels_last)
        self.side = nn.Linear(4, 1).double()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.conv(x)).mean((2, 3))
        return h, self.side(h)


def test_the_kept_views_write_grads_of_their_own_every_probe():
    torch.manual_seed(0)
    trunk = _ConvAndSide()
    heads = nn.ModuleList([nn.Linear(4, 2).double() for _ in range(3)])
    w = {"t0": 0.2, "t1": 0.5, "t2": 0.3}
    params = [*trunk.parameters(), *heads.parameters()]

    def losses(x):
        h, side = trunk(x)
        out = {t: (head(h) ** 2).mean() for t, head in zip(w, heads)}
        out["t0"] = out["t0"] + (side**2).mean()
        return out

    def plain(x):
        return torch.autograd.grad(sum(w[t] * v for t, v in losses(x).items()), params)

    xs = [torch.randn(5, 3, 6, 6, dtype=torch.float64) for _ in range(3)]
    with gl.Profiler(trunk, list(w), engine="loop") as prof:
        eng = prof._engine
        kept, views = [], None
        for i, x in enumerate(xs):
            if i < 2:  # the third probe accumulates into the second's .grad
                for p in params:
                    p.grad = None
            snap = prof.backward(losses(x), w)
            ref = reference_grams(losses(x), trunk)
            for layer, g in ref.layer_grams.items():
                assert_gram_close(snap.layer_grams[layer], g, 1e-10)
            want = plain(x)
            if i == 2:
                want = [a + b for a, b in zip(plain(xs[1]), want)]
            for p, g in zip(params, want):
                torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
            assert trunk.conv.weight.grad.stride() == trunk.conv.weight.stride()
            if i == 0:  # the next probes rewrite the kept buffers: these stay as they are
                kept = [(p.grad, p.grad.clone()) for p in trunk.parameters()]
            if i > 0:
                assert views is None or eng._views is views  # made once, then reused
                views = eng._views
    assert views is not None
    for g, copy in kept:
        torch.testing.assert_close(g, copy, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("direct", [True, False])
def test_task_grad_is_autograd_grad(direct):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    unused = torch.ones(2, requires_grad=True)
    loss = (x.sin() ** 2).sum()
    got = loop.task_grad(loss, (x, unused), True, direct)
    want = torch.autograd.grad(loss, (x, unused), retain_graph=True, allow_unused=True)
    torch.testing.assert_close(got[0], want[0], rtol=0.0, atol=0.0)
    assert got[1] is None
    assert want[1] is None
    got = loop.task_grad(loss, (x,), False, direct)  # frees the graph, as autograd.grad
    with pytest.raises(RuntimeError, match="a second time"):
        loop.task_grad(loss, (x,), False, direct)
    with pytest.raises(RuntimeError, match="only for scalar outputs"):
        loop.task_grad(x.sin(), (x,), False, direct)


def test_task_grad_takes_the_public_call_where_the_engine_call_differs(monkeypatch):
    """A torch whose private engine call is missing or takes other arguments (checked once on
    a trivial graph): the public ``autograd.grad``; an error raised by the backward itself (a
    user's TypeError) is never caught."""

    def other_signature(*args, **kwargs):
        raise TypeError("run_backward() got an unexpected keyword argument")

    for private in (other_signature, None):
        monkeypatch.setattr(torch.autograd.graph, "_engine_run_backward", private, raising=False)
        loop._engine_call.cache_clear()
        assert loop._engine_call() is None
        x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        (g,) = loop.task_grad((x**2).sum(), (x,), False, True)
        torch.testing.assert_close(g, 2 * x, rtol=0.0, atol=0.0)
    monkeypatch.undo()
    loop._engine_call.cache_clear()
    assert loop._engine_call() is not None  # this torch's

    class Raises(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            raise TypeError("a user's bug in a custom backward")

    x = torch.randn(3, requires_grad=True)
    with pytest.raises(TypeError, match="a user's bug"):
        loop.task_grad(Raises.apply(x).sum(), (x,), True, True)
    assert loop._engine_call() is not None


@pytest.mark.parametrize("engine", ["loop", "auto"])
def test_a_sparse_gradient_not_from_an_embedding_is_densified(engine):
    """``torch.gather(..., sparse_grad=True)`` gives a shared parameter a sparse gradient: the
    graph index flags it as it flags a sparse Embedding's (``auto`` serves it with ``loop``,
    which writes a sparse ``.grad``; it crashed ``loop``'s row copy, then ``auto``'s
    ``batched`` candidate, before)."""
    torch.manual_seed(0)

    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return torch.gather(self.table, 0, idx, sparse_grad=True).tanh()

    _check_sparse_table(Table(), engine)


@pytest.mark.parametrize("engine", ["batched", "gramian"])
def test_a_gathered_sparse_gradient_is_refused_by_the_batched_engines(engine):
    """As for a sparse Embedding: a GradlensError naming the parameter, nothing written."""
    table = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    trunk = nn.ParameterDict({"table": table})
    head = nn.Linear(4, 2).double()
    with gl.Profiler(trunk, ["a", "b"], engine=engine) as prof:
        z = torch.gather(table, 0, torch.randint(0, 6, (5, 4)), sparse_grad=True)
        y = head(z)
        with pytest.raises(gl.GradlensError, match="table"):
            prof.backward({"a": y[:, 0].mean(), "b": y[:, 1].mean()})
    assert table.grad is None
    assert head.weight.grad is None


class _SparseRows(torch.autograd.Function):
    """Rows of a table whose backward returns a sparse gradient (no node the index knows)."""

    @staticmethod
    def forward(ctx, table, idx):
        ctx.save_for_backward(idx)
        ctx.n = table.shape[0]
        return table[idx]

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        i = idx.reshape(1, -1)
        shape = (ctx.n, g.shape[-1])
        rows = g.reshape(-1, g.shape[-1])
        return torch.sparse_coo_tensor(i, rows, shape, check_invariants=True), None


def test_a_sparse_gradient_from_a_custom_function_is_densified():
    """The loop engine's row copy takes only dense gradients: a sparse one from a custom
    autograd Function (which no engine is told about) goes through ``fill_row``, densified."""

    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return _SparseRows.apply(self.table, idx).tanh()

    _check_sparse_table(Table(), "loop")


def _check_sparse_table(trunk: nn.Module, engine: str) -> None:
    torch.manual_seed(0)
    heads = nn.ModuleList([nn.Linear(4, 1).double() for _ in range(2)])
    with gl.Profiler(trunk, ["a", "b"], engine=engine) as prof:
        for _ in range(4):
            z = trunk(torch.randint(0, 6, (5, 4)))
            z = z if z.dim() == 2 else z.mean(1)
            losses = {t: h(z).pow(2).mean() for t, h in zip("ab", heads)}
            ref = reference_grams(losses, trunk)
            snap = prof.backward(losses)
            assert_gram_close(snap.gram, ref.gram, 1e-10)
            trunk.table.grad = None


@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_a_parameter_given_data_of_another_shape_gets_new_columns(engine):
    # the same Parameter object, its .data replaced (another input width): the kept columns,
    # Gram plan and row views follow the new shape (they were kept by the parameters' ids)
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    heads = nn.ModuleList([nn.Linear(5, 1).double() for _ in range(2)])
    xs = [torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 7, dtype=torch.float64)]

    def losses(x):
        z = trunk(x)
        return {f"t{i}": (h(z) ** 2).mean() for i, h in enumerate(heads)}

    with gl.Profiler(trunk, ["t0", "t1"], engine=engine) as prof:
        for step in range(4):
            if step == 2:
                trunk[0].weight.data = torch.randn(6, 7, dtype=torch.float64)
            x = xs[step >= 2]
            for p in [*trunk.parameters(), *heads.parameters()]:
                p.grad = None
            snap = prof.backward(losses(x))
            ref = reference_grams(losses(x), trunk)
            for layer, g in ref.layer_grams.items():
                assert_gram_close(snap.layer_grams[layer], g, 1e-10)
            plain = torch.autograd.grad(sum(losses(x).values()), list(trunk.parameters()))
            for p, g in zip(trunk.parameters(), plain):
                torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
