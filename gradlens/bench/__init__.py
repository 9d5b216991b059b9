"""Benchmark of the engines against a plain scalarized step and the per-task loop.

Everything is measured in one process, interleaved (each repeat times every method once, in a
rotating order), and reported as ratios of medians to the plain step ``(w @ stack(L)).backward()``
on the same model and batch. A profiled method is timed on its profiler's second probe (the first
allocates the engine's buffers), as in a training run. Peers: a LibMTL-style per-task loop
(T ``autograd.grad`` calls, flatten, Gram, weighted gradient written back) and, when
``torchjd`` is installed, TorchJD's Gramian engine (``torchjd.autogram.Engine.compute_gramian``
then the weighted backward, as its documentation shows). Peak memory is measured in a fresh
process per method (``--memory``): resident-memory growth on CPU,
``torch.cuda.max_memory_allocated`` growth on a CUDA device.

Everything runs on one ``device`` ("cpu", "cuda" or "cuda:N"); on CUDA each timed step is
bracketed by ``torch.cuda.synchronize()``, so the clock reads when the device has finished.

Example:
    >>> from gradlens.bench import run_benchmark
    >>> rows = run_benchmark(models=["mlp-tiny"], tasks=[2], methods=["plain", "gramian"],
    ...                      repeats=2, batch=16, amortise=())
    >>> sorted({r["method"] for r in rows})
    ['gramian', 'plain']
    >>> rows[0]["device"]
    'cpu'
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import platform
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
from gradlens.bench._weightings import WEIGHTED_METHODS, weighted_step
from gradlens.engines._base import quiet_vmap as _quiet_vmap
from gradlens.profiler import Profiler

__all__ = [
    "AMORTISED",
    "METHODS",
    "MODELS",
    "WEIGHTED_METHODS",
    "ZOO_MODELS",
    "format_table",
    "hardware_info",
    "measure_peak_memory",
    "run_benchmark",
]

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

METHODS = ("plain", "loop-libmtl", "torchjd", "loop", "batched", "gramian", "auto", "features")

#: ``gradlens bench --zoo``: Hugging Face trunks (see :mod:`gradlens.bench._zoo`) and two of ours
ZOO_MODELS = (
    "bert", "gpt2", "t5-encoder", "vit", "resnet", "convnext", "mobilenetv2", "mlp-1m", "cnn-1m"
)

#: methods that get amortised rows (``method@every=k``) when ``amortise`` is not empty
AMORTISED = ("gramian", "features")

# A profiler built with ``every=_ONCE`` probes its step 0 only: the unprobed timings use it.
_ONCE = 10**9


def _parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` of type cpu or cuda (not yet checked to exist)."""
    expected = "`device` should be 'cpu', 'cuda' or 'cuda:N'"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise GradlensError(f"{expected}; found {device!r}.") from exc
    if dev.type not in ("cpu", "cuda"):
        raise GradlensError(f"{expected}; found {device!r} (device type {dev.type!r}).")
    return dev


def _check_device(dev: torch.device, given: object) -> torch.device:
    """``dev`` if this machine has it, with a CUDA index made explicit; else a GradlensError."""
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GradlensError(
            f"`device` should be 'cpu' on this machine (torch.cuda.is_available() is False, "
            f"torch {torch.__version__}); found {given!r}."
        )
    n = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= n:
        raise GradlensError(
            f"`device` should be 'cpu' or one of cuda:0..cuda:{n - 1} on this machine; "
            f"found {given!r}."
        )
    return torch.device("cuda", index)


def _device(device: str | torch.device) -> torch.device:
    return _check_device(_parse_device(device), device)


def _clock(clock: str, device: torch.device) -> Callable[[], float]:
    """The clock of ``clock`` ('wall' or 'cpu'); on CUDA it synchronizes before each read, so a
    step's end is read once its kernels have run, and its start once the previous work has."""
    if clock == "cpu":
        return time.thread_time
    if device.type == "cuda":

        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return now
    return time.perf_counter


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware_info(device: str | torch.device = "cpu", clock: str = "wall") -> dict[str, Any]:
    """What the benchmark ran on: the device, its name and torch's version (on CPU, also the
    number of torch threads the timing used: 1 under ``clock="cpu"``).

    Example:
        >>> info = hardware_info("cpu")
        >>> info["device"], info["torch_threads"] >= 1, bool(info["name"])
        ('cpu', True, True)
    """
    dev = _device(device)
    info: dict[str, Any] = {"device": str(dev), "torch": torch.__version__}
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    else:
        info["name"] = _cpu_name()
        info["torch_threads"] = 1 if clock == "cpu" else torch.get_num_threads()
    return info


