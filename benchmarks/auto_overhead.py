"""``auto``'s own cost: its steady-state probe against the engine it chose, called directly.

Usage: ``python benchmarks/auto_overhead.py --models gpt2,convnext --tasks 3 --pairs 100
[--profile]`` (one torch thread; thread CPU time; batch 4 as the zoo bench).

An ``auto`` profiler decides first; its decision is restored into a fresh ``auto`` profiler, so
it times no candidate again. Two copies of the set-up (the same seed: the same model and batch),
one with that ``auto`` profiler, one with a profiler of the engine it chose, called directly;
five untimed probed steps each, then ``--pairs`` pairs of probed steps (forward included), one of
each, alternating which goes first (ABBA), so the machine's other load hits both alike. Prints
the ratio of the medians and the median of the paired ratios; ``--profile`` also prints the
cProfile functions whose own time differs most between the two.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from typing import Any

import torch
from auto_decision import _probe, _profiler  # (this folder: the same profilers and timed step)

from gradlens.bench._setup import _Setup
from gradlens.profiler import Profiler


def _make(setup: _Setup, method: str, state: dict[str, Any]) -> Profiler:
    """``auto_decision.py``'s profiler for ``method``, with ``state`` restored into ``auto``."""
    prof = _profiler(setup, method)
    if method == "auto" and state:
        prof._engine.load_state_dict(state)  # type: ignore[attr-defined]  # the auto engine
    return prof


def _decide(setup: _Setup) -> tuple[str, dict[str, Any]]:
    prof = _make(setup, "auto", {})
    engine: Any = prof._engine
    while engine.describe() == "timing":
        _probe(setup, prof)
    chose, state = engine.describe(), engine.state_dict()
    prof.close()
    return chose, state


def measure(model: str, T: int, pairs: int, profile: bool) -> None:
    a, b = _Setup(model, T, 4), _Setup(model, T, 4)  # the same seed: the same model and batch
    chose, state = _decide(a)
    profs = {"auto": _make(a, "auto", state), chose: _make(b, chose, state)}
    setups = {"auto": a, chose: b}
    assert profs["auto"]._engine.describe() == chose  # type: ignore[attr-defined]  # auto
    times: dict[str, list[float]] = {m: [] for m in profs}
    cprof = {m: cProfile.Profile(time.thread_time) for m in profs}
    for m in profs:
        for _ in range(5):
            _probe(setups[m], profs[m])
    order = list(profs)
    for i in range(pairs):
        for m in order if i % 2 == 0 else order[::-1]:  # ABBA: neither goes first
            if profile:
                cprof[m].enable()
            times[m].append(_probe(setups[m], profs[m]))
            if profile:
                cprof[m].disable()
    a.close()
    b.close()
    med = {m: statistics.median(times[m]) * 1e3 for m in profs}
    paired = statistics.median(x / y for x, y in zip(times["auto"], times[chose]))
    print(
        f"{model} T={T}: auto (chose {chose}) {med['auto']:.3f} ms, {chose} direct "
        f"{med[chose]:.3f} ms, auto / direct {med['auto'] / med[chose]:.4f} (median of the "
        f"{pairs} paired ratios {paired:.4f})",
        flush=True,
    )
    if profile:
        _diff(cprof["auto"], cprof[chose], pairs)


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
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for model in args.models.split(","):
        for T in (int(t) for t in args.tasks.split(",")):
            measure(model, T, args.pairs, args.profile)


if __name__ == "__main__":
    main()
