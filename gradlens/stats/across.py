"""Associations across runs: weight -> interference -> accuracy, as one corrected family.

:func:`associations` builds the family of tests (every pair of columns x method x scope:
pooled, partial on model size, per-size stratum), runs each with :func:`correlate` or
:func:`partial_correlation` on its own random stream, and adjusts the p-values of the whole family.
Re-exported by :mod:`gradlens.stats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError
from gradlens.stats import _args
from gradlens.stats import _core as _core
from gradlens.stats.correlation import (
    CORRECTIONS,
    Correction,
    Method,
    correlate,
    partial_correlation,
)

__all__ = ["associations"]

_COLUMNS = [
    "relation",
    "x",
    "y",
    "method",
    "scope",
    "stratum",
    "covariates",
    "n",
    "n_groups",
    "estimate",
    "ci_low",
    "ci_high",
    "ci_level",
    "p_value",
    "p_method",
    "p_floor",
    "p_adjusted",
    "correction",
    "n_tests",
    "bootstrap",
    "note",
]


def _relation_pairs(
    weight_cols: list[str], interference_cols: list[str], accuracy_cols: list[str]
) -> list[tuple[str, str, str]]:
    pairs = [("weight->interference", w, i) for w in weight_cols for i in interference_cols]
    pairs += [("interference->accuracy", i, a) for i in interference_cols for a in accuracy_cols]
    pairs += [("weight->accuracy", w, a) for w in weight_cols for a in accuracy_cols]
    return pairs


def _group_keys(df: pd.DataFrame, cols: list[str]) -> np.ndarray | None:
    if not cols:
        return None
    # one integer label per distinct combination (NaN is a value of its own, as before)
    return df.groupby(cols, sort=False, dropna=False).ngroup().to_numpy()


def associations(
    table: pd.DataFrame,
    *,
    weight_cols: Sequence[str],
    interference_cols: Sequence[str],
    accuracy_cols: Sequence[str],
    size_col: str | None = "model.n_params",
    methods: Sequence[Method] = ("spearman", "pearson", "kendall"),
    correction: Correction = "holm",
    group_cols: Sequence[str] | None = None,
    resample: Literal["groups", "within"] = "groups",
    stratify: bool = True,
    n_boot: int = 2000,
    n_perm: int | None = None,
    ci: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """Test weight -> interference, interference -> accuracy and weight -> accuracy across runs.

    For every pair of columns and every method, one row per scope:

    - ``"pooled"``: all runs together (:func:`correlate`);
    - ``"partial"``: all runs, controlling for model size (:func:`partial_correlation` on
      ``log10(size)``, or the raw size when a size is not positive; Spearman and Pearson only,
      Kendall has no residual form) when the table holds at least two sizes;
    - ``"stratum"``: the runs of one model size (``stratum`` names it), when ``stratify`` and at
      least two sizes.

    The family corrected for multiplicity is every row of the returned table with a finite
    p-value; ``correction`` and ``n_tests`` state it in each row, ``p_adjusted`` holds the result.
    Rows whose statistic is undefined (a constant variable, fewer than 3 runs) have NaN and a
    ``note``, and are not part of the family. Each test draws from its own random stream derived
    from ``seed``.

    Args:
        table: One row per run (e.g. :func:`runs_table`).
        weight_cols: Weight columns (for two tasks one suffices: the other is its complement).
        interference_cols: Interference summary columns.
        accuracy_cols: Accuracy columns (per task and the mean).
        size_col: Model-size column for the partial correlation and the strata (``None``: none).
        methods: Correlation methods.
        correction: ``"holm"`` (family-wise error), ``"bh"`` (false discovery rate) or ``"none"``.
        group_cols: Columns defining bootstrap groups (e.g. the configuration columns, so seeds
            of one configuration move together); ``None`` resamples runs.
        resample: ``"groups"`` (cluster bootstrap) or ``"within"`` (seeds within a group).
        stratify: Add the per-size rows.
        n_boot: Bootstrap resamples per test.
        n_perm: Permutations per test; ``None``: ``max(2000, 40 * number of tests)``, so that
            the smallest attainable p-value, ``1 / (n_perm + 1)``, survives a Holm correction
            over the whole family at 0.05 (with fewer, a family of ``m`` tests can never reject
            once ``m / (n_perm + 1) >= 0.05``).
        ci: Confidence level.
        seed: Base seed.
        progress: Show a progress bar over the tests.

    Returns:
        ``relation, x, y, method, scope, stratum, covariates, n, n_groups, estimate, ci_low,
        ci_high, ci_level, p_value, p_method, p_adjusted, correction, n_tests, bootstrap, note``.

    Example:
        >>> import numpy as np, pandas as pd
        >>> rng = np.random.default_rng(0)
        >>> w = np.repeat([0.2, 0.4, 0.6, 0.8], 6)
        >>> t = pd.DataFrame({"weights.a": w, "cosine.a|b": w + rng.normal(0, 0.1, 24),
        ...                   "accuracy.mean": rng.normal(size=24)})
        >>> res = associations(t, weight_cols=["weights.a"], interference_cols=["cosine.a|b"],
        ...                    accuracy_cols=["accuracy.mean"], size_col=None,
        ...                    methods=["spearman"], n_boot=200, n_perm=200)
        >>> res[["relation", "p_adjusted", "correction"]].round(3).values.tolist()[0]
        ['weight->interference', 0.015, 'holm']
    """
    from tqdm.auto import tqdm

    table = _args.frame(table)
    cols = [
        _args.columns(table, c, name)
        for c, name in (
            (weight_cols, "weight_cols"),
            (interference_cols, "interference_cols"),
            (accuracy_cols, "accuracy_cols"),
        )
    ]
    meths = [_args.choice(m, _core.METHODS, "methods") for m in methods]
    if not meths:
        raise GradlensError("`methods` should name at least one method; found none.")
    correction = _args.choice(correction, CORRECTIONS, "correction")
    gcols = [] if group_cols is None else _args.columns(table, group_cols, "group_cols")
    if gcols:
        _args.choice(resample, _core.RESAMPLES, "resample")
    level = _args.level(ci)
    _args.count(n_boot, "n_boot")
    if n_perm is not None:
        _args.count(n_perm, "n_perm")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise GradlensError(f"`seed` should be an int; found {seed!r}.")
    sizes, size_cov, cov_name = _sizes(table, size_col)
    jobs = _jobs(_relation_pairs(*cols), meths, sizes, cov_name, stratify)
    if n_perm is None:
        n_perm = max(2000, 40 * len(jobs))
    rows = []
    for index, job in enumerate(tqdm(jobs, desc="tests", disable=not progress)):
        sub = table if job["scope"] != "stratum" else table[table[size_col] == job.pop("_size")]
        options = {
            "n_boot": n_boot,
            "n_perm": n_perm,
            "resample": resample,
            "ci": level,
            "seed": np.random.default_rng([int(seed), index]),
        }
        res = _run_test(job, sub, size_cov, gcols, options)
        res.pop("method")
        rows.append({**job, **res})
    return _adjusted(pd.DataFrame(rows), correction)


def _sizes(table: pd.DataFrame, size_col: str | None) -> tuple[list[Any], pd.Series | None, str]:
    """The distinct sizes, the covariate of the partial correlation and its name."""
    if size_col is None:
        return [], None, ""
    _args.columns(table, [size_col], "size_col")
    sizes = sorted(table[size_col].dropna().unique().tolist())
    raw = pd.to_numeric(table[size_col], errors="coerce").astype(np.float64)
    if bool((raw.dropna() > 0).all()):
        return sizes, np.log10(raw), f"log10({size_col})"
    return sizes, raw, size_col


def _jobs(
    pairs: list[tuple[str, str, str]],
    methods: list[str],
    sizes: list[Any],
    cov_name: str,
    stratify: bool,
) -> list[dict[str, Any]]:
    """The family of tests: per pair and method, pooled, partial (>= 2 sizes) and per size."""
    multi_size = len(sizes) >= 2
    jobs: list[dict[str, Any]] = []
    for relation, xc, yc in pairs:
        for method in methods:
            base = {"relation": relation, "x": xc, "y": yc, "method": method}
            jobs.append({**base, "scope": "pooled", "stratum": "all", "covariates": ""})
            if multi_size and method != "kendall":
                jobs.append({**base, "scope": "partial", "stratum": "all", "covariates": cov_name})
            if multi_size and stratify:
                jobs += [
                    {**base, "scope": "stratum", "stratum": str(s), "covariates": "", "_size": s}
                    for s in sizes
                ]
    return jobs


def _run_test(
    job: dict[str, Any],
    sub: pd.DataFrame,
    size_cov: pd.Series | None,
    gcols: list[str],
    options: dict[str, Any],
) -> dict[str, Any]:
    """One test of the family on the rows ``sub`` (a partial correlation or a correlation)."""
    x = pd.to_numeric(sub[job["x"]], errors="coerce")
    y = pd.to_numeric(sub[job["y"]], errors="coerce")
    if job["scope"] == "partial":
        work = pd.DataFrame({"x": x, "y": y, "size": size_cov})
        if gcols:
            work["g"] = _group_keys(sub, gcols)
        res = partial_correlation(
            work, "x", "y", ["size"], method=job["method"], groups="g" if gcols else None,
            **options,
        )  # fmt: skip
        res.pop("covariates")
        return res
    return correlate(
        x.to_numpy(float), y.to_numpy(float), method=job["method"],
        groups=_group_keys(sub, gcols), **options,
    )  # fmt: skip


def _adjusted(out: pd.DataFrame, correction: str) -> pd.DataFrame:
    """The family's table with its adjusted p-values, the correction and the family's size."""
    if out.empty:
        return pd.DataFrame(columns=_COLUMNS)
    p = out["p_value"].to_numpy(dtype=np.float64)
    out["p_adjusted"] = _core.adjust_pvalues(p, correction)
    out["correction"] = correction
    out["n_tests"] = int(np.isfinite(p).sum())
    return out[_COLUMNS]
