"""How often ``auto`` picks an engine more than 5 % slower than the truly fastest one.

Usage: ``python benchmarks/auto_decision.py --models gpt2,resnet,convnext --tasks 3
--repeats 30 [--json out.json]`` (one torch thread; thread CPU time; batch 4 as the zoo bench).

Each repeat, in a rotating order, times:

- every exact candidate (``loop``, ``batched``, ``gramian``, ``gramian-vmap``: the gramian
  engine with its second stage vmapped throughout) on its steady-state probe, as the bench
  does (a fresh profiler, ``--warm-probes`` untimed probes, the timed one); over all repeats
  the medians give the "true" ordering of the candidates (printed with the two half-samples'
  medians, even and odd repeats, so one can see whether the ordering holds);
- one fresh ``auto`` decision per decision rule (``new``: the rule in
  :mod:`gradlens.engines.auto`; ``old``: the rule before it, round 1 then one more timing of
  the candidates within 1.5x, winner by fastest probe, first probes included), counting the
  probes it took, then its steady-state probe (two probes after the decision, the second
  timed).

Reported per rule: what it chose, the share of decisions whose choice is more than 5 % slower
than the fastest candidate by the true medians ("misses"), the probes a decision took, and the
median steady-state ``auto`` probe against the fastest candidate and against the median of the
engines it chose (auto's dispatch overhead, within the noise of the two medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

import gradlens.engines.auto as auto_mod
from gradlens.bench._setup import _Setup
from gradlens.profiler import Profiler

CANDS = ("loop", "batched", "gramian", "gramian-vmap")


class OldDecision(auto_mod.Decision):
    """The rule before interleaved rounds: round 1, then one more timing of each candidate
    within 1.5x of the best, winner by fastest probe."""

    def best(self) -> dict[str, float]:
        return {name: min(ts) for name, ts in self.times.items()}

    def next_candidate(self, order: Sequence[str]) -> str | None:
        for name in order:
            if name not in self.times:
                return name
        best = min(self.best().values())
        for name in order:
            if len(self.times[name]) < 2 and self.times[name][0] <= 1.5 * best:
                return name
        return None


RULES: dict[str, type[auto_mod.Decision]] = {"new": auto_mod.Decision, "old": OldDecision}


def _profiler(setup: _Setup, name: str) -> Profiler:
    setup.close()
    engine = "gramian" if name == "gramian-vmap" else name
    prof = Profiler(setup.trunk, setup.tasks, engine=engine)
    if name == "gramian-vmap":
        prof._engine.stage = "vmap"  # type: ignore[attr-defined]  # the gramian engine
    setup._profilers[(name, 1)] = prof
    return prof


def _probe(setup: _Setup, prof: Profiler) -> float:
    setup.zero()
    t0 = time.thread_time()
    losses, _ = setup.losses()
    prof.backward(losses, setup.w)
    return time.thread_time() - t0


def _candidate(setup: _Setup, name: str, warm: int) -> float:
    prof = _profiler(setup, name)
    for _ in range(warm):
        _probe(setup, prof)
    t = _probe(setup, prof)
    prof.close()
    return t


def _auto(setup: _Setup, rule: str) -> tuple[str, int, float]:
    auto_mod.Decision = RULES[rule]  # type: ignore[misc]  # the class auto's compute makes
    try:
        prof = _profiler(setup, "auto")
        engine: Any = prof._engine
        n = 0
        while not any(d.winner for d in engine.decisions.values()):
            _probe(setup, prof)
            n += 1
        _probe(setup, prof)
        t = _probe(setup, prof)
        chose = engine.describe()
        prof.close()
    finally:
        auto_mod.Decision = RULES["new"]  # type: ignore[misc]  # restored
    return chose, n, t


def measure(model: str, T: int, repeats: int, warmup: int, warm: int) -> dict[str, Any]:
    setup = _Setup(model, T, 4)
    items = [*CANDS, "auto-new", "auto-old"]
    times: dict[str, list[float]] = {c: [] for c in items}
    chose: dict[str, list[str]] = {r: [] for r in RULES}
    probes: dict[str, list[int]] = {r: [] for r in RULES}
    for r in range(warmup + repeats):
        rot = items[r % len(items) :] + items[: r % len(items)]
        for it in rot:
            if it.startswith("auto-"):
                rule = it.removeprefix("auto-")
                c, n, t = _auto(setup, rule)
                if r >= warmup:
                    chose[rule].append(c)
                    probes[rule].append(n)
            else:
                t = _candidate(setup, it, warm)
            if r >= warmup:
                times[it].append(t)
    setup.close()
    return _summary(model, T, times, chose, probes)


def _summary(
    model: str,
    T: int,
    times: dict[str, list[float]],
    chose: dict[str, list[str]],
    probes: dict[str, list[int]],
) -> dict[str, Any]:
    med = {c: statistics.median(times[c]) for c in CANDS}
    halves = {
        c: (statistics.median(times[c][0::2]), statistics.median(times[c][1::2] or times[c]))
        for c in CANDS
    }
    best = min(med.values())
    out: dict[str, Any] = {
        "model": model,
        "tasks": T,
        "median_ms": {c: med[c] * 1e3 for c in CANDS},
        "halves_ms": {c: [h * 1e3 for h in halves[c]] for c in CANDS},
        "vs_best": {c: med[c] / best for c in CANDS},
        "rules": {},
    }
    for rule in RULES:
        ratios = [med[c] / best for c in chose[rule]]
        auto_med = statistics.median(times[f"auto-{rule}"])
        chosen_med = statistics.median([med[c] for c in chose[rule]])
        out["rules"][rule] = {
            "chose": {c: chose[rule].count(c) for c in sorted(set(chose[rule]))},
            "misses": sum(q > 1.05 for q in ratios),
            "decisions": len(ratios),
            "mean_true_ratio": statistics.fmean(ratios),
            "probes": [min(probes[rule]), statistics.median(probes[rule]), max(probes[rule])],
            "auto_ms": auto_med * 1e3,
            "auto_vs_best": auto_med / best,
            "auto_vs_chosen": auto_med / chosen_med,
        }
    return out


def _print(s: dict[str, Any]) -> None:
    cands = ", ".join(
        f"{c} {s['median_ms'][c]:.2f} ms ({s['vs_best'][c]:.3f}x; halves "
        f"{s['halves_ms'][c][0]:.2f}/{s['halves_ms'][c][1]:.2f})"
        for c in CANDS
    )
    print(f"{s['model']} T={s['tasks']}: {cands}")
    for rule, v in s["rules"].items():
        print(
            f"  {rule}: chose {v['chose']}, misses {v['misses']}/{v['decisions']}, mean true "
            f"ratio {v['mean_true_ratio']:.3f}, probes min/med/max {v['probes']}, auto "
            f"{v['auto_ms']:.2f} ms = {v['auto_vs_best']:.3f}x best, "
            f"{v['auto_vs_chosen']:.3f}x its chosen engines",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt2,resnet,convnext")
    ap.add_argument("--tasks", default="3")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--warm-probes", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = []
    for model in args.models.split(","):
        for T in (int(t) for t in args.tasks.split(",")):
            s = measure(model, T, args.repeats, args.warmup, args.warm_probes)
            _print(s)
            out.append(s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
