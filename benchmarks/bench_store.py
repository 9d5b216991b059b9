"""Benchmark of the run store: writing while training, size on disk, loading into pandas.

A training loop (an MLP of ``--layers`` Linear layers, forward + backward + SGD step per step) hands
one Snapshot per step (``--tasks`` tasks, one Gram per layer plus the total) to a
:class:`gradlens.store.RunWriter`. The Grams are cheap stand-ins (``A A^T`` of a random ``T x 16``
per layer) so that only the store is measured, not an engine. Reported: the share of the loop's
wall time spent in ``add_snapshot`` + ``close`` (buffering and the chunk flushes), the per-call
latency (median and worst: a flush), the size on disk, and the time to read the run back
(``load_run`` + ``.steps``, then ``.metrics``).

Run: ``python benchmarks/bench_store.py`` (defaults: 10,000 steps, T=8, 20 layers,
flush_every=100), ``--json out.json`` to save the numbers. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import gradlens
from gradlens import TOTAL_LAYER, Snapshot
from gradlens.store import RunWriter, load_run


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(
    steps: int, tasks: int, layers: int, flush_every: int, width: int, batch: int, out: Path
) -> dict[str, Any]:
    """Train ``steps`` steps while writing a run to ``out``; return the measurements."""
    torch.manual_seed(0)
    names = tuple(f"t{k}" for k in range(tasks))
    layer_names = [f"trunk.{k}" for k in range(layers)]
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, width)
    weights = torch.full((tasks,), 1.0 / tasks, dtype=torch.float64)
    meta = {"tasks": list(names), "engine": "bench", "layers": layer_names, "bench": True}

    writer = RunWriter(out, meta=meta, flush_every=flush_every)
    store_s = 0.0
    calls: list[float] = []
    t_loop = time.perf_counter()
    for step in tqdm(range(steps), desc="training + store", mininterval=1.0):
        # "training": one forward/backward/SGD step of the MLP
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        # stand-in Grams, one per layer (an engine's work, not the store's)
        a = torch.randn(layers, tasks, 16, dtype=torch.float64)
        per_layer = a @ a.transpose(1, 2)
        snap = Snapshot(
            step,
            names,
            per_layer.sum(0),
            dict(zip(layer_names, per_layer.unbind(0))),
            weights,
            losses=dict.fromkeys(names, loss.item()),
        )
        t0 = time.perf_counter()
        writer.add_snapshot(snap)
        dt = time.perf_counter() - t0
        calls.append(dt)
        store_s += dt
    t0 = time.perf_counter()
    writer.close()
    close_s = time.perf_counter() - t0
    store_s += close_s
    loop_s = time.perf_counter() - t_loop

    size = _dir_size(out)
    t0 = time.perf_counter()
    loaded = load_run(out)
    n_rows = len(loaded.steps)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_metric_rows = len(loaded.metrics)
    metrics_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded.grams(TOTAL_LAYER)
    grams_s = time.perf_counter() - t0
    calls.sort()
    return {
        "steps": steps,
        "tasks": tasks,
        "layers": layers,
        "flush_every": flush_every,
        "loop_s": loop_s,
        "store_s": store_s,
        "store_share": store_s / loop_s,
        "add_snapshot_median_us": statistics.median(calls) * 1e6,
        "add_snapshot_max_ms": calls[-1] * 1e3,
        "close_ms": close_s * 1e3,
        "size_mb": size / 2**20,
        "bytes_per_step": size / steps,
        "step_rows": n_rows,
        "load_steps_s": load_s,
        "metrics_s": metrics_s,
        "metric_rows": n_metric_rows,
        "grams_total_s": grams_s,
    }


def _table(r: dict[str, Any]) -> str:
    rows = [
        (
            "probed steps x tasks x layers (+ total)",
            f"{r['steps']:,} x {r['tasks']} x {r['layers']}",
        ),
        ("chunk size (flush_every)", f"{r['flush_every']} steps"),
        ("training loop wall time", f"{r['loop_s']:.1f} s"),
        ("time in the store (add_snapshot + close)", f"{r['store_s']:.2f} s"),
        ("store's share of the loop", f"{100 * r['store_share']:.1f} %"),
        ("store time per probed step (amortised)", f"{1e6 * r['store_s'] / r['steps']:.0f} us"),
        ("add_snapshot, median call (buffering)", f"{r['add_snapshot_median_us']:.0f} us"),
        ("add_snapshot, slowest call (a flush)", f"{r['add_snapshot_max_ms']:.1f} ms"),
        ("size on disk", f"{r['size_mb']:.1f} MiB ({r['bytes_per_step']:.0f} B/step)"),
        ("rows in run.steps", f"{r['step_rows']:,}"),
        ("load_run + .steps into pandas", f"{r['load_steps_s']:.2f} s"),
        (".metrics (derived, all layers)", f"{r['metrics_s']:.2f} s ({r['metric_rows']:,} rows)"),
        (".grams() of the total, (S, T, T)", f"{r['grams_total_s']:.2f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"| {'quantity':<{w}} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {k:<{w}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--flush-every", type=int, default=100)
    parser.add_argument("--width", type=int, default=64, help="MLP width of the training step")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the training step")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    base = args.dir or Path(tempfile.mkdtemp(prefix="gradlens-bench-store-"))
    out = base / "run"
    if out.exists():
        shutil.rmtree(out)
    try:
        result = run(
            args.steps, args.tasks, args.layers, args.flush_every, args.width, args.batch, out
        )
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            if args.dir is None:
                shutil.rmtree(base, ignore_errors=True)
    result["machine"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gradlens": gradlens.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_1min_before_after": [
            load_before,
            os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        ],
    }
    print(_table(result))
    m = result["machine"]
    print(
        f"\n{m['cpus']} CPUs, {m['threads']} torch threads, load average (1 min) "
        f"{m['load_average_1min_before_after'][0]:.1f} before, "
        f"{m['load_average_1min_before_after'][1]:.1f} after; torch {m['torch']}."
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
