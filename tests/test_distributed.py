"""DistributedProfiler: 2 gloo processes on CPU against one process on the concatenated batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradlens as gl
from gradlens.distributed import DistributedProfiler
from gradlens.testing import reference_grams

TASKS = ["t0", "t1", "t2"]
W = {"t0": 0.2, "t1": 0.5, "t2": 0.3}
BATCH = 12
STEPS = 3  # every=2: steps 0 and 2 are probed (profiler reduces), step 1 is a plain DDP step
#: (engine, grams, wrapping, bucket_bytes): a tiny bucket forces several all-reduce buckets.
CASES = {
    "gramian_local_ddp": ("gramian", "local", "ddp", 25 * 2**20),
    "batched_global_ddp": ("batched", "global", "ddp", 25 * 2**20),
    "loop_global_plain": ("loop", "global", "plain", 256),
    "features_global_ddp": ("features", "global", "ddp", 25 * 2**20),
}


class MTL(nn.Module):
    """No BatchNorm: data parallelism is then exactly the concatenated batch."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in TASKS])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [h(z).squeeze(1) for h in self.heads]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(BATCH, 5, generator=g, dtype=torch.float64)
    y = torch.randn(len(TASKS), BATCH, generator=g, dtype=torch.float64)
    return x, y


def _losses(outs: list[torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {t: ((o - y[i]) ** 2).mean() * (1 + i) for i, (t, o) in enumerate(zip(TASKS, outs))}


def _run_case(name: str, rank: int, world: int, root: Path) -> dict:
    engine, grams, wrap, bucket = CASES[name]
    torch.manual_seed(rank if wrap == "plain" else 0)  # plain: rank 0's weights are broadcast
    model = MTL().double()
    x, y = _data()
    lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
    net = nn.parallel.DistributedDataParallel(model) if wrap == "ddp" else model
    prof = DistributedProfiler(
        net,
        model.trunk,
        TASKS,
        engine=engine,
        every=2,
        store=root / name,
        grams=grams,
        bucket_bytes=bucket,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out: dict = {"grads": [], "grams": {}, "store_none": prof.store is None}
    for step in range(STEPS):
        opt.zero_grad()
        z, outs = net(x[lo:hi])
        snap = prof.backward(
            _losses(outs, y[:, lo:hi]), W, features=z if engine == "features" else None
        )
        out["grads"].append([p.grad.clone() for p in model.parameters()])
        if snap is not None:
            out["grams"][step] = (snap.gram, dict(snap.layer_grams))
        opt.step()
    prof.close()
    out["params"] = [p.detach().clone() for p in model.parameters()]
    return out


def _worker(rank: int, world: int, init_file: str, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        res = {name: _run_case(name, rank, world, Path(root)) for name in CASES}
        torch.save(res, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _reference() -> dict:
    """One process, the concatenated batch: grads per step, and Grams at the probed steps."""
    torch.manual_seed(0)
    model = MTL().double()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out: dict = {"grads": [], "param": {}, "features": {}, "half": {}}
    for step in range(STEPS):
        opt.zero_grad()
        if step % 2 == 0:
            z, outs = model(x)
            losses = _losses(outs, y)
            out["param"][step] = reference_grams(losses, model.trunk)
            J = torch.stack(
                [
                    torch.autograd.grad(v, z, retain_graph=True)[0].reshape(-1)
                    for v in losses.values()
                ]
            )
            out["features"][step] = J @ J.T
            for r in range(2):
                lo, hi = r * BATCH // 2, (r + 1) * BATCH // 2
                _, o = model(x[lo:hi])
                out["half"][(step, r)] = reference_grams(_losses(o, y[:, lo:hi]), model.trunk)
            model.zero_grad()
        z, outs = model(x)
        sum(W[t] * v for t, v in _losses(outs, y).items()).backward()
        out["grads"].append([p.grad.clone() for p in model.parameters()])
        opt.step()
    out["params"] = [p.detach().clone() for p in model.parameters()]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict, Path]:
    root = tmp_path_factory.mktemp("ddp")
    init = root / "init"
    mp.spawn(_worker, args=(2, str(init), str(root)), nprocs=2, join=True)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return ranks, _reference(), root


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_are_what_ddp_gives_on_the_concatenated_batch(runs, case):
    ranks, ref, _ = runs
    assert len(ranks) == 2
    assert ref["grads"]
    assert ref["params"]
    for r in ranks:
        for got, want in zip(r[case]["grads"], ref["grads"], strict=True):
            for g, w in zip(got, want, strict=True):
                _close(g, w)
        for p, q in zip(r[case]["params"], ref["params"], strict=True):
            _close(p, q)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["batched_global_ddp", "loop_global_plain"])
def test_global_parameter_grams_match_the_concatenated_batch(runs, case):
    ranks, ref, _ = runs
    assert len(ranks) == 2
    for r in ranks:
        assert sorted(r[case]["grams"]) == [0, 2]
        for step, (gram, layers) in r[case]["grams"].items():
            _close(gram, ref["param"][step].gram)
            assert list(layers) == list(ref["param"][step].layer_grams)
            for name, g in ref["param"][step].layer_grams.items():
                _close(layers[name], g)


@pytest.mark.slow
def test_global_feature_grams_match_the_concatenated_batch(runs):
    ranks, ref, _ = runs
    assert len(ranks) == 2
    for r in ranks:
        assert sorted(r["features_global_ddp"]["grams"]) == [0, 2]  # not vacuous on no probe
        for step, (gram, _) in r["features_global_ddp"]["grams"].items():
            _close(gram, ref["features"][step])


@pytest.mark.slow
def test_local_grams_are_each_ranks_own_batch(runs):
    ranks, ref, _ = runs
    assert len(ranks) == 2
    for rank, r in enumerate(ranks):
        assert sorted(r["gramian_local_ddp"]["grams"]) == [0, 2]
        for step, (gram, _) in r["gramian_local_ddp"]["grams"].items():
            _close(gram, ref["half"][(step, rank)].gram)
    # the two halves differ: rank-local is not global
    assert not torch.allclose(
        ranks[0]["gramian_local_ddp"]["grams"][0][0], ranks[1]["gramian_local_ddp"]["grams"][0][0]
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_only_rank_zero_writes_the_store(runs, case):
    ranks, ref, root = runs
    assert [r[case]["store_none"] for r in ranks] == [False, True]
    run = gl.load_run(root / case)
    assert run.meta["grams"] == CASES[case][1]
    assert run.meta["world_size"] == 2
    assert run.meta["grams_rank"] == (0 if CASES[case][1] == "local" else None)
    assert list(run.probed_steps) == [0, 2]
    _close(torch.from_numpy(run.grams()[0]), ranks[0][case]["grams"][0][0])


# -- one-process group: validation ----------------------------------------------------------------
@pytest.fixture
def group(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_refuses_without_an_initialized_process_group():
    assert not dist.is_initialized()
    model = MTL()
    with pytest.raises(gl.GradlensError, match="init_process_group"):
        DistributedProfiler(model, model.trunk, TASKS)


@pytest.mark.usefixtures("group")
def test_bad_arguments():
    model = MTL()
    with pytest.raises(gl.GradlensError, match=r"`grams` should be one of \['global', 'local'\]"):
        DistributedProfiler(model, model.trunk, TASKS, grams="all")  # type: ignore[arg-type]
    with pytest.raises(gl.GradlensError, match=r"engine='batched'.*T x P"):
        DistributedProfiler(model, model.trunk, TASKS, engine="gramian", grams="global")
    with pytest.raises(gl.GradlensError, match=r"`model` should be the nn\.Module"):
        DistributedProfiler(model.parameters(), model.trunk, TASKS)  # type: ignore[arg-type]
    with pytest.raises(gl.GradlensError, match="`bucket_bytes` should be an int >= 1; found"):
        DistributedProfiler(model, model.trunk, TASKS, bucket_bytes=0)
    other = nn.Linear(2, 2)
    with pytest.raises(gl.GradlensError, match="`shared` should be part of `model`"):
        DistributedProfiler(model, other, TASKS)
    prof = DistributedProfiler(model, model.trunk, TASKS)
    with pytest.raises(gl.GradlensError, match="`observe` is not supported"):
        prof.observe({})
    assert "grams='local'" in repr(prof)
    assert "world_size=1" in repr(prof)
    prof.close()


@pytest.mark.usefixtures("group")
def test_one_rank_is_the_plain_profiler():
    torch.manual_seed(3)
    model = MTL().double()
    x, y = _data()
    net = nn.parallel.DistributedDataParallel(model)
    prof = DistributedProfiler(net, model.trunk, TASKS, engine="batched", grams="global")
    z, outs = net(x)
    losses = _losses(outs, y)
    ref = reference_grams(losses, model.trunk)
    assert not net.require_backward_grad_sync  # every step is probed: the profiler reduces
    snap = prof.backward(losses, W)
    _close(snap.gram, ref.gram)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, outs = model(x)
    sum(W[t] * v for t, v in _losses(outs, y).items()).backward()
    for g, p in zip(got, model.parameters()):
        _close(g, p.grad)
    prof.close()
    assert net.require_backward_grad_sync  # DDP is itself again


# -- the documented examples ---------------------------------------------------------------------
_DOC = Path(__file__).resolve().parents[1] / "docs" / "real_setups.md"


def _doc_blocks() -> list[str]:
    import re

    return re.findall(r"```python\n(.*?)```", _DOC.read_text(), flags=re.S)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(5))
def test_real_setups_examples_run(index, tmp_path):
    import subprocess
    import sys

    blocks = _doc_blocks()
    assert len(blocks) == 5
    script = tmp_path / "example.py"
    script.write_text(blocks[index])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=_DOC.parents[1],
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip()


@pytest.mark.usefixtures("group")
def test_a_step_set_from_outside_moves_ddps_sync():
    """``prof.step = n`` (a resumed run): DDP reduces the coming step only if it is unprobed,
    as after the profiler's own steps."""
    model = MTL().double()
    net = nn.parallel.DistributedDataParallel(model)
    prof = DistributedProfiler(net, model.trunk, TASKS, engine="loop", every=4)
    assert not net.require_backward_grad_sync  # step 0 is probed: the profiler reduces
    prof.step = 5
    assert net.require_backward_grad_sync  # step 5 is not: DDP does
    prof.step = 8
    assert not net.require_backward_grad_sync
    prof.close()
    assert net.require_backward_grad_sync


@pytest.mark.usefixtures("group")
def test_a_sparse_embedding_is_refused_before_any_side_effect():
    emb = nn.Embedding(10, 4, sparse=True).double()
    model = nn.ModuleDict({"trunk": nn.Sequential(emb, nn.Flatten()), "head": nn.Linear(12, 1)})
    model = model.double()
    prof = DistributedProfiler(model, model["trunk"], ["a", "b"], engine="loop")
    z = model["trunk"](torch.tensor([[1, 2, 3], [4, 5, 6]]))
    losses = {"a": model["head"](z).mean(), "b": model["head"](z).pow(2).mean()}
    _refused_unchanged(prof, model, losses, r"DistributedProfiler .* sparse=False")


def _refused_unchanged(prof, model, losses, match, weights=None):
    """``prof.backward`` refuses ``losses`` (a GradlensError matching ``match``) and changes
    nothing: the step and every ``.grad`` as they were; the profiler is closed after."""
    with pytest.raises(gl.GradlensError, match=match):
        prof.backward(losses, weights)
    assert prof.step == 0
    assert all(p.grad is None for p in model.parameters())
    prof.close()


@pytest.mark.usefixtures("group")
def test_a_custom_functions_sparse_gradient_is_refused_before_any_side_effect():
    """No node type says so: the graph index learns it (one backward), then refuses it."""

    from tests.engines.test_graph_sparse import _sparse_rows

    Rows = _sparse_rows()
    table = nn.Parameter(torch.randn(10, 4, dtype=torch.float64))
    model = nn.ModuleDict({"trunk": nn.ParameterDict({"table": table}), "head": nn.Linear(4, 1)})
    model = model.double()
    prof = DistributedProfiler(model, model["trunk"], ["a", "b"], engine="loop")
    z = Rows.apply(table, torch.tensor([1, 2, 2]))
    losses = {"a": model["head"](z).mean(), "b": model["head"](z).pow(2).mean()}
    refused = r"DistributedProfiler .* SparseRowsBackward.*\['table'\]"
    _refused_unchanged(prof, model, losses, refused)


@pytest.mark.usefixtures("group")
def test_a_graph_vmap_cannot_run_is_refused_naming_the_fix():
    """Dropout inside a non-reentrant activation checkpoint runs again under the batched
    backward's vmap: the global batched engine raised torch's raw vmap error."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = MTL().double().train()
    drop = nn.Dropout(0.5)
    x, y = _data()
    prof = DistributedProfiler(model, model.trunk, TASKS, engine="batched", grams="global")
    z = checkpoint(lambda t: drop(model.trunk(t)), x, use_reentrant=False)
    losses = _losses([h(z).squeeze(1) for h in model.heads], y)
    _refused_unchanged(prof, model, losses, r"engine='loop'", W)


@pytest.mark.usefixtures("group")
@pytest.mark.parametrize("case", ["per-layer held", "forced probe"])
def test_writes_ddp_cannot_average_are_refused_before_anything_is_written(case):
    """Held per-layer weights on an unprobed step are written outside autograd, and a probe a
    Gram weighting forces on a step the schedule skips comes after DDP prepared to reduce it:
    DDP averaged neither (then torch's 'Expected to have finished reduction' error)."""
    from gradlens.weightings import make_weighting

    torch.manual_seed(0)
    model = MTL().double()
    net = nn.parallel.DistributedDataParallel(model)
    x, y = _data()
    mgda = make_weighting("mgda", TASKS)
    weighting = gl.per_layer(mgda) if case == "per-layer held" else mgda
    prof = DistributedProfiler(net, model.trunk, TASKS, engine="loop", every=2)
    if case == "per-layer held":
        prof.backward(_losses(net(x)[1], y), weighting)  # step 0: probed, weights held
        for p in model.parameters():
            p.grad = None
    else:
        prof.step = 1  # the schedule skips it; no weights held yet
    losses = _losses(net(x)[1], y)
    match = "per_layer" if case == "per-layer held" else "should be one the schedule probes"
    with pytest.raises(gl.GradlensError, match=match):
        prof.backward(losses, weighting)
    assert prof.step == 1
    assert all(p.grad is None for p in model.parameters())
    prof.close()
