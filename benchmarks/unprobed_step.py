"""What an unprobed step costs under each engine, against a plain step (``every=k`` training).

Usage: ``python benchmarks/unprobed_step.py --models bert,resnet,vit --steps 70``

Each method trains its own copy of the trunk and heads (so one profiler's hooks never slow
another's steps), its profiler set to a step the schedule skips (``every=10**9``, step 1 on);
the steps run interleaved, one torch thread, thread CPU time, median after 10 warm-up rounds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gradlens.bench._setup import _Setup
from gradlens.profiler import Profiler

ENGINES = ("loop", "gramian", "auto")


def _stepper(s: _Setup, method: str) -> Callable[[], None]:
    trunk, heads = copy.deepcopy(s.trunk), copy.deepcopy(s.heads)
    prof = None if method == "plain" else Profiler(trunk, s.tasks, engine=method, every=10**9)
    if prof is not None:
        prof.step = 1  # every following step is unprobed
    params = [*trunk.parameters(), *heads.parameters()]

    def step() -> None:
        for p in params:
            p.grad = None
        z = trunk(s.x)
        losses = {t: F.cross_entropy(h(z), s.y[i]) for i, (t, h) in enumerate(zip(s.tasks, heads))}
        if prof is None:
            (s.wt @ torch.stack(list(losses.values()))).backward()
        else:
            prof.backward(losses, s.w)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bert,resnet,vit")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=70)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for model in args.models.split(","):
        s = _Setup(model, args.tasks, 4)
        steps = {m: _stepper(s, m) for m in ("plain", *ENGINES)}
        times: dict[str, list[float]] = {m: [] for m in steps}
        for i in range(args.steps + 10):
            for m, f in steps.items():
                t0 = time.thread_time()
                f()
                if i >= 10:
                    times[m].append(time.thread_time() - t0)
        base = statistics.median(times["plain"])
        ratios = " ".join(f"{m} {statistics.median(times[m]) / base:.3f}x" for m in ENGINES)
        print(f"{model} T={args.tasks}: plain {base * 1e3:.2f} ms; unprobed step: {ratios}")


if __name__ == "__main__":
    main()
