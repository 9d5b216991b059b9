"""Finding 2: does gradient conflict go with performance?

Within runs: for each pair (MultiDigits, DomainDigits), three longer runs at ``p = 0.5`` (MLP width
0.5, depth 2, probes every 2 steps) give per-epoch conflict (the fraction of probes with
``cos < 0``; and, per run, the continuous mean cosine) and the per-epoch validation accuracy;
``stats.within_run`` correlates them per run (Pearson, effective-n test and interval), and all
epochs of all runs are pooled (Pearson, cluster bootstrap by run), as the paper's single linear
fit (r = 0.06) did.

Across runs: on the capacity sweeps (``analyses.capacity``), ``stats.associations`` of the weight,
the run's conflict frequency and mean cosine, and its final test accuracy (Spearman, pooled, per
size and partial on size; seeds of a configuration resampled together; Holm over all tests), and
:func:`weight_controlled`: the mean cosine and the conflict frequency against accuracy with the
weight (``p``, ``p^2``) and the size partialled out.

    python -m analyses.conflict [--quick | --full]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses import _figures
from analyses._common import (
    QUICK,
    Pair,
    Preset,
    base_train,
    load_tables,
    pair_sweep,
    parse_args,
    run_study,
    save_figure,
    study_pairs,
    sweep_cost,
    sweep_units,
    write_json,
)
from analyses.optimal_weight import weight_cells
from gradlens import load_run, plots, stats

__all__ = [
    "EQUIVALENCE_R",
    "across_runs",
    "long_size",
    "main",
    "pool_within",
    "verdict_r",
    "weight_controlled",
    "within_runs",
]

#: Equivalence margin of finding 2, stated before the study run: |r| < 0.2.
EQUIVALENCE_R = 0.2


def verdict_r(ci95: tuple[float, float], ci90: tuple[float, float]) -> str:
    """The verdict of "conflict and accuracy are not correlated" from a correlation's intervals.

    ``"equivalent within |r| < 0.2"`` when the 90 % interval lies inside the margin (TOST at 5 %),
    ``"correlated (r > 0)"`` / ``"correlated (r < 0)"`` when the 95 % interval excludes 0 (the
    two can hold together: a small but non-zero r), else ``"inconclusive"``.

    Example:
        >>> verdict_r((-0.1, 0.12), (-0.08, 0.1))
        'equivalent within |r| < 0.2'
        >>> verdict_r((0.05, 0.5), (0.1, 0.45))
        'correlated (r > 0)'
        >>> verdict_r((-0.3, 0.4), (-0.25, 0.35))
        'inconclusive'
    """
    out = []
    if ci90[0] > -EQUIVALENCE_R and ci90[1] < EQUIVALENCE_R:
        out.append(f"equivalent within |r| < {EQUIVALENCE_R:g}")
    if ci95[0] > 0:
        out.append("correlated (r > 0)")
    elif ci95[1] < 0:
        out.append("correlated (r < 0)")
    return "; ".join(out) or "inconclusive"


def pool_within(per_run: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Fisher-z pooling of per-run ``within_run`` results (``estimate``, ``n_eff``).

    ``stats.pool_correlations`` (DerSimonian-Laird random effects, Hartung-Knapp t-interval) at
    95 % and at 90 % (the TOST interval against :data:`EQUIVALENCE_R`), the simulated design's
    test beside it (the t-interval of the runs' unweighted mean z, ``analyses.power``'s
    ``power_within``), and :func:`verdict_r`.

    Example:
        >>> rows = [{"estimate": r, "n_eff": 20.0} for r in (0.05, -0.1, 0.0, 0.08, -0.02)]
        >>> p = pool_within(rows)
        >>> p["k"], p["ci90_low"] > -0.2, p["verdict"]
        (5, True, 'equivalent within |r| < 0.2')
    """
    from scipy import stats as st

    ok = [x for x in per_run if x.get("estimate") is not None and x.get("n_eff")]
    r = np.array([x["estimate"] for x in ok], float)
    n = np.array([x["n_eff"] for x in ok], float)
    p95 = stats.pool_correlations(r, n, ci=0.95)
    p90 = stats.pool_correlations(r, n, ci=0.90)
    out: dict[str, Any] = {
        **p95,
        "ci90_low": p90["ci_low"],
        "ci90_high": p90["ci_high"],
        "per_run_r": r.tolist(),
        "per_run_n_eff": n.tolist(),
        "margin_r": EQUIVALENCE_R,
    }
    if len(r) >= 2 and np.isfinite(p95["estimate"]):
        z = np.arctanh(np.clip(r, -0.999999, 0.999999))
        m, se = float(z.mean()), float(z.std(ddof=1) / np.sqrt(len(z)))
        t95, t90 = st.t.ppf(0.975, len(z) - 1), st.t.ppf(0.95, len(z) - 1)
        out["mean_z_t"] = {
            "estimate": float(np.tanh(m)),
            "ci_low": float(np.tanh(m - t95 * se)),
            "ci_high": float(np.tanh(m + t95 * se)),
            "ci90_low": float(np.tanh(m - t90 * se)),
            "ci90_high": float(np.tanh(m + t90 * se)),
        }
        out["verdict"] = verdict_r((p95["ci_low"], p95["ci_high"]), (p90["ci_low"], p90["ci_high"]))
    else:
        out["verdict"] = "not estimable (fewer than 2 runs)"
    return out


