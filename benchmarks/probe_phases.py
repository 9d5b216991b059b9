"""Where a probed step's time goes, phase by phase, against the LibMTL-style loop.

Usage: ``python benchmarks/probe_phases.py --models bert,vit,resnet --tasks 3``
(one torch thread; thread CPU time). Each method's step is timed whole and each phase by
wrapping the function that does it (the wrapper's own cost, about a microsecond a call, is
included), interleaved over ``--repeats`` rounds after ``--warmup`` steps (``auto`` has chosen by
then); medians in ms. Every profiler is made before the timing and kept, so the hooks of all of
them run in every forward (they do nothing outside their own probes, but the Python calls cost
every method the same few microseconds). The phases of a profiled step:

- ``forward``: the model and the losses (with the profiler's forward hooks);
  (a phase is counted once: a call inside another timed call belongs to the outer one, except
  ``gramian``'s second stage and ``.grad`` writes, which run inside its rules' loop and are
  taken out of it)
- ``task backwards``: the T backward passes (``torch.autograd.grad``; one batched call for
  ``batched``), in LibMTL's step and the engines alike; ``gramian``'s second stage (the batched,
  or looped, backward of the T rows through the trunk to the recorded layers' outputs);
- ``flatten``: LibMTL's ``cat`` + ``stack``; the engines' copy into their ``T x P`` buffer;
- ``grams``: LibMTL's one Gram; the engines' one per layer (:class:`GramPlan`); ``gramian``'s
  rules (each layer's Gram and weighted gradient from its inputs and output gradients: every
  task's weight gradient on the rules' gradient path) and its generic layers;
- ``write .grad``: the weighted gradient written to the shared parameters;
- ``heads backward``: the weighted backward through the heads (``torch.autograd.backward``;
  the loop engine takes the heads' gradients from its T passes instead; ``gramian``'s first
  stage, which also captures each task's rows);
- ``graph index``, ``snapshot``, ``checks``: the profiler's own work (one walk of the graph,
  the Snapshot and its symmetrized Grams, the losses' and the Snapshot's checks);
- ``rest``: what no phase above covers (Python between the calls).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import gradlens.bench._setup as setup_mod
import gradlens.engines._batching as batching_mod
import gradlens.engines.batched as batched_mod
import gradlens.engines.gramian as gramian_mod
import gradlens.engines.loop as loop_mod
import gradlens.profiler as profiler_mod
from gradlens.bench._setup import _Setup
from gradlens.profiler import Profiler

_acc: dict[str, float] = collections.defaultdict(float)
# the timed calls under way, each with the time of the inner calls timed apart within it
_stack: list[list[float]] = []


def _wrap(owner: Any, name: str, phase: str, inner: bool = False) -> None:
    """Time ``owner.name`` to ``phase``. A call inside another timed call belongs to the outer
    one, unless ``inner``: then it is timed to its own phase and its time taken out of the
    outer call's (the gramian engine's second stage runs inside its rules' loop)."""
    f = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        if _stack and not inner:
            return f(*args, **kwargs)
        _stack.append([0.0])
        t0 = time.thread_time()
        try:
            return f(*args, **kwargs)
        finally:
            dt = time.thread_time() - t0
            _acc[phase] += dt - _stack.pop()[0]
            if _stack:
                _stack[-1][0] += dt

    setattr(owner, name, timed)


