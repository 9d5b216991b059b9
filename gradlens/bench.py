"""Benchmark of the engines against a plain scalarized step and the per-task loop.

Everything is measured in one process, interleaved (each repeat times every method once, in a
rotating order), and reported as ratios of medians to the plain step ``(sum_t w_t L_t).backward()``
on the same model and batch. Peers: a LibMTL-style per-task loop (T ``autograd.grad`` calls,
flatten, Gram, weighted gradient written back) and, when ``torchjd`` is installed, TorchJD's
Gramian engine (``torchjd.autogram.Engine.compute_gramian`` then the weighted backward, as its
documentation shows). Peak memory is measured in a fresh process per method (``--memory``).

Example:
    >>> from gradlens.bench import run_benchmark
    >>> rows = run_benchmark(models=["mlp-tiny"], tasks=[2], methods=["plain", "gramian"],
    ...                      repeats=2, batch=16, amortise=())
    >>> sorted({r["method"] for r in rows})
    ['gramian', 'plain']
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from gradlens._errors import GradlensError
from gradlens.profiler import Profiler

__all__ = ["METHODS", "MODELS", "format_table", "run_benchmark"]

#: model name -> (trunk factory, input shape, feature dim)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {}


def _mlp(d_in: int, hidden: int, depth: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        return nn.Sequential(*layers)

    return make


def _cnn(width: int, blocks: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        layers: list[nn.Module] = [
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        c = width
        for i in range(blocks):
            c2 = c * 2 if i % 2 == 1 else c
            stride = 2 if i % 2 == 1 else 1
            layers += [nn.Conv2d(c, c2, 3, padding=1, stride=stride), nn.BatchNorm2d(c2), nn.ReLU()]
            c = c2
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 256), nn.ReLU()]
        return nn.Sequential(*layers)

    return make


class _Transformer(nn.Module):
    def __init__(self, d: int, layers: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Linear(16, d)
        self.blocks = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(
                d, 4, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            ),
            layers,
            enable_nested_tensor=False,
        )
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x))).mean(1)


MODELS.update(
    {
        "mlp-tiny": (_mlp(32, 64, 2), (32,), 64),
        "mlp-1m": (_mlp(512, 640, 3), (512,), 640),
        "mlp-10m": (_mlp(1024, 1536, 5), (1024,), 1536),
        "cnn-1m": (_cnn(48, 4), (3, 32, 32), 256),
        "cnn-10m": (_cnn(128, 5), (3, 32, 32), 256),
        "transformer": (lambda: _Transformer(192, 2, 32), (32, 16), 192),
    }
)

METHODS = ("plain", "loop-libmtl", "torchjd", "loop", "batched", "gramian", "features")


class _Setup:
    """Model, heads, batch and a step function per method."""

    def __init__(self, model: str, n_tasks: int, batch: int, seed: int = 0) -> None:
        if model not in MODELS:
            raise GradlensError(f"`model` should be one of {sorted(MODELS)}; found {model!r}.")
        torch.manual_seed(seed)
        make, shape, d = MODELS[model]
        self.trunk = make()
        self.heads = nn.ModuleList([nn.Linear(d, 10) for _ in range(n_tasks)])
        self.x = torch.randn(batch, *shape)
        self.y = torch.randint(0, 10, (n_tasks, batch))
        self.tasks = [f"t{i}" for i in range(n_tasks)]
        self.w = {t: 1.0 / n_tasks for t in self.tasks}
        self.wt = torch.full((n_tasks,), 1.0 / n_tasks)
        self.n_params = sum(p.numel() for p in self.trunk.parameters())
        self._profilers: dict[tuple[str, int], Profiler] = {}
        self._torchjd: Any = None

    def losses(
        self, trunk: nn.Module | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        z = (trunk or self.trunk)(self.x)
        return {
            t: F.cross_entropy(h(z), self.y[i])
            for i, (t, h) in enumerate(zip(self.tasks, self.heads))
        }, z

    def zero(self) -> None:
        for p in [*self.trunk.parameters(), *self.heads.parameters()]:
            p.grad = None

    def prepare(self, method: str, every: int = 1) -> None:
        """Attach the profiler ``method`` needs (and only it), before the timed forward.

        A profiler is created fresh when the method changes, so its step counter starts at 0
        (probed); no hooks of another method stay on the model while a method is timed.
        """
        key = (method, every) if method not in ("plain", "loop-libmtl", "torchjd") else None
        if key is None or key not in self._profilers:
            self.close()
            if key is not None:
                self._profilers[key] = Profiler(self.trunk, self.tasks, engine=method, every=every)

    def step(self, method: str, every: int = 1) -> None:
        """One training step of ``method`` (call :meth:`prepare` first)."""
        self.zero()
        if method == "torchjd":
            self._torchjd_step()
            return
        losses, z = self.losses()
        if method == "plain":
            sum(self.w[t] * v for t, v in losses.items()).backward()
        elif method == "loop-libmtl":
            self._libmtl(losses)
        else:
            prof = self._profilers[(method, every)]
            prof.backward(losses, self.w, features=z if method == "features" else None)

    def _libmtl(self, losses: dict[str, torch.Tensor]) -> None:
        # LibMTL's pattern: T autograd.grad calls on the shared parameters, flatten, stack
        params = list(self.trunk.parameters())
        rows = []
        for v in losses.values():
            gs = torch.autograd.grad(v, params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in gs]))
        J = torch.stack(rows)
        _ = (J @ J.T).double()
        flat = self.wt @ J
        k = 0
        for p in params:
            p.grad = flat[k : k + p.numel()].view_as(p).clone()
            k += p.numel()
        L = torch.stack(list(losses.values()))
        torch.autograd.backward(self.wt @ L, inputs=list(self.heads.parameters()))

    def _torchjd_step(self) -> None:
        if self._torchjd is None:
            # its hooks stay on the modules it is given: use a copy so other methods don't pay
            from torchjd.autogram import Engine

            self._jd_trunk = copy.deepcopy(self.trunk)
            self._torchjd = Engine(self._jd_trunk, batch_dim=None)
        for p in self._jd_trunk.parameters():
            p.grad = None
        losses, _ = self.losses(self._jd_trunk)
        L = torch.stack(list(losses.values()))
        _ = self._torchjd.compute_gramian(L)
        L.backward(self.wt)

    def close(self) -> None:
        for p in self._profilers.values():
            p.close()
        self._profilers = {}


def _available(methods: Sequence[str]) -> list[str]:
    out = []
    for m in methods:
        if m not in METHODS:
            raise GradlensError(f"`methods` should be among {list(METHODS)}; found {m!r}.")
        if m == "torchjd" and importlib.util.find_spec("torchjd") is None:
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
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time one training step per method, interleaved, as ratios to the plain step.

    Returns one row per (model, T, method): median seconds per step, ratio to plain, ratio to the
    LibMTL-style loop; plus, for ``gramian`` and each ``k`` in ``amortise``, a row
    ``gramian@every=k`` whose time is ``(t_probe + (k - 1) t_unprobed) / k`` from the measured
    probed and unprobed step times of the same run.

    ``clock="cpu"`` times the CPU time of the calling thread (``time.thread_time``) with torch
    on one thread: robust to other processes sharing the machine, and the work each method does;
    ``clock="wall"`` (default) is elapsed time with torch's own threading.
    """
    if clock not in ("wall", "cpu"):
        raise GradlensError(f"`clock` should be 'wall' or 'cpu'; found {clock!r}.")
    if clock == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _run(
                models, tasks, methods, batch, repeats, warmup, amortise, time.thread_time, progress
            )
        finally:
            torch.set_num_threads(threads)
    return _run(
        models, tasks, methods, batch, repeats, warmup, amortise, time.perf_counter, progress
    )