def long_size(pre: Preset) -> tuple[float, int]:
    """Width and depth of the MLP of the long runs (tiny in the quick presets)."""
    return (0.125, 1) if pre.name in QUICK else (0.5, 2)


def _long_runs(pair: Pair, pre: Preset, runs: Path, workers: int) -> Path:
    width, depth = long_size(pre)
    train = {
        **base_train(pair.dataset, pair.options(pre), pre.conflict_epochs),
        "tasks": list(pair.tasks),
        "every": 2,
    }
    sweep = {
        "p": [0.5],
        "sizes": [{"width": width, "depth": depth}],
        "seeds": list(range(pre.conflict_seeds)),
    }
    out = runs / f"conflict-{pair.name}"
    run_study({"train": train, "sweep": sweep}, out, workers)
    return out


def within_runs(run_dirs: Sequence[Path], n_boot: int) -> dict[str, Any]:
    """Per-run ``within_run`` and the pooled per-epoch Pearson (cluster bootstrap by run)."""
    per_run, epochs = [], []
    for k, d in enumerate(sorted(run_dirs)):
        run = load_run(d)
        res = stats.within_run(run, metric="conflict", n_boot=n_boot, seed=k)
        cos = stats.within_run(run, metric="cosine", n_boot=n_boot, seed=k)
        per_run.append({"run": d.name, **res, "cosine": cos})
        epochs.append(stats.epoch_table(run, metric="conflict").assign(run=d.name))
    ep = pd.concat(epochs, ignore_index=True)
    pooled = stats.correlate(
        ep["interference"], ep["score"], method="pearson", groups=ep["run"], n_boot=n_boot, seed=0
    )
    centred = ep.assign(
        interference=ep["interference"] - ep.groupby("run")["interference"].transform("mean"),
        score=ep["score"] - ep.groupby("run")["score"].transform("mean"),
    )
    within = stats.correlate(
        centred["interference"],
        centred["score"],
        method="pearson",
        groups=centred["run"],
        n_boot=n_boot,
        seed=0,
    )
    return {
        "per_run": per_run,
        "pooled": pooled,
        "pooled_run_centred": within,
        # the design's test: per-run r pooled by Fisher z, TOST against |r| < 0.2
        "fisher_cosine": pool_within([x["cosine"] for x in per_run]),
        "fisher_conflict": pool_within(per_run),
        "epochs": ep,
    }