def _instrument() -> None:
    _wrap(torch.autograd, "grad", "task backwards")
    _wrap(torch.autograd, "backward", "heads backward")
    _wrap(torch, "cat", "flatten")
    _wrap(torch, "stack", "flatten")  # LibMTL's (the profiler's own stacks count to checks)
    _wrap(loop_mod.GramPlan, "run", "grams")
    _wrap(loop_mod, "write_flat", "write .grad")
    _wrap(batched_mod, "batched_grad", "task backwards")
    _wrap(loop_mod, "task_grad", "task backwards")  # the loop engine's direct engine call
    # gramian: the weighted backward through the heads that captures each task's rows, the
    # batched (or looped) backward of the rows through the trunk, the rules (Grams, weighted
    # gradients) and the .grad writes they make
    _wrap(gramian_mod, "capture_rows", "heads backward")
    _wrap(gramian_mod.GramianEngine, "_rule_grams", "grams")
    for owner, name in (
        (batching_mod, "vmapped_grad_from"),
        (batching_mod, "looped_grad_from"),  # a segment whose per-task blocks are large
        (gramian_mod, "looped_grad_from"),
        (gramian_mod, "batched_grad_from"),  # off CPU
    ):
        _wrap(owner, name, "task backwards", inner=True)
    for name in ("accumulate_grads", "accumulate_grad"):
        _wrap(gramian_mod, name, "write .grad", inner=True)
    _wrap(profiler_mod.GraphIndex, "build", "graph index")
    _wrap(profiler_mod, "Snapshot", "snapshot")
    for name in ("stack_losses", "check_finite", "stack_grams"):
        _wrap(profiler_mod, name, "checks")
    _wrap(profiler_mod.ProbeWarnings, "check", "checks")  # the zero and unrecorded flags


def _libmtl(setup: _Setup, losses: dict[str, torch.Tensor]) -> None:
    """The bench's LibMTL-style step, its phases named."""
    params = list(setup.trunk.parameters())
    J = setup_mod.libmtl_jacobian(losses, params)
    t0 = time.thread_time()
    _ = (J @ J.T).double()
    _acc["grams"] += time.thread_time() - t0
    t0 = time.thread_time()
    flat = setup.wt @ J
    k = 0
    for p in params:
        p.grad = flat[k : k + p.numel()].view_as(p).clone()
        k += p.numel()
    _acc["write .grad"] += time.thread_time() - t0
    L = torch.stack(list(losses.values()))
    torch.autograd.backward(setup.wt @ L, inputs=list(setup.heads.parameters()))


def _step(setup: _Setup, method: str) -> Callable[[], None]:
    def run() -> None:
        setup.zero()
        t0 = time.thread_time()
        losses, _ = setup.losses()
        _acc["forward"] += time.thread_time() - t0
        if method == "loop-libmtl":
            _libmtl(setup, losses)
        else:
            setup._profilers[(method, 1)].backward(losses, setup.w)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bert,vit,resnet")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--methods", default="loop-libmtl,loop,batched,gramian,auto")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", default="small", help="the zoo trunks' size: small or base")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    _instrument()
    methods = args.methods.split(",")
    for model in args.models.split(","):
        setup = _Setup(model, args.tasks, args.batch, size=args.size)
        for m in methods:
            if m != "loop-libmtl":
                setup._profilers[(m, 1)] = Profiler(setup.trunk, setup.tasks, engine=m)
        steps = {m: _step(setup, m) for m in methods}
        for m in methods:
            for _ in range(args.warmup):
                steps[m]()
        got: dict[str, dict[str, list[float]]] = {m: collections.defaultdict(list) for m in methods}
        for _ in range(args.repeats):
            for m in methods:
                _acc.clear()
                t0 = time.thread_time()
                steps[m]()
                total = time.thread_time() - t0
                got[m]["total"].append(total)
                for phase, v in _acc.items():
                    got[m][phase].append(v)
                got[m]["rest"].append(total - sum(_acc.values()))
        _print(model, args.tasks, methods, got, setup)
        setup.close()


def _print(
    model: str, T: int, methods: list[str], got: dict[str, dict[str, list[float]]], setup: _Setup
) -> None:
    phases = [
        "forward", "task backwards", "flatten", "grams", "write .grad", "heads backward",
        "graph index", "snapshot", "checks", "rest", "total",
    ]  # fmt: skip
    chose = ""
    if ("auto", 1) in setup._profilers:
        chose = f" (auto chose {setup._profilers[('auto', 1)]._engine.describe()})"  # type: ignore[attr-defined]  # the auto engine
    print(f"\n{model}, T = {T}, batch {setup.x.shape[0]}: thread CPU ms per step{chose}")
    print(f"{'phase':<16}" + "".join(f"{m:>13}" for m in methods))
    for phase in phases:
        cells = [statistics.median(got[m][phase]) * 1e3 if got[m][phase] else 0.0 for m in methods]
        print(f"{phase:<16}" + "".join(f"{c:>13.3f}" for c in cells))


if __name__ == "__main__":
    main()
