"""Per-probe cost of following the shared module's current parameters (issue 14).

At every probe the profiler checks whether a shared parameter was replaced since the last one
(``load_state_dict(..., assign=True)``, ``layer.weight = nn.Parameter(...)``): a fingerprint of
the probe's reached leaves (:meth:`gradlens.engines._shared.SharedParams.follow`), and a walk of
the module (:meth:`~gradlens.engines._shared.SharedParams.sync`) only when it changed. Prints,
per model and engine: the fingerprint's median time, the walk's (what checking every probe would
cost), and whole probes with the check and with it patched out, interleaved, as a ratio of
medians. CPU time of this thread, one torch thread. Models: the 16-layer width-64 MLP of
``host_time.py`` (batch 16) and a tiny Hugging Face BERT (2 layers, width 64, batch 4, 16
tokens) when transformers is installed.

    python benchmarks/shared_follow.py                 # T = 8
    python benchmarks/shared_follow.py --tasks 3 --repeats 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import gradlens as gl
from gradlens.engines import _shared
from gradlens.engines._graph import GraphIndex

Losses = Callable[[], dict[str, torch.Tensor]]


def median_us(f: Callable[[], object], n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.thread_time_ns()
        f()
        ts.append(time.thread_time_ns() - t0)
    return statistics.median(ts) / 1e3


def bench(name: str, trunk: nn.Module, tasks: list[str], losses: Losses, engine: str,
          repeats: int, calls: int) -> None:
    with gl.Profiler(trunk, tasks, engine=engine) as prof:
        for _ in range(3):
            prof.backward(losses())
        shared = prof._shared
        leaves = GraphIndex.build(torch.stack(list(losses().values()))).leaves
        follow = median_us(lambda: shared.follow(leaves), calls)
        walk = median_us(shared.sync, calls)
        real = _shared.SharedParams.follow
        on: list[float] = []
        off: list[float] = []
        try:
            for _ in range(repeats):
                for check in (True, False):
                    _shared.SharedParams.follow = real if check else (lambda self, lv: False)  # type: ignore[method-assign]  # the check patched out
                    ls = losses()
                    t0 = time.thread_time_ns()
                    prof.backward(ls)
                    (on if check else off).append((time.thread_time_ns() - t0) / 1e3)
        finally:
            _shared.SharedParams.follow = real  # type: ignore[method-assign]  # restored
    a, b = statistics.median(on), statistics.median(off)
    print(f"{name:24s} {engine:8s} leaves {len(leaves):3d}  fingerprint {follow:5.1f} us  "
          f"walk {walk:5.1f} us  probe {a:8.0f} us with the check, {b:8.0f} us without: "
          f"{a / b:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tasks = [f"t{i}" for i in range(args.tasks)]
    print(f"T = {args.tasks}, CPU, 1 thread, CPU time; load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(16):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    mlp = nn.Sequential(*layers)
    heads = nn.ModuleList([nn.Linear(64, 1) for _ in tasks])
    x = torch.randn(16, 64)

    def mlp_losses() -> dict[str, torch.Tensor]:
        z = mlp(x)
        return {t: h(z).pow(2).mean() for t, h in zip(tasks, heads)}

    for engine in ("gramian", "loop"):
        bench("MLP 16 x 64, batch 16", mlp, tasks, mlp_losses, engine, args.repeats, args.calls)
    try:
        import transformers as tf
    except ImportError:
        return
    cfg = tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, vocab_size=1000)
    bert = tf.BertModel(cfg)
    ids = torch.randint(0, 1000, (4, 16))

    def bert_losses() -> dict[str, torch.Tensor]:
        z = bert(input_ids=ids).last_hidden_state[:, 0]
        return {t: h(z).pow(2).mean() for t, h in zip(tasks, heads)}

    for engine in ("gramian", "loop"):
        bench("BERT 2 x 64, batch 4", bert, tasks, bert_losses, engine, args.repeats, args.calls)


if __name__ == "__main__":
    main()
