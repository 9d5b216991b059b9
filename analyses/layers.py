"""Per-layer interference: which layers conflict, how it moves over training and with depth.

Over training: the long runs of ``analyses.conflict`` (``p = 0.5``, probes every 2 steps): per
layer and epoch, the mean cosine of the two tasks' gradients (``stats.epoch_table`` with
``metric="cosine"`` and the layer), per run and averaged over runs.

With depth: the capacity sweep's joint runs at ``p = 0.5``: per run, the mean cosine of every
layer over the whole run, by the layer's position from input to output, per depth.

    python -m analyses.layers [--quick | --full]    # after (or instead of) analyses.conflict
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses import _figures
from analyses._common import (
    load_tables,
    pair_sweep,
    parse_args,
    save_figure,
    study_pairs,
    write_json,
)
from analyses.conflict import _long_runs, long_size
from gradlens import TOTAL_LAYER, load_run, stats

__all__ = ["layer_epochs", "layer_profile", "main"]

TOTAL = TOTAL_LAYER


def _layers(metrics: pd.DataFrame) -> list[str]:
    """The run's layers in the order the profiler recorded them (input to output), total last."""
    names = [str(x) for x in dict.fromkeys(metrics["layer"]) if str(x) != TOTAL]
    return [*names, TOTAL]


def layer_epochs(run_dir: Path) -> pd.DataFrame:
    """``[layer, order, epoch, cosine]`` of one run: per layer, the mean cosine of each epoch."""
    run = load_run(run_dir)
    rows = []
    for k, layer in enumerate(_layers(run.metrics)):
        t = stats.epoch_table(run, metric="cosine", layer=layer)
        label = "all shared" if layer == TOTAL else f"layer {layer}"
        rows.append(t[["epoch", "interference"]].assign(layer=label, order=k))
    return (
        pd.concat(rows, ignore_index=True)
        .rename(columns={"interference": "cosine"})
        .assign(run=run_dir.name)
    )


def layer_profile(sweep_dir: Path, weight_col: str) -> pd.DataFrame:
    """Per joint run at ``p = 0.5`` of a sweep: each layer's mean cosine over the run.

    Columns ``[run, model.depth, model.width, model.n_params, layer, position, cosine]``;
    ``position`` is the layer's index from the input (0) among the run's layers.
    """
    test = load_tables(sweep_dir)["test"]
    runs = test[(test["n_tasks"] == 2) & np.isclose(test[weight_col], 0.5)]
    rows = []
    for _, r in runs.iterrows():
        m = load_run(sweep_dir / r["run_id"]).metrics
        cos = m[m["metric"] == "cosine"]
        for pos, layer in enumerate(_layers(cos)[:-1]):
            rows.append(
                {
                    "run": r["run_id"],
                    "model.depth": r["model.depth"],
                    "model.width": r["model.width"],
                    "model.n_params": r["model.n_params"],
                    "layer": layer,
                    "position": pos,
                    "cosine": float(cos.loc[cos["layer"] == layer, "value"].mean()),
                }
            )
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-layer tables of both pairs; figures ``layer_conflict_<pair>.png`` and ``layers.json``."""
    args = parse_args(__doc__.splitlines()[0], argv)
    pre = args.preset
    summary: dict[str, Any] = {"preset": pre.__dict__, "pairs": {}}
    width, depth = long_size(pre)
    for pair in study_pairs(pre):
        long_dir = _long_runs(pair, pre, args.runs, args.workers)
        ep = pd.concat(
            [layer_epochs(d) for d in sorted(long_dir.iterdir()) if d.is_dir()], ignore_index=True
        )
        wcol = f"weights.{pair.tasks[0]}"
        prof = layer_profile(pair_sweep(pair, pre, args.runs, args.workers), wcol)
        by_depth = (
            prof.groupby(["model.depth", "position"])["cosine"].agg(["mean", "std", "count"])
            .reset_index()
            if len(prof)
            else prof
        )  # fmt: skip
        per_layer = ep.groupby(["order", "layer"])["cosine"].agg(["mean", "min", "max"])
        summary["pairs"][pair.name] = {
            "epochs": ep,
            "per_layer_mean_cosine": per_layer.reset_index(),
            "share_of_epochs_with_negative_mean_cosine": ep.groupby("layer")["cosine"]
            .apply(lambda c: float((c.dropna() < 0).mean()) if c.notna().any() else None)
            .to_dict(),
            "by_depth": by_depth,
        }
        fig = _figures.layer_conflict(
            ep.dropna(subset=["cosine"]),
            title=f"{pair.name}, {pair.kind}, MLP width {width:g} depth {depth}, p = 0.5: "
            f"per-layer gradient cosine over training ({ep['run'].nunique()} runs)",
        )
        save_figure(fig, args.figures / f"layer_conflict_{pair.name}.png")
        if len(by_depth):
            fig = _figures.layer_depth(
                by_depth,
                title=f"{pair.name}: per-layer mean cosine by depth, joint runs at p = 0.5 "
                "(all widths and seeds; +-1 SE)",
            )
            save_figure(fig, args.figures / f"layer_depth_{pair.name}.png")
    write_json(summary, args.figures / "layers.json")
    return summary


if __name__ == "__main__":
    s = main()
    for name, p in s["pairs"].items():
        print(name, p["per_layer_mean_cosine"].to_string(index=False))
