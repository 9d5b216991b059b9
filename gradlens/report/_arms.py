"""Multi-task optimization methods as arms of a sweep's report.

Runs trained with ``TrainConfig(weighting=...)`` (``meta["weighting"]``: ``"upgrad"``,
``"mgda/per_layer"``...) are not points of the weight analysis: their weights change every step.
They are compared here, per task set and model size, with the static-weight runs: each method,
the best static weights (chosen on the selection split, as the gain table does) and uniform
weights. Per arm: the mean final score over seeds with its t interval, its difference from the
best static weights with the paired t interval when the seeds match (Welch's otherwise), the
interval :func:`gradlens.stats.joint_gain` gives a gain, the training wall time per step
(``meta["seconds_per_step"]``) and the mean conflict frequency over probed steps.

A study has 3 to 10 seeds: a percentile bootstrap over 3 seeds covers about 0.81 at a nominal
0.95 (it can take only 10 values); the t interval is exact under normal seed noise
(``tests/report/test_arms.py`` measures both).

Example:
    >>> import pandas as pd
    >>> t = pd.DataFrame({"tasks": ["a|b"] * 4, "seed": [0, 1, 0, 1], "size": 1,
    ...     "weighting": [None, None, "mgda", "mgda"], "weights.a": 0.5, "weights.b": 0.5,
    ...     "accuracy.mean": [0.80, 0.82, 0.83, 0.86], "_select": [0.8, 0.8, 0.8, 0.8],
    ...     "seconds_per_step": [0.01, 0.01, 0.03, 0.03], "conflict_freq.mean": 0.3})
    >>> arms = method_arms(t, size_col="size")
    >>> arms[["arm", "score", "diff", "paired"]].round(3).values.tolist()
    [['static a=0.5 b=0.5', 0.81, 0.0, True], ['mgda', 0.845, 0.035, True]]
    >>> arms[["diff_low", "diff_high"]].round(3).values.tolist()[1]  # paired t, 1 df
    [-0.029, 0.099]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from gradlens.report import _render as _r
from gradlens.stats import paired_t, welch_t

__all__ = ["arms_section", "method_arms", "split_methods"]

#: The run's meta field that names its method (flattened by ``load_runs``).
METHOD_COL = "weighting"


def split_methods(table: pd.DataFrame, index: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(static, all)``: the rows without a method, and every row with ``weighting`` and
    ``seconds_per_step`` columns copied from the runs' meta (``index``, row-aligned)."""
    full = table.copy()
    for col in (METHOD_COL, "seconds_per_step"):
        full[col] = index[col].to_numpy() if col in index.columns else None
    method = full[METHOD_COL].notna().to_numpy()
    return full[~method], full


def _arm_name(row: pd.Series, wcols: list[str]) -> str:
    parts = [f"{c.removeprefix('weights.')}={float(row[c]):.3g}" for c in wcols]
    return "static " + " ".join(parts)


def method_arms(
    table: pd.DataFrame,
    *,
    size_col: str | None,
    score_col: str = "accuracy.mean",
    seed_col: str = "seed",
    ci: float = 0.95,
) -> pd.DataFrame:
    """One row per arm, task set and size: ``tasks, size, arm, kind, n, score, ci_low,
    ci_high, diff, diff_low, diff_high, paired, seconds_per_step, conflict`` (see the module
    docstring); empty when no run has a method."""
    t = table[table["tasks"].astype(str).str.contains("|", regex=False)]
    if METHOD_COL not in t.columns or not t[METHOD_COL].notna().any():
        return pd.DataFrame()
    rows: list[dict[str, Any]] = []
    keys = ["tasks"] + ([size_col] if size_col else [])
    for key, sub in t.groupby(keys, sort=True, dropna=False):
        key_t = key if isinstance(key, tuple) else (key,)
        where = {"tasks": key_t[0], "size": key_t[1] if size_col else None}
        arms, best = _arms_of(sub, score_col)
        for name, kind, g in arms:
            rows.append(
                {
                    **where,
                    "arm": name,
                    "kind": kind,
                    **_arm_stats(g, best, score_col, seed_col, ci),
                    "seconds_per_step": _mean(g, "seconds_per_step"),
                    "conflict": _mean(g, "conflict_freq.mean"),
                    "ci_level": ci,
                }
            )
    return pd.DataFrame(rows)