def across_runs(table: pd.DataFrame, weight_col: str, n_boot: int) -> pd.DataFrame:
    """``stats.associations`` of weight, conflict and accuracy over the joint runs of a sweep."""
    joint = table[table["n_tasks"] == 2]
    return stats.associations(
        joint,
        weight_cols=[weight_col],
        interference_cols=["conflict_freq.mean", "cosine.mean"],
        accuracy_cols=["accuracy.mean"],
        methods=("spearman",),
        group_cols=["model.n_params", weight_col],
        n_boot=n_boot,
        seed=0,
    )


def weight_controlled(joint: pd.DataFrame, weight_col: str, n_boot: int) -> list[dict[str, Any]]:
    """Run-level interference vs test accuracy, controlling for the weight and the size.

    Partial Pearson correlation (``stats.partial_correlation``) of the mean cosine (and of the
    conflict frequency) with ``accuracy.mean`` over the joint runs, on the covariates
    ``log10(parameters)``, ``p`` and ``p^2`` (accuracy is a hump in ``p``, so a linear term alone
    would leave the weight's effect in the residuals); seeds of a configuration are resampled
    together. A table with too few runs for the covariates gives a row with a ``note``.
    """
    t = joint.assign(
        log10_params=np.log10(joint["model.n_params"].astype(float)),
        p=joint[weight_col].astype(float),
        p2=joint[weight_col].astype(float) ** 2,
    )
    covariates = ["log10_params", "p", "p2"]
    if t["model.n_params"].nunique() < 2:
        covariates = ["p", "p2"]
    out = []
    for x in ("cosine.mean", "conflict_freq.mean"):
        row: dict[str, Any] = {"x": x, "y": "accuracy.mean", "controls": covariates}
        if len(t) < len(covariates) + 4:
            out.append({**row, "estimate": None, "note": f"{len(t)} runs: too few"})
            continue
        res = stats.partial_correlation(
            t, x, "accuracy.mean", covariates, method="pearson", n_boot=n_boot,
            n_perm=n_boot, groups=["model.n_params", weight_col], seed=0,
        )  # fmt: skip
        r90 = stats.partial_correlation(
            t, x, "accuracy.mean", covariates, method="pearson", n_boot=n_boot,
            n_perm=0, groups=["model.n_params", weight_col], ci=0.90, seed=0,
        )  # fmt: skip
        res.update(ci90_low=r90["ci_low"], ci90_high=r90["ci_high"], n_runs=len(t))
        res["n_configurations"] = int(t.groupby(["model.n_params", weight_col]).ngroups)
        res["verdict"] = verdict_r((res["ci_low"], res["ci_high"]), (r90["ci_low"], r90["ci_high"]))
        out.append({**row, **res})
    return out


