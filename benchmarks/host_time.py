"""Host time of a probe on a model whose kernels are negligible (issue 14).

16 Linear layers of width 64 (ReLU between), batch 16, T linear heads, CPU, one torch thread,
CPU time of this thread. Prints the plain step, each engine's probe (its second, steady-state),
their ratio, the probe's time per layer, and where a gramian probe's time goes by function
(cProfile on this thread's CPU time, cumulative, the gradlens functions and autograd's entry
points; the graph index's walks are ``_graph.py:from_roots``, ``_capture.py:split_heads``,
``_graph.py:reaches_past`` and ``_segments.py:plan_from_index``; the heads' split, the
reaches-past answer and the cut plan are computed once per graph signature and reused).

The ``floor`` row is a probe of the same model written by hand along the engine's route, its
tensor work only (see ``floor_probe``): what is left for the profiler's own bookkeeping under a
target ratio.

    python benchmarks/host_time.py            # T = 8
    python benchmarks/host_time.py --tasks 3
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

import gradlens as gl

LAYERS, WIDTH, BATCH = 16, 64, 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    T = args.tasks
    m = HostMLP(T)
    trunk, heads, x, y, tasks, wt, losses, plain = (
        m.trunk, m.heads, m.x, m.y, m.tasks, m.wt, m.losses, m.plain
    )

    profs = {e: gl.Profiler(trunk, tasks, engine=e) for e in ("loop", "batched", "gramian")}
    for p in profs.values():
        p.close()
    floor = floor_probe(trunk, heads, x, y, wt)
    times: dict[str, list[float]] = {"plain": [], "floor": [], **{e: [] for e in profs}}
    for r in range(args.repeats + 1):
        for name in times:
            if name == "plain":
                t0 = time.thread_time()
                plain()
            elif name == "floor":
                t0 = time.thread_time()
                floor()
            else:
                prof = gl.Profiler(trunk, tasks, engine=name)
                prof.backward(losses())  # first probe: buffers
                t0 = time.thread_time()
                prof.backward(losses())
            dt = time.thread_time() - t0
            if name not in ("plain", "floor"):
                prof.close()
            if r:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"16 x Linear({WIDTH}), batch {BATCH}, T = {T}, CPU, 1 thread, CPU time, "
          f"median of {args.repeats}")
    for k, v in med.items():
        print(f"  {k:<8} {v * 1e3:7.3f} ms  {v / med['plain']:5.2f}x plain  "
              f"{v / LAYERS * 1e6:7.1f} us per layer")

    breakdown(lambda: gl.Profiler(trunk, tasks, engine="gramian"), losses, args.repeats)
    prof = gl.Profiler(trunk, tasks, engine="gramian")
    prof.backward(losses())
    pr = cProfile.Profile(time.thread_time)  # CPU time: robust to other jobs on the machine
    n = 20
    for _ in range(n):
        ls = losses()
        pr.enable()
        prof.backward(ls)
        pr.disable()
    prof.close()
    st = pstats.Stats(pr)
    rows = []
    for (file, _, func), (_, _, _, cum, _) in st.stats.items():  # type: ignore[attr-defined]
        if "gradlens" in file or func in ("run_backward", "grad", "backward"):
            rows.append((cum / n, f"{file.rsplit('/', 1)[-1]}:{func}"))
    print("gramian probe, cumulative time per probe by function (cProfile, adds overhead):")
    for cum, name in sorted(rows, reverse=True)[:24]:
        print(f"  {cum * 1e3:7.3f} ms  {name}")


class HostMLP:
    """The model of this script (also ``legacy_batching.py``'s): 16 Linear layers of width 64
    with ReLU between, batch 16, ``T`` linear heads with a squared loss each; seeded."""

    def __init__(self, T: int) -> None:
        torch.manual_seed(0)
        mods: list[nn.Module] = []
        for _ in range(LAYERS):
            mods += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
        self.trunk = nn.Sequential(*mods)
        self.heads = nn.ModuleList([nn.Linear(WIDTH, 1) for _ in range(T)])
        self.x, self.y = torch.randn(BATCH, WIDTH), torch.randn(T, BATCH)
        self.tasks = [f"t{i}" for i in range(T)]
        self.wt = torch.full((T,), 1.0 / T)

    def losses(self) -> dict[str, torch.Tensor]:
        z = self.trunk(self.x)
        pairs = enumerate(zip(self.tasks, self.heads))
        return {t: ((h(z).squeeze(1) - self.y[i]) ** 2).mean() for i, (t, h) in pairs}

    def plain(self) -> None:
        """A plain step's backward: the weighted sum of the losses."""
        (self.wt @ torch.stack(list(self.losses().values()))).backward()


def floor_probe(
    trunk: nn.Sequential, heads: nn.ModuleList, x: torch.Tensor, y: torch.Tensor, wt: torch.Tensor
) -> Callable[[], None]:
    """A gramian probe of this model written by hand, with nothing but its tensor work: the
    forward with hooks recording each Linear's input and output edge, one weighted backward
    through the heads (hooks on the heads' first nodes keep each task's rows, the heads'
    .grad written), one vmapped backward of the rows to every Linear output, the grouped
    Linear Grams and weighted gradients, .grad written; no graph index, no checks, no
    Snapshot. What a probe of this model costs at the least along the engine's route."""
    from torch.autograd.graph import get_gradient_edge

    from gradlens.engines.rules.linear import linear_group_stacked

    lins = [m for m in trunk if isinstance(m, nn.Linear)]
    head_leaves = [p for h in heads for p in h.parameters()]
    T = len(heads)
    rec: list[tuple[torch.Tensor, Any]] = []

    def hook(m: nn.Module, a: tuple[torch.Tensor, ...], o: torch.Tensor) -> None:
        rec.append((a[0].detach(), get_gradient_edge(o)))

    def probe() -> None:
        handles = [m.register_forward_hook(hook) for m in lins]
        rec.clear()
        z = trunk(x)
        outs = [h(z) for h in heads]
        L = torch.stack([((o.squeeze(1) - y[i]) ** 2).mean() for i, o in enumerate(outs)])
        for h_ in handles:
            h_.remove()
        rows: list[Any] = [None] * T
        hooks = [
            cast(Any, o.grad_fn).register_hook(lambda gi, _, t=t: rows.__setitem__(t, gi[1]))
            for t, o in enumerate(outs)
        ]
        ez = get_gradient_edge(z)
        gs = torch.autograd.grad(wt @ L, [ez, *head_leaves], retain_graph=True)
        for h_ in hooks:
            h_.remove()
        with torch.no_grad():
            torch._foreach_add_(cast(Any, [p.grad for p in head_leaves]), list(gs[1:]))
        D = torch.autograd.grad(
            [ez], [e for _, e in rec], grad_outputs=[torch.stack(rows)], is_grads_batched=True
        )
        got = linear_group_stacked(lins, [a for a, _ in rec], list(D), torch.ones(T), 1 << 30)
        G, gW, gb = cast(Any, got)
        G = G * torch.outer(wt, wt).double().reciprocal()  # the rows carry w_t
        with torch.no_grad():
            grads = [m.weight.grad for m in lins] + [m.bias.grad for m in lins]
            torch._foreach_add_(cast(Any, grads), [*gW.unbind(0), *gb.unbind(0)])
        del G

    plain_grads = [p.grad for p in [*trunk.parameters(), *heads.parameters()]]
    if any(g is None for g in plain_grads):
        (wt @ torch.stack([h(trunk(x)).sum() for h in heads])).backward()
    return probe


def breakdown(make: Callable[[], gl.Profiler], losses: Callable[[], dict], n: int) -> None:
    """Where a gramian probe's CPU time goes: steps timed by wrapping them (thread CPU time,
    no profiler overhead; nested steps are included in their callers)."""
    from gradlens import profiler
    from gradlens.engines import _batching, _graph, _segments, gramian
    from gradlens.engines.rules import _groups

    spent: dict[str, float] = defaultdict(float)

    def timed(owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += time.thread_time() - t0

        setattr(owner, name, wrapper)

    timed(_graph.GraphIndex, "from_roots", "graph index: one walk (GraphIndex.build)")
    timed(gramian, "split_heads", "graph index: heads' split (split_heads)")
    timed(_graph.GraphIndex, "reaches_past", "graph index: reaches_past")
    timed(_segments, "plan_segments", "graph index: cut plan (plan_segments, cached)")
    timed(profiler, "check_finite", "profiler: the losses read on the host (check_finite)")
    timed(profiler, "stack_grams", "profiler: per-layer Grams stacked (stack_grams)")
    timed(gramian, "capture_rows", "first stage: weighted backward through the heads")
    timed(_batching, "vmapped_grad_from", "second stage: batched backward through the trunk")
    timed(_groups, "linear_group_stacked", "Linear rule, grouped layers (Grams, weighted grads)")
    timed(gramian, "accumulate_grads", "writing .grad of the shared layers")
    timed(profiler, "Snapshot", "Snapshot")
    prof = make()
    prof.backward(losses())
    total = 0.0
    for _ in range(n):
        ls = losses()
        t0 = time.thread_time()
        prof.backward(ls)
        total += time.thread_time() - t0
    prof.close()
    print(f"gramian probe, {total / n * 1e3:.3f} ms (back-to-back probes), by step:")
    for label, sec in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {sec / n * 1e3:7.3f} ms  {label}")


if __name__ == "__main__":
    main()
