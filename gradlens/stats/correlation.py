"""Correlation of two variables with a bootstrap interval and a permutation p-value.

:func:`correlate` (Spearman, Pearson, Kendall tau-b), :func:`partial_correlation` (controlling
for covariates) and :func:`adjust` (Holm or Benjamini-Hochberg). Both correlations share their
steps: drop incomplete pairs, refuse what is undefined, bootstrap the unit of the design (runs,
groups of runs, seeds within groups, or blocks of a series), permute the same unit. Re-exported
by :mod:`gradlens.stats`.

Example:
    >>> from gradlens.stats.correlation import correlate
    >>> r = correlate([1, 2, 3, 4, 5], [1, 3, 2, 5, 4], n_boot=0)
    >>> round(r["estimate"], 2), r["p_method"]
    (0.8, 'exact permutation')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError
from gradlens.stats import _args
from gradlens.stats import _core as _core
from gradlens.stats._args import SeedLike

__all__ = ["Correction", "Method", "adjust", "correlate", "partial_correlation"]

Method = _core.Method
Correction = _core.Correction
CORRECTIONS: tuple[str, ...] = ("holm", "bh", "none")
_NAN2 = (math.nan, math.nan)


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
    return _result(
        method,
        math.nan,
        _NAN2,
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
    resample: _core.Resample = "groups",
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
      a cluster bootstrap that resamples whole groups (its resamples spread by
      ``sqrt(G / (G - 1))`` around the estimate on Fisher's z scale, G the number of groups,
      the small-sample correction of a resampled mean); with ``resample="within"``: a stratified
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
    method = _args.choice(method, _core.METHODS, "method")
    n_boot = _args.count(n_boot, "n_boot")
    n_perm = _args.count(n_perm, "n_perm")
    level = _args.level(ci)
    rng = _args.rng(seed)
    xv, yv, codes = _complete_pairs(x, y, groups, block)
    if codes is not None:
        resample = _args.choice(resample, _core.RESAMPLES, "resample")
    n = xv.size
    n_groups = int(codes.max()) + 1 if codes is not None and n else n
    length = 0
    if block is not None:
        length = _core.auto_block_length(xv, yv) if block == "auto" and n else 1
        if block != "auto":
            length = _args.count(block, "block", minimum=1)
        boot_kind = f"circular block (length {length})"
    else:
        boot_kind = "runs" if codes is None else resample
    note = _degenerate(xv, yv)
    if note:
        return _undefined(method, level, n, n_groups, boot_kind, note)
    estimate = float(_core.correlation_counts(xv, yv, np.ones((1, n)), method)[0])
    boots = np.empty(0)
    if n_boot:
        if block is not None:
            C = _core.block_bootstrap_counts(rng, n_boot, n, min(length, n))
        else:
            C = _core.bootstrap_counts(rng, n_boot, n, codes, resample)
        boots = _finite(_core.correlation_counts(xv, yv, C, method))
        if codes is not None and resample == "groups":
            boots = _cluster_expanded(boots, estimate, n_groups)
    p, p_method, floor = math.nan, "none", math.nan
    if block is not None and boots.size:
        p = _core.centered_bootstrap_pvalue(estimate, boots)
        p_method = "centred block bootstrap"
    elif block is None and n_perm:
        p, p_method, floor = _permutation_test(rng, xv, yv, estimate, method, n_perm, codes, "")
    return _result(
        method,
        estimate,
        _core.percentile_interval(boots, level) if boots.size else _NAN2,
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


def _complete_pairs(
    x: Any, y: Any, groups: Any, block: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``x`` and ``y`` (and the group codes) checked, with the pairs holding a NaN dropped."""
    xv, yv = _args.vector(x, "x"), _args.vector(y, "y")
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
    if codes is not None:
        codes = np.asarray(pd.factorize(codes[keep])[0], dtype=np.intp)
    return xv[keep], yv[keep], codes


def _cluster_expanded(boots: np.ndarray, estimate: float, n_groups: int) -> np.ndarray:
    """Cluster-bootstrap correlations spread by ``sqrt(G / (G - 1))`` around the estimate on
    Fisher's z scale. Resampling ``G`` clusters gives a mean-like statistic ``(G - 1) / G`` of
    its variance; with 8-10 configurations the plain percentile interval of a correlation
    covered 0.924-0.926 at rho = 0.3, the expanded one 0.935-0.940 (``docs/stats.md``)."""
    if n_groups < 2:
        return boots
    lim = 1.0 - 1e-12
    z = math.atanh(min(max(estimate, -lim), lim))
    zb = np.arctanh(np.clip(boots, -lim, lim))
    return np.tanh(z + math.sqrt(n_groups / (n_groups - 1.0)) * (zb - z))


