"""Where the time of one step goes: torch.profiler over plain and probed steps.

Usage: ``python benchmarks/profile_step.py --device cuda --model mlp-10m --tasks 8 40``
(``--model bert --batch 4`` for a ``gradlens bench --zoo`` trunk; ``--size base --batch 8`` for
it at ``--size base``)
(``--device cpu`` works too). For each method it prints the wall time per step, the time the GPU
spent in kernels (CUDA), the number of kernel launches, and the ten operators with the most
self CPU time, so a probed step can be told apart as compute-bound or launch/Python-bound.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gradlens.bench._hardware import _device
from gradlens.bench._setup import _Setup


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="mlp-10m")
    ap.add_argument("--tasks", type=int, nargs="+", default=[8])
    ap.add_argument("--methods", nargs="+", default=["plain", "gramian", "features"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", default="small", help="the zoo trunks' size: small or base")
    args = ap.parse_args()
    dev = _device(args.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for T in args.tasks:
        setup = _Setup(args.model, T, args.batch, device=dev, size=args.size)
        for method in args.methods:
            setup.prepare(method)
            for _ in range(3):  # warm-up (and the profiler's probe at step 0)
                setup.step(method)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                setup.step(method)
            _sync(dev)
            wall = (time.perf_counter() - t0) / args.steps
            with profile(activities=acts) as prof:
                for _ in range(args.steps):
                    setup.step(method)
                _sync(dev)
            evs = prof.key_averages()
            kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
            gpu = sum(e.device_time_total for e in kernels) / 1e3 / args.steps
            print(
                f"\n## {args.model} T={T} {method}: wall {wall * 1e3:.2f} ms/step, "
                f"GPU kernels {gpu:.2f} ms/step, {len(kernels) / args.steps:.0f} launches/step"
            )
            print(evs.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=50))
        setup.close()


if __name__ == "__main__":
    main()
