"""Effect of holding a Gram weighting's weights between probes (``every=k``) in a small study.

UPGrad and MGDA recompute their weights from the Gram at every step; with ``every=k`` gradlens
computes them at the probed steps only and holds them in between. This trains the same runs
(MultiDigits n = 3000, two tasks, MLP width 0.5 depth 2, 5 epochs, 3 seeds) with ``every`` in
{1, 10} and reports the final test accuracy (mean over tasks) and the mean conflict frequency
over the probed steps, as mean and range over seeds.

    python benchmarks/held_weights.py          # a few CPU minutes on one thread
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch

import gradlens as gl
from gradlens.train import train

BASE = {
    "dataset": "multidigits",
    "dataset_options": {"n": 3000, "seed": 0},
    "model": "mlp",
    "width": 0.5,
    "depth": 2,
    "batch_size": 64,
    "epochs": 5,
    "lr": 3e-3,
}


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("upgrad", "mgda"):
            for every in (1, 10):
                acc, conflict, sec, probes = [], [], [], []
                for seed in (0, 1, 2):
                    cfg = {**BASE, "weighting": method, "every": every, "seed": seed}
                    out = f"{tmp}/{method}-{every}-{seed}"
                    res = train(cfg, out, progress=False)
                    test = res.metrics["test"]
                    acc.append(np.mean([m["accuracy"] for m in test.values()]))
                    run = gl.load_run(out)
                    m = run.metrics
                    c = m[(m.layer == gl.TOTAL_LAYER) & (m.metric == "conflict")]["value"]
                    conflict.append(float(c.mean()))
                    sec.append(run.meta["seconds_per_step"])
                    probes.append(len(run.probed_steps))
                rows.append((method, every, acc, conflict, sec, probes))
    print(
        "| method | every | test accuracy (mean over tasks) | conflict frequency | probed steps "
        "| ms/step |"
    )
    print("|---|---:|---|---|---:|---:|")
    for method, every, acc, conflict, sec, probes in rows:
        print(
            f"| {method} | {every} | {np.mean(acc):.4f} [{min(acc):.4f}, {max(acc):.4f}] | "
            f"{np.mean(conflict):.3f} [{min(conflict):.3f}, {max(conflict):.3f}] | "
            f"{probes[0]} | {1000 * np.mean(sec):.1f} |"
        )


if __name__ == "__main__":
    main()