def _finite(values: np.ndarray) -> np.ndarray:
    """Bootstrap statistics without the undefined ones (a resample where a variable is constant)."""
    return values[np.isfinite(values)]


def _permutation_test(
    rng: np.random.Generator,
    xv: np.ndarray,
    yv: np.ndarray,
    estimate: float,
    method: str,
    n_perm: int,
    codes: np.ndarray | None,
    of: str,
) -> tuple[float, str, float]:
    """p-value, its method's name and its floor: ``yv`` permuted against ``xv`` (by group)."""
    perms, exact, unit = _permutation_rows(rng, xv.size, n_perm, codes)
    p = _core.permutation_pvalue(estimate, _core.permutation_null(xv, yv, perms, method), exact)
    name = f"{'exact ' if exact else ''}permutation{unit}{of}"
    return p, name, _core.pvalue_floor(exact, perms.shape[0])


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
    resample: _core.Resample = "groups",
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
    df = _args.frame(df, "df")
    method = _args.choice(method, ("spearman", "pearson"), "method")
    covs = _args.columns(df, covariates, "covariates")
    if not covs:
        raise GradlensError("`covariates` should name at least one column; found none.")
    _args.columns(df, [x, y], "x/y")
    group_cols = [] if groups is None else _args.columns(df, groups, "groups")
    n_boot = _args.count(n_boot, "n_boot")
    n_perm = _args.count(n_perm, "n_perm")
    level = _args.level(ci)
    rng = _args.rng(seed)
    xv, yv, Z, codes = _complete_rows(df, x, y, covs, group_cols)
    if codes is not None:
        resample = _args.choice(resample, _core.RESAMPLES, "resample")
    n = xv.size
    n_groups = int(codes.max()) + 1 if codes is not None and n else n
    boot_kind = "runs" if codes is None else resample
    note = _degenerate(xv, yv)
    est = math.nan
    if not note:
        est = float(_core.partial_counts(xv, yv, Z, np.ones((1, n)), method)[0])
        if not math.isfinite(est):
            note = "a variable is fully explained by the covariates"
    out_cov = ",".join(covs)
    if note:
        return {**_undefined(method, level, n, n_groups, boot_kind, note), "covariates": out_cov}
    boots = np.empty(0)
    if n_boot:
        C = _core.bootstrap_counts(rng, n_boot, n, codes, resample)
        boots = _finite(_core.partial_counts(xv, yv, Z, C, method))
        if codes is not None and resample == "groups":
            boots = _cluster_expanded(boots, est, n_groups)
    p, p_method, floor = math.nan, "none", math.nan
    if n_perm:
        rx, ry = _core.residuals_for_partial(xv, yv, Z, method)
        p, p_method, floor = _permutation_test(
            rng, rx, ry, est, "pearson", n_perm, codes, " of residuals"
        )
    res = _result(
        method,
        est,
        _core.percentile_interval(boots, level) if boots.size else _NAN2,
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


def _complete_rows(
    df: pd.DataFrame, x: str, y: str, covs: list[str], group_cols: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``x``, ``y``, the covariates and the group codes of the rows complete in every column."""
    used = df[[x, y, *covs]].apply(pd.to_numeric, errors="coerce").astype(np.float64)
    keep = used.notna().all(axis=1).to_numpy()
    codes = None
    if group_cols:
        key = df.loc[keep, group_cols].astype(str).agg("\x1f".join, axis=1)
        codes = np.asarray(pd.factorize(key)[0], dtype=np.intp)
    return used[x].to_numpy()[keep], used[y].to_numpy()[keep], used[covs].to_numpy()[keep], codes


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
    method = _args.choice(method, CORRECTIONS, "method")
    p = _args.vector(pvalues, "pvalues")
    finite = p[np.isfinite(p)]
    if ((finite < 0) | (finite > 1)).any():
        raise GradlensError(
            f"`pvalues` should lie in [0, 1]; found {finite[(finite < 0) | (finite > 1)][:3]}."
        )
    return _core.adjust_pvalues(p, method)
