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

__all__ = ["gains", "main", "n_test", "ols_fit", "select_weights", "size_gains", "with_test_noise"]

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


_SIZE_GAIN_KEYS = ("gain", "se_seed", "se_test", "se", "df", "ci_low", "ci_high", "p_value",
                   "interval")  # fmt: skip


def n_test(table: pd.DataFrame, task: str, split: str = "test") -> tuple[int, bool]:
    """Test items a task is scored on, from the runs' dataset metadata, and whether they are
    the task's own (a domain's share of the split) rather than the items every task shares.
    ``(0, False)`` when the table does not say (no test-set variance can then be added).

    Example:
        >>> t = pd.DataFrame({"dataset.n.test": [500], "dataset.domain_counts.test.a": [250]})
        >>> n_test(t, "a"), n_test(t, "b"), n_test(t.iloc[:, :0], "a")
        ((250, True), (500, False), (0, False))
    """
    for col, own in (
        (f"dataset.domain_counts.{split}.{task}", True),
        (f"dataset.n.{split}", False),
    ):
        if col in table.columns and table[col].notna().any():
            return int(table[col].dropna().iloc[0]), own
    return 0, False


def with_test_noise(g: pd.DataFrame, table: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """``stats.joint_gain`` rows with the test-set noise added beside every accuracy.

    Adds ``n_test``, ``joint_sd_test`` and ``single_sd_test`` (``stats.binomial_sd`` of each
    seed-mean accuracy), ``se_test`` (``stats.gain_test_var``: the bound of the test-set
    variance of the gain, both accuracies being on the same items) and ``se_seed`` (the paired
    t's ``se``), keeps the seed-only interval as ``ci_low_seed``/``ci_high_seed`` and replaces
    ``se``, ``df``, ``ci_low``, ``ci_high`` and ``p_value`` by those of ``stats.paired_gain``
    (seed and test-set variance, Welch-Satterthwaite df, never narrower than the seed-only
    interval: ``stats._gain.with_test_var``).
    """
    from gradlens.stats._gain import with_test_var

    g = g.copy()
    ns = {t: n_test(table, t)[0] for t in g["task"].unique()}
    g["n_test"] = g["task"].map(ns)
    g["joint_sd_test"] = stats.binomial_sd(g["joint_mean"].to_numpy(float), g["n_test"])
    g["single_sd_test"] = stats.binomial_sd(g["single_mean"].to_numpy(float), g["n_test"])
    g["ci_low_seed"], g["ci_high_seed"] = g["ci_low"], g["ci_high"]
    res = [
        with_test_var(
            r.gain, r.se, r.df, stats.gain_test_var(r.joint_mean, r.single_mean, r.n_test), level
        )
        for r in g.itertuples(index=False)
    ]
    for key in ("se", "df", "ci_low", "ci_high", "p_value", "interval", "se_seed", "se_test"):
        g[key] = [r[key] for r in res]
    g.loc[~np.isfinite(g["se_test"].to_numpy(float)), "interval"] = (
        "paired t over seeds (test-set size unknown)"
    )
    return g


def size_gains(
    tables: dict[str, pd.DataFrame], tasks: Sequence[str], level: float = 0.95
) -> pd.DataFrame:
    """Per size, the gain at the val-selected weight, mean over the tasks, seeds as clusters.

    A seed's joint run scores every task and its single-task runs share the seed's
    initialisation and batch order, so the unit of resampling is the seed: per seed ``s``,
    ``d_s = mean_t(joint_t,s - single_t,s)`` (the cluster mean), and ``stats.paired_gain``
    gives the paired t over those ``d_s`` with the test-set variance added: per task the bound
    ``stats.gain_test_var`` at the seed-mean accuracies, combined over tasks as independent
    when each task has its own test items (a domain pair) and as perfectly correlated when the
    tasks label the same items (a multi-task pair: ``(sum_t sqrt(v_t) / T)^2``, an upper
    bound). Columns: the size, ``model.n_params``, the weight, ``joint_mean``, ``single_mean``,
    ``joint_sd_test``, ``single_sd_test``, ``gain``, ``se_seed``, ``se_test``, ``se``, ``df``,
    ``ci_low``, ``ci_high``, ``ci_low_seed``, ``ci_high_seed``, ``p_value``, ``n_seeds``,
    ``n_test``, ``interval``.
    """
    test = tables["test"]
    w = f"weights.{tasks[0]}"
    chosen = select_weights(tables["val"], tasks)
    ns = {t: n_test(test, t) for t in tasks}
    rows = []
    for _, c in chosen.iterrows():
        at = test[(test[SIZE[0]] == c[SIZE[0]]) & (test[SIZE[1]] == c[SIZE[1]])]
        joint = at[(at["n_tasks"] == len(tasks)) & np.isclose(at[w], c[w])].set_index("seed")
        diffs, tv, jm, sm = [], [], [], []
        for t in tasks:
            single = at[(at["n_tasks"] == 1) & (at["tasks"].astype(str) == t)].set_index("seed")
            d = (joint[f"accuracy.{t}"] - single[f"accuracy.{t}"]).dropna()
            diffs.append(d)
            jm.append(float(joint[f"accuracy.{t}"].mean()))
            sm.append(float(single[f"accuracy.{t}"].mean()))
            tv.append(stats.gain_test_var(jm[-1], sm[-1], ns[t][0]))
        d = pd.concat(diffs, axis=1).dropna().mean(axis=1).to_numpy(float)
        own = all(ns[t][1] for t in tasks)
        test_var = sum(tv) / len(tasks) ** 2 if own else (sum(np.sqrt(tv)) / len(tasks)) ** 2
        seed_only = stats.paired_gain(d, level=level)
        res = stats.paired_gain(
            d, test_var=test_var if math.isfinite(test_var) else 0.0, level=level
        )
        n_items = float(np.mean([ns[t][0] for t in tasks]))
        rows.append(
            {
                "model.width": c["model.width"],
                "model.depth": c["model.depth"],
                "model.n_params": int(joint["model.n_params"].iloc[0]),
                w: c[w],
                "joint_mean": float(np.mean(jm)),
                "single_mean": float(np.mean(sm)),
                "joint_sd_test": float(stats.binomial_sd(np.mean(jm), n_items)),
                "single_sd_test": float(stats.binomial_sd(np.mean(sm), n_items)),
                **{k: res[k] for k in _SIZE_GAIN_KEYS},
                "ci_low_seed": seed_only["ci_low"],
                "ci_high_seed": seed_only["ci_high"],
                "n_seeds": int(d.size),
                "n_test": {t: ns[t][0] for t in tasks},
                "test_items": "own per task" if own else "shared by the tasks",
            }
        )
    return pd.DataFrame(rows)


def gains(tables: dict[str, pd.DataFrame], tasks: Sequence[str], n_boot: int) -> pd.DataFrame:
    """Test-split gains per size and task at the val-selected weight and at ``p = 0.5``, with
    the test-set noise (:func:`with_test_noise`)."""
    g = stats.joint_gain(tables["test"], size_cols=SIZE, n_boot=n_boot, seed=0)
    g = with_test_noise(g, tables["test"])
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
            # per size at the selected weight, mean over tasks: seeds as clusters, test noise in
            "size_gains": size_gains(tables, pair.tasks),
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
                "95 % intervals: thick, seeds only; thin, seeds + test-set sampling (bound)",
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
