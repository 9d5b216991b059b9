"""Host time of a probe on a model whose kernels are negligible (issue 14).

16 Linear layers of width 64 (ReLU between), batch 16, T linear heads, CPU, one torch thread,
CPU time of this thread. Prints the plain step, each engine's probe (its second, steady-state),
their ratio, the probe's time per layer, and where a gramian probe's time goes by function
(cProfile, cumulative, the gradlens functions and autograd's entry points).

    python benchmarks/host_time.py            # T = 8
    python benchmarks/host_time.py --tasks 3
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

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
    torch.manual_seed(0)
    T = args.tasks
    mods: list[nn.Module] = []
    for _ in range(LAYERS):
        mods += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    trunk = nn.Sequential(*mods)
    heads = nn.ModuleList([nn.Linear(WIDTH, 1) for _ in range(T)])
    x, y = torch.randn(BATCH, WIDTH), torch.randn(T, BATCH)
    tasks = [f"t{i}" for i in range(T)]
    wt = torch.full((T,), 1.0 / T)

    def losses() -> dict[str, torch.Tensor]:
        z = trunk(x)
        pairs = enumerate(zip(tasks, heads))
        return {t: ((h(z).squeeze(1) - y[i]) ** 2).mean() for i, (t, h) in pairs}

    def plain() -> None:
        (wt @ torch.stack(list(losses().values()))).backward()

    profs = {e: gl.Profiler(trunk, tasks, engine=e) for e in ("loop", "batched", "gramian")}
    for p in profs.values():
        p.close()
    times: dict[str, list[float]] = {"plain": [], **{e: [] for e in profs}}
    for r in range(args.repeats + 1):
        for name in times:
            if name == "plain":
                t0 = time.thread_time()
                plain()
            else:
                prof = gl.Profiler(trunk, tasks, engine=name)
                prof.backward(losses())  # first probe: buffers
                t0 = time.thread_time()
                prof.backward(losses())
            dt = time.thread_time() - t0
            if name != "plain":
                prof.close()
            if r:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"16 x Linear({WIDTH}), batch {BATCH}, T = {T}, CPU, 1 thread, CPU time, "
          f"median of {args.repeats}")
    for k, v in med.items():
        print(f"  {k:<8} {v * 1e3:7.3f} ms  {v / med['plain']:5.2f}x plain  "
              f"{v / LAYERS * 1e6:7.1f} us per layer")

    prof = gl.Profiler(trunk, tasks, engine="gramian")
    prof.backward(losses())
    pr = cProfile.Profile()
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
    for cum, name in sorted(rows, reverse=True)[:14]:
        print(f"  {cum * 1e3:7.3f} ms  {name}")


if __name__ == "__main__":
    main()
