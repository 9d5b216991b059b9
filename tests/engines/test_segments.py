"""The gramian engine's backward, cut between layers (gradlens.engines._segments)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

import gradlens as gl
from gradlens.engines import _batching as batching_mod
from gradlens.engines._segments import plan_segments
from gradlens.testing import reference_grams
from tests.zoo import assert_gram_close


class _Residual(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.tanh(self.a(x)))


def _edges(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, object]]:
    got: dict[str, object] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(
                lambda m_, a, out, n=name: got.__setitem__(n, get_gradient_edge(out))
            )
    return model(x), got


def test_every_layer_of_a_plain_mlp_is_a_cut():
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    z, e = _edges(mlp, torch.randn(5, 3))
    out = torch.relu(z)  # the shared outputs, above the last layer
    plan = plan_segments([get_gradient_edge(out)], [e["4"], e["2"], e["0"], mlp[0].weight])
    assert plan == [([0], 0), ([1], 1), ([2], 2), ([3], None)]


def test_a_residual_block_is_cut_at_its_ends_only():
    net = nn.Sequential(nn.Linear(3, 4), _Residual(4), nn.Linear(4, 2))
    z, e = _edges(net, torch.randn(5, 3))
    out = torch.tanh(z)
    plan = plan_segments([get_gradient_edge(out)], [e["2"], e["1.b"], e["1.a"], e["0"]])
    # the block's inner layers are bypassed by the skip connection: one segment holds both
    assert plan == [([0], 0), ([1, 2, 3], 3), ([], None)]


def test_a_parameter_used_above_and_below_a_layer_prevents_the_cut():
    first, lin = nn.Linear(3, 4), nn.Linear(4, 4)
    s = nn.Parameter(torch.tensor(0.5))
    h = first(torch.randn(5, 3) * s)
    z = lin(torch.tanh(h) * s)
    plan = plan_segments([get_gradient_edge(z)], [get_gradient_edge(h), s])
    assert plan == [([0, 1], None)]


def _trunk():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
        nn.Linear(8, 5),
    ).double()  # fmt: skip


@pytest.mark.parametrize("n_tasks", [2, 5])
def test_one_backward_per_layer_and_blocks_freed_on_the_way(monkeypatch, n_tasks):
    trunk = _trunk()
    heads = nn.ModuleList([nn.Linear(5, 1).double() for _ in range(n_tasks)])
    x, ys = torch.randn(7, 6, dtype=torch.float64), torch.randn(n_tasks, 7, dtype=torch.float64)
    asked: list[int] = []
    alive: list[int] = []
    blocks: list[weakref.ref] = []
    inner = batching_mod.vmapped_grad_from

    def spy(outputs, cotangents, inputs, *rest, **kw):
        asked.append(len(inputs))
        alive.append(sum(r() is not None for r in blocks))
        got = inner(outputs, cotangents, inputs, *rest, **kw)
        blocks.extend(weakref.ref(g) for g in got if g is not None)
        return got

    monkeypatch.setattr(batching_mod, "vmapped_grad_from", spy)
    names = [f"t{i}" for i in range(n_tasks)]
    # a tiny budget: no merging of segments (small blocks would otherwise go in one backward)
    with gl.Profiler(trunk, tasks=names, engine="gramian", memory_budget=8) as prof:
        z = trunk(x)
        losses = {
            t: ((h(z).squeeze(1) - ys[i]) ** 2).mean() for i, (t, h) in enumerate(zip(names, heads))
        }
        ref = reference_grams(losses, trunk)
        snap = prof.backward(losses)
    assert_gram_close(snap.gram, ref.gram, 1e-10)
    for layer, g in ref.layer_grams.items():
        assert_gram_close(snap.layer_grams[layer], g, 1e-10)
    # the shared output is the last layer's: three more layers, one backward each
    assert asked == [1, 1, 1]
    # when a backward starts, only its own cotangent (the block above) is still alive
    assert max(alive) <= 1, alive


def test_small_blocks_share_one_backward(monkeypatch):
    trunk = _trunk()
    heads = nn.ModuleList([nn.Linear(5, 1).double() for _ in range(3)])
    x = torch.randn(7, 6, dtype=torch.float64)
    asked: list[int] = []
    inner = batching_mod.vmapped_grad_from

    def spy(outputs, cotangents, inputs, *rest, **kw):
        asked.append(len(inputs))
        return inner(outputs, cotangents, inputs, *rest, **kw)

    monkeypatch.setattr(batching_mod, "vmapped_grad_from", spy)
    names = ["t0", "t1", "t2"]
    with gl.Profiler(trunk, tasks=names, engine="gramian") as prof:  # default budget
        z = trunk(x)
        losses = {t: h(z).pow(2).mean() * (i + 1) for i, (t, h) in enumerate(zip(names, heads))}
        ref = reference_grams(losses, trunk)
        snap = prof.backward(losses)
    assert_gram_close(snap.gram, ref.gram, 1e-10)
    assert asked == [3]


@pytest.mark.parametrize(
    ("first", "act", "legacy", "rules"),
    [
        (None, nn.ReLU, True, False),  # only LEGACY_FAST types: autograd's own batching
        (None, nn.GELU, True, False),  # as in the transformer trunks: autograd's own batching
        (None, lambda: _Attention(8), True, False),  # attention under it: no rule to register
        (None, nn.SiLU, False, False),  # an unlisted type: torch.func.vmap
        (None, lambda: nn.Sequential(_Attention(8), nn.SiLU()), False, True),  # ... its rule
        (None, lambda: _Conv(8), False, False),  # a convolution that runs: torch.func.vmap
        # a convolution below the lowest recorded layer (a ViT's patch embedding) never runs
        (lambda: _Conv(6), nn.GELU, True, False),
    ],
)
def test_the_second_stage_picks_its_batching_by_the_graph(
    monkeypatch, first, act, legacy, rules
):
    torch.manual_seed(0)
    bottom = [first()] if first is not None else []
    trunk = nn.Sequential(*bottom, nn.Linear(6, 8), act(), nn.Linear(8, 8), nn.ReLU()).double()
    heads = nn.ModuleList([nn.Linear(8, 1).double() for _ in range(3)])
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    seen: list[tuple[bool, bool]] = []
    inner = batching_mod.vmapped_grad_from

    def spy(*args, legacy=False, rules=True, **kw):
        seen.append((legacy, rules))
        return inner(*args, legacy=legacy, rules=rules, **kw)

    monkeypatch.setattr(batching_mod, "vmapped_grad_from", spy)
    names = ["t0", "t1", "t2"]
    with gl.Profiler(trunk, tasks=names, engine="gramian") as prof:
        for _ in range(2):  # the second probe: the facts come from the signature's memo
            z = trunk(x)
            losses = {t: h(z).pow(2).mean() * (i + 1) for i, (t, h) in enumerate(zip(names, heads))}
            ref = reference_grams(losses, trunk)
            snap = prof.backward(losses)
            assert_gram_close(snap.gram, ref.gram, 1e-10)
            for layer, g in ref.layer_grams.items():
                assert_gram_close(snap.layer_grams[layer], g, 1e-10)
    assert seen == [(legacy, rules)] * 2


class _Conv(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d, d, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4)  # 2 heads
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = nn.functional.scaled_dot_product_attention(q, k, v)  # the fused CPU kernel
        return out.transpose(1, 2).reshape(b, n, d)


# -- the graph index's dominator plan against the descendants-per-candidate reference ----------
def _reference_plan(tops, targets):
    """The cut plan as computed before the graph index: a descendants pass per candidate."""
    nodes = [t.node if isinstance(t, GradientEdge) else get_gradient_edge(t).node for t in targets]
    start = {e.node for e in tops}
    parents: dict = {}
    seen, todo = set(start), list(start)
    while todo:
        fn = todo.pop()
        for nxt, nr in fn.next_functions:
            if nxt is None:
                continue
            parents.setdefault(nxt, []).append((fn, nr))
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)

    def below_of(n):
        out, todo = set(), [n]
        while todo:
            for nxt, _ in todo.pop().next_functions:
                if nxt is not None and nxt not in out:
                    out.add(nxt)
                    todo.append(nxt)
        return out

    cuts = []
    for i, t in enumerate(targets):
        n = nodes[i]
        if not isinstance(t, GradientEdge) or n in start or n not in parents:
            continue
        if any(nr != t.output_nr for _, nr in parents[n]):
            continue
        below = below_of(n)
        if all(p is n or p in below for v in below for p, _ in parents.get(v, ())):
            cuts.append((i, below))
    cuts.sort(key=lambda c: -len(c[1]))
    chain = []
    for i, below in cuts:
        if not chain or nodes[i] in chain[-1][1]:
            chain.append((i, below))
    if not chain:
        return [(list(range(len(targets))), None)]
    segments = [[] for _ in range(len(chain) + 1)]
    for j, n in enumerate(nodes):
        segments[sum(n in below for _, below in chain)].append(j)
    out = []
    for s, members in enumerate(segments):
        cut = chain[s][0] if s < len(chain) else None
        if cut is not None:
            members = [m for m in members if m != cut] + [cut]
        out.append((members, cut))
    return out


class _RandomNet(nn.Module):
    """Linear layers wired by a seed: chains, skips from earlier layers, a reused parameter."""

    def __init__(self, seed: int, n: int = 7, d: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList([nn.Linear(d, d) for _ in range(n)])
        self.skip = [int(torch.randint(-1, i, (), generator=g)) if i else -1 for i in range(n)]
        self.reuse = int(torch.randint(0, 2 * n, (), generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]
        for i, lin in enumerate(self.layers):
            h = torch.tanh(lin(outs[-1]))
            if self.skip[i] >= 0:
                h = h + outs[self.skip[i] + 1]
            if i == self.reuse:  # a parameter used again outside its layer
                h = h + self.layers[0].bias
            outs.append(h)
        return outs[-1]


@pytest.mark.parametrize("seed", range(12))
def test_the_dominator_plan_equals_the_descendants_reference(seed):
    from gradlens.engines._graph import GraphIndex

    net = _RandomNet(seed)
    out, e = _edges(net, torch.randn(2, 3))
    loss = out.sum()
    targets = [e[f"layers.{i}"] for i in reversed(range(7))] + [net.layers[3].weight]
    tops = [get_gradient_edge(out)]
    want = _reference_plan(tops, targets)
    assert plan_segments(tops, targets) == want  # an index built from the tops
    index = GraphIndex.build(torch.stack([loss, 2 * loss]))  # the probe's index, from the losses
    assert plan_segments(tops, targets, index) == want


def test_a_plan_is_reused_for_a_graph_of_the_same_shape_only():
    from gradlens.engines import _segments
    from gradlens.engines._graph import GraphIndex

    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))

    def plan(batch: int, extra: bool):
        out, e = _edges(mlp, torch.randn(batch, 3))
        tops = [get_gradient_edge(out)]
        index = GraphIndex.build((out * 2 if extra else out).sum().reshape(1))
        return index, plan_segments(tops, [e["4"], e["2"], e["0"]], index)

    _segments._PLANS.clear()
    i1, p1 = plan(5, False)
    assert len(_segments._PLANS) == 1
    i2, p2 = plan(7, False)  # another batch size: the same graph shape, the plan is reused
    assert i1.signature == i2.signature
    assert p1 == p2
    assert len(_segments._PLANS) == 1
    i3, p3 = plan(5, True)  # one more node: a new shape, planned anew
    assert i3.signature != i1.signature
    assert len(_segments._PLANS) == 2
    assert p3 == p1


def test_the_graph_index_counts_leaves_and_uses_as_autograd_sees_them():
    from gradlens.engines._graph import GraphIndex

    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    h = lin(lin(x))  # the weight and the bias used twice
    loss = (h * lin.bias).sum()  # the bias a third time
    g = GraphIndex.build(loss.reshape(1))
    assert g.uses[id(lin.weight)] == 2
    assert g.uses[id(lin.bias)] == 3
    assert set(g.leaves) == {id(lin.weight), id(lin.bias)}
    assert len(g.nodes) == len(g.node_set) == len(g.edges)
    # past the stop node h, the bias is reached directly (the product), the weight only through h
    assert g.reaches_past({h.grad_fn}, set(), {id(lin.bias)})
    assert not g.reaches_past({h.grad_fn}, set(), {id(lin.weight)})


def test_the_plan_cache_is_bounded_and_evicts_the_oldest(monkeypatch):
    from gradlens.engines import _segments

    monkeypatch.setattr(_segments, "_PLANS", {})
    monkeypatch.setattr(_segments, "_MAX_PLANS", 2)
    keys = []
    for depth in (1, 2, 3):  # three graph shapes
        mlp = nn.Sequential(*[nn.Linear(3, 3) for _ in range(depth)])
        out, e = _edges(mlp, torch.randn(2, 3))
        plan_segments([get_gradient_edge(out)], [e[str(i)] for i in range(depth)])
        keys.append(next(reversed(_segments._PLANS)))
    assert list(_segments._PLANS) == keys[1:]


class _DistinctNet(_RandomNet):
    """_RandomNet with a different activation per layer: a node type names its layer."""

    ACTS = (torch.tanh, torch.sigmoid, torch.relu, torch.sin, torch.cos, torch.exp, torch.erf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]
        for i, lin in enumerate(self.layers):
            h = self.ACTS[i](lin(outs[-1]))
            if self.skip[i] >= 0:
                h = h + outs[self.skip[i] + 1]
            outs.append(h)
        return outs[-1]


@pytest.mark.parametrize("seed", range(12))
def test_types_between_lists_what_the_backward_runs(seed):
    """``GraphIndex.types_between`` against the nodes whose pre-hooks fire during the backward
    from the output to a random subset of layer outputs (and a leaf, every other seed)."""
    from gradlens.engines._graph import GraphIndex

    net = _DistinctNet(seed).double()
    out, e = _edges(net, torch.randn(2, 3, dtype=torch.float64))
    index = GraphIndex.build(torch.stack([out.sum()]))
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(7, generator=g)[: 1 + seed % 4].tolist()
    targets: list = [e[f"layers.{i}"] for i in chosen]
    targets += [net.layers[2].weight] if seed % 2 else []
    ran: set = set()
    hooks = [n.register_prehook(lambda gi, n=n: ran.add(n)) for n in index.nodes]
    try:
        torch.autograd.grad([out], targets, [torch.ones_like(out)], allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    nodes = [t.node if isinstance(t, GradientEdge) else get_gradient_edge(t).node for t in targets]
    assert index.types_between([out.grad_fn], nodes) == {type(n).__name__ for n in ran}
    assert ran  # (the check compares something)


# -- a shared output computed from another one (found by tests/engines/test_fuzz_engines.py) --


class _TwoOutputs(nn.Module):
    """A trunk returning its last layer's output and a function of it: the backward from the
    second output also flows into the first, whose own cotangent is not its whole gradient."""

    def __init__(self, second: str = "sin") -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(4, 4)
        self.second = second

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.b(torch.tanh(self.a(x)))
        return z, (z.sin() if self.second == "sin" else z)


@pytest.mark.parametrize("second", ["sin", "same"])
@pytest.mark.parametrize("engine", ["gramian", "batched", "loop"])
@pytest.mark.parametrize("heads_kind", ["split", "one-node", "tiny-weight"])
def test_a_shared_output_computed_from_another_is_exact(engine, heads_kind, second):
    """``return z, f(z)``; and ``return z, z`` (the same tensor twice: one shared output, not
    two each handed the whole gradient; found by the review of the fix)."""
    torch.manual_seed(0)
    trunk = _TwoOutputs(second).double()
    T = 3
    one = heads_kind == "one-node"  # one head node for all tasks: no split, a backward each
    heads = nn.ModuleList([nn.Linear(4, T)] if one else [nn.Linear(4, 1) for _ in range(T)])
    heads = heads.double()
    tasks = [f"t{t}" for t in range(T)]
    # a weight far below the others: that task's rows come from a backward of its own
    w = {"t0": 1e-9 if heads_kind == "tiny-weight" else 0.3, "t1": 0.5, "t2": 1.0}
    params = [*trunk.parameters(), *heads.parameters()]
    with gl.Profiler(trunk, tasks, engine=engine) as prof:
        for _ in range(2):
            z, z2 = trunk(torch.randn(3, 5, dtype=torch.float64))
            ys = heads[0](z).unbind(1) if one else [h(z).squeeze(1) for h in heads]
            losses = {t: (y**2).mean() * (i + 1) for i, (t, y) in enumerate(zip(tasks, ys))}
            losses["t2"] = losses["t2"] + z2.square().mean()
            ref = reference_grams(losses, trunk)
            plain = torch.autograd.grad(
                sum(w[t] * v for t, v in losses.items()), params, retain_graph=True
            )
            snap = prof.backward(losses, w)
            for layer, g in ref.layer_grams.items():
                assert_gram_close(snap.layer_grams[layer], g, 1e-10)
            for p, want in zip(params, plain):
                torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12)
                p.grad = None
