"""Finding 1: does the gain of joint over single-task training grow with model capacity?

For a two-task pair (MultiDigits, loss weights) and a two-domain pair (DomainDigits, resampling),
sweep the weight ``p`` over a width x depth grid of MLPs with 3 seeds and single-task baselines
(:func:`analyses._common.pair_sweep`). Per size, the gain on each task is ``stats.joint_gain`` on
the test split at the weight chosen on the validation split (and, for reference, at ``p = 0.5``).
Whether it grows with capacity: Spearman of ``log10(parameters)`` and the gain over sizes, with a
bootstrap over sizes, and the OLS slope of the gain on ``log10(parameters)`` (points per decade,
t-interval over sizes). Figures: gain against parameters (log axis), one y scale for all pairs.

    python -m analyses.capacity            # the small grid we ran (see analyses/README.md)
    python -m analyses.capacity --quick    # seconds; writes under runs/analyses-quick
    python -m analyses.capacity --full     # the paper-style grid of gradlens.models.GRID
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from analyses import _figures
from analyses._common import (
    QUICK,
    Timer,
    load_tables,
    pair_sweep,
    parse_args,
    save_figure,
    sweep_cost,
    sweep_units,
    write_json,
)
from gradlens import stats

__all__ = ["gains", "main", "ols_fit", "select_weights"]

SIZE = ["model.width", "model.depth"]


def select_weights(val: pd.DataFrame, tasks: Sequence[str]) -> pd.DataFrame:
    """Per size, the joint weight with the best mean validation ``accuracy.mean`` over seeds.

    Example:
        >>> t = pd.DataFrame({"model.width": 1, "model.depth": 1, "n_tasks": 2,
        ...     "weights.a": [0.2, 0.2, 0.8, 0.8], "accuracy.mean": [0.5, 0.6, 0.7, 0.7]})
        >>> select_weights(t, ["a", "b"])["weights.a"].tolist()
        [0.8]
    """
    joint = val[val["n_tasks"] == len(tasks)]
    w = f"weights.{tasks[0]}"
    cells = joint.groupby([*SIZE, w], as_index=False)["accuracy.mean"].mean()
    best = cells.loc[cells.groupby(SIZE)["accuracy.mean"].idxmax()]
    return best.rename(columns={"accuracy.mean": "val_accuracy"}).reset_index(drop=True)


def gains(tables: dict[str, pd.DataFrame], tasks: Sequence[str], n_boot: int) -> pd.DataFrame:
    """Test-split gains per size and task at the val-selected weight and at ``p = 0.5``."""
    g = stats.joint_gain(tables["test"], size_cols=SIZE, n_boot=n_boot, seed=0)
    w = f"weights.{tasks[0]}"
    joint = tables["test"][tables["test"]["n_tasks"] == len(tasks)]  # sizes of the joint models
    g = g.merge(joint[[*SIZE, "model.n_params"]].drop_duplicates(SIZE), on=SIZE, how="left")
    chosen = select_weights(tables["val"], tasks)[[*SIZE, w]].assign(setting="p selected on val")
    out = [g.merge(chosen, on=[*SIZE, w])]
    uniform = g[np.isclose(g[w], 0.5)].assign(setting="p = 0.5")
    if len(uniform):
        out.append(uniform)
    return pd.concat(out, ignore_index=True)


def _trend(g: pd.DataFrame, n_boot: int) -> dict[str, Any]:
    """Spearman of log10(parameters) and the gain over sizes x tasks (cluster bootstrap by size)."""
    x = np.log10(g["model.n_params"].to_numpy(float))
    res = stats.correlate(
        x,
        g["gain"].to_numpy(float),
        method="spearman",
        groups=g["model.n_params"],
        n_boot=n_boot,
        seed=0,
    )
    return res


def ols_fit(g: pd.DataFrame) -> dict[str, float] | None:
    """OLS of the gain (points) on ``log10(parameters)`` over sizes (the tasks' mean per size).

    The tasks of one size share their runs, so the unit is the size: ``K`` sizes give a
    t-interval of the slope with ``K - 2`` degrees of freedom. None with fewer than 3 sizes.

    Example:
        >>> g = pd.DataFrame({"model.n_params": [1e3, 1e4, 1e5, 1e3, 1e4, 1e5],
        ...                   "gain": [0.00, 0.01, 0.02, 0.00, 0.01, 0.02]})
        >>> round(ols_fit(g)["slope"], 6)
        1.0
    """
    from scipy import stats as st

    per = g.groupby("model.n_params")["gain"].mean()
    if len(per) < 3:
        return None
    res = st.linregress(np.log10(per.index.to_numpy(float)), 100 * per.to_numpy(float))
    half = float(st.t.ppf(0.975, len(per) - 2) * res.stderr)
    return {
        "slope": float(res.slope),
        "intercept": float(res.intercept),
        "ci_low": float(res.slope) - half,
        "ci_high": float(res.slope) + half,
        "p_value": float(res.pvalue),
        "n_sizes": len(per),
        "unit": "accuracy points per decade of parameters",
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the sweeps (resuming), compute the gains, write figures and JSON; return the summary."""
    args = parse_args(__doc__.splitlines()[0], argv)
    pre = args.preset
    n_boot = 200 if pre.name in QUICK else 2000
    summary: dict[str, Any] = {"preset": pre.__dict__, "pairs": {}}
    all_gains = {}
    units = sweep_units(pre)
    if args.train_only:
        for _, pair, family in units:
            pair_sweep(pair, pre, args.runs, args.workers, family)
        return summary
    for name, pair, family in units:
        with Timer() as tm:
            sweep = pair_sweep(pair, pre, args.runs, args.workers, family)
        tables = load_tables(sweep)
        g = gains(tables, pair.tasks, n_boot)
        all_gains[name] = g
        sel = g[g["setting"] == "p selected on val"]
        pair_sum: dict[str, Any] = {
            "pair": pair.name,
            "family": family,
            "kind": pair.kind,
            "tasks": list(pair.tasks),
            "sweep_wall_seconds_this_call": tm.wall,
            "sweep_cost": sweep_cost(sweep),
            "n_runs": len(tables["test"]),
            "gains": g,
            "mean_gain_selected": float(sel["gain"].mean()),
            "share_positive_selected": float((sel["gain"] > 0).mean()),
            "share_ci_above_0_selected": float((sel["ci_low"] > 0).mean()),
            "share_ci_below_0_selected": float((sel["ci_high"] < 0).mean()),
        }
        for setting, sub in g.groupby("setting"):
            pair_sum[f"trend ({setting})"] = (
                _trend(sub, n_boot) if sub["model.n_params"].nunique() >= 3 else None
            )
            pair_sum[f"ols ({setting})"] = ols_fit(sub)
        summary["pairs"][name] = pair_sum
    # one y scale for every capacity figure, so that pairs compare at a glance
    both = pd.concat(all_gains.values())
    lows = both[["gain", "ci_low"]].min(axis=1)
    highs = both[["gain", "ci_high"]].max(axis=1)
    ylim = (100 * float(lows.min()) - 1, max(100 * float(highs.max()), 0) + 1)
    summary["figure_ylim_points"] = list(ylim)
    for name, pair, family in units:
        g = all_gains[name]
        for setting, stem in (("p selected on val", ""), ("p = 0.5", "_uniform")):
            sub = g[g["setting"] == setting]
            if not len(sub):
                continue
            fig = _figures.gain_vs_params(
                sub,
                weight_col=f"weights.{pair.tasks[0]}",
                fit=summary["pairs"][name][f"ols ({setting})"],
                ylim=ylim,
                series="family" if pre.study else "depth",
                title=f"{pair.name}, {pair.kind}, {family.upper()}: joint - single-task test "
                f"accuracy at {setting} (p of '{pair.tasks[0]}' written by each point); "
                "95 % seed intervals",
            )
            save_figure(fig, args.figures / f"capacity_{name}{stem}.png")
    write_json(summary, args.figures / "capacity.json")
    return summary


if __name__ == "__main__":
    s = main()
    for name, p in s["pairs"].items():
        tr = p.get("trend (p selected on val)") or {}
        rho = tr.get("estimate", math.nan)
        print(
            f"{name}: mean gain {100 * p['mean_gain_selected']:+.2f} points; "
            f"Spearman(size, gain) {rho:.2f}; sweep {p['sweep_wall_seconds_this_call']:.0f} s"
        )
