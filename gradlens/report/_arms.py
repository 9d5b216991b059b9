"""Multi-task optimization methods as arms of a sweep's report.

Runs trained with ``TrainConfig(weighting=...)`` (``meta["weighting"]``: ``"upgrad"``,
``"mgda/per_layer"``...) are not points of the weight analysis: their weights change every step.
They are compared here, per task set and model size, with the static-weight runs: each method,
the best static weights (chosen on the selection split, as the gain table does) and uniform
weights. Per arm: the mean final score over seeds with a bootstrap interval (seeds resampled, as
in the weight analysis), its difference from the best static weights (paired by seed when the
seeds match; :func:`gradlens.stats.joint_gain`'s resampling), the training wall time per step
(``meta["seconds_per_step"]``) and the mean conflict frequency over probed steps.

Example:
    >>> import pandas as pd
    >>> t = pd.DataFrame({"tasks": ["a|b"] * 4, "seed": [0, 1, 0, 1], "size": 1,
    ...     "weighting": [None, None, "mgda", "mgda"], "weights.a": 0.5, "weights.b": 0.5,
    ...     "accuracy.mean": [0.80, 0.82, 0.83, 0.86], "_select": [0.8, 0.8, 0.8, 0.8],
    ...     "seconds_per_step": [0.01, 0.01, 0.03, 0.03], "conflict_freq.mean": 0.3})
    >>> arms = method_arms(t, size_col="size", n_boot=200)
    >>> arms[["arm", "score", "diff", "paired"]].round(3).values.tolist()
    [['static a=0.5 b=0.5', 0.81, 0.0, True], ['mgda', 0.845, 0.035, True]]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from gradlens.report import _render as _r
from gradlens.stats import _core as _core
from gradlens.stats._gain import gain_boot, gain_pairs, rescaled

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
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per arm, task set and size: ``tasks, size, arm, kind, n, score, ci_low,
    ci_high, diff, diff_low, diff_high, paired, seconds_per_step, conflict`` (see the module
    docstring); empty when no run has a method."""
    rng = np.random.default_rng(seed)
    t = table[table["tasks"].astype(str).str.contains("|", regex=False)]
    if METHOD_COL not in t.columns or not t[METHOD_COL].notna().any():
        return pd.DataFrame()
    rows: list[dict[str, Any]] = []
    keys = ["tasks"] + ([size_col] if size_col else [])
    for key, sub in t.groupby(keys, sort=True, dropna=False):
        key_t = key if isinstance(key, tuple) else (key,)
        static = sub[sub[METHOD_COL].isna()]
        wcols = [c for c in sub.columns if str(c).startswith("weights.")]
        wcols = [c for c in wcols if static[c].notna().any()] if len(static) else []
        arms: list[tuple[str, str, pd.DataFrame]] = []
        best = None
        if len(static) and wcols:
            groups = [g for _, g in static.groupby(wcols, sort=True, dropna=False)]
            sel = "_select" if "_select" in static.columns else score_col
            means = np.array([float(g[sel].mean()) for g in groups])
            if np.isfinite(means).any():
                k = int(np.nanargmax(means))
                best = groups[k]
                arms.append((_arm_name(best.iloc[0], wcols), "best static", best))
            for i, g in enumerate(groups):
                w = g.iloc[0][wcols].to_numpy(np.float64)
                if np.allclose(w, w[0]) and (best is None or i != k):
                    arms.append((_arm_name(g.iloc[0], wcols), "uniform", g))
        for m, g in sub[sub[METHOD_COL].notna()].groupby(METHOD_COL, sort=True):
            arms.append((str(m), "method", g))
        for name, kind, g in arms:
            s = g[[seed_col, score_col]].dropna()
            vals = s[score_col].to_numpy(np.float64)
            lo = hi = math.nan
            if vals.size and n_boot:
                C = rng.multinomial(vals.size, np.full(vals.size, 1.0 / vals.size), size=n_boot)
                boots = C @ rescaled(vals) / vals.size
                lo, hi = _core.percentile_interval(boots, ci)
            d = dlo = dhi = math.nan
            paired = False
            if best is not None:
                va, vb, pairs = gain_pairs(g, best, score_col, seed_col)
                paired = pairs is not None
                if pairs is not None:
                    d = float(pairs.mean()) if pairs.size else math.nan
                elif va.size and vb.size:
                    d = float(va.mean() - vb.mean())
                boots = (
                    gain_boot(va, vb, pairs, n_boot, rng)
                    if n_boot and va.size and vb.size
                    else np.empty(0)
                )
                if boots.size:
                    dlo, dhi = _core.percentile_interval(boots, ci)
            rows.append(
                {
                    "tasks": key_t[0],
                    "size": key_t[1] if size_col else None,
                    "arm": name,
                    "kind": kind,
                    "n": int(vals.size),
                    "score": float(vals.mean()) if vals.size else math.nan,
                    "ci_low": lo,
                    "ci_high": hi,
                    "diff": d,
                    "diff_low": dlo,
                    "diff_high": dhi,
                    "paired": paired,
                    "seconds_per_step": _mean(g, "seconds_per_step"),
                    "conflict": _mean(g, "conflict_freq.mean"),
                    "ci_level": ci,
                }
            )
    return pd.DataFrame(rows)


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
        f"{level}% bootstrap interval (seeds resampled), the difference from the best static "
        "weights (chosen on the selection split; paired by seed where the seeds match), the "
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
