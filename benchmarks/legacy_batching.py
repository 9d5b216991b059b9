"""The gramian second stage under autograd's own batching against ``torch.func.vmap``.

A second stage that runs only the node types of
:data:`gradlens.engines._batching.LEGACY_FAST` (Linear, ReLU, add, mul, sigmoid, views, and the
types of the zoo's transformer trunks, without convolution or batch norm) runs under autograd's
own (legacy) batching, ``is_grads_batched=True``; any other under ``torch.func.vmap``. CPU, one
thread, thread CPU time:

- on the host-time MLP of ``host_time.py`` (16 Linear layers of width 64 with ReLU, batch 16,
  T linear heads): ``second stage alone``, the batched backward of T cotangents from the trunk's
  output to every Linear output, each way, interleaved over ``--repeats`` rounds (medians);
- on it and on each ``--models`` trunk of ``gradlens bench --zoo`` (batch 4): a gramian probe
  as it is (``now``), the same probe with the legacy route switched off (``before``:
  ``torch.func.vmap`` with the attention rule registered at every probe, the code before),
  the same probe under the legacy batching whatever its graph holds (``legacy``), the
  ``batched`` engine's probe and a plain step, interleaved in one process; paired ratios (the
  median over rounds of the per-round ratio).

    python benchmarks/legacy_batching.py --tasks 8
    python benchmarks/legacy_batching.py --tasks 3 --models bert,gpt2,t5-encoder,vit --repeats 40
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from host_time import BATCH, WIDTH, HostMLP  # (this folder: the same model)
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

import gradlens as gl
from gradlens.bench._setup import _Setup
from gradlens.engines import gramian
from gradlens.engines._batching import vmapped_grad_from


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--models", default="", help="zoo trunks, comma-separated (default: none)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    T = args.tasks
    mlp = HostMLP(T)
    trunk, x, tasks = mlp.trunk, mlp.x, mlp.tasks

    # the second stage alone
    edges: list[GradientEdge] = []
    hooks = [
        m.register_forward_hook(lambda m_, a, out: edges.append(get_gradient_edge(out)))
        for m in trunk
        if isinstance(m, nn.Linear)
    ]

    def stage(legacy: bool) -> Callable[[], None]:
        def run() -> None:
            edges.clear()
            z = trunk(x)
            cot = torch.ones(T, *z.shape)
            vmapped_grad_from(  # (no attention here: no rule to register either way)
                [get_gradient_edge(z)], [cot], list(edges), False, legacy=legacy, rules=False
            )

        return run

    def forward() -> None:
        edges.clear()
        trunk(x)

    alone = _interleaved(
        {"forward": forward, "legacy": stage(True), "func.vmap": stage(False)}, args.repeats
    )
    for h in hooks:
        h.remove()
    fwd = statistics.median(alone["forward"])
    print(f"16 x Linear({WIDTH}), batch {BATCH}, T = {T}, CPU, 1 thread, thread CPU time")
    for name in ("legacy", "func.vmap"):
        med = statistics.median(alone[name]) - fwd
        print(f"  second stage alone, {name:<9} {med * 1e3:6.3f} ms (forward subtracted)")

    _probes("mlp16", trunk, tasks, mlp.losses, mlp.plain, args.repeats)
    for name in filter(None, args.models.split(",")):
        setup = _Setup(name, T, 4)

        def zoo_losses(setup: _Setup = setup) -> dict[str, torch.Tensor]:
            setup.zero()
            return setup.losses()[0]

        def zoo_plain(setup: _Setup = setup) -> None:
            (setup.wt @ torch.stack(list(zoo_losses().values()))).backward()

        _probes(name, setup.trunk, setup.tasks, zoo_losses, zoo_plain, args.repeats)


def _probes(
    name: str,
    trunk: nn.Module,
    tasks: list[str],
    losses: Callable[[], dict[str, torch.Tensor]],
    plain: Callable[[], None],
    repeats: int,
) -> None:
    """A gramian probe now and before, and the batched engine's, against a plain step."""
    prof = gl.Profiler(trunk, tasks, engine="gramian")
    batched = gl.Profiler(trunk, tasks, engine="batched")
    inner = gramian.segment_backward  # type: ignore[attr-defined]  # (its import, patched)
    routes: dict[str, set[tuple[bool, bool]]] = {k: set() for k in ("before", "now", "legacy")}

    def probe(how: str) -> Callable[[], None]:
        def route(*a: Any, legacy: bool, rules: bool, **k: Any) -> Any:
            if how == "before":  # the code before: func.vmap, the attention rule registered
                legacy, rules = False, True
            elif how == "legacy":  # the legacy vmap whatever the graph holds
                legacy, rules = True, False
            routes[how].add((legacy, rules))
            return inner(*a, legacy=legacy, rules=rules, **k)

        def run() -> None:
            gramian.segment_backward = route  # type: ignore[attr-defined, assignment]  # (patched)
            try:
                prof.backward(losses())
            finally:
                gramian.segment_backward = inner  # type: ignore[attr-defined]  # (restored)

        return run

    fns = {
        "plain": plain, "before": probe("before"), "now": probe("now"),
        "legacy": probe("legacy"), "batched": lambda: batched.backward(losses()),
    }  # fmt: skip
    got = _interleaved(fns, repeats)
    prof.close()
    batched.close()
    base = got["plain"]
    taken = {k: ", ".join(_describe(r) for r in sorted(v)) for k, v in routes.items()}
    print(f"{name}: T = {len(tasks)}, plain {statistics.median(base) * 1e3:.2f} ms; second "
          f"stage: now {taken['now']}, before {taken['before']}, legacy {taken['legacy']}")
    for k in ("before", "now", "legacy", "batched"):
        paired = statistics.median(a / b for a, b in zip(got[k], base))
        print(f"  {k:<8} {statistics.median(got[k]) * 1e3:7.2f} ms, {paired:.3f}x plain (paired)")
    for k in ("before", "legacy", "batched"):
        ratio = statistics.median(a / b for a, b in zip(got["now"], got[k]))
        print(f"  gramian now / {k} (paired): {ratio:.3f}x")


def _describe(route: tuple[bool, bool]) -> str:
    legacy, rules = route
    return "legacy vmap" if legacy else "func.vmap" + (" + attention rule" if rules else "")


def _interleaved(fns: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Each function timed once per round, in alternating order, after 5 untimed rounds."""
    for f in fns.values():
        for _ in range(5):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for r in range(repeats):
        for name, f in items if r % 2 else items[::-1]:
            t0 = time.thread_time()
            f()
            times[name].append(time.thread_time() - t0)
    return times


if __name__ == "__main__":
    main()
