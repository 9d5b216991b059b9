"""``gradlens demo``: train a two-task MultiDigits model with the profiler, plot, summarise."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from gradlens._commands._args import positive_int
from gradlens._validate import check_int

NAME = "demo"
HELP = (
    "Train a two-task MultiDigits model with the profiler attached (about a minute on 2 CPU "
    "cores); write the run, a conflict heatmap and print a summary."
)

#: The default demo: a small ResNet on both digits, probed every 5 steps.
DEMO_CONFIG: dict[str, Any] = {
    "dataset": "multidigits",
    "model": "resnet",
    "width": 0.5,
    "depth": 1,
    "epochs": 8,
    "batch_size": 128,
    "lr": 1e-3,
    "engine": "gramian",
    "every": 5,
    "seed": 0,
}
#: ``--quick``: a few seconds, for tests and smoke checks (accuracy is not meaningful).
QUICK_CONFIG: dict[str, Any] = {
    "dataset": "multidigits",
    "dataset_options": {"n": 384},
    "model": "mlp",
    "width": 0.25,
    "depth": 1,
    "epochs": 1,
    "batch_size": 64,
    "lr": 1e-3,
    "engine": "gramian",
    "every": 1,
    "seed": 0,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--out``, ``--epochs``, ``--quick``, ``--no-progress``, ``--threads``."""
    p.add_argument(
        "--out", type=Path, default=Path("gradlens-demo"), help="output folder (gradlens-demo)"
    )
    p.add_argument(
        "--epochs", type=positive_int, default=None, help="epochs (default 8; --quick: 1)"
    )
    p.add_argument(
        "--quick", action="store_true", help="a tiny model on 384 samples: seconds, for smoke tests"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the demo's small model gains little from more, and "
        "one thread does not stall when other programs keep the cores busy)",
    )


def run(args: argparse.Namespace) -> int:
    """Train, write OUT/run, OUT/heatmap.png and OUT/layers.png, print the summary."""
    import torch

    from gradlens._errors import require

    # Fail before training if an extra is missing.
    require("sklearn", "data", "gradlens demo (the bundled digits)")
    require("matplotlib", "plot", "gradlens demo (the heatmaps)")

    config = dict(QUICK_CONFIG if args.quick else DEMO_CONFIG)
    if args.epochs is not None:
        config["epochs"] = args.epochs
    check_int("--threads", args.threads, minimum=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, config)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, config: dict[str, Any]) -> int:
    from gradlens import plots
    from gradlens.store import load_run
    from gradlens.train import train

    out = Path(args.out)
    config["config"] = {"demo": "quick" if args.quick else "default", "threads": args.threads}
    start = time.perf_counter()
    result = train(config, out / "run", progress=not args.no_progress, overwrite=True)
    train_s = time.perf_counter() - start
    run_ = load_run(out / "run")
    heatmap = plots.save(plots.conflict_heatmap(run_), out / "heatmap.png")
    layers = plots.save(plots.layer_step_heatmap(run_), out / "layers.png")
    total_s = time.perf_counter() - start
    sys.stdout.write(
        _summary(run_, result.metrics, config, train_s, total_s, [heatmap, layers]) + "\n"
    )
    return 0


def _summary(
    run_: Any,
    final: dict[str, dict[str, dict[str, float]]],
    config: dict[str, Any],
    train_s: float,
    total_s: float,
    figures: list[Path],
) -> str:
    from gradlens import TOTAL_LAYER

    meta = run_.meta
    tasks = list(run_.tasks)
    m = run_.metrics
    total = m[m["layer"] == TOTAL_LAYER]

    def mean_of(frame: Any, metric: str) -> float:
        v = frame.loc[frame["metric"] == metric, "value"].to_numpy(dtype=float)
        v = v[~(v != v)]  # drop NaN (a zero-gradient task)
        return float(v.mean()) if v.size else math.nan

    per_layer = (
        m[(m["metric"] == "conflict") & (m["layer"] != TOTAL_LAYER)]
        .groupby("layer", observed=True)["value"]
        .mean()
    )
    model = meta["model"]
    lines = [
        f"gradlens demo: MultiDigits, tasks {', '.join(tasks)} (the left and right digit), "
        f"{model['family']} width {model['width']:g} depth {model['depth']} "
        f"({model['n_params']:,} parameters), {config['epochs']} epoch"
        f"{'s' * (config['epochs'] != 1)}, "
        f"trained in {train_s:.1f} s ({total_s:.1f} s with the figures)",
        "",
        f"{'task':<8}{'val acc':>10}{'test acc':>10}",
    ]
    for t in tasks:
        lines.append(
            f"{t:<8}{final['val'][t]['accuracy']:>10.4f}{final['test'][t]['accuracy']:>10.4f}"
        )
    lines += [
        "",
        f"Interference on the shared trunk ({len(run_.probed_steps)} probed steps, "
        f"engine {meta['engine']}, all shared parameters):",
        f"  mean cosine          {mean_of(total, 'cosine'):+.3f}",
        f"  conflict frequency   {mean_of(total, 'conflict'):.3f}   (share of probes with cos < 0)",
        f"  norm ratio           {mean_of(total, 'norm_ratio'):.3f}   "
        "(mean of max |g_t| / min |g_t|)",
    ]
    if len(per_layer):
        worst = str(per_layer.idxmax())
        lines.append(
            f"  most conflicted layer: {worst} (conflict frequency {per_layer.max():.3f}, "
            f"{len(per_layer)} layers)"
        )
    lines += [
        "",
        f"Run:      {run_.path}   (gradlens.load_run({str(run_.path)!r}))",
        f"Heatmap:  {figures[0]}   (task x task mean cosine and conflict frequency)",
        f"Layers:   {figures[1]}   (mean cosine per layer over training)",
    ]
    return "\n".join(lines)