def _arms_of(
    sub: pd.DataFrame, score_col: str
) -> tuple[list[tuple[str, str, pd.DataFrame]], pd.DataFrame | None]:
    """The arms of one task set and size (best static, uniform, each method) and the best."""
    static = sub[sub[METHOD_COL].isna()]
    wcols = [c for c in sub.columns if str(c).startswith("weights.")]
    wcols = [c for c in wcols if static[c].notna().any()] if len(static) else []
    arms: list[tuple[str, str, pd.DataFrame]] = []
    best = None
    if len(static) and wcols:
        groups = [g for _, g in static.groupby(wcols, sort=True, dropna=False)]
        sel = "_select" if "_select" in static.columns else score_col
        means = np.array([float(g[sel].mean()) for g in groups])
        k = int(np.nanargmax(means)) if np.isfinite(means).any() else -1
        if k >= 0:
            best = groups[k]
            arms.append((_arm_name(best.iloc[0], wcols), "best static", best))
        for i, g in enumerate(groups):
            w = g.iloc[0][wcols].to_numpy(np.float64)
            if np.allclose(w, w[0]) and i != k:
                arms.append((_arm_name(g.iloc[0], wcols), "uniform", g))
    for m, g in sub[sub[METHOD_COL].notna()].groupby(METHOD_COL, sort=True):
        arms.append((str(m), "method", g))
    return arms, best


def _arm_stats(
    g: pd.DataFrame, best: pd.DataFrame | None, score_col: str, seed_col: str, ci: float
) -> dict[str, Any]:
    """Mean score with its t interval; difference from ``best``: paired t, else Welch t."""
    vals = g[[seed_col, score_col]].dropna()[score_col].to_numpy(np.float64)
    score = paired_t(vals, ci)  # the t interval of a mean (of the values, not differences)
    out = {
        "n": int(vals.size),
        "score": score["gain"],
        "ci_low": score["ci_low"],
        "ci_high": score["ci_high"],
        "diff": math.nan,
        "diff_low": math.nan,
        "diff_high": math.nan,
        "paired": False,
    }
    if best is None:
        return out
    va, vb, pairs = _pairs(g, best, score_col, seed_col)
    out["paired"] = pairs is not None
    if pairs is not None:
        diff = paired_t(pairs, ci)
    elif va.size and vb.size:
        diff = welch_t(va, vb, ci)
    else:
        return out
    out.update(diff=diff["gain"], diff_low=diff["ci_low"], diff_high=diff["ci_high"])
    return out


def _pairs(
    arm: pd.DataFrame, best: pd.DataFrame, col: str, seed_col: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The arm's and the best's values of ``col``; their per-seed differences when every seed
    appears once on each side (else ``None``)."""
    a = arm[[seed_col, col]].dropna()
    b = best[[seed_col, col]].dropna()
    va, vb = a[col].to_numpy(np.float64), b[col].to_numpy(np.float64)
    paired = (
        len(a) > 0
        and a[seed_col].is_unique
        and b[seed_col].is_unique
        and set(a[seed_col]) == set(b[seed_col])
    )
    if not paired:
        return va, vb, None
    d = a.set_index(seed_col)[col] - b.set_index(seed_col)[col]
    return va, vb, d.to_numpy(np.float64)


def _mean(g: pd.DataFrame, col: str) -> float:
    if col not in g.columns:
        return math.nan
    v = pd.to_numeric(g[col], errors="coerce").to_numpy(np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def arms_section(arms: pd.DataFrame, metric: str, split: str) -> _r.Section:
    """The report section of :func:`method_arms`' table."""
    sec = _r.Section(title="Methods as arms")
    level = round(100 * float(arms["ci_level"].iloc[0]))
    sec.paragraphs.append(
        f"Multi-task optimization methods (weights recomputed from the Gram or the losses during "
        f"training) against static weights: mean final {metric} on {split} over seeds with its "
        f"{level}% t interval over seeds, the difference from the best static weights (chosen "
        "on the selection split) with its paired t interval where the seeds match (Welch's "
        "otherwise), the "
        "training wall time per step, and the mean conflict frequency over probed steps. "
        "Intervals are not adjusted for the number of arms."
    )
    for (tasks, size), sub in arms.groupby(["tasks", "size"], sort=True, dropna=False):
        where = f"tasks {str(tasks).replace('|', ', ')}"
        if size is not None and not (isinstance(size, float) and math.isnan(size)):
            where += f", model size {_r.num(size)}"
        sec.tables.append(
            _r.Table(
                caption=f"Arms, {where}",
                header=[
                    "arm",
                    "kind",
                    "n",
                    metric,
                    f"{level}% interval",
                    "vs best static",
                    f"{level}% interval",
                    "s/step",
                    "conflict freq",
                ],
                rows=[
                    [
                        r["arm"],
                        r["kind"],
                        r["n"],
                        _r.num(r["score"]),
                        _r.interval(r["ci_low"], r["ci_high"], 3),
                        _r.num(r["diff"], 3, signed=True),
                        _r.interval(r["diff_low"], r["diff_high"], 3),
                        _r.num(r["seconds_per_step"], 3),
                        _r.num(r["conflict"], 3),
                    ]
                    for _, r in sub.iterrows()
                ],
                text_columns=frozenset({0, 1}),
            )
        )
    return sec
