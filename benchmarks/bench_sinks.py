"""What the dashboard sinks cost the training loop: wall time of a profiled loop (probe every step,
4 tasks, an MLP trunk of 0.2M parameters, torch on one thread) with no sink, with each of the
W&B (offline), MLflow (local file store) and TensorBoard sinks, as ratios to the loop without a
sink, in one process, configurations interleaved over rounds (median reported). ``close()`` (the
drain of what is still queued, and the library's own shutdown) is timed apart.

Usage: ``python benchmarks/bench_sinks.py [--steps 200] [--rounds 3] [--image-every 10]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch
from torch import nn

import gradlens as gl

TASKS = ["a", "b", "c", "d"]


def _sink(kind: str, root: str, image_every: int) -> Any:
    if kind == "wandb":
        import wandb

        from gradlens.sinks import WandbSink

        init = {
            "mode": "offline",
            "dir": root,
            "project": "bench",
            "settings": wandb.Settings(silent=True, console="off", x_disable_stats=True),
        }
        return WandbSink(init=init, image_every=image_every)
    if kind == "mlflow":
        from gradlens.sinks import MLflowSink

        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        return MLflowSink(tracking_uri="file://" + root, image_every=image_every)
    if kind == "tensorboard":
        from gradlens.sinks import TensorBoardSink

        return TensorBoardSink(root)
    return None


def _loop(steps: int, sink: Any) -> tuple[float, float, float, float]:
    """Seconds of the loop: wall, CPU of the training thread, CPU of the process (the sink's
    worker included, until close() returns); and wall seconds of close()."""
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128)
    )
    heads = nn.ModuleList([nn.Linear(128, 1) for _ in TASKS])
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.01)
    xs = [torch.randn(128, 64) for _ in range(8)]
    prof = gl.Profiler(trunk, TASKS, engine="gramian", every=1, sinks=[sink] if sink else [])
    t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
    for step in range(steps):
        x = xs[step % len(xs)]
        z = trunk(x)
        losses = {
            t: (h(z).squeeze(1) - x[:, k]).pow(2).mean()
            for k, (t, h) in enumerate(zip(TASKS, heads))
        }
        opt.zero_grad()
        prof.backward(losses)
        opt.step()
    t1, c1 = time.perf_counter(), time.thread_time()
    prof.close()
    return t1 - t0, c1 - c0, time.process_time() - p0, time.perf_counter() - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--image-every", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    kinds = ["none", "wandb", "mlflow", "tensorboard"]
    loop: dict[str, list[float]] = {k: [] for k in kinds}
    thread: dict[str, list[float]] = {k: [] for k in kinds}
    proc: dict[str, list[float]] = {k: [] for k in kinds}
    close: dict[str, list[float]] = {k: [] for k in kinds}
    dropped: dict[str, tuple[int, int]] = {}
    _loop(20, None)  # warm-up
    for _ in range(args.rounds):
        for kind in kinds:
            with tempfile.TemporaryDirectory() as root:
                sink = _sink(kind, root, args.image_every)
                a, b, c, d = _loop(args.steps, sink)
                loop[kind].append(a)
                thread[kind].append(b)
                proc[kind].append(c)
                close[kind].append(d)
                if sink is not None and hasattr(sink, "dropped_images"):
                    dropped[kind] = (sink.dropped_scalars, sink.dropped_images)
    med = {
        name: {k: statistics.median(v) for k, v in d.items()}
        for name, d in (("loop", loop), ("thread", thread), ("proc", proc), ("close", close))
    }
    print(
        f"{args.steps} steps, probe every step, heatmap every {args.image_every} probes; "
        f"median of {args.rounds} rounds; ratios to the loop without a sink"
    )
    print(
        "| sink | wall s (ratio) | training-thread CPU s (ratio) | process CPU s (ratio) "
        "| close() wall s | dropped scalars, images |"
    )
    print("|---|---:|---:|---:|---:|---|")

    def fmt(what: str, kind: str) -> str:
        return f"{med[what][kind]:.2f} ({med[what][kind] / med[what]['none']:.2f})"

    for kind in kinds:
        print(
            f"| {kind} | {fmt('loop', kind)} | {fmt('thread', kind)} | {fmt('proc', kind)} | "
            f"{med['close'][kind]:.2f} | {dropped.get(kind, '')} |"
        )


if __name__ == "__main__":
    main()
