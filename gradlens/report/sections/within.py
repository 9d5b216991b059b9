"""The within-run part of a task set's section: per-epoch conflict against the validation
metric inside each run (effective-n intervals), pooled across runs with random effects."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError
from gradlens.report import _claims as _claims
from gradlens.report import _render as _r
from gradlens.report.sections._common import CORRECTION_NAME, Findings, Options, Verdict

__all__ = ["within_part"]


def within_part(
    joint: pd.DataFrame,
    by_id: dict[str, Any],
    opts: Options,
    sec: _r.Section,
    found: Findings,
    out: dict[str, Any],
) -> None:
    """Within-run correlations of one task set: per run, adjusted, pooled; claims deferred."""
    from gradlens import stats

    table = _per_run(joint, by_id, opts)
    tested = table[table["p_value"].notna()]
    if tested.empty:
        found.unsupported.append(
            f"Within-run correlation of per-epoch conflict with validation {opts.metric} is not "
            "testable: the runs have no per-epoch validation evals (points 'epoch:<k>')."
        )
        out["within_run"] = table
        return
    table["p_adjusted"] = np.nan
    table.loc[tested.index, "p_adjusted"] = stats.adjust(
        tested["p_value"].to_numpy(np.float64), method=opts.correction
    )
    out["within_run"] = table
    tested = table.loc[tested.index]
    level = round(100 * float(tested["ci_level"].iloc[0]))
    pooled = stats.pool_correlations(
        tested["estimate"].to_numpy(np.float64), tested["n_eff"].to_numpy(np.float64), ci=0.95
    )
    out["within_run_pooled"] = pooled
    _describe(table, len(tested), level, opts, sec)
    r = tested["estimate"].to_numpy(np.float64)
    sig = tested[tested["p_adjusted"] < opts.alpha]
    stat = (
        f"median r = {_r.num(np.nanmedian(r), 2, signed=True)} over {len(tested)} runs; "
        f"{len(sig)} of {len(tested)} runs significant after {opts.correction}"
    )
    skipped = len(table) - len(tested)
    if skipped:
        stat += f"; {skipped} runs not testable (see the table notes)"
    if pooled["k"] < 2:
        found.unsupported.append(
            f"Within-run correlation of per-epoch conflict with validation {opts.metric}: "
            f"fewer than 2 runs with n_eff > 3 to pool ({stat}); inconclusive."
        )
        return
    pstat = (
        f"pooled r = {_r.num(pooled['estimate'], 2, signed=True)} "
        f"{_r.interval(pooled['ci_low'], pooled['ci_high'])}, p = {_r.pval(pooled['p_value'])}, "
        f"{pooled['k']} runs, tau^2 = {pooled['tau2']:.3g}; {stat}"
    )
    mde = _pooled_mde(pooled, tested, opts)
    out["within_run_pooled"]["min_detectable_r"] = mde
    found.defer(
        "within-run pooled correlation",
        float(pooled["p_value"]),
        _verdict(pooled, pstat, opts, mde),
    )


def _pooled_mde(pooled: dict[str, Any], tested: pd.DataFrame, opts: Options) -> float:
    """The pooled test's minimal detectable |r| (80 % power at this number of runs and median
    effective n; simulated by :func:`gradlens.stats.min_detectable_effect`), NaN when not asked
    (``power_sims=0``) or not reachable."""
    from gradlens import stats

    if not opts.power_sims:
        return math.nan
    res = stats.min_detectable_effect(
        "pooled",
        sizes=1,
        weights=1,
        seeds=int(pooled["k"]),
        n_eff=float(np.nanmedian(tested["n_eff"].to_numpy(np.float64))),
        alpha=opts.alpha,
        n_sim=opts.power_sims,
        seed=opts.seed,
    )
    return float(res["effect"]) if res.get("reachable") else math.nan


def _per_run(joint: pd.DataFrame, by_id: dict[str, Any], opts: Options) -> pd.DataFrame:
    """:func:`gradlens.stats.within_run` of each run (a note where it cannot be computed)."""
    from gradlens import stats

    rows = []
    for rid in joint["run_id"]:
        try:
            res = stats.within_run(
                by_id[rid],
                metric="conflict",
                eval_metric=opts.metric,
                split="val",
                n_boot=opts.n_boot,
                seed=opts.seed,
            )
        except GradlensError as exc:
            rows.append({"run_id": rid, "note": str(exc)})
            continue
        rows.append({"run_id": rid, **res})
    table = pd.DataFrame(rows)
    if "p_value" not in table:
        table["p_value"] = np.nan
    return table


def _describe(
    table: pd.DataFrame, n_tested: int, level: int, opts: Options, sec: _r.Section
) -> None:
    """The paragraph on how the within-run correlations are tested, and their table."""
    corr = CORRECTION_NAME[opts.correction]
    sec.paragraphs.append(
        f"Within each run, per-epoch conflict frequency against validation {opts.metric} "
        f"(Pearson r). Epochs are autocorrelated, so the interval and p-value use the "
        f"effective number of epochs of two AR(1) series (n_eff): a {level}% Fisher-z "
        f"interval on n_eff and a t-test on n_eff - 2 df, {corr} over the {n_tested} runs. "
        f"The circular block-bootstrap interval is shown for reference only: at a few dozen "
        f"epochs it covers well under {level}% (docs/stats.md). Across runs, the per-run "
        f"correlations are pooled by Fisher z with DerSimonian-Laird random effects and a "
        f"Hartung-Knapp interval (runs with n_eff <= 3 carry no information and are left out)."
    )
    sec.tables.append(
        _r.Table(
            caption=f"Within-run correlation of conflict with validation {opts.metric}",
            header=[
                "run",
                "epochs",
                "n_eff",
                "r",
                f"{level}% interval (effective n)",
                "p (effective n)",
                "p_adj",
                "block bootstrap interval (undercovers)",
                "note",
            ],
            rows=[
                [
                    r["run_id"],
                    _r.num(r.get("n")),
                    _r.num(r.get("n_eff"), 3),
                    _r.num(r.get("estimate"), 3, signed=True),
                    _r.interval(r.get("ci_low_neff"), r.get("ci_high_neff")),
                    _r.pval(r.get("p_value")),
                    _r.pval(r.get("p_adjusted")),
                    _r.interval(r.get("ci_low"), r.get("ci_high")),
                    r.get("note", ""),
                ]
                for _, r in table.iterrows()
            ],
            text_columns=frozenset({0, 8}),
        )
    )


def _verdict(
    pooled: dict[str, Any], pstat: str, opts: Options, mde: float = math.nan
) -> Callable[[float], Verdict]:
    """The claim on the pooled within-run correlation at a given level."""

    def verdict(level: float) -> Verdict:
        if math.isfinite(pooled["p_value"]) and pooled["p_value"] < level:
            direction = "rises" if pooled["estimate"] > 0 else "falls"
            return [
                f"Within runs, validation {opts.metric} {direction} with per-epoch conflict "
                f"({pstat}; random-effects pooling, one test). Curves that both trend over "
                "training correlate without one driving the other."
            ], []
        lo, hi = pooled["ci_low"], pooled["ci_high"]
        if _claims.interval_verdict(lo, hi, opts.margin_r) == "equivalent":
            return [], [
                f"Within runs, per-epoch conflict and validation {opts.metric} are equivalent "
                f"to uncorrelated within |r| < {opts.margin_r:g} ({pstat})."
            ]
        return [], [
            f"Inconclusive: no evidence within runs that per-epoch conflict tracks validation "
            f"{opts.metric} ({pstat}); the interval does not rule out |r| up to "
            f"{max(abs(lo), abs(hi)):.2f}"
            + (
                f"; with {pooled['k']} runs the pooled test has 80 % power only from "
                f"|r| = {mde:.2f} (simulated, gradlens.stats.min_detectable_effect)."
                if math.isfinite(mde)
                else "."
            )
        ]

    return verdict
