"""How much a freshly mapped buffer costs here: stack 40 rows of 0.75 MiB (31 MiB) into a new
buffer, then into a reused one. Run with ``MALLOC_MMAP_THRESHOLD_=131072`` to have glibc map every
large allocation afresh (as it does above 32 MiB whatever the setting), and without it to see its
default reuse. Usage: ``python benchmarks/page_faults.py``."""

from __future__ import annotations

import resource
import statistics
import time

import torch


def main() -> None:
    torch.set_num_threads(1)
    rows = [torch.randn(128, 1536) for _ in range(40)]
    fresh, faults = [], []
    for _ in range(5):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        torch.stack(rows)
        fresh.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    buf = torch.empty(40, 128, 1536)
    torch.stack(rows, out=buf)
    reused = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.stack(rows, out=buf)
        reused.append(time.perf_counter() - t0)
    f, n = statistics.median(fresh), statistics.median(faults)
    print(
        f"new buffer {f * 1e3:.1f} ms ({n:.0f} page faults, {f / max(n, 1) * 1e6:.1f} us each), "
        f"reused buffer {statistics.median(reused) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