def _run(
    models: Sequence[str],
    tasks: Sequence[int],
    methods: Sequence[str],
    batch: int,
    repeats: int,
    warmup: int,
    amortise: Sequence[int],
    now: Callable[[], float],
    progress: Callable[[str], None] | None,
) -> list[dict[str, Any]]:
    methods = _available(methods)
    rows: list[dict[str, Any]] = []
    for model in models:
        for T in tasks:
            setup = _Setup(model, T, batch)
            times: dict[str, list[float]] = {m: [] for m in methods}
            unprobed: list[float] = []
            extra = ["gramian-unprobed"] if "gramian" in methods and amortise else []
            order = methods + extra
            for r in range(warmup + repeats):
                rot = order[r % len(order) :] + order[: r % len(order)]
                for m in rot:
                    if m == "gramian-unprobed":
                        # a fresh profiler probes its step 0 only (Every(10**9)): time step 1
                        setup.prepare("gramian", every=10**9)
                        setup.step("gramian", every=10**9)
                        t0 = now()
                        setup.step("gramian", every=10**9)
                    else:
                        setup.prepare(m)
                        t0 = now()
                        setup.step(m)
                    dt = now() - t0
                    if r >= warmup:
                        (unprobed if m == "gramian-unprobed" else times[m]).append(dt)
            setup.close()
            med = {m: statistics.median(v) for m, v in times.items()}
            base = med.get("plain", float("nan"))
            loop = med.get("loop-libmtl", float("nan"))
            for m in methods:
                rows.append(_row(model, T, batch, setup.n_params, m, med[m], base, loop))
            if unprobed and "gramian" in med:
                tu = statistics.median(unprobed)
                rows.append(
                    _row(model, T, batch, setup.n_params, "gramian-unprobed", tu, base, loop)
                )
                for k in amortise:
                    t = (med["gramian"] + (k - 1) * tu) / k
                    rows.append(
                        _row(model, T, batch, setup.n_params, f"gramian@every={k}", t, base, loop)
                    )
            if progress is not None:
                progress(
                    f"{model} T={T}: " + ", ".join(f"{m} {med[m] / base:.2f}x" for m in methods)
                )
    return rows


