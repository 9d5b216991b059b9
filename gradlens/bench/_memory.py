"""Peak memory of a method's training steps, measured in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from gradlens._errors import GradlensError
from gradlens.bench._hardware import _device
from gradlens.bench._setup import _Setup

__all__ = ["measure_peak_memory"]


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
        "import json, sys; from gradlens.bench._memory import _child_memory; "
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
