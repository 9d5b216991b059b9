"""The gramian engine's second stage on CPU: its default against one backward per task, in one
process, interleaved, as ratios to the ``batched`` engine.

Usage: ``python benchmarks/second_stage.py bert,vit,resnet,convnext 3,8 7`` (trunks of
``gradlens bench``, T values, repeats; ``BATCH=128`` in the environment for another batch).
Each repeat times every method on a fresh profiler: two probes untimed, then the mean CPU time
of one torch thread over three probed steps (forward included); medians over the repeats.
``gramian-looped`` is the engine with ``stage="looped"`` (the CPU default before issue 14 on
these trunks), ``gramian-vmap`` with every segment vmapped, ``gramian`` its default.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from gradlens.bench._setup import _Setup
from gradlens.engines._base import quiet_vmap

STAGES = {"gramian": None, "gramian-vmap": "vmap", "gramian-looped": "looped"}


def _time(setup: _Setup, method: str) -> float:
    base = "gramian" if method in STAGES else method
    setup.prepare(base, fresh=True)
    if method in STAGES:
        setup._profilers[(base, 1)]._engine.stage = STAGES[method]  # type: ignore[attr-defined]  # the gramian engine's
    with quiet_vmap():
        setup.step(base)
        setup.step(base)
        t0 = time.thread_time()
        for _ in range(3):
            setup.step(base)
        return (time.thread_time() - t0) / 3


def main() -> None:
    torch.set_num_threads(1)
    models = sys.argv[1].split(",")
    tasks = [int(t) for t in sys.argv[2].split(",")]
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    methods = ["batched", "gramian-looped", "gramian"]
    batch = int(os.environ.get("BATCH", "4"))
    for model in models:
        for T in tasks:
            setup = _Setup(model, T, batch)
            times: dict[str, list[float]] = {m: [] for m in methods}
            for r in range(repeats + 1):  # the first repeat is a warm-up
                for m in methods:
                    dt = _time(setup, m)
                    if r:
                        times[m].append(dt)
            med = {m: statistics.median(v) for m, v in times.items()}
            cells = [f"{m} {med[m] * 1e3:.1f} ms ({med[m] / med['batched']:.2f}x)" for m in methods]
            print(f"{model} T={T}: " + "  ".join(cells), flush=True)
            setup.close()


if __name__ == "__main__":
    main()
