"""Child process of the SIGKILL tests in test_store.py (not a test module).

``python tests/_store_child.py RUN_DIR FLUSH_EVERY`` trains a small two-task model under
``gradlens.Profiler(..., engine="loop", every=1, store=RunWriter(RUN_DIR, flush_every=...))`` forever
and prints ``flushed <step>`` each time a chunk ending at ``<step>`` has been committed (the writer
flushes synchronously inside ``prof.backward`` at every ``FLUSH_EVERY``-th probed step).
"""

from __future__ import annotations

import math
import sys

import torch

import gradlens as gl
from gradlens.store import RunWriter


def main() -> None:
    path, flush_every = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh()
    )
    heads = torch.nn.ModuleDict({"a": torch.nn.Linear(32, 1), "b": torch.nn.Linear(32, 1)})
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = torch.optim.SGD(params, lr=1e-2)
    writer = RunWriter(path, flush_every=flush_every, flush_seconds=math.inf)
    prof = gl.Profiler(trunk, tasks=["a", "b"], engine="loop", every=1, store=writer)
    print("ready", flush=True)
    step = 0
    while True:
        x = torch.randn(64, 8)
        z = trunk(x)
        losses = {
            "a": (heads["a"](z).squeeze(1) - x[:, 0]).pow(2).mean(),
            "b": (heads["b"](z).squeeze(1) - x[:, 1] * x[:, 2]).pow(2).mean(),
        }
        opt.zero_grad()
        prof.backward(losses, weights={"a": 0.25, "b": 0.75})
        opt.step()
        if (step + 1) % flush_every == 0:
            print(f"flushed {step}", flush=True)
        step += 1


if __name__ == "__main__":
    main()