class _Setup:
    """Model, heads, batch and a step function per method."""

    def __init__(
        self,
        model: str,
        n_tasks: int,
        batch: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        from gradlens.bench._zoo import ZOO, build_zoo

        if model not in MODELS and model not in ZOO:
            raise GradlensError(
                f"`model` should be one of {sorted(MODELS) + sorted(ZOO)}; found {model!r}."
            )
        self.device = torch.device(device)
        torch.manual_seed(seed)  # built on CPU, then moved: the same model and batch everywhere
        if model in ZOO:
            trunk, make_x = build_zoo(model)
            x = make_x(batch)
            with torch.no_grad():
                d = trunk(x).shape[1]
        else:
            make, shape, d = MODELS[model]
            trunk, x = make(), torch.randn(batch, *shape)
        self.trunk = trunk.to(self.device)
        self.heads = nn.ModuleList([nn.Linear(d, 10) for _ in range(n_tasks)]).to(self.device)
        self.x = x.to(self.device)
        self.y = torch.randint(0, 10, (n_tasks, batch)).to(self.device)
        self.tasks = [f"t{i}" for i in range(n_tasks)]
        self.w = {t: 1.0 / n_tasks for t in self.tasks}
        self.wt = torch.full((n_tasks,), 1.0 / n_tasks, device=self.device)
        self.n_params = sum(p.numel() for p in self.trunk.parameters())
        self._profilers: dict[tuple[str, int], Profiler] = {}
        self._torchjd: Any = None
        self._weightings: dict[str, Any] = {}

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

    def prepare(self, method: str, every: int = 1, fresh: bool = False) -> bool:
        """Attach the profiler ``method`` needs (and only it), before the timed forward.

        A profiler is created fresh when the method changes (or ``fresh`` is set), so its step
        counter starts at 0 (probed); no hooks of another method stay on the model while a
        method is timed. TorchJD's engine (on its own copy of the trunk) is built here, so its
        set-up is neither timed nor counted in its peak memory. Returns whether a profiler was
        created.
        """
        path = method.partition("+")[0]  # "gramian+upgrad": a weighting on the gramian engine
        key = (method, every) if path not in ("plain", "loop-libmtl", "torchjd") else None
        created = False
        if key is None or fresh or key not in self._profilers:
            self.close()
            if key is not None:
                self._profilers[key] = Profiler(self.trunk, self.tasks, engine=path, every=every)
                created = True
        if path == "torchjd" and self._torchjd is None:
            # its hooks stay on the modules it is given: use a copy so other methods don't pay
            from torchjd.autogram import Engine

            self._jd_trunk = copy.deepcopy(self.trunk).to(self.device)
            self._torchjd = Engine(self._jd_trunk, batch_dim=None)
        return created

    def step(self, method: str, every: int = 1) -> None:
        """One training step of ``method`` (call :meth:`prepare` first)."""
        self.zero()
        if "+" in method:  # a multi-task optimization method (gradlens.bench._weightings)
            weighted_step(self, method, every)
            return
        if method == "torchjd":
            self._torchjd_step()
            return
        losses, z = self.losses()
        if method == "plain":
            # the scalarization as one product (the profiler's own form): a Python sum of T
            # products launches 2T small kernels, a cost the profiled steps would not pay
            (self.wt @ torch.stack(list(losses.values()))).backward()
        elif method == "loop-libmtl":
            self._libmtl(losses)
        else:
            prof = self._profilers[(method, every)]
            prof.backward(losses, self.w, features=z if method == "features" else None)

    def deciding(self) -> bool:
        """Whether the ``auto`` profiler is still timing candidates for this graph."""
        engine = self._profilers[("auto", 1)]._engine
        return not any(d.winner for d in engine.decisions.values())  # type: ignore[attr-defined]

    def chosen(self) -> str:
        """The engine the ``auto`` profiler chose."""
        return self._profilers[("auto", 1)]._engine.describe()  # type: ignore[attr-defined]

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
        for p in self._jd_trunk.parameters():
            p.grad = None
        losses, _ = self.losses(self._jd_trunk)
        L = torch.stack(list(losses.values()))
        with _quiet_vmap():  # its vmap's slow-path notices (e.g. SDPA backward on CPU)
            _ = self._torchjd.compute_gramian(L)
        L.backward(self.wt)

    def close(self) -> None:
        for p in self._profilers.values():
            p.close()
        self._profilers = {}


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

    The unprobed steps are timed on a profiler made fresh for each timing with
    ``every=10**9``, so it probes its step 0 only: step 1 is the after-probe step, step 2 a
    steady one.

    ``clock="cpu"`` times the CPU time of the calling thread (``time.thread_time``) with torch
    on one thread: robust to other processes sharing the machine, and the work each method does;
    ``clock="wall"`` (default) is elapsed time with torch's own threading. ``device`` is "cpu",
    "cuda" or "cuda:N"; on CUDA only the wall clock is meaningful (the CPU time of the launching
    thread misses the kernels), and each timed step starts and ends with
    ``torch.cuda.synchronize()``.
    """
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
                models, tasks, methods, batch, repeats, warmup, amortise, now, dev, progress
            )
        finally:
            torch.set_num_threads(threads)
    return _run(models, tasks, methods, batch, repeats, warmup, amortise, now, dev, progress)


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
    order = [*methods, *unprobed]
    rows: list[dict[str, Any]] = []
    for model in models:
        for T in tasks:
            setup = _Setup(model, T, batch, device=device)
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
                            # a profiler's first probe allocates its buffers: time the second
                            # (with every=1 a probe too), the steady state of a training run;
                            # auto: the first probe after its choice is made
                            setup.step(name)
                            while name == "auto" and setup.deciding():
                                setup.step(name)
                        if name == "auto":
                            chosen[setup.chosen()] = chosen.get(setup.chosen(), 0) + 1
                        t0 = now()
                        setup.step(name)
                    dt = now() - t0
                    if r >= warmup:
                        times[name].append(dt)
            setup.close()
            med = {m: statistics.median(v) for m, v in times.items()}
            base = med.get("plain", float("nan"))
            loop = med.get("loop-libmtl", float("nan"))
            common = {
                "model": model,
                "params": setup.n_params,
                "tasks": T,
                "batch": batch,
                "device": str(device),
            }
            for m in methods:
                rows.append(_row(common, m, med[m], base, loop))
                if m == "auto":  # what auto chose, over the repeats (a fresh choice each)
                    rows[-1]["chose"] = dict(sorted(chosen.items()))
            for m in AMORTISED:
                if f"{m}-unprobed" not in med:
                    continue
                t_after, t_steady = med[f"{m}-after-probe"], med[f"{m}-unprobed"]
                rows.append(_row(common, f"{m}-after-probe", t_after, base, loop))
                rows.append(_row(common, f"{m}-unprobed", t_steady, base, loop))
                for k in amortise:
                    t = _amortised(med[m], t_after, t_steady, k)
                    rows.append(_row(common, f"{m}@every={k}", t, base, loop))
            if progress is not None:
                progress(
                    f"{model} T={T}: " + ", ".join(f"{m} {med[m] / base:.2f}x" for m in methods)
                )
    return rows


def _row(common: dict[str, Any], method: str, t: float, base: float, loop: float) -> dict[str, Any]:
    return {**common, "method": method, "seconds": t, "vs_plain": t / base, "vs_loop": t / loop}


def measure_peak_memory(
    model: str,
    n_tasks: int,
    method: str,
    batch: int = 128,
    *,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Peak memory growth (MiB) over three steps of ``method``, in a fresh interpreter.

    On CPU it is the resident-memory growth (Linux: sampled from ``/proc/self/statm``; the row's
    ``"memory"`` is ``"rss"``), with glibc told to map every allocation above 128 KiB on its own
    (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set at once: by default
    glibc raises that threshold after the first large free and then keeps freed blocks, and the
    resident set measures the allocator's history rather than the tensors alive (measured on
    mlp-10m, T = 40: plain 84 -> 54 MiB, gramian 398 -> 209 MiB); on a CUDA device it is
    ``torch.cuda.max_memory_allocated`` above ``torch.cuda.memory_allocated`` before the first
    step (``"memory": "cuda_allocated"``: the tensors' bytes, not the caching allocator's reserve).

    Example:
        >>> row = measure_peak_memory("mlp-tiny", 2, "plain", batch=8)
        >>> row["memory"], row["device"], row["peak_mib"] >= 0
        ('rss', 'cpu', True)
    """
    dev = _device(device)
    code = (
        "import json, sys; from gradlens.bench import _child_memory; "
        f"print(json.dumps(_child_memory({model!r}, {n_tasks}, {method!r}, {batch}, "
        f"{str(dev)!r})))"
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "MALLOC_MMAP_THRESHOLD_": "131072",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        raise GradlensError(f"memory measurement of {method!r} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak(steps: Callable[[], None]) -> int:
    """Peak resident memory above the level before ``steps``, sampled every millisecond.

    (``ru_maxrss`` is a high-water mark over the whole process, set by imports and set-up as
    well, so it can hide a step's peak; sampling the current RSS cannot.)
    """
    import threading

    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        steps()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes()) - base


def _cuda_peak(steps: Callable[[], None], device: torch.device) -> int:
    """Peak allocated CUDA memory during ``steps`` above what was allocated before them."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    steps()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _child_memory(
    model: str, n_tasks: int, method: str, batch: int, device: str = "cpu"
) -> dict[str, Any]:
    """Peak memory growth over three steps of ``method``, in this (fresh) process."""
    dev = torch.device(device)
    setup = _Setup(model, n_tasks, batch, device=dev)
    setup.prepare(method)
    with torch.no_grad():
        # allocate the forward's own buffers once
        (setup._jd_trunk if method == "torchjd" else setup.trunk)(setup.x)

    def steps() -> None:
        for _ in range(3):
            setup.step(method)

    cuda = dev.type == "cuda"
    peak = _cuda_peak(steps, dev) if cuda else _rss_peak(steps)
    setup.close()
    return {
        "model": model,
        "tasks": n_tasks,
        "method": method,
        "batch": batch,
        "device": str(dev),
        "memory": "cuda_allocated" if cuda else "rss",
        "peak_mib": peak / 2**20,
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
