"""What a per-layer Gram weighting costs by itself: the weighting called on every layer's Gram.

``weights=gl.per_layer(w)`` calls ``w`` once per shared layer at each probe. This takes the Grams
of one gradlens probe on a ``gradlens bench`` model (a zoo trunk by default) and times, in CPU
time of one torch thread, TorchJD's ``UPGradWeighting`` and ``MGDAWeighting`` called on every
layer's Gram (median of 3) and once on the whole-model Gram, to compare with the step times of
``gradlens bench --methods gramian,gramian+upgrad/per_layer,...``.

    python benchmarks/layer_weighting_time.py --models bert,mobilenetv2 --tasks 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradlens.bench import ZOO_MODELS
from gradlens.bench._setup import _Setup
from gradlens.bench._weightings import weighting_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(m for m in ZOO_MODELS if "-1m" not in m))
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for model in args.models.split(","):
        setup = _Setup(model, args.tasks, args.batch)
        setup.prepare("gramian+upgrad")
        losses, _ = setup.losses()
        snap = setup._profilers[("gramian+upgrad", 1)].backward(
            losses, weights=weighting_for("gramian+upgrad")
        )
        setup.close()
        assert snap is not None
        cells = []
        for name in ("upgrad", "mgda"):
            w = weighting_for(f"gramian+{name}")
            runs = []
            for _ in range(3):
                t0 = time.thread_time()
                for g in snap.layer_grams.values():
                    w(g)
                runs.append(time.thread_time() - t0)
            t0 = time.thread_time()
            w(snap.gram)
            whole = time.thread_time() - t0
            per_layer = statistics.median(runs) * 1e3
            cells.append(
                f"{name}: {len(snap.layer_grams)} layer Grams {per_layer:.1f} ms"
                f" (whole Gram {whole * 1e3:.2f} ms)"
            )
        print(f"{model} T={args.tasks}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
