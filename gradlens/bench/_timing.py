"""The interleaved timing of the methods (:func:`run_benchmark`) and its table."""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradlens._errors import GradlensError
from gradlens.bench._hardware import _check_device, _clock, _parse_device
from gradlens.bench._memory import step_tensor_peak
from gradlens.bench._setup import _ONCE, _Setup
from gradlens.bench._weightings import WEIGHTED_METHODS

__all__ = ["AMORTISED", "METHODS", "ZOO_MODELS", "format_table", "run_benchmark"]

METHODS = ("plain", "loop-libmtl", "torchjd", "loop", "batched", "gramian", "auto", "features")

#: ``gradlens bench --zoo``: Hugging Face trunks (see :mod:`gradlens.bench._zoo`) and two of ours
ZOO_MODELS = (
    "bert",
    "gpt2",
    "t5-encoder",
    "vit",
    "resnet",
    "convnext",
    "mobilenetv2",
    "mlp-1m",
    "cnn-1m",
)

#: the exact engines ``auto`` chooses from: its row is compared with theirs
EXACT = ("loop", "batched", "gramian")

#: methods that get amortised rows (``method@every=k``) when ``amortise`` is not empty
AMORTISED = ("gramian", "features")


def _available(methods: Sequence[str]) -> list[str]:
    out = []
    for m in methods:
        if m not in METHODS and m not in WEIGHTED_METHODS:
            raise GradlensError(
                f"`methods` should be among {[*METHODS, *WEIGHTED_METHODS]}; found {m!r}."
            )
        if (m == "torchjd" or "+" in m) and importlib.util.find_spec("torchjd") is None:
            continue
        out.append(m)
    return out


def run_benchmark(
    models: Sequence[str] = ("mlp-1m", "cnn-1m"),
    tasks: Sequence[int] = (2, 8, 40),
    methods: Sequence[str] = METHODS,
    *,
    batch: int = 128,
    repeats: int = 7,
    warmup: int = 2,
    amortise: Sequence[int] = (10, 100),
    clock: str = "wall",
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
    memory: bool = False,
    warm_probes: int = 4,
    size: str = "small",
) -> list[dict[str, Any]]:
    """Time one training step per method, interleaved, as ratios to the plain step.

    Returns one row per (model, T, method): median seconds per step, ratio to plain, ratio to the
    LibMTL-style loop, and the device. For ``gramian`` and ``features`` (see :data:`AMORTISED`),
    when ``amortise`` is not empty, three more kinds of rows, all from the same interleaved run:

    - ``<method>-after-probe``: an unprobed step right after a probed one. It costs more than a
      steady unprobed step (on CPU ~10 % for ``gramian``: the allocator and page-fault aftermath
      of the probe's large buffers; a plain step right after a probe is equally slower).
    - ``<method>-unprobed``: a steady unprobed step, one preceded by an unprobed step.
    - ``<method>@every=k`` for each ``k`` in ``amortise`` (integers >= 2): the mean step time
      when probing every k-th step, ``(t_probe + t_after + (k - 2) t_steady) / k``, where
      ``t_probe`` is the ``<method>`` row, ``t_after`` the after-probe row and ``t_steady`` the
      unprobed row.

    With ``memory``, each method's row also gets ``peak_mib`` and ``memory``: the peak of live
    tensor bytes during a steady-state step, measured once after the timing in this process
    (:func:`gradlens.bench._memory.step_tensor_peak`; untimed).

    A profiled method is timed on the probe after ``warm_probes`` untimed ones of its profiler
    (made fresh at each repeat): the engines reach their steady state over their first probes
    (ResNet T = 3, batch 4: ``batched`` 13.5 ms at its first and second probes, 12.2 ms from its
    fifth; ``loop`` steady from its second), so timing all at the same depth compares like with
    like. ``auto`` makes a fresh choice at each repeat (its first probes time its candidates) and
    is timed on the probe after ``warm_probes`` more untimed ones of the engine it chose
    (:meth:`gradlens.bench._setup._Setup.warm`): the same distance from its profiler's creation,
    and from the memory the losing candidates freed, as an engine's timed probe from its own
    profiler's creation (the MLP 1M at T = 8, batch 4: ``auto``'s first, second and fifth probes
    after its choice 1.13x, 1.04x and 1.00x ``gramian``'s fifth, ``benchmarks/auto_position.py``);
    its row also holds what it chose (``chose``) and its time against each exact engine timed in
    the run (``vs_engines``, ratios of medians; ``paired_vs_engines``, medians of the ratios
    within a repeat) and against the fastest of them (``vs_best_engine``,
    ``paired_vs_best_engine``).

    The unprobed steps are timed on a profiler made fresh for each timing with
    ``every=10**9``, so it probes its step 0 only: step 1 is the after-probe step, step 2 a
    steady one.

    ``clock="cpu"`` times the CPU time of the calling thread (``time.thread_time``) with torch
    on one thread: robust to other processes sharing the machine, and the work each method does;
    ``clock="wall"`` (default) is elapsed time with torch's own threading. ``device`` is "cpu",
    "cuda" or "cuda:N"; on CUDA only the wall clock is meaningful (the CPU time of the launching
    thread misses the kernels), and each timed step starts and ends with
    ``torch.cuda.synchronize()``.

    ``size`` sets the dimensions of the Hugging Face trunks (:data:`gradlens.bench._zoo.SIZES`:
    "small", the tiny configurations, or "base", a modest realistic size); the benchmark's own
    models are sized by their names. Each row records it (``"size"``).
    """
    from gradlens.bench._zoo import check_size

    check_size(size)
    if clock not in ("wall", "cpu"):
        raise GradlensError(f"`clock` should be 'wall' or 'cpu'; found {clock!r}.")
    dev = _parse_device(device)
    if clock == "cpu" and dev.type == "cuda":
        raise GradlensError(
            f"`clock` should be 'wall' when `device` is a CUDA device (the CPU time of the "
            f"launching thread does not include the GPU's work); found clock='cpu' with "
            f"device={device!r}."
        )
    dev = _check_device(dev, device)
    if isinstance(warm_probes, bool) or not isinstance(warm_probes, int) or warm_probes < 1:
        raise GradlensError(
            f"`warm_probes` should be an integer >= 1 (a profiler's first probe allocates its "
            f"buffers); found {warm_probes!r}."
        )
    bad = [k for k in amortise if isinstance(k, bool) or not isinstance(k, int) or k < 2]
    if bad:
        raise GradlensError(
            f"`amortise` should hold integers k >= 2 (probe every k-th step; k=1 is the probed "
            f"row itself); found {list(amortise)!r}."
        )
    now = _clock(clock, dev)
    if clock == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _run(
                models, tasks, methods, batch, repeats, warmup, amortise, now, dev, progress,
                memory, warm_probes, size,
            )  # fmt: skip
        finally:
            torch.set_num_threads(threads)
    return _run(
        models, tasks, methods, batch, repeats, warmup, amortise, now, dev, progress, memory,
        warm_probes, size,
    )  # fmt: skip


