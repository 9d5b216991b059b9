"""``auto``'s own cost: its steady-state probe against the engine it chose, called directly.

Usage: ``python benchmarks/auto_overhead.py --models gpt2,convnext --tasks 3 --blocks 15
[--profile]`` (one torch thread; thread CPU time; batch 4 as the zoo bench).

An ``auto`` profiler decides first (its choice is kept: its decision is restored into every
``auto`` profiler made after it, so none times candidates again). Then ``--blocks`` blocks, each
with a fresh profiler per method in alternating order (``auto``, then one of the chosen engine
made directly; the next block the other way round), two untimed probes, then ``--steps`` timed
probed steps (forward included). Prints the median of each and their ratio; ``--profile`` also
prints the cProfile functions of ``auto`` against the direct engine whose own time differs most.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from typing import Any

import torch

from gradlens.bench._setup import _Setup
from gradlens.profiler import Profiler


def _make(setup: _Setup, method: str, state: dict[str, Any]) -> Profiler:
    setup.close()
    engine = "gramian" if method == "gramian-vmap" else method
    prof = Profiler(setup.trunk, setup.tasks, engine=engine)
    if method == "gramian-vmap":
        prof._engine.stage = "vmap"  # type: ignore[attr-defined]  # the gramian engine
    if method == "auto" and state:
        prof._engine.load_state_dict(state)  # type: ignore[attr-defined]  # the auto engine
    setup._profilers[(method, 1)] = prof
    return prof


def _step(setup: _Setup, prof: Profiler) -> float:
    setup.zero()
    t0 = time.thread_time()
    losses, _ = setup.losses()
    prof.backward(losses, setup.w)
    return time.thread_time() - t0


def _decide(setup: _Setup) -> tuple[str, dict[str, Any]]:
    prof = _make(setup, "auto", {})
    engine: Any = prof._engine
    while engine.describe() == "timing":
        _step(setup, prof)
    chose, state = engine.describe(), engine.state_dict()
    prof.close()
    return chose, state


def measure(model: str, T: int, blocks: int, steps: int, profile: bool) -> None:
    setup = _Setup(model, T, 4)
    chose, state = _decide(setup)
    methods = ["auto", chose]
    times: dict[str, list[float]] = {m: [] for m in methods}
    profs = {m: cProfile.Profile(time.thread_time) for m in methods}
    for b in range(blocks):
        for m in methods if b % 2 == 0 else methods[::-1]:
            prof = _make(setup, m, state)
            assert m != "auto" or prof._engine.describe() == chose  # type: ignore[attr-defined]  # auto
            _step(setup, prof)
            _step(setup, prof)
            for _ in range(steps):
                if profile:
                    profs[m].enable()
                times[m].append(_step(setup, prof))
                if profile:
                    profs[m].disable()
            prof.close()
    setup.close()
    med = {m: statistics.median(times[m]) * 1e3 for m in methods}
    print(
        f"{model} T={T}: auto (chose {chose}) {med['auto']:.3f} ms, {chose} direct "
        f"{med[chose]:.3f} ms, auto / direct {med['auto'] / med[chose]:.4f} "
        f"({len(times['auto'])} steps each, {blocks} alternating blocks)",
        flush=True,
    )
    if profile:
        _diff(profs["auto"], profs[chose], len(times["auto"]))


def _diff(a: cProfile.Profile, b: cProfile.Profile, n: int) -> None:
    """The functions whose own (tottime) per step differs most between the two."""
    sa = pstats.Stats(a).stats  # type: ignore[attr-defined]  # pstats' table
    sb = pstats.Stats(b).stats  # type: ignore[attr-defined]  # pstats' table
    keys = set(sa) | set(sb)
    diffs = []
    for k in keys:
        ta = sa[k][2] if k in sa else 0.0
        tb = sb[k][2] if k in sb else 0.0
        ca = sa[k][1] if k in sa else 0
        cb = sb[k][1] if k in sb else 0
        diffs.append(((ta - tb) / n * 1e6, (ca - cb) / n, f"{k[0].split('/')[-1]}:{k[1]}({k[2]})"))
    diffs.sort(reverse=True)
    print("  own time per step, auto - direct (us), calls per step, function:")
    for d, c, name in diffs[:12]:
        print(f"  {d:+8.1f} us {c:+6.1f}  {name}")
    print("  ... most negative:")
    for d, c, name in diffs[-4:]:
        print(f"  {d:+8.1f} us {c:+6.1f}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt2,convnext")
    ap.add_argument("--tasks", default="3")
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for model in args.models.split(","):
        for T in (int(t) for t in args.tasks.split(",")):
            measure(model, T, args.blocks, args.steps, args.profile)


if __name__ == "__main__":
    main()
