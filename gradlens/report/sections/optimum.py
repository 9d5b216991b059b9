"""The optimal-weight part of a task set's section: the grid optimum per model size with its
interval, and whether it moves with model size."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from gradlens.report import _render as _r
from gradlens.report.sections._common import (
    Findings,
    Options,
    Verdict,
    describe,
    present,
    size_label,
)

__all__ = ["optimum_part"]


def optimum_part(
    joint: pd.DataFrame,
    wcol: str,
    size_col: str | None,
    opts: Options,
    sec: _r.Section,
    found: Findings,
    out: dict[str, Any],
) -> pd.DataFrame | None:
    """The optimal ``wcol`` per model size (a description) and its trend with size (a test)."""
    from gradlens import stats

    score = f"{opts.metric}.mean"
    if not present(joint, score):
        return None
    work = joint
    scol = size_col
    if scol is None:
        work = joint.assign(**{"model size": "all runs"})
        scol = "model size"
    opt = stats.optimal_weight(
        work,
        weight_col=wcol,
        score_col=score,
        size_cols=[scol],
        n_boot=opts.n_boot,
        seed=opts.seed,
    )
    out["optimal_weight"] = opt
    level = round(100 * float(opt["ci_level"].iloc[0])) if len(opt) else 95
    sec.tables.append(_optimum_table(opt, wcol, scol, score, level))
    wdesc = describe(wcol, opts.metric)
    stars = "; ".join(
        f"{_r.num(r['p_star'])} {_r.interval(r['ci_low'], r['ci_high'])}"
        + (f" at {size_label(scol, r[scol])}" if size_col else "")
        for _, r in opt.iterrows()
    )
    if len(opt) and int(opt["min_seeds"].min()) < 2:
        found.unsupported.append(
            f"The intervals of the optimal {wdesc} do not reflect seed noise: some weights have "
            "a single seed."
        )
    found.descriptive.append(
        f"The best {wdesc} in this sweep (grid optimum of the mean over seeds) is {stars}."
    )
    if size_col is not None and len(opt) >= 2:
        _trend_part(joint, opt, wcol, size_col, level, opts, sec, found, out)
    return opt


def _optimum_table(opt: pd.DataFrame, wcol: str, scol: str, score: str, level: int) -> _r.Table:
    return _r.Table(
        caption=f"Optimal {wcol} per model size (grid optimum of the mean {score} over "
        f"seeds; {level}% bootstrap interval, seeds resampled within each weight)",
        header=[scol, "p*", f"{level}% interval", f"{score} at p*", "weights", "runs", "min seeds"],
        rows=[
            [
                _r.num(r[scol], 4),
                _r.num(r["p_star"]),
                _r.interval(r["ci_low"], r["ci_high"]),
                _r.num(r["score_at_p_star"], 4),
                _r.num(r["n_weights"]),
                _r.num(r["n_runs"]),
                _r.num(r["min_seeds"]),
            ]
            for _, r in opt.iterrows()
        ],
    )


def _trend_part(
    joint: pd.DataFrame,
    opt: pd.DataFrame,
    wcol: str,
    size_col: str,
    level: int,
    opts: Options,
    sec: _r.Section,
    found: Findings,
    out: dict[str, Any],
) -> None:
    """Does the optimal weight move with model size? Its table, and the deferred claim."""
    from gradlens import stats

    # The test of a moving optimum fits a parabola per size when every size has 3 weights or
    # more: the grid optimum's bootstrap test has atoms at slope 0 and rejects 0.00-0.01 of null
    # sweeps (docs/stats.md); the table above stays the grid optimum, a description.
    quadratic = int(opt["n_weights"].min()) >= 3
    trend = stats.optimal_weight_trend(
        joint,
        weight_col=wcol,
        score_col=f"{opts.metric}.mean",
        size_col=size_col,
        estimator="quadratic" if quadratic else "grid",
        n_boot=opts.n_boot,
        seed=opts.seed,
    )
    out["optimal_weight_trend"] = trend
    sec.tables.append(
        _r.Table(
            caption=f"Does the optimal weight move with model size? Slope of p* "
            f"({trend['estimator']} optimum) on {trend['x']}",
            header=["slope", f"{level}% interval", "p", "spearman (sizes, p*)", "sizes"],
            rows=[
                [
                    _r.num(trend["slope"], 3, signed=True),
                    _r.interval(trend["ci_low"], trend["ci_high"], 3),
                    _r.pval(trend["p_value"]),
                    _r.num(trend["spearman"], 2),
                    _r.num(trend["n_sizes"]),
                ]
            ],
        )
    )
    stat = (
        f"slope = {_r.num(trend['slope'], 2, signed=True)} per unit of {trend['x']} "
        f"{_r.interval(trend['ci_low'], trend['ci_high'], 3)}, p = {_r.pval(trend['p_value'])}, "
        f"{trend['n_sizes']} sizes, {trend['estimator']} optimum per size"
    )
    wdesc = describe(wcol, opts.metric)
    p = float(trend["p_value"])
    trend["min_detectable_slope_approx"] = _trend_mde(trend, opts.alpha)

    def power_text(level: float) -> str:
        mde = _trend_mde(trend, level)
        if not math.isfinite(mde):
            return ""
        return (
            f" At this design the test has 80 % power only for slopes of about |{mde:.2g}| or "
            f"more per unit of {trend['x']} (normal approximation at level {level:.3g}: the "
            "standard error read off the interval's width)."
        )

    def verdict(level: float) -> Verdict:
        if math.isfinite(p) and p < level:
            return [f"The optimal {wdesc} moves with model size ({stat}; one test)."], []
        return [], [
            f"Inconclusive: no evidence that the optimal {wdesc} moves with model size "
            f"({stat}); slopes inside that interval are not ruled out, so this is not evidence "
            "of one weight for all sizes." + power_text(level)
        ]

    found.defer(f"optimal-weight trend of {wcol}", p, verdict)


def _trend_mde(trend: dict[str, Any], alpha: float) -> float:
    """The slope a two-sided test at level ``alpha`` detects with 80 % power, by the normal
    approximation ``(z_(1-alpha/2) + z_0.8) * se`` with ``se`` read off the interval's width
    (``ci_level``); NaN without a finite interval. (The simulated one,
    ``stats.min_detectable_effect("trend")``, takes tens of seconds a task set: too slow for
    every report.)

    >>> round(_trend_mde({"ci_low": -0.196, "ci_high": 0.196, "ci_level": 0.95}, 0.05), 3)
    0.28
    """
    from statistics import NormalDist

    lo, hi = float(trend.get("ci_low", math.nan)), float(trend.get("ci_high", math.nan))
    level = float(trend.get("ci_level", 0.95))
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < level < 1 and hi > lo):
        return math.nan
    z = NormalDist().inv_cdf
    se = (hi - lo) / (2 * z(0.5 + level / 2))
    return (z(1 - alpha / 2) + z(0.8)) * se
