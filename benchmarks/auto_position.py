"""``auto``'s probe time by its position after its choice, against an engine's by its position
after its profiler's creation: what the bench's rule for timing ``auto`` rests on.

Usage: ``python benchmarks/auto_position.py --model mlp-1m --tasks 8 --repeats 60 [--engine
gramian] [--probes 6]`` (one torch thread; thread CPU time; batch 4 as the zoo bench).

Each repeat, for ``auto`` and ``--engine`` (alternating which goes first): one step of the
LibMTL-style loop (its buffers come and go between the fresh profilers, as in a full bench run),
a fresh profiler, for ``auto`` its deciding probes untimed, then ``--probes`` probes timed one by
one. Prints, per position k, the median of each, their paired ratio, and ``auto``'s k-th probe
after its choice over the engine's fifth probe (the one ``gradlens bench`` times, with
``--warm-probes 4``), paired within the repeat.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradlens.bench._setup import _Setup


def _probes(setup: _Setup, name: str, k: int) -> list[float]:
    setup.prepare("loop-libmtl")
    setup.step("loop-libmtl")
    setup.prepare(name)
    if name == "auto":
        setup.warm("auto", 0)  # its deciding probes only
    out = []
    for _ in range(k):
        t0 = time.thread_time()
        setup.step(name)
        out.append(time.thread_time() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp-1m")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--engine", default="gramian")
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--probes", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    setup = _Setup(args.model, args.tasks, args.batch)
    K = max(args.probes, 5)
    times: dict[str, list[list[float]]] = {"auto": [], args.engine: []}
    for r in range(args.warmup + args.repeats):
        for name in ["auto", args.engine][:: 1 if r % 2 else -1]:
            t = _probes(setup, name, K)
            if r >= args.warmup:
                times[name].append(t)
    setup.close()
    a, e = times["auto"], times[args.engine]
    print(
        f"{args.model} T={args.tasks}: auto's k-th probe after its choice, {args.engine}'s k-th "
        f"after its profiler's creation (medians over {args.repeats} fresh profilers, ms)"
    )
    for k in range(K):
        ratio = statistics.median(x[k] / y[k] for x, y in zip(a, e))
        print(
            f"  k={k + 1}: auto {statistics.median(x[k] for x in a) * 1e3:.2f}, {args.engine} "
            f"{statistics.median(y[k] for y in e) * 1e3:.2f}, paired ratio {ratio:.3f}; "
            f"auto k-th / {args.engine} 5th, paired "
            f"{statistics.median(x[k] / y[4] for x, y in zip(a, e)):.3f}"
        )


if __name__ == "__main__":
    main()
