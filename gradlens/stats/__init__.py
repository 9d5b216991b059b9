"""Across-run statistics: does interference move with the loss weights, and predict accuracy?

Tables in, tables out. :func:`runs_table` turns runs (``gradlens.store.Run`` objects, or a sweep
directory) into one row per run: configuration, interference summaries and final accuracies.
:func:`associations` then tests weight -> interference, interference -> accuracy and
weight -> accuracy with Spearman, Pearson and Kendall correlations, bootstrap intervals,
permutation p-values, partial correlations controlling for model size, strata by model size, and a
Holm or Benjamini-Hochberg correction named in its output. :func:`within_run` correlates per-epoch
interference with the validation metric with a block bootstrap; :func:`optimal_weight`,
:func:`optimal_weight_trend` and :func:`joint_gain` answer the weight-sweep questions.
Everything is a tidy :class:`pandas.DataFrame` or a flat dict, and :func:`to_json` writes any of
them as strict JSON (NaN -> null). Methods, their assumptions and the measured calibration are in
``docs/stats.md``.

The resampling kernels are vectorised numpy (``gradlens.stats._core``); scipy (the ``stats``
extra) is needed only for the t and normal quantiles of :func:`within_run`. The tests check every
statistic against scipy.

Example:
    >>> import numpy as np
    >>> from gradlens import stats
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=40); y = x + rng.normal(size=40)
    >>> res = stats.correlate(x, y, method="spearman", n_boot=500, n_perm=500)
    >>> res["ci_low"] < res["estimate"] < res["ci_high"], res["p_value"] < 0.05
    (True, True)
    >>> stats.adjust([0.01, 0.04, 0.03], method="holm").round(2).tolist()
    [0.03, 0.06, 0.06]
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError, require
from gradlens._types import TOTAL_LAYER
from gradlens.stats import _core as _core
from gradlens.stats import _gain as _gain

if TYPE_CHECKING:
    from gradlens.store import Run

__all__ = [
    "adjust",
    "associations",
    "correlate",
    "epoch_table",
    "joint_gain",
    "min_detectable_effect",
    "optimal_weight",
    "optimal_weight_trend",
    "partial_correlation",
    "pool_correlations",
    "power",
    "run_summary",
    "runs_table",
    "selected_gain",
    "to_json",
    "within_run",
]

Method = Literal["spearman", "pearson", "kendall"]
Correction = Literal["holm", "bh", "none"]
Estimator = Literal["grid", "quadratic"]
_CORRECTIONS: tuple[str, ...] = ("holm", "bh", "none")
_ESTIMATORS: tuple[str, ...] = ("grid", "quadratic")
_SUMMARY_COLUMNS = ["phase", "metric", "task_i", "task_j", "value", "n"]
_PAIR_METRICS = ("cosine", "conflict", "gms")
SeedLike = int | np.random.Generator | None


# --------------------------------------------------------------------------- validation helpers


def _choice(value: Any, allowed: Sequence[str], name: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise GradlensError(f"`{name}` should be one of {list(allowed)}; found {value!r}.")
    return value


def _rng(seed: SeedLike) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)):
        return np.random.default_rng(seed)
    raise GradlensError(f"`seed` should be an int, a numpy Generator or None; found {seed!r}.")


def _count(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise GradlensError(f"`{name}` should be an integer >= {minimum}; found {value!r}.")
    return int(value)


def _level(ci: Any) -> float:
    if isinstance(ci, bool) or not isinstance(ci, (int, float)) or not 0.0 < float(ci) < 1.0:
        raise GradlensError(f"`ci` should be a confidence level in (0, 1); found {ci!r}.")
    return float(ci)


def _vector(values: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise GradlensError(
            f"`{name}` should be a 1-D sequence of numbers; found {type(values).__name__}."
        ) from None
    if arr.ndim != 1:
        raise GradlensError(f"`{name}` should be 1-D; found shape {arr.shape}.")
    if np.isinf(arr).any():
        raise GradlensError(f"`{name}` should hold finite numbers or NaN; found an infinity.")
    return arr


def _columns(table: pd.DataFrame, cols: Sequence[str], name: str) -> list[str]:
    if isinstance(cols, str):
        cols = [cols]
    out = list(cols)
    missing = [c for c in out if c not in table.columns]
    if missing:
        raise GradlensError(
            f"`{name}` should name columns of the table; found {missing}, which are not among "
            f"{list(table.columns)}."
        )
    return out


def _frame(table: Any, name: str = "table") -> pd.DataFrame:
    if not isinstance(table, pd.DataFrame):
        raise GradlensError(
            f"`{name}` should be a pandas DataFrame (e.g. from runs_table); "
            f"found {type(table).__name__}."
        )
    return table


# --------------------------------------------------------------------------- correlations


def _result(
    method: str,
    estimate: float,
    ci: tuple[float, float],
    level: float,
    p: float,
    *,
    n: int,
    n_groups: int,
    bootstrap: str,
    n_boot: int,
    p_method: str,
    note: str,
    p_floor: float = math.nan,
) -> dict[str, Any]:
    return {
        "method": method,
        "estimate": float(estimate),
        "ci_low": ci[0],
        "ci_high": ci[1],
        "ci_level": level,
        "p_value": float(p),
        "n": n,
        "n_groups": n_groups,
        "bootstrap": bootstrap,
        "n_boot": n_boot,
        "p_method": p_method,
        "p_floor": p_floor,
        "note": note,
    }


def _undefined(
    method: str, level: float, n: int, n_groups: int, bootstrap: str, note: str
) -> dict[str, Any]:
    """The result row of a statistic that is undefined on this data (NaN, with the reason)."""
    nan2 = (math.nan, math.nan)
    return _result(
        method,
        math.nan,
        nan2,
        level,
        math.nan,
        n=n,
        n_groups=n_groups,
        bootstrap=bootstrap,
        n_boot=0,
        p_method="none",
        note=note,
    )


def _degenerate(x: np.ndarray, y: np.ndarray) -> str:
    if x.size < 3:
        return f"fewer than 3 complete pairs ({x.size})"
    if np.all(x == x[0]):
        return "x is constant"
    if np.all(y == y[0]):
        return "y is constant"
    return ""


def _group_codes(groups: Any, n: int, name: str = "groups") -> np.ndarray:
    arr = np.asarray(groups, dtype=object)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise GradlensError(
            f"`{name}` should give one group label per observation ({n}); found shape {arr.shape}."
        )
    codes, _ = pd.factorize(pd.Series(arr), use_na_sentinel=False)
    return np.asarray(codes, dtype=np.intp)


def correlate(
    x: Any,
    y: Any,
    *,
    method: Method = "spearman",
    n_boot: int = 2000,
    n_perm: int = 2000,
    groups: Any = None,
    resample: Literal["groups", "within"] = "groups",
    block: int | Literal["auto"] | None = None,
    ci: float = 0.95,
    seed: SeedLike = 0,
) -> dict[str, Any]:
    """Correlation of ``x`` and ``y`` with a bootstrap interval and a two-sided p-value.

    The estimate equals ``scipy.stats.spearmanr`` / ``pearsonr`` / ``kendalltau`` (tau-b). Pairs
    with a NaN are dropped first. The interval is a percentile bootstrap (resamples where a
    variable is constant are left out; ``n_boot`` in the result counts the ones kept):

    - default: resample observations (runs) with replacement;
    - ``groups`` (one label per observation, e.g. a configuration id) with ``resample="groups"``:
      a cluster bootstrap that resamples whole groups; with ``resample="within"``: a stratified
      bootstrap that resamples members (seeds) within each group, keeping the design fixed;
    - ``block`` (``"auto"`` or a length): ``x`` and ``y`` are time series and a circular block
      bootstrap resamples blocks of consecutive points (``"auto"``: see ``docs/stats.md``).

    The p-value is a permutation test of ``|estimate|`` (``y`` permuted against ``x``) with the
    +1 correction, ``(1 + #{|r_perm| >= |r|}) / (n_perm + 1)``; when ``n! <= n_perm`` all
    permutations are enumerated and the test is exact. With ``block``, permuting would destroy the
    autocorrelation, so the p-value comes from the centred block bootstrap instead,
    ``(1 + #{|r*_b - r| >= |r|}) / (B + 1)``.

    Args:
        x: First variable, 1-D.
        y: Second variable, same length.
        method: ``"spearman"``, ``"pearson"`` or ``"kendall"``.
        n_boot: Bootstrap resamples (0: no interval).
        n_perm: Permutations (0: no p-value; unused with ``block``).
        groups: Optional group label per observation, for a cluster or stratified bootstrap.
        resample: ``"groups"`` (cluster) or ``"within"`` (stratified), with ``groups``.
        block: Block length for time series, or ``"auto"``; exclusive with ``groups``.
        ci: Confidence level of the interval.
        seed: Seed or ``numpy.random.Generator`` of the resampling.

    Returns:
        ``method, estimate, ci_low, ci_high, ci_level, p_value, n, n_groups, bootstrap, n_boot,
        p_method, note``; the estimate and p-value are NaN (with a ``note``) when a variable is
        constant or fewer than 3 pairs remain.

    Example:
        >>> r = correlate([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], method="pearson", n_boot=0)
        >>> round(r["estimate"], 3), round(r["p_value"], 3), r["p_method"]
        (0.8, 0.133, 'exact permutation')
    """
    method = _choice(method, _core.METHODS, "method")
    n_boot = _count(n_boot, "n_boot")
    n_perm = _count(n_perm, "n_perm")
    level = _level(ci)
    rng = _rng(seed)
    xv, yv = _vector(x, "x"), _vector(y, "y")
    if xv.shape != yv.shape:
        raise GradlensError(
            f"`x` and `y` should have the same length; found {xv.size} and {yv.size}."
        )
    if groups is not None and block is not None:
        raise GradlensError(
            "`groups` and `block` should not both be given: a bootstrap resamples either groups "
            f"or blocks of a series; found groups and block={block!r}."
        )
    codes = None if groups is None else _group_codes(groups, xv.size)
    keep = ~(np.isnan(xv) | np.isnan(yv))
    xv, yv = xv[keep], yv[keep]
    if codes is not None:
        codes = np.asarray(pd.factorize(codes[keep])[0], dtype=np.intp)
        resample = _choice(resample, _core.RESAMPLES, "resample")  # type: ignore[assignment]
    n = xv.size
    n_groups = int(codes.max()) + 1 if codes is not None and n else n
    if block is not None:
        if block == "auto":
            length = _core.auto_block_length(xv, yv) if n else 1
        else:
            length = _count(block, "block", minimum=1)
        boot_kind = f"circular block (length {length})"
    else:
        length = 0
        boot_kind = "runs" if codes is None else resample
    note = _degenerate(xv, yv)
    nan2 = (math.nan, math.nan)
    if note:
        return _undefined(method, level, n, n_groups, boot_kind, note)
    estimate = float(_core.correlation_counts(xv, yv, np.ones((1, n)), method)[0])
    boots = np.empty(0)
    if n_boot:
        if block is not None:
            C = _core.block_bootstrap_counts(rng, n_boot, n, min(length, n))
        else:
            C = _core.bootstrap_counts(rng, n_boot, n, codes, resample)
        boots = _core.correlation_counts(xv, yv, C, method)
        boots = boots[np.isfinite(boots)]
    interval = _core.percentile_interval(boots, level) if boots.size else nan2
    floor = math.nan
    if block is not None:
        p = _core.centered_bootstrap_pvalue(estimate, boots) if boots.size else math.nan
        p_method = "centred block bootstrap" if boots.size else "none"
    elif n_perm:
        perms, exact, unit = _permutation_rows(rng, n, n_perm, codes)
        p = _core.permutation_pvalue(estimate, _core.permutation_null(xv, yv, perms, method), exact)
        p_method = f"{'exact ' if exact else ''}permutation{unit}"
        floor = _core.pvalue_floor(exact, perms.shape[0])
    else:
        p, p_method = math.nan, "none"
    return _result(
        method,
        estimate,
        interval,
        level,
        p,
        n=n,
        n_groups=n_groups,
        bootstrap=boot_kind,
        n_boot=int(boots.size),
        p_method=p_method,
        note="",
        p_floor=floor,
    )


def _permutation_rows(
    rng: np.random.Generator, n: int, n_perm: int, codes: np.ndarray | None
) -> tuple[np.ndarray, bool, str]:
    """Permutations of runs, or of whole groups when ``codes`` are given (the bootstrap's unit)."""
    if codes is None or int(codes.max()) + 1 == n:
        perms, exact = _core.permutations(rng, n, n_perm)
        return perms, exact, ""
    perms, exact, _ = _core.group_permutations(rng, codes, n_perm)
    return perms, exact, " of groups"


def partial_correlation(
    df: pd.DataFrame,
    x: str,
    y: str,
    covariates: Sequence[str],
    *,
    method: Literal["spearman", "pearson"] = "spearman",
    n_boot: int = 2000,
    n_perm: int = 2000,
    groups: str | Sequence[str] | None = None,
    resample: Literal["groups", "within"] = "groups",
    ci: float = 0.95,
    seed: SeedLike = 0,
) -> dict[str, Any]:
    """Partial correlation of columns ``x`` and ``y`` of ``df`` controlling for ``covariates``.

    Both variables are residualised on the covariates (least squares with an intercept) and the
    residuals are correlated (Pearson). For ``"spearman"`` every variable is ranked first (the
    pingouin convention), so the result equals
    ``-P[x, y] / sqrt(P[x, x] P[y, y])`` with ``P`` the inverse of the rank correlation matrix.
    Rows with a NaN in a used column are dropped. The bootstrap redoes the residualisation in
    every resample (rows, or groups given by the ``groups`` columns, as in :func:`correlate`); the
    permutation p-value permutes the residuals of ``y`` against those of ``x`` (Freedman-Lane
    style), ``(1 + #{|r_perm| >= |r|}) / (n_perm + 1)``. Kendall has no residual form and is
    refused.

    Args:
        df: The table.
        x: Column of the first variable.
        y: Column of the second variable.
        covariates: Columns to control for (at least one).
        method: ``"spearman"`` or ``"pearson"``.
        n_boot: Bootstrap resamples (0: no interval).
        n_perm: Permutations (0: no p-value).
        groups: Column(s) whose combined values define bootstrap groups.
        resample: ``"groups"`` (cluster) or ``"within"`` (stratified), with ``groups``.
        ci: Confidence level.
        seed: Seed or Generator.

    Returns:
        The keys of :func:`correlate`, plus ``covariates`` (comma-joined).

    Example:
        >>> import numpy as np, pandas as pd
        >>> rng = np.random.default_rng(0)
        >>> z = rng.normal(size=100)  # a confounder of x and y
        >>> x, y = z + rng.normal(size=100), z + rng.normal(size=100)
        >>> df = pd.DataFrame({"z": z, "x": x, "y": y})
        >>> round(correlate(x, y, n_boot=0, n_perm=0)["estimate"], 2)
        0.49
        >>> r = partial_correlation(df, "x", "y", ["z"], n_boot=0, n_perm=500)
        >>> round(r["estimate"], 2), r["p_value"] > 0.05
        (0.03, True)
    """
    df = _frame(df, "df")
    method = _choice(method, ("spearman", "pearson"), "method")  # type: ignore[assignment]
    covs = _columns(df, covariates, "covariates")
    if not covs:
        raise GradlensError("`covariates` should name at least one column; found none.")
    _columns(df, [x, y], "x/y")
    group_cols = [] if groups is None else _columns(df, groups, "groups")
    n_boot = _count(n_boot, "n_boot")
    n_perm = _count(n_perm, "n_perm")
    level = _level(ci)
    rng = _rng(seed)
    used = df[[x, y, *covs]].apply(pd.to_numeric, errors="coerce").astype(np.float64)
    keep = used.notna().all(axis=1).to_numpy()
    xv = used[x].to_numpy()[keep]
    yv = used[y].to_numpy()[keep]
    Z = used[covs].to_numpy()[keep]
    n = xv.size
    codes = None
    if group_cols:
        key = df.loc[keep, group_cols].astype(str).agg("\x1f".join, axis=1)
        codes = np.asarray(pd.factorize(key)[0], dtype=np.intp)
        resample = _choice(resample, _core.RESAMPLES, "resample")  # type: ignore[assignment]
    n_groups = int(codes.max()) + 1 if codes is not None and n else n
    boot_kind = "runs" if codes is None else resample
    nan2 = (math.nan, math.nan)
    note = _degenerate(xv, yv)
    est = math.nan
    if not note:
        est = float(_core.partial_counts(xv, yv, Z, np.ones((1, n)), method)[0])
        if not math.isfinite(est):
            note = "a variable is fully explained by the covariates"
    out_cov = ",".join(covs)
    if note:
        res = _undefined(method, level, n, n_groups, boot_kind, note)
        return {**res, "covariates": out_cov}
    boots = np.empty(0)
    if n_boot:
        C = _core.bootstrap_counts(rng, n_boot, n, codes, resample)
        boots = _core.partial_counts(xv, yv, Z, C, method)
        boots = boots[np.isfinite(boots)]
    interval = _core.percentile_interval(boots, level) if boots.size else nan2
    p, p_method, floor = math.nan, "none", math.nan
    if n_perm:
        rx, ry = _core.residuals_for_partial(xv, yv, Z, method)
        perms, exact, unit = _permutation_rows(rng, n, n_perm, codes)
        null = _core.permutation_null(rx, ry, perms, "pearson")
        p = _core.permutation_pvalue(est, null, exact)
        p_method = f"{'exact ' if exact else ''}permutation{unit} of residuals"
        floor = _core.pvalue_floor(exact, perms.shape[0])
    res = _result(
        method,
        est,
        interval,
        level,
        p,
        n=n,
        n_groups=n_groups,
        bootstrap=boot_kind,
        n_boot=int(boots.size),
        p_method=p_method,
        note="",
        p_floor=floor,
    )
    return {**res, "covariates": out_cov}


def adjust(pvalues: Any, method: Correction = "holm") -> np.ndarray:
    """Multiplicity-adjusted p-values: Holm (family-wise error) or Benjamini-Hochberg (FDR).

    Holm: with ``p_(1) <= ... <= p_(m)``, ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``.
    BH: ``adj_(i) = min_{j >= i} min(1, m p_(j) / j)`` (equal to
    ``scipy.stats.false_discovery_control(p, method="bh")``). ``"none"`` returns the input. NaN
    entries are not part of the family and stay NaN.

    Args:
        pvalues: 1-D p-values in [0, 1] (NaN allowed).
        method: ``"holm"``, ``"bh"`` or ``"none"``.

    Example:
        >>> adjust([0.01, 0.02, 0.03, float("nan")], method="bh").tolist()
        [0.03, 0.03, 0.03, nan]
    """
    method = _choice(method, _CORRECTIONS, "method")  # type: ignore[assignment]
    p = _vector(pvalues, "pvalues")
    finite = p[np.isfinite(p)]
    if ((finite < 0) | (finite > 1)).any():
        raise GradlensError(
            f"`pvalues` should lie in [0, 1]; found {finite[(finite < 0) | (finite > 1)][:3]}."
        )
    return _core.adjust_pvalues(p, method)


# --------------------------------------------------------------------------- per-run summaries


def _metrics_of(run: Any) -> pd.DataFrame:
    frame = getattr(run, "metrics", None)
    if not isinstance(frame, pd.DataFrame):
        raise GradlensError(
            "`run` should have a `.metrics` DataFrame [step, layer, metric, task_i, task_j, "
            f"value] (a gradlens.store.Run); found {type(run).__name__} without one."
        )
    return frame


def _evals_of(run: Any) -> pd.DataFrame:
    frame = getattr(run, "evals", None)
    if not isinstance(frame, pd.DataFrame):
        raise GradlensError(
            "`run` should have an `.evals` DataFrame [point, epoch, step, split, task, metric, "
            f"value]; found {type(run).__name__} without one."
        )
    return frame


def _meta_of(run: Any) -> dict[str, Any]:
    meta = getattr(run, "meta", None)
    if not isinstance(meta, Mapping):
        raise GradlensError(
            f"`run` should have a `.meta` dict; found {type(run).__name__} without one."
        )
    return dict(meta)


def _layer_rows(run: Any, layer: str) -> pd.DataFrame:
    m = _metrics_of(run)
    rows = m[m["layer"].astype(str) == layer]
    if rows.empty and not m.empty:
        raise GradlensError(
            f"`layer` should be one of {sorted(m['layer'].astype(str).unique())}; found {layer!r}."
        )
    out = rows[["step", "metric", "task_i", "task_j", "value"]].copy()
    for col in ("metric", "task_i", "task_j"):
        out[col] = out[col].astype(str)
    out["step"] = out["step"].astype(np.int64)
    out["value"] = out["value"].astype(np.float64)
    return out


def _aggregate(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean per key, frequency of ``value > 0`` for ``conflict`` (renamed ``conflict_freq``)."""
    rows = rows[np.isfinite(rows["value"].to_numpy())].copy()
    is_conflict = rows["metric"] == "conflict"
    rows.loc[is_conflict, "value"] = (rows.loc[is_conflict, "value"] > 0).astype(np.float64)
    rows.loc[is_conflict, "metric"] = "conflict_freq"
    out = rows.groupby(keys, sort=False, observed=True)["value"].agg(["mean", "count"])
    return out.reset_index().rename(columns={"mean": "value", "count": "n"})


def _phase_labels(steps: np.ndarray, phases: int) -> np.ndarray:
    if steps.size == 0:
        return np.empty(0, dtype=np.int64)
    s0, s1 = int(steps.min()), int(steps.max())
    if s1 == s0:
        return np.ones(steps.size, dtype=np.int64)
    k = np.floor((steps - s0) / (s1 - s0) * phases).astype(np.int64) + 1
    return np.minimum(k, phases)


def run_summary(run: Run | Any, *, phases: int = 3, layer: str = TOTAL_LAYER) -> pd.DataFrame:
    """Summaries of one run's interference over training, overall and per phase.

    Phase ``"k/P"`` holds the probed steps in the k-th of ``P`` equal spans of the probed step
    range ``[first, last]`` (the last step belongs to the last phase), phase ``"all"`` every
    probed step. Per metric and pair (or task): the mean over probed steps of ``cosine``,
    ``gms``, ``norm``, ``cos_to_update``, ``norm_ratio``, ``norm_cv``, and ``conflict_freq``, the
    fraction of probed steps in conflict (``cos < 0``). NaN values (a task with a zero gradient)
    are left out; ``n`` counts the values used. An empty phase has no rows.

    Args:
        run: A ``gradlens.store.Run`` (anything with ``.metrics`` in the long format).
        phases: Number of phases of training (>= 1).
        layer: The layer to summarise; the total over shared parameters by default.

    Returns:
        Tidy ``[phase, metric, task_i, task_j, value, n]``.

    Example:
        >>> import pandas as pd
        >>> from types import SimpleNamespace
        >>> m = pd.DataFrame({"step": [0, 10, 20, 30], "layer": "__all__", "metric": "cosine",
        ...                   "task_i": "a", "task_j": "b", "value": [0.5, -0.1, 0.3, -0.2]})
        >>> s = run_summary(SimpleNamespace(metrics=m), phases=2)
        >>> s[s.phase == "all"][["metric", "value", "n"]].values.tolist()
        [['cosine', 0.125, 4]]
        >>> s[s.phase == "2/2"].value.round(3).tolist()
        [0.05]
    """
    phases = _count(phases, "phases", minimum=1)
    rows = _layer_rows(run, layer)
    if rows.empty:
        return pd.DataFrame(
            {
                c: pd.Series(
                    dtype=object if c in ("phase", "metric", "task_i", "task_j") else float
                )
                for c in _SUMMARY_COLUMNS
            }
        )
    keys = ["metric", "task_i", "task_j"]
    whole = _aggregate(rows, keys)
    whole.insert(0, "phase", "all")
    parts = [whole]
    labels = _phase_labels(rows["step"].to_numpy(), phases)
    for k in range(1, phases + 1):
        sel = rows[labels == k]
        if sel.empty:
            continue
        agg = _aggregate(sel, keys)
        agg.insert(0, "phase", f"{k}/{phases}")
        parts.append(agg)
    out = pd.concat(parts, ignore_index=True)[_SUMMARY_COLUMNS]
    out["n"] = out["n"].astype(np.int64)
    return out


def _summary_wide(summary: pd.DataFrame, phase: str) -> dict[str, float]:
    sel = summary[summary["phase"] == phase]
    out: dict[str, float] = {}
    pair_means: dict[str, list[float]] = {}
    for metric, ti, tj, value in zip(sel["metric"], sel["task_i"], sel["task_j"], sel["value"]):
        if ti and tj:
            # every pair metric is symmetric: one name per pair whatever the run's task order
            a, b = sorted((str(ti), str(tj)))
            out[f"{metric}.{a}|{b}"] = float(value)
            pair_means.setdefault(metric, []).append(float(value))
        elif ti:
            out[f"{metric}.{ti}"] = float(value)
        else:
            out[metric] = float(value)
    for metric, values in pair_means.items():
        out[f"{metric}.mean"] = float(np.mean(values))
    return out


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        elif isinstance(value, (list, tuple, Mapping)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = value
    return out


def _final_scores(run: Any, tasks: Sequence[str], split: str, metric: str) -> dict[str, float]:
    ev = _evals_of(run)
    sel = ev[(ev["point"] == "final") & (ev["split"] == split) & (ev["metric"] == metric)]
    out: dict[str, float] = {}
    values = []
    for task in tasks:
        v = sel.loc[sel["task"] == task, "value"]
        val = float(v.iloc[-1]) if len(v) else math.nan
        out[f"{metric}.{task}"] = val
        values.append(val)
    finite = [v for v in values if math.isfinite(v)]
    out[f"{metric}.mean"] = (
        float(np.mean(values)) if len(finite) == len(values) and values else math.nan
    )
    return out


def _parse_phase(phase: str) -> tuple[str, int]:
    if phase == "all":
        return phase, 1
    match = re.fullmatch(r"(\d+)/(\d+)", phase) if isinstance(phase, str) else None
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise GradlensError(f"`phase` should be 'all' or 'k/P' with 1 <= k <= P; found {phase!r}.")
    return phase, int(match.group(2))


def _iter_runs(runs: Any) -> list[tuple[str, Any]]:
    if isinstance(runs, (str, os.PathLike)):
        from gradlens.store import load_run, load_runs

        index = load_runs(runs)
        return [(str(rid), load_run(p)) for rid, p in zip(index["run_id"], index["path"])]
    if isinstance(runs, pd.DataFrame) or not isinstance(runs, Iterable):
        raise GradlensError(
            "`runs` should be a sweep directory or an iterable of runs (gradlens.store.Run or run "
            f"directories); found {type(runs).__name__}."
        )
    out: list[tuple[str, Any]] = []
    for i, run in enumerate(runs):
        if isinstance(run, (str, os.PathLike)):
            from gradlens.store import load_run

            run = load_run(run)
        meta = _meta_of(run)
        path = getattr(run, "path", None)
        rid = meta.get("run_id") or (Path(path).name if path is not None else f"run{i}")
        out.append((str(rid), run))
    return out


def runs_table(
    runs: Iterable[Run | Any] | str | os.PathLike[str],
    *,
    phase: str = "all",
    layer: str = TOTAL_LAYER,
    split: str = "test",
    eval_metric: str = "accuracy",
    progress: bool = False,
) -> pd.DataFrame:
    """One row per run: configuration, interference summaries and final scores.

    Columns: ``run_id``; ``tasks`` (joined with ``"|"``) and ``n_tasks``; the metadata flattened
    with dots (``weights.<task>``, ``model.family``, ``model.width``, ``model.depth``,
    ``model.n_params``, ``seed``, ``config.*``; lists as JSON strings); the summaries of
    :func:`run_summary` for ``phase``, wide: ``cosine.<i>|<j>``, ``conflict_freq.<i>|<j>``,
    ``gms.<i>|<j>`` (and ``<metric>.mean`` over pairs), ``norm.<task>``,
    ``cos_to_update.<task>``, ``norm_ratio``, ``norm_cv``; the final ``eval_metric`` on ``split``
    per task, ``<eval_metric>.<task>``, and their mean over the run's tasks,
    ``<eval_metric>.mean`` (NaN if a task has none). Runs with other tasks leave NaN in columns
    they do not have.

    Args:
        runs: Runs (objects with ``.meta``, ``.metrics``, ``.evals``), run directories, or a sweep
            directory (read with ``gradlens.store.load_runs`` / ``load_run``). ``run_id`` is the
            store's id for a directory, else ``meta["run_id"]``, the run path's name, or
            ``run<i>``.
        phase: ``"all"`` or ``"k/P"`` (e.g. ``"3/3"``, the last third of training).
        layer: Layer whose summaries are tabulated.
        split: Split of the final evals (``"test"`` or ``"val"``).
        eval_metric: Eval metric to tabulate.
        progress: Show a progress bar while reading runs.

    Example:
        >>> import pandas as pd
        >>> from types import SimpleNamespace
        >>> m = pd.DataFrame({"step": [0, 1], "layer": "__all__", "metric": "cosine",
        ...                   "task_i": "a", "task_j": "b", "value": [0.2, 0.4]})
        >>> ev = pd.DataFrame({"point": "final", "epoch": pd.array([None, None], "Int64"),
        ...     "step": pd.array([None, None], "Int64"), "split": "test", "task": ["a", "b"],
        ...     "metric": "accuracy", "value": [0.9, 0.7]})
        >>> run = SimpleNamespace(meta={"tasks": ["a", "b"], "weights": {"a": 0.5, "b": 0.5},
        ...                             "seed": 1}, metrics=m, evals=ev)
        >>> t = runs_table([run])
        >>> t[["run_id", "weights.a", "cosine.a|b", "accuracy.mean"]].round(3).values.tolist()
        [['run0', 0.5, 0.3, 0.8]]
    """
    from tqdm.auto import tqdm

    phase, n_phases = _parse_phase(phase)
    items = _iter_runs(runs)
    rows: list[dict[str, Any]] = []
    for rid, run in tqdm(items, desc="runs", disable=not progress):
        meta = _meta_of(run)
        tasks = [str(t) for t in meta.get("tasks", [])]
        # the task set, not the run's order of it: runs on [b, a] and [a, b] are analysed together
        row: dict[str, Any] = {
            "run_id": rid, "tasks": "|".join(sorted(tasks)), "n_tasks": len(tasks)
        }  # fmt: skip
        row.update(_flatten({k: v for k, v in meta.items() if k not in ("tasks", "run_id")}))
        row.update(_summary_wide(run_summary(run, phases=n_phases, layer=layer), phase))
        row.update(_final_scores(run, tasks, split, eval_metric))
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- associations


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

    table = _frame(table)
    wcols = _columns(table, weight_cols, "weight_cols")
    icols = _columns(table, interference_cols, "interference_cols")
    acols = _columns(table, accuracy_cols, "accuracy_cols")
    meths = [_choice(m, _core.METHODS, "methods") for m in methods]
    if not meths:
        raise GradlensError("`methods` should name at least one method; found none.")
    correction = _choice(correction, _CORRECTIONS, "correction")  # type: ignore[assignment]
    gcols = [] if group_cols is None else _columns(table, group_cols, "group_cols")
    if gcols:
        _choice(resample, _core.RESAMPLES, "resample")
    level = _level(ci)
    _count(n_boot, "n_boot")
    if n_perm is not None:
        _count(n_perm, "n_perm")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise GradlensError(f"`seed` should be an int; found {seed!r}.")
    sizes: list[Any] = []
    size_cov: pd.Series | None = None
    cov_name = ""
    if size_col is not None:
        _columns(table, [size_col], "size_col")
        sizes = sorted(table[size_col].dropna().unique().tolist())
        raw = pd.to_numeric(table[size_col], errors="coerce").astype(np.float64)
        positive = bool((raw.dropna() > 0).all())
        size_cov = np.log10(raw) if positive else raw
        cov_name = f"log10({size_col})" if positive else size_col
    multi_size = len(sizes) >= 2
    jobs: list[dict[str, Any]] = []
    for relation, xc, yc in _relation_pairs(wcols, icols, acols):
        for method in meths:
            jobs.append(
                {
                    "relation": relation,
                    "x": xc,
                    "y": yc,
                    "method": method,
                    "scope": "pooled",
                    "stratum": "all",
                    "covariates": "",
                }
            )
            if multi_size and method != "kendall":
                jobs.append(
                    {
                        "relation": relation,
                        "x": xc,
                        "y": yc,
                        "method": method,
                        "scope": "partial",
                        "stratum": "all",
                        "covariates": cov_name,
                    }
                )
            if multi_size and stratify:
                for s in sizes:
                    jobs.append(
                        {
                            "relation": relation,
                            "x": xc,
                            "y": yc,
                            "method": method,
                            "scope": "stratum",
                            "stratum": str(s),
                            "covariates": "",
                            "_size": s,
                        }
                    )
    if n_perm is None:
        n_perm = max(2000, 40 * len(jobs))
    rows = []
    for index, job in enumerate(tqdm(jobs, desc="tests", disable=not progress)):
        rng = np.random.default_rng([int(seed), index])
        sub = table
        if job["scope"] == "stratum":
            sub = table[table[size_col] == job.pop("_size")]
        if job["scope"] == "partial":
            work = pd.DataFrame(
                {
                    "x": pd.to_numeric(sub[job["x"]], errors="coerce"),
                    "y": pd.to_numeric(sub[job["y"]], errors="coerce"),
                    "size": size_cov,
                }
            )
            if gcols:
                work["g"] = _group_keys(sub, gcols)
            res = partial_correlation(
                work,
                "x",
                "y",
                ["size"],
                method=job["method"],
                n_boot=n_boot,
                n_perm=n_perm,
                groups="g" if gcols else None,
                resample=resample,
                ci=level,
                seed=rng,
            )
            res.pop("covariates")
        else:
            res = correlate(
                pd.to_numeric(sub[job["x"]], errors="coerce").to_numpy(float),
                pd.to_numeric(sub[job["y"]], errors="coerce").to_numpy(float),
                method=job["method"],
                n_boot=n_boot,
                n_perm=n_perm,
                groups=_group_keys(sub, gcols),
                resample=resample,
                ci=level,
                seed=rng,
            )
        res.pop("method")
        rows.append({**job, **res})
    columns = [
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
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=columns)
    p = out["p_value"].to_numpy(dtype=np.float64)
    out["p_adjusted"] = _core.adjust_pvalues(p, correction)
    out["correction"] = correction
    out["n_tests"] = int(np.isfinite(p).sum())
    return out[columns]


# --------------------------------------------------------------------------- within a run


def epoch_table(
    run: Run | Any,
    *,
    metric: str = "conflict",
    eval_metric: str = "accuracy",
    split: str = "val",
    layer: str = TOTAL_LAYER,
    task: str | None = None,
    entry: tuple[str, str] | None = None,
) -> pd.DataFrame:
    """Per-epoch interference next to the per-epoch validation metric of one run.

    Epoch ``k`` (an eval at point ``"epoch:<k>"`` with its ``step``) covers the probed steps in
    ``(step of epoch k-1, step of epoch k]`` (the first epoch starts at the first probe). Its
    interference is the fraction of probed values in conflict for ``metric="conflict"`` (the
    paper's "amount of gradient conflict") and the mean otherwise, over every pair or task of
    ``metric`` unless ``entry=(task_i, task_j)`` picks one (``(task, "")`` for per-task
    metrics, ``("", "")`` for whole-matrix ones). The score is ``eval_metric`` on ``split``,
    averaged over tasks unless ``task`` is given. Epochs without a probe have NaN interference.

    Args:
        run: A ``gradlens.store.Run`` (or anything with ``.metrics`` and ``.evals``).
        metric: Interference metric (``"conflict"``, ``"cosine"``, ``"gms"``, ``"norm_ratio"``...).
        eval_metric: Eval metric (``"accuracy"``, ``"loss"``...).
        split: Eval split.
        layer: Layer of the interference.
        task: Task of the score; ``None`` averages the run's tasks.
        entry: One ``(task_i, task_j)`` entry of the metric; ``None`` averages all.

    Returns:
        ``[epoch, step, interference, score, n_probes]`` sorted by epoch.

    Example:
        >>> import pandas as pd
        >>> from types import SimpleNamespace
        >>> m = pd.DataFrame({"step": [5, 10, 15, 20], "layer": "__all__", "metric": "conflict",
        ...                   "task_i": "a", "task_j": "b", "value": [1.0, 0.0, 1.0, 1.0]})
        >>> ev = pd.DataFrame({"point": ["epoch:1", "epoch:2"], "epoch": pd.array([1, 2], "Int64"),
        ...     "step": pd.array([10, 20], "Int64"), "split": "val", "task": "a",
        ...     "metric": "accuracy", "value": [0.6, 0.7]})
        >>> epoch_table(SimpleNamespace(metrics=m, evals=ev))[["epoch", "interference", "score"]
        ...     ].values.tolist()
        [[1.0, 0.5, 0.6], [2.0, 1.0, 0.7]]
    """
    rows = _layer_rows(run, layer)
    rows = rows[rows["metric"] == metric]
    if entry is not None:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise GradlensError(f"`entry` should be a (task_i, task_j) tuple; found {entry!r}.")
        rows = rows[(rows["task_i"] == entry[0]) & (rows["task_j"] == entry[1])]
    ev = _evals_of(run)
    sel = ev[
        ev["point"].astype(str).str.startswith("epoch:")
        & (ev["split"] == split)
        & (ev["metric"] == eval_metric)
    ]
    if task is not None:
        sel = sel[sel["task"] == task]
    if sel.empty:
        raise GradlensError(
            f"`run.evals` should hold per-epoch evals (point 'epoch:<k>') of {eval_metric!r} on "
            f"split {split!r}{'' if task is None else f' for task {task!r}'}; found none."
        )
    epochs = sel["point"].astype(str).str.slice(len("epoch:")).astype(np.int64)
    if sel["step"].isna().any():
        raise GradlensError(
            "`run.evals` should give the training `step` of each per-epoch eval, to map probed "
            f"steps to epochs; found {int(sel['step'].isna().sum())} without one."
        )
    per_epoch = pd.DataFrame(
        {
            "epoch": epochs.to_numpy(),
            "step": sel["step"].astype(np.int64).to_numpy(),
            "value": sel["value"].to_numpy(np.float64),
        }
    )
    per_epoch = (
        per_epoch.groupby("epoch", sort=True)
        .agg(step=("step", "max"), score=("value", "mean"))
        .reset_index()
    )
    ends = per_epoch["step"].to_numpy()
    if np.any(np.diff(ends) < 0):
        raise GradlensError(
            f"`run.evals` should have steps increasing with the epoch; found {ends.tolist()}."
        )
    idx = np.searchsorted(ends, rows["step"].to_numpy(), side="left")
    rows = rows.assign(epoch_index=idx)
    rows = rows[rows["epoch_index"] < len(ends)]
    agg = _aggregate(rows, ["epoch_index"])
    inter = np.full(len(ends), np.nan)
    counts = np.zeros(len(ends), dtype=np.int64)
    inter[agg["epoch_index"].to_numpy()] = agg["value"].to_numpy()
    counts[agg["epoch_index"].to_numpy()] = agg["n"].to_numpy()
    return pd.DataFrame(
        {
            "epoch": per_epoch["epoch"].to_numpy(),
            "step": ends,
            "interference": inter,
            "score": per_epoch["score"].to_numpy(),
            "n_probes": counts,
        }
    )


def within_run(
    run: Run | Any,
    *,
    metric: str = "conflict",
    eval_metric: str = "accuracy",
    split: str = "val",
    layer: str = TOTAL_LAYER,
    task: str | None = None,
    entry: tuple[str, str] | None = None,
    method: Literal["pearson", "spearman"] = "pearson",
    block: int | Literal["auto"] = "auto",
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: SeedLike = 0,
) -> dict[str, Any]:
    """Correlation of per-epoch interference with the validation metric within one run.

    The per-epoch series come from :func:`epoch_table` (epochs without a probe are dropped).
    Training curves are autocorrelated, so neither runs nor epochs can be treated as independent:

    - ``ci_low``/``ci_high``: circular block bootstrap percentile interval (:func:`correlate` with
      ``block``); ``p_block`` its centred bootstrap p-value;
    - ``p_value``: t-test with the effective sample size of two AR(1) series,
      ``n_eff = n (1 - r_x r_y) / (1 + r_x r_y)`` (Bretherton et al. 1999; ``r_x``, ``r_y`` the
      lag-1 autocorrelations, of the ranks for Spearman), ``t = r sqrt((n_eff - 2) / (1 - r^2))``
      on ``n_eff - 2`` degrees of freedom; ``ci_low_neff``/``ci_high_neff`` the Fisher-z interval
      with ``n_eff``. On AR(1) data this test holds its level where the block bootstrap, at the
      few dozen epochs of a run, still undercovers (measured in ``docs/stats.md``).

    The paper reports Pearson ``r = 0.06`` for this statistic; hence the Pearson default.

    Args:
        run: A ``gradlens.store.Run``.
        metric: Interference metric.
        eval_metric: Validation metric.
        split: Split of the per-epoch evals.
        layer: Layer of the interference.
        task: Task of the score (``None``: mean over tasks).
        entry: One entry of the interference metric (see :func:`epoch_table`).
        method: ``"pearson"`` or ``"spearman"``.
        block: Block length or ``"auto"`` (``docs/stats.md``).
        n_boot: Bootstrap resamples.
        ci: Confidence level.
        seed: Seed or Generator.

    Returns:
        The keys of :func:`correlate` (``p_value`` as above), plus ``p_block``, ``n_eff``,
        ``autocorr_x``, ``autocorr_y``, ``ci_low_neff``, ``ci_high_neff``, ``metric``,
        ``eval_metric`` and ``split``.

    Example:
        >>> import numpy as np, pandas as pd
        >>> from types import SimpleNamespace
        >>> k = np.arange(1, 31)
        >>> m = pd.DataFrame({"step": k * 10, "layer": "__all__", "metric": "cosine",
        ...                   "task_i": "a", "task_j": "b", "value": np.sin(k)})
        >>> ev = pd.DataFrame({"point": [f"epoch:{i}" for i in k], "epoch": pd.array(k, "Int64"),
        ...     "step": pd.array(k * 10, "Int64"), "split": "val", "task": "a",
        ...     "metric": "accuracy", "value": np.sin(k) + 0.1 * np.cos(3 * k)})
        >>> r = within_run(SimpleNamespace(metrics=m, evals=ev), metric="cosine", n_boot=500)
        >>> round(r["estimate"], 2), r["n"], r["p_value"] < 0.01
        (0.99, 30, True)
    """
    method = _choice(method, ("pearson", "spearman"), "method")  # type: ignore[assignment]
    level = _level(ci)
    table = epoch_table(
        run,
        metric=metric,
        eval_metric=eval_metric,
        split=split,
        layer=layer,
        task=task,
        entry=entry,
    )
    table = table[np.isfinite(table["interference"].to_numpy())]
    x = table["interference"].to_numpy(np.float64)
    y = table["score"].to_numpy(np.float64)
    res = correlate(x, y, method=method, n_boot=n_boot, n_perm=0, block=block, ci=level, seed=seed)
    extra: dict[str, Any] = {
        "p_block": res["p_value"],
        "n_eff": math.nan,
        "autocorr_x": math.nan,
        "autocorr_y": math.nan,
        "ci_low_neff": math.nan,
        "ci_high_neff": math.nan,
    }
    r = res["estimate"]
    if math.isfinite(r):
        sp = require("scipy.stats", "stats", "gradlens.stats.within_run")
        if method == "spearman":
            ones = np.ones((1, x.size))
            x, y = _core.weighted_ranks(x, ones)[0], _core.weighted_ranks(y, ones)[0]
        n_eff, ax, ay = _core.effective_n(x, y)
        rc = min(abs(r), 1.0 - 1e-15)
        t = rc * math.sqrt((n_eff - 2.0) / (1.0 - rc * rc)) if n_eff > 2 else 0.0
        p = float(2.0 * sp.t.sf(t, n_eff - 2.0)) if n_eff > 2 else 1.0  # type: ignore[attr-defined]
        half = float(sp.norm.ppf((1.0 + level) / 2.0)) / math.sqrt(max(n_eff - 3.0, 1e-12))  # type: ignore[attr-defined]
        z = math.atanh(max(min(r, 1.0 - 1e-15), -1.0 + 1e-15))
        extra.update(
            {
                "n_eff": n_eff,
                "autocorr_x": ax,
                "autocorr_y": ay,
                "ci_low_neff": math.tanh(z - half),
                "ci_high_neff": math.tanh(z + half),
            }
        )
        res["p_value"] = p
        res["p_method"] = "AR(1) effective-n t-test"
    return {**res, **extra, "metric": metric, "eval_metric": eval_metric, "split": split}


# --------------------------------------------------------------------------- weight sweeps


def _argmax_weights(M: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per row of ``M`` (``(B, K)``), the mean of the weights that attain the row's maximum."""
    top = M.max(axis=1, keepdims=True)
    mask = top - 1e-12 * np.maximum(1.0, np.abs(top)) <= M
    return (mask * w).sum(axis=1) / mask.sum(axis=1)


def _p_star(
    M: np.ndarray, w: np.ndarray, n_k: np.ndarray, estimator: str
) -> tuple[np.ndarray, np.ndarray]:
    """Optimal weight and the score there for each row of cell means ``M`` (``(B, K)``)."""
    if estimator == "grid":
        return _argmax_weights(M, w), M.max(axis=1)
    X = np.stack([np.ones_like(w), w, w * w], axis=1)
    sw = np.sqrt(n_k)[:, None]
    beta = M @ (np.linalg.pinv(sw * X) * np.sqrt(n_k)[None, :]).T  # weighted least squares
    fitted = beta @ X.T
    a, b, c = beta[:, 0], beta[:, 1], beta[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = np.clip(-b / (2.0 * c), w.min(), w.max())
    concave = c < 0
    grid_best = _argmax_weights(fitted, w)
    p = np.where(concave, vertex, grid_best)
    score = a + b * p + c * p * p
    return p, score


def _sweep_cells(
    sub: pd.DataFrame, weight_col: str, score_col: str
) -> tuple[np.ndarray, list[np.ndarray]]:
    data = sub[[weight_col, score_col]].apply(pd.to_numeric, errors="coerce").dropna()
    w_values = np.sort(data[weight_col].unique())
    cells = [data.loc[data[weight_col] == v, score_col].to_numpy(np.float64) for v in w_values]
    return w_values.astype(np.float64), cells


def _rescaled(c: np.ndarray) -> np.ndarray:
    """Seed values spread by ``sqrt(m / (m - 1))`` around their mean, so that the bootstrap
    variance of their mean is the unbiased ``s^2 / m`` instead of ``(m - 1) / m`` of it (a third
    too small with 3 seeds)."""
    m = c.size
    return c if m < 2 else c.mean() + math.sqrt(m / (m - 1.0)) * (c - c.mean())


def _p_star_boot(
    w: np.ndarray, cells: list[np.ndarray], n_boot: int, rng: np.random.Generator, estimator: str
) -> tuple[float, float, np.ndarray]:
    n_k = np.array([c.size for c in cells], dtype=np.float64)
    means = np.array([c.mean() for c in cells])[None, :]
    p, score = _p_star(means, w, n_k, estimator)
    if n_boot == 0:
        return float(p[0]), float(score[0]), np.empty(0)
    M = np.empty((n_boot, len(cells)))
    for k, c in enumerate(cells):
        counts = rng.multinomial(c.size, np.full(c.size, 1.0 / c.size), size=n_boot)
        M[:, k] = counts @ _rescaled(c) / c.size
    boots, _ = _p_star(M, w, n_k, estimator)
    return float(p[0]), float(score[0]), boots


def _sweep_args(
    table: Any,
    weight_col: str,
    score_col: str,
    size_cols: Sequence[str],
    estimator: str,
    n_boot: int,
    ci: float,
) -> tuple[pd.DataFrame, list[str], float]:
    table = _frame(table)
    _columns(table, [weight_col, score_col], "weight_col/score_col")
    scols = _columns(table, size_cols, "size_cols")
    _choice(estimator, _ESTIMATORS, "estimator")
    _count(n_boot, "n_boot")
    return table, scols, _level(ci)


def optimal_weight(
    table: pd.DataFrame,
    *,
    weight_col: str,
    score_col: str = "accuracy.mean",
    size_cols: Sequence[str] = ("model.n_params",),
    estimator: Estimator = "grid",
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: SeedLike = 0,
) -> pd.DataFrame:
    """The optimal weight ``p*`` of a weight sweep per model size, with a bootstrap interval.

    Per size (the distinct values of ``size_cols``), the runs at each weight are the seeds of
    that cell. ``estimator="grid"``: ``p*`` is the weight with the highest mean score over seeds
    (the mean of the weights tied at the top). ``"quadratic"``: a parabola is fitted to the cell
    means (weighted by the seeds per cell) and ``p*`` is its vertex clipped to the grid range when
    it is concave, else the best grid point of the fit; it moves continuously, so its interval is
    less lumpy. The interval is a percentile bootstrap that resamples seeds within each weight
    (the grid stays fixed), from the seed values spread by ``sqrt(m / (m - 1))`` around their cell
    mean so that a mean of ``m`` seeds gets its unbiased variance (a plain bootstrap of 3 seeds
    gives two thirds of it); with one seed per weight the interval has no width. Pass the joint
    runs of one task pair (single-task runs belong to :func:`joint_gain`).

    Args:
        table: One row per run (e.g. :func:`runs_table`).
        weight_col: The swept weight (e.g. ``"weights.<first task>"``).
        score_col: Score to maximise (e.g. ``"accuracy.mean"``).
        size_cols: Columns that identify a model size.
        estimator: ``"grid"`` or ``"quadratic"``.
        n_boot: Bootstrap resamples.
        ci: Confidence level.
        seed: Seed or Generator.

    Returns:
        One row per size: ``*size_cols, p_star, ci_low, ci_high, ci_level, score_at_p_star,
        n_weights, n_runs, min_seeds, estimator``.

    Example:
        >>> import numpy as np, pandas as pd
        >>> w = np.repeat(np.linspace(0.1, 0.9, 5), 3)
        >>> t = pd.DataFrame({"weights.a": w, "size": 1,
        ...                   "accuracy.mean": -(w - 0.5) ** 2 + 0.001 * np.tile([-1, 0, 1], 5)})
        >>> optimal_weight(t, weight_col="weights.a", size_cols=["size"], n_boot=200)[
        ...     ["size", "p_star", "n_weights", "min_seeds"]].values.tolist()
        [[1.0, 0.5, 5.0, 3.0]]
    """
    table, scols, level = _sweep_args(
        table, weight_col, score_col, size_cols, estimator, n_boot, ci
    )
    rng = _rng(seed)
    rows = []
    for key, sub in table.groupby(scols, sort=True, dropna=False):
        w, cells = _sweep_cells(sub, weight_col, score_col)
        key_t = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(scols, key_t))
        if estimator == "quadratic" and len(cells) < 3:
            raise GradlensError(
                f"`estimator='quadratic'` should have at least 3 weights per size; found "
                f"{len(cells)} for {row}."
            )
        if not cells:
            continue
        p, score, boots = _p_star_boot(w, cells, n_boot, rng, estimator)
        lo, hi = _core.percentile_interval(boots, level) if boots.size else (math.nan, math.nan)
        row.update(
            {
                "p_star": p,
                "ci_low": lo,
                "ci_high": hi,
                "ci_level": level,
                "score_at_p_star": score,
                "n_weights": len(cells),
                "n_runs": int(sum(c.size for c in cells)),
                "min_seeds": int(min(c.size for c in cells)),
                "estimator": estimator,
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


def optimal_weight_trend(
    table: pd.DataFrame,
    *,
    weight_col: str,
    score_col: str = "accuracy.mean",
    size_col: str = "model.n_params",
    estimator: Estimator = "grid",
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: SeedLike = 0,
) -> dict[str, Any]:
    """Does the optimal weight move with model size? Slope of ``p*`` on ``log10(size)``.

    ``p*`` per size is :func:`optimal_weight`'s; the slope is the least-squares slope of ``p*``
    on ``log10(size)`` (the raw size if one is not positive). Its interval is the percentile
    interval of the slopes of the bootstrapped ``p*`` (seeds resampled within each size and
    weight), and the two-sided p-value of "slope = 0" inverts that bootstrap distribution,
    ``min(1, 2 min(1 + #{b* <= 0}, 1 + #{b* >= 0}) / (B + 1))``. With a grid ``p*`` the bootstrap
    has ties at 0, which makes the test conservative; its measured calibration is in
    ``docs/stats.md``. ``spearman`` (of size and ``p*``, descriptive, no test) is reported too.

    Args:
        table: One row per run.
        weight_col: The swept weight.
        score_col: Score to maximise.
        size_col: Numeric model size (e.g. ``"model.n_params"``).
        estimator: ``"grid"`` or ``"quadratic"`` (see :func:`optimal_weight`).
        n_boot: Bootstrap resamples.
        ci: Confidence level.
        seed: Seed or Generator.

    Returns:
        ``slope, ci_low, ci_high, ci_level, p_value, spearman, n_sizes, sizes, p_star, x,
        estimator``.

    Example:
        >>> import numpy as np, pandas as pd
        >>> grid = np.linspace(0.1, 0.9, 9); rows = []
        >>> for size, best in [(1e5, 0.3), (1e6, 0.5), (1e7, 0.7)]:
        ...     for s in range(3):
        ...         rows += [{"size": size, "seed": s, "w": w,
        ...                   "acc": -(w - best) ** 2 + 0.002 * s} for w in grid]
        >>> r = optimal_weight_trend(pd.DataFrame(rows), weight_col="w", score_col="acc",
        ...                          size_col="size", n_boot=200)
        >>> round(r["slope"], 2), r["p_value"] < 0.05
        (0.2, True)
    """
    table, _, level = _sweep_args(table, weight_col, score_col, [size_col], estimator, n_boot, ci)
    rng = _rng(seed)
    sizes = np.sort(pd.to_numeric(table[size_col], errors="coerce").dropna().unique())
    if sizes.size < 2:
        raise GradlensError(
            f"`size_col` should hold at least 2 distinct sizes for a trend; found {sizes.tolist()}."
        )
    positive = bool((sizes > 0).all())
    xs = np.log10(sizes) if positive else sizes.astype(np.float64)
    p_star = np.empty(sizes.size)
    boots = np.empty((n_boot, sizes.size))
    numeric_size = pd.to_numeric(table[size_col], errors="coerce")
    for j, size in enumerate(sizes):
        w, cells = _sweep_cells(table[numeric_size == size], weight_col, score_col)
        if estimator == "quadratic" and len(cells) < 3:
            raise GradlensError(
                f"`estimator='quadratic'` should have at least 3 weights per size; found "
                f"{len(cells)} for size {size}."
            )
        p_star[j], _, b = _p_star_boot(w, cells, n_boot, rng, estimator)
        boots[:, j] = b
    xc = xs - xs.mean()
    slope = float(xc @ (p_star - p_star.mean()) / (xc @ xc))
    if n_boot:
        bs = (boots - boots.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
        lo, hi = _core.percentile_interval(bs, level)
        le = int(np.count_nonzero(bs <= 0))
        ge = int(np.count_nonzero(bs >= 0))
        p = min(1.0, 2.0 * min(le + 1, ge + 1) / (n_boot + 1))
    else:
        lo = hi = p = math.nan
    rho = math.nan
    if sizes.size >= 3 and np.ptp(p_star) > 0:
        rho = float(_core.correlation_counts(xs, p_star, np.ones((1, xs.size)), "spearman")[0])
    return {
        "slope": slope,
        "ci_low": lo,
        "ci_high": hi,
        "ci_level": level,
        "p_value": p,
        "spearman": rho,
        "n_sizes": int(sizes.size),
        "sizes": sizes.tolist(),
        "p_star": p_star.tolist(),
        "x": f"log10({size_col})" if positive else size_col,
        "estimator": estimator,
    }


def _gain_pairs(
    joint: pd.DataFrame, single: pd.DataFrame, col: str, seed_col: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Joint and single values of ``col``; the per-seed differences when the seeds pair up."""
    js = joint[[seed_col, col]].dropna()
    ss = single[[seed_col, col]].dropna()
    a = js[col].to_numpy(np.float64)
    b = ss[col].to_numpy(np.float64)
    paired = (
        js[seed_col].is_unique
        and ss[seed_col].is_unique
        and set(js[seed_col]) == set(ss[seed_col])
        and len(js) > 0
    )
    if not paired:
        return a, b, None
    d = (js.set_index(seed_col)[col] - ss.set_index(seed_col)[col]).to_numpy(np.float64)
    return a, b, d


def _gain_boot(
    a: np.ndarray, b: np.ndarray, d: np.ndarray | None, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    if d is not None:
        C = rng.multinomial(d.size, np.full(d.size, 1.0 / d.size), size=n_boot)
        return C @ _rescaled(d) / d.size
    ca = rng.multinomial(a.size, np.full(a.size, 1.0 / a.size), size=n_boot)
    cb = rng.multinomial(b.size, np.full(b.size, 1.0 / b.size), size=n_boot)
    return ca @ _rescaled(a) / a.size - cb @ _rescaled(b) / b.size


def _gain_stats(
    a: np.ndarray,
    b: np.ndarray,
    d: np.ndarray | None,
    interval: str,
    n_boot: int,
    level: float,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Gain, interval and p-value: t (paired or Welch) or percentile bootstrap."""
    if a.size == 0 or b.size == 0:
        nan = math.nan
        return {"gain": nan, "se": nan, "df": nan, "ci_low": nan, "ci_high": nan,
                "p_value": nan, "interval": "none"}
    res = _gain.paired_t(d, level) if d is not None else _gain.welch_t(a, b, level)
    if interval == "bootstrap":
        boots = _gain_boot(a, b, d, n_boot, rng) if n_boot else np.empty(0)
        lo, hi = _core.percentile_interval(boots, level) if boots.size else (math.nan, math.nan)
        res.update({"ci_low": lo, "ci_high": hi, "interval": "percentile bootstrap"})
    return res


def joint_gain(
    table: pd.DataFrame,
    *,
    size_cols: Sequence[str] = ("model.n_params",),
    seed_col: str = "seed",
    tasks_col: str = "tasks",
    metric: str = "accuracy",
    interval: Literal["t", "bootstrap"] = "t",
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: SeedLike = 0,
) -> pd.DataFrame:
    """Gain of joint over single-task training, per task, model size and weight configuration.

    Single-task runs are the rows whose ``tasks_col`` names one task; joint runs name several
    (``"|"``-joined, as :func:`runs_table` writes). A joint configuration is a size (the values of
    ``size_cols``), a task set and its ``weights.*`` values; for each of its tasks ``t``, its
    baseline is every single-task run on ``t`` with the same size (matched by model size and task
    name; ``config.baseline_of`` is not needed). ``gain = mean(joint <metric>.t) - mean(single
    <metric>.t)`` over seeds. When the joint and single runs have the same seeds (matched on
    ``seed_col``), the gain is the mean of per-seed differences (``paired``) and the interval
    and p-value are the paired t interval and test (``scipy.stats.ttest_rel``); otherwise
    Welch's (``ttest_ind(equal_var=False)``). ``interval="bootstrap"`` replaces the interval by
    a percentile bootstrap of seeds (seed values rescaled as in :func:`optimal_weight`); it
    undercovers at 3-5 seeds (``docs/stats.md``), the t interval does not. Picking the best
    weight on the scores you report is optimistic: see :func:`selected_gain`.

    Args:
        table: One row per run, joint and single-task (e.g. :func:`runs_table`).
        size_cols: Columns that identify a model size.
        seed_col: Seed column.
        tasks_col: Column naming the run's tasks, ``"|"``-joined.
        metric: Score prefix: columns ``<metric>.<task>``.
        interval: ``"t"`` or ``"bootstrap"``.
        n_boot: Bootstrap resamples (``interval="bootstrap"`` only).
        ci: Confidence level.
        seed: Seed or Generator of the bootstrap.

    Returns:
        ``*size_cols, tasks, weights.*, task, weight, joint_mean, single_mean, gain, se, df,
        ci_low, ci_high, ci_level, p_value, interval, n_joint, n_single, paired, note``.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"tasks": ["a|b"] * 2 + ["a"] * 2, "seed": [0, 1, 0, 1],
        ...                   "size": 1, "weights.a": [0.5, 0.5, 1.0, 1.0],
        ...                   "weights.b": [0.5, 0.5, None, None],
        ...                   "accuracy.a": [0.82, 0.84, 0.80, 0.81], "accuracy.b": 0.5})
        >>> g = joint_gain(t, size_cols=["size"])
        >>> g[["task", "gain", "paired", "note"]].round(3).values.tolist()
        [['a', 0.025, True, ''], ['b', nan, False, 'no single-task run on b at this size']]
    """
    table = _frame(table)
    scols = _columns(table, size_cols, "size_cols")
    _columns(table, [seed_col, tasks_col], "seed_col/tasks_col")
    interval = _choice(interval, ("t", "bootstrap"), "interval")  # type: ignore[assignment]
    n_boot = _count(n_boot, "n_boot")
    level = _level(ci)
    rng = _rng(seed)
    wcols = [c for c in table.columns if str(c).startswith("weights.")]
    task_lists = table[tasks_col].astype(str).str.split("|")
    is_single = task_lists.str.len() == 1
    single, joint = table[is_single], table[~is_single]
    rows = []
    keys = [*scols, tasks_col, *wcols]
    for key, sub in joint.groupby(keys, sort=True, dropna=False):
        key_t = key if isinstance(key, tuple) else (key,)
        base = dict(zip(keys, key_t))
        size_mask = np.ones(len(single), dtype=bool)
        for c in scols:
            size_mask &= (single[c] == base[c]).to_numpy()
        for task in str(base[tasks_col]).split("|"):
            col = f"{metric}.{task}"
            row = {**base, "task": task, "weight": base.get(f"weights.{task}", math.nan)}
            if col not in table.columns:
                raise GradlensError(
                    f"`metric` should prefix score columns `<metric>.<task>`; found no {col!r}."
                )
            ref = single[size_mask & (single[tasks_col].astype(str) == task).to_numpy()]
            note = "" if len(ref) else f"no single-task run on {task} at this size"
            a, b, d = _gain_pairs(sub, ref, col, seed_col)
            res = _gain_stats(a, b, d, interval, n_boot, level, rng)
            row.update(
                {
                    "joint_mean": float(sub[col].mean()),
                    "single_mean": float(ref[col].mean()) if len(ref) else math.nan,
                    "gain": res["gain"],
                    "se": res["se"],
                    "df": res["df"],
                    "ci_low": res["ci_low"],
                    "ci_high": res["ci_high"],
                    "ci_level": level,
                    "p_value": res["p_value"],
                    "interval": res["interval"],
                    "n_joint": int(sub[col].notna().sum()),
                    "n_single": int(ref[col].notna().sum()),
                    "paired": d is not None,
                    "note": note,
                }
            )
            rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- JSON


def _jsonable(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, pd.Timestamp):
        return obj.isoformat()
    if isinstance(obj, pd.DataFrame):
        return [_jsonable(r) for r in obj.to_dict(orient="records")]
    if isinstance(obj, pd.Series):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    raise GradlensError(
        f"`obj` should hold tables, dicts, lists, numbers and strings; found {type(obj).__name__}."
    )


def to_json(obj: Any, path: str | os.PathLike[str] | None = None, *, indent: int = 2) -> str:
    """Strict JSON of a statistics result: tables as lists of records, NaN and NA as ``null``.

    Args:
        obj: A DataFrame, a dict (e.g. of several results), a list, or a scalar.
        path: If given, the JSON is also written there.
        indent: Indentation.

    Returns:
        The JSON text.

    Example:
        >>> import pandas as pd
        >>> print(to_json({"t": pd.DataFrame({"a": [1.0, float("nan")]})}, indent=None))
        {"t": [{"a": 1.0}, {"a": null}]}
    """
    text = json.dumps(_jsonable(obj), indent=indent, allow_nan=False)
    if path is not None:
        Path(path).write_text(text + "\n", encoding="utf-8")
    return text


# The focused modules below use the validation helpers above, so they are imported last.
from gradlens.stats._meta import pool_correlations  # noqa: E402
from gradlens.stats._power import min_detectable_effect, power  # noqa: E402
from gradlens.stats._select import selected_gain  # noqa: E402