def _row(
    model: str, T: int, batch: int, n: int, method: str, t: float, base: float, loop: float
) -> dict[str, Any]:
    return {
        "model": model,
        "params": n,
        "tasks": T,
        "batch": batch,
        "method": method,
        "seconds": t,
        "vs_plain": t / base,
        "vs_loop": t / loop,
    }


def measure_peak_memory(model: str, n_tasks: int, method: str, batch: int = 128) -> dict[str, Any]:
    """Peak resident-memory growth (MiB) over three steps of ``method``, in a fresh interpreter
    (Linux: sampled from ``/proc/self/statm``)."""
    code = (
        "import json, sys; from gradlens.bench import _child_memory; "
        f"print(json.dumps(_child_memory({model!r}, {n_tasks}, {method!r}, {batch})))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        raise GradlensError(f"memory measurement of {method!r} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child_memory(model: str, n_tasks: int, method: str, batch: int) -> dict[str, Any]:
    """Peak resident memory above the level before the first step, sampled every millisecond.

    (``ru_maxrss`` is a high-water mark over the whole process, set by imports and set-up as
    well, so it can hide a step's peak; sampling the current RSS cannot.)
    """
    import threading

    setup = _Setup(model, n_tasks, batch)
    setup.prepare(method)
    with torch.no_grad():
        setup.trunk(setup.x)  # allocate the forward's own buffers once
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(3):
        setup.step(method)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    return {
        "model": model,
        "tasks": n_tasks,
        "method": method,
        "batch": batch,
        "peak_mib": (peak[0] - base) / 2**20,
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table: one line per (model, T), one column per method (ratio to plain)."""
    methods: list[str] = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    keys: list[tuple[str, int]] = []
    for r in rows:
        if (r["model"], r["tasks"]) not in keys:
            keys.append((r["model"], r["tasks"]))
    head = f"{'model':<12}{'params':>10}{'T':>4}{'plain ms':>10}" + "".join(
        f"{m:>{max(10, len(m) + 2)}}" for m in methods if m != "plain"
    )
    lines = [head, "-" * len(head)]
    for model, T in keys:
        sel = {r["method"]: r for r in rows if r["model"] == model and r["tasks"] == T}
        plain = sel.get("plain")
        line = f"{model:<12}{next(iter(sel.values()))['params']:>10,}{T:>4}"
        line += f"{plain['seconds'] * 1e3:>10.1f}" if plain else f"{'-':>10}"
        for m in methods:
            if m == "plain":
                continue
            width = max(10, len(m) + 2)
            line += f"{sel[m]['vs_plain']:>{width - 1}.2f}x" if m in sel else f"{'-':>{width}}"
        lines.append(line)
    return "\n".join(lines)