def _scatter(epochs: dict[str, pd.DataFrame]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(epochs), 4.2), layout="constrained")
    for ax, (name, ep) in zip(fig.subplots(1, len(epochs), squeeze=False)[0], epochs.items()):
        many = ep["run"].nunique() > 5  # a legend of 20 runs would hide the data
        for k, (run, sub) in enumerate(ep.groupby("run")):
            sc = ax.scatter(
                sub["interference"],
                sub["score"],
                c=sub["epoch"],
                cmap="viridis",
                marker="o" if many else "osD^v"[k % 5],
                s=14 if many else 28,
                alpha=0.6 if many else 1.0,
                label=run.split("_")[-1],
            )
        r = np.corrcoef(ep["interference"], ep["score"])[0, 1]
        ax.set(
            xlabel="per-epoch conflict frequency (cos < 0)",
            ylabel="val accuracy (mean)",
            title=f"{name}: all epochs of {ep['run'].nunique()} runs, pooled Pearson r = {r:.2f}",
        )
        if not many:
            ax.legend(title="run", fontsize=8)
        fig.colorbar(sc, ax=ax, label="epoch")
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the long runs, resume the sweeps, compute both analyses, write figures and JSON."""
    args = parse_args(__doc__.splitlines()[0], argv)
    pre = args.preset
    n_boot = 200 if pre.name in QUICK else 2000
    summary: dict[str, Any] = {"preset": pre.__dict__, "pairs": {}}
    epochs = {}
    if args.train_only:
        for pair in study_pairs(pre):
            _long_runs(pair, pre, args.runs, args.workers)
        for _, pair, family in sweep_units(pre):
            pair_sweep(pair, pre, args.runs, args.workers, family)
        return summary
    for pair in study_pairs(pre):
        long_dir = _long_runs(pair, pre, args.runs, args.workers)
        w = within_runs([d for d in long_dir.iterdir() if d.is_dir()], n_boot)
        epochs[pair.name] = w.pop("epochs")
        summary["pairs"][pair.name] = {
            "kind": pair.kind,
            "within": w,
            "long_runs_cost": sweep_cost(long_dir),
        }
        first = sorted(d for d in long_dir.iterdir() if d.is_dir())[0]
        fig = plots.conflict_timeline(load_run(first), title=f"{pair.name}: {first.name}")
        save_figure(fig, args.figures / f"conflict_timeline_{pair.name}.png")
    for name, pair, family in sweep_units(pre):
        tables = load_tables(pair_sweep(pair, pre, args.runs, args.workers, family))
        wcol = f"weights.{pair.tasks[0]}"
        assoc = across_runs(tables["test"], wcol, n_boot)
        # the MLP sweep keeps the key "across"; other families add "across (<family>)"
        key = "across" if family == "mlp" else f"across ({family})"
        summary["pairs"][pair.name][key] = assoc
        wkey = "weight_controlled" + ("" if family == "mlp" else f" ({family})")
        summary["pairs"][pair.name][wkey] = weight_controlled(
            tables["test"][tables["test"]["n_tasks"] == 2], wcol, n_boot
        )
        joint = tables["test"][tables["test"]["n_tasks"] == 2]
        for col, stem, ylabel, scale in (
            ("conflict_freq.mean", "conflict", "share of probes with cos < 0", 1.0),
            ("cosine.mean", "cosine", "mean gradient cosine of the two tasks", 1.0),
            ("accuracy.mean", "test_accuracy", "test accuracy, mean over tasks (points)", 100.0),
        ):
            fig = _figures.weight_vs_metric(
                weight_cells(joint, wcol, col),
                weight_col=wcol,
                xlabel=_figures.weight_label(wcol, pair.kind),
                ylabel=ylabel,
                scale=scale,
                title=f"{pair.name}, {pair.kind}, {family.upper()}, joint runs: {ylabel} against "
                "the weight",
            )
            save_figure(fig, args.figures / f"weight_vs_{stem}_{name}.png")
    save_figure(_scatter(epochs), args.figures / "conflict_vs_accuracy_epochs.png")
    fig = _figures.forest(
        {
            name: {
                **p["within"]["fisher_cosine"],
                "per_run": p["within"]["fisher_cosine"]["per_run_r"],
            }
            for name, p in summary["pairs"].items()
        },
        margin=EQUIVALENCE_R,
        xlabel="Pearson r of per-epoch mean cosine and validation accuracy",
        title="Finding 2 within runs: per-run r (grey) and their Fisher-z pool (random effects), "
        "against the margin stated in advance",
    )
    save_figure(fig, args.figures / "conflict_within_pooled.png")
    write_json(summary, args.figures / "conflict.json")
    return summary


if __name__ == "__main__":
    s = main()
    for name, p in s["pairs"].items():
        pooled = p["within"]["pooled"]
        print(
            f"{name}: pooled per-epoch r = {pooled['estimate']:.3f} "
            f"[{pooled['ci_low']:.3f}, {pooled['ci_high']:.3f}]"
        )
