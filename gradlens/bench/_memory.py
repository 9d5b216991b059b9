"""Peak memory of a method's training steps, measured in a fresh interpreter."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from gradlens._errors import GradlensError
from gradlens.bench._hardware import _device
from gradlens.bench._setup import _Setup

__all__ = ["measure_peak_memory", "step_tensor_peak"]


def measure_peak_memory(
    model: str,
    n_tasks: int,
    method: str,
    batch: int = 128,
    *,
    device: str | torch.device = "cpu",
    size: str = "small",
) -> dict[str, Any]:
    """Peak memory growth (MiB) over three steps of ``method``, in a fresh interpreter
    (``size``: the zoo trunks' dimensions, as in :func:`gradlens.bench.run_benchmark`).

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
    from gradlens.bench._zoo import check_size

    check_size(size)
    dev = _device(device)
    code = (
        "import json, sys; from gradlens.bench._memory import _child_memory; "
        f"print(json.dumps(_child_memory({model!r}, {n_tasks}, {method!r}, {batch}, "
        f"{str(dev)!r}, {size!r})))"
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
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    model: str, n_tasks: int, method: str, batch: int, device: str = "cpu", size: str = "small"
) -> dict[str, Any]:
    """Peak memory growth over three steps of ``method``, in this (fresh) process."""
    dev = torch.device(device)
    setup = _Setup(model, n_tasks, batch, device=dev, size=size)
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
        "size": size,
        "device": str(dev),
        "memory": "cuda_allocated" if cuda else "rss",
        "peak_mib": peak / 2**20,
    }


#: The ``record_function`` label of the step whose peak :func:`step_tensor_peak` reports.
_MEASURED = "gradlens-bench-measured-step"


def step_tensor_peak(setup: _Setup, method: str) -> dict[str, Any]:
    """Peak bytes of tensors alive during a steady-state step of ``method``, in this process.

    The method starts afresh (a new profiler: its buffers are counted), with no ``.grad`` and
    with the model, heads and batch already in memory (the zero level); the steps before the
    measured one are those the timing runs first (one probe; ``auto``: until it has chosen).
    The peak is the highest level of live tensor bytes during the measured step, counting
    everything allocated since the zero level and still alive (buffers kept from one probe to
    the next, the last step's ``.grad``). On CPU the level is summed from the CPU allocator's
    allocation and free events (``torch.profiler`` with ``profile_memory=True``): the bytes of
    tensors, not the resident set (no allocator cache, no BLAS or oneDNN scratch, no Python
    objects); on CUDA it is ``torch.cuda.max_memory_allocated`` above the zero level. Returns
    ``{"peak_mib": ..., "memory": "cpu_tensors" | "cuda_allocated"}``.

    Example:
        >>> from gradlens.bench._setup import _Setup
        >>> setup = _Setup("mlp-tiny", 2, 8)
        >>> plain, loop = (step_tensor_peak(setup, m) for m in ("plain", "loop"))
        >>> plain["memory"], 0 < plain["peak_mib"] < loop["peak_mib"]
        ('cpu_tensors', True)
        >>> setup.close()
    """
    setup.prepare(method, fresh=True)
    setup.zero()
    if setup.device.type == "cuda":
        dev = setup.device
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        _warm(setup, method)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        setup.step(method)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        kind = "cuda_allocated"
    else:
        peak = _cpu_tensor_peak(setup, method)
        kind = "cpu_tensors"
    setup.close()
    return {"memory": kind, "peak_mib": peak / 2**20}


def _warm(setup: _Setup, method: str) -> None:
    """The steps before the measured one: one probe (``auto``: after its choice)."""
    setup.warm(method, 1)


@contextlib.contextmanager
def _kineto_quiet() -> Iterator[None]:
    """Kineto writes "profiler_start" / "profiler_stop" lines to file descriptor 2 from C++ at
    every profile (no setting silences them): descriptor 2 points at /dev/null while the profile
    starts and stops, and back, whatever happens (errors are raised, not printed, in between)."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _cpu_tensor_peak(setup: _Setup, method: str) -> int:
    """Live tensor bytes at their highest during the measured step, from the CPU allocator's
    events since the zero level (see :func:`step_tensor_peak`)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with _kineto_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _warm(setup, method)
        with record_function(_MEASURED):
            setup.step(method)
    events = list(prof.profiler.kineto_results.events())  # the allocator events, in order
    (step,) = [e for e in events if e.name() == _MEASURED]
    t0, t1 = step.start_ns(), step.start_ns() + step.duration_ns()
    level = peak = 0
    memory = sorted(
        ((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"),
        key=lambda e: e[0],
    )
    for t, nbytes in memory:
        if t > t1:
            break
        level += nbytes
        if t >= t0:
            peak = max(peak, level)
        else:
            peak = level  # the level the measured step starts from
    return peak
