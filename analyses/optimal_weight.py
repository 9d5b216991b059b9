"""Finding 3: is the optimal weight ``p*`` stable across model sizes?

Reads the same sweeps as ``analyses.capacity`` (running or resuming them if needed): per model size
``p*`` of the first task's weight (first domain's sampling probability) on the validation split,
with the grid and the quadratic estimators of ``stats.optimal_weight`` and their seed-bootstrap
intervals; then ``stats.optimal_weight_trend``: the slope of ``p*`` on ``log10(parameters)``; and
the cost of transfer: per size, the test accuracy at the smallest model's weight minus that at
its own (:func:`transfer_cost`).

    python -m analyses.optimal_weight [--quick | --full]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from analyses import _figures
from analyses._common import (
    QUICK,
    load_tables,
    pair_sweep,
    parse_args,
    save_figure,
    sweep_units,
    write_json,
)
from gradlens import stats

__all__ = ["main", "optimum", "transfer_cost", "weight_cells"]


def optimum(table: pd.DataFrame, weight_col: str, n_boot: int) -> dict[str, Any]:
    """``p*`` per size and its trend over sizes, for both estimators, from joint runs only."""
    joint = table[table["n_tasks"] == 2]
    out: dict[str, Any] = {}
    for est in ("grid", "quadratic"):
        best = stats.optimal_weight(
            joint,
            weight_col=weight_col,
            size_cols=["model.n_params"],
            estimator=est,
            n_boot=n_boot,
            seed=0,
        )
        sizes = joint[["model.n_params", "model.width", "model.depth"]].drop_duplicates()
        best = best.merge(sizes, on="model.n_params", how="left")
        trend = (
            stats.optimal_weight_trend(
                joint, weight_col=weight_col, estimator=est, n_boot=n_boot, seed=0
            )
            if len(sizes) >= 2
            else None
        )
        out[est] = {
            "per_size": best,
            "trend": trend,
            "range": float(best["p_star"].max() - best["p_star"].min()),
        }
    return out


def weight_cells(joint: pd.DataFrame, weight_col: str, value: str) -> pd.DataFrame:
    """Per size and weight: the seed mean and standard error of ``value`` (for the figures).

    Example:
        >>> t = pd.DataFrame({"model.depth": 1, "model.width": 1.0, "model.n_params": 10,
        ...                   "w": [0.2, 0.2, 0.8], "acc": [0.5, 0.7, 0.9]})
        >>> c = weight_cells(t, "w", "acc")
        >>> c["mean"].round(6).tolist(), c["n"].tolist()
        ([0.6, 0.9], [2, 1])
    """
    keys = ["model.depth", "model.width", "model.n_params", weight_col]
    out = joint.groupby(keys)[value].agg(["mean", "std", "count"]).reset_index()
    out["se"] = (out["std"] / np.sqrt(out["count"])).fillna(0.0)
    return out.rename(columns={"count": "n"}).drop(columns="std")


def transfer_cost(tables: dict[str, pd.DataFrame], tasks: Sequence[str]) -> pd.DataFrame:
    """Per size, the test accuracy lost by using the smallest model's weight instead of its own.

    Each size's weight and the smallest size's weight are the grid points with the best mean
    validation accuracy (:func:`analyses.capacity.select_weights`); the cost is the test
    ``accuracy.mean`` at the smallest model's weight minus that at the size's own, paired by seed,
    with a t-interval over seeds (None with one seed). Negative: transferring costs accuracy.

    Example:
        >>> t = pd.DataFrame({"model.width": [1, 1, 1, 1, 2, 2, 2, 2], "model.depth": 1,
        ...     "model.n_params": [10] * 4 + [20] * 4, "n_tasks": 2, "seed": [0, 1] * 4,
        ...     "weights.a": [0.2, 0.2, 0.8, 0.8] * 2,
        ...     "accuracy.mean": [0.9, 0.9, 0.5, 0.5, 0.6, 0.6, 0.8, 0.8]})
        >>> transfer_cost({"val": t, "test": t}, ["a", "b"])["cost"].round(6).tolist()
        [0.0, -0.2]
    """
    from scipy import stats as st

    from analyses.capacity import SIZE, select_weights

    w = f"weights.{tasks[0]}"
    own = select_weights(tables["val"], tasks)
    joint_val = tables["val"][tables["val"]["n_tasks"] == len(tasks)]
    # the joint model's parameter count (a baseline has one head fewer)
    sizes = joint_val[[*SIZE, "model.n_params"]].drop_duplicates(SIZE)
    own = own.merge(sizes, on=SIZE)
    p_small = float(own.loc[own["model.n_params"].idxmin(), w])
    test = tables["test"][tables["test"]["n_tasks"] == len(tasks)]
    rows = []
    for _, r in own.iterrows():
        at = test[
            (test["model.width"] == r["model.width"]) & (test["model.depth"] == r["model.depth"])
        ]
        a = at[np.isclose(at[w], p_small)].set_index("seed")["accuracy.mean"]
        b = at[np.isclose(at[w], r[w])].set_index("seed")["accuracy.mean"]
        d = (a - b).dropna()
        half = (
            float(st.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
            if len(d) > 1
            else None
        )
        rows.append(
            {
                "model.n_params": int(r["model.n_params"]),
                "own_p": float(r[w]),
                "small_p": p_small,
                "cost": float(d.mean()),
                "ci_low": None if half is None else float(d.mean()) - half,
                "ci_high": None if half is None else float(d.mean()) + half,
                "n_seeds": len(d),
            }
        )
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Resume the sweeps, estimate ``p*`` per size, write figures and JSON; return the summary."""
    args = parse_args(__doc__.splitlines()[0], argv)
    pre = args.preset
    n_boot = 200 if pre.name in QUICK else 2000
    summary: dict[str, Any] = {"preset": pre.__dict__, "pairs": {}}
    for name, pair, family in sweep_units(pre):
        tables = load_tables(pair_sweep(pair, pre, args.runs, args.workers, family))
        wcol = f"weights.{pair.tasks[0]}"
        res = {split: optimum(tables[split], wcol, n_boot) for split in ("val", "test")}
        summary["pairs"][name] = {
            "pair": pair.name,
            "family": family,
            "kind": pair.kind,
            "weight": wcol,
            **res,
        }
        joint = tables["val"][tables["val"]["n_tasks"] == 2]
        cells = weight_cells(joint, wcol, "accuracy.mean")
        opt = res["val"]["quadratic"]["per_size"][["model.n_params", "p_star", "ci_low", "ci_high"]]
        grid = res["val"]["grid"]["per_size"][["model.n_params", "p_star"]]
        opt = opt.merge(grid.rename(columns={"p_star": "best_p"}), on="model.n_params")
        summary["pairs"][name]["figure_cells"] = cells
        summary["pairs"][name]["transfer_cost"] = transfer_cost(tables, pair.tasks)
        fig = _figures.accuracy_vs_weight(
            cells,
            opt,
            weight_col=wcol,
            xlabel=_figures.weight_label(wcol, pair.kind),
            title=f"{pair.name}, {pair.kind}, {family.upper()}: validation accuracy against the "
            "weight",
        )
        save_figure(fig, args.figures / f"optimal_weight_{name}.png")
    write_json(summary, args.figures / "optimal_weight.json")
    return summary


if __name__ == "__main__":
    s = main()
    for name, p in s["pairs"].items():
        tr = p["val"]["quadratic"]["trend"] or {}
        print(
            f"{name}: p* range {p['val']['quadratic']['range']:.3f}; slope/decade "
            f"{tr.get('slope')} CI [{tr.get('ci_low')}, {tr.get('ci_high')}] p={tr.get('p_value')}"
        )