def _amortised(t_probe: float, t_after: float, t_steady: float, k: int) -> float:
    """Mean step time when probing every ``k``-th step (k >= 2): one probed step, one step right
    after it, ``k - 2`` steady unprobed steps."""
    return (t_probe + t_after + (k - 2) * t_steady) / k


def _run(
    models: Sequence[str],
    tasks: Sequence[int],
    methods: Sequence[str],
    batch: int,
    repeats: int,
    warmup: int,
    amortise: Sequence[int],
    now: Callable[[], float],
    device: torch.device,
    progress: Callable[[str], None] | None,
    memory: bool = False,
    warm_probes: int = 4,
    size: str = "small",
) -> list[dict[str, Any]]:
    methods = _available(methods)
    # timed unprobed steps: name -> (method, untimed steps of a fresh every=_ONCE profiler before
    # the timed one): 1 = the probe (so the timed step comes right after it), 2 = probe + one
    # unprobed step (so the timed step is a steady one)
    unprobed: dict[str, tuple[str, int]] = {}
    if amortise:
        for m in AMORTISED:
            if m in methods:
                unprobed[f"{m}-after-probe"] = (m, 1)
                unprobed[f"{m}-unprobed"] = (m, 2)
    rows: list[dict[str, Any]] = []
    for model in models:
        for T in tasks:
            setup = _Setup(model, T, batch, device=device, size=size)
            times, chosen = _time_methods(
                setup, methods, unprobed, warmup, repeats, now, warm_probes
            )
            peaks = {m: step_tensor_peak(setup, m) for m in methods} if memory else {}
            setup.close()
            med = {m: statistics.median(v) for m, v in times.items()}
            common = {
                "model": model,
                "params": setup.n_params,
                "tasks": T,
                "batch": batch,
                "size": size,
                "device": str(device),
            }
            new = _rows(common, methods, times, med, chosen, amortise)
            for r in new:
                r.update(peaks.get(r["method"], {}))
            rows += new
            if progress is not None:
                base = med.get("plain", float("nan"))
                progress(
                    f"{model} T={T}: " + ", ".join(f"{m} {med[m] / base:.2f}x" for m in methods)
                )
    return rows


def _time_methods(
    setup: _Setup,
    methods: Sequence[str],
    unprobed: dict[str, tuple[str, int]],
    warmup: int,
    repeats: int,
    now: Callable[[], float],
    warm_probes: int = 4,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Each repeat times every method once, in a rotating order; the first ``warmup`` repeats
    are dropped. Returns the times per method and what ``auto`` chose (a fresh choice each)."""
    order = [*methods, *unprobed]
    times: dict[str, list[float]] = {m: [] for m in order}
    chosen: dict[str, int] = {}
    for r in range(warmup + repeats):
        rot = order[r % len(order) :] + order[: r % len(order)]
        for name in rot:
            if name in unprobed:
                m, before = unprobed[name]
                setup.prepare(m, every=_ONCE, fresh=True)
                for _ in range(before):
                    setup.step(m, every=_ONCE)
                t0 = now()
                setup.step(m, every=_ONCE)
            else:
                if setup.prepare(name):
                    # a profiler's first probes allocate its buffers and warm the engine up:
                    # time the one after warm_probes (with every=1 a probe too), the steady state
                    # of a training run; auto: warm_probes after its choice is made (its first
                    # probes after it pay for the page faults of memory the losing candidates
                    # freed: ResNet T = 8, 3,400 faults, +6 ms; the MLP T = 8 6.6 against 5.7 ms)
                    setup.warm(name, warm_probes)
                if name == "auto" and r >= warmup:
                    chosen[setup.chosen()] = chosen.get(setup.chosen(), 0) + 1
                t0 = now()
                setup.step(name)
            dt = now() - t0
            if r >= warmup:
                times[name].append(dt)
    return times, chosen


def _rows(
    common: dict[str, Any],
    methods: Sequence[str],
    times: dict[str, list[float]],
    med: dict[str, float],
    chosen: dict[str, int],
    amortise: Sequence[int],
) -> list[dict[str, Any]]:
    """The rows of one (model, T): each method's, then the amortised ones."""
    base = med.get("plain", float("nan"))
    loop = med.get("loop-libmtl", float("nan"))
    rows = []
    for m in methods:
        rows.append(_row(common, m, med[m], base, loop))
        if m == "auto":  # what auto chose, over the repeats (a fresh choice each)
            rows[-1]["chose"] = dict(sorted(chosen.items()))
            rows[-1].update(_against_engines(times, med))
    for m in AMORTISED:
        if f"{m}-unprobed" not in med:
            continue
        t_after, t_steady = med[f"{m}-after-probe"], med[f"{m}-unprobed"]
        rows.append(_row(common, f"{m}-after-probe", t_after, base, loop))
        rows.append(_row(common, f"{m}-unprobed", t_steady, base, loop))
        for k in amortise:
            t = _amortised(med[m], t_after, t_steady, k)
            rows.append(_row(common, f"{m}@every={k}", t, base, loop))
    return rows


def _against_engines(times: dict[str, list[float]], med: dict[str, float]) -> dict[str, Any]:
    """``auto``'s time against each exact engine timed in the run (and the LibMTL-style loop):
    ratios of the medians
    (``vs_engines``; ``vs_best_engine`` for the engine with the lowest median), and the medians
    of the ratios within each repeat (``paired_vs_engines``, ``paired_vs_best_engine``), where
    the two steps ran seconds apart, so the machine's slower spells cancel."""
    engines = [e for e in EXACT if e in med]
    if "auto" not in med or not engines:
        return {}
    best = min(engines, key=med.__getitem__)
    # the LibMTL-style loop too, when timed: the baseline auto should never be slower than
    others = [*engines, *(["loop-libmtl"] if "loop-libmtl" in med else [])]
    paired = {
        e: statistics.median(a / t for a, t in zip(times["auto"], times[e])) for e in others
    }
    return {
        "vs_engines": {e: med["auto"] / med[e] for e in others},
        "vs_best_engine": med["auto"] / med[best],
        "paired_vs_engines": paired,
        "paired_vs_best_engine": paired[best],
    }


def _row(common: dict[str, Any], method: str, t: float, base: float, loop: float) -> dict[str, Any]:
    return {**common, "method": method, "seconds": t, "vs_plain": t / base, "vs_loop": t / loop}


def format_table(rows: Sequence[dict[str, Any]], key: str = "vs_plain") -> str:
    """A fixed-width table: one line per (model, T), one column per method: the ratio to plain,
    or with ``key="peak_mib"`` the peak tensor memory (rows measured with ``memory=True``)."""
    if key == "peak_mib":
        rows = [r for r in rows if "peak_mib" in r]
    if not rows:
        return ""
    methods: list[str] = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    keys: list[tuple[str, int]] = []
    for r in rows:
        if (r["model"], r["tasks"]) not in keys:
            keys.append((r["model"], r["tasks"]))
    mem = key == "peak_mib"
    head = f"{'model':<12}{'params':>10}{'T':>4}{'plain MiB' if mem else 'plain ms':>10}" + "".join(
        f"{m:>{max(10, len(m) + 2)}}" for m in methods if m != "plain"
    )
    lines = [head, "-" * len(head)]
    for model, T in keys:
        sel = {r["method"]: r for r in rows if r["model"] == model and r["tasks"] == T}
        plain = sel.get("plain")
        line = f"{model:<12}{next(iter(sel.values()))['params']:>10,}{T:>4}"
        if plain is None:
            line += f"{'-':>10}"
        else:
            line += f"{plain['peak_mib'] if mem else plain['seconds'] * 1e3:>10.1f}"
        for m in methods:
            if m == "plain":
                continue
            width = max(10, len(m) + 2)
            if m not in sel:
                line += f"{'-':>{width}}"
            elif mem:
                line += f"{sel[m]['peak_mib']:>{width - 3}.1f}MiB"
            else:
                line += f"{sel[m]['vs_plain']:>{width - 1}.2f}x"
        lines.append(line)
    return "\n".join(lines)
