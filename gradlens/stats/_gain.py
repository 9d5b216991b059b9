"""t intervals, t-tests and equivalence tests of a joint-vs-single gain, and held-out selection.

A gain is measured on a handful of seeds (3 to 10). A percentile bootstrap of 3 paired differences
covers about 0.81 of the time at a nominal 0.95 (it can only take the 10 values of the resampled
means); the t interval on the same differences is exact under normal seed noise and stays near
nominal otherwise (measured in ``docs/stats.md``). Everything here is closed form.

Held-out selection (:func:`cross_fit_gain`): choosing the best weight on scores that share run
noise with the scores then reported (validation and test of the same run) makes the reported gain
optimistic. Here each seed's gain is measured at the weight chosen on the *other* seeds only
(leave-one-seed-out), so the seed that is evaluated took no part in choosing.

The resampling of seeds shared by :func:`gradlens.stats.joint_gain`, the optimal weight and the
report's arm comparison (:func:`gain_pairs`, :func:`gain_boot`, :func:`rescaled`,
:func:`gain_stats`) lives here too: this module is their stable internal path.

Example:
    >>> import numpy as np
    >>> r = paired_t(np.array([0.01, 0.03, 0.02]))
    >>> round(r["gain"], 3), round(r["ci_low"], 4), round(r["ci_high"], 4), round(r["p_value"], 3)
    (0.02, -0.0048, 0.0448, 0.074)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from gradlens._errors import require
from gradlens.stats import _core as _core

__all__ = [
    "binomial_sd",
    "cross_fit_gain",
    "equivalence_p",
    "gain_boot",
    "gain_pairs",
    "gain_stats",
    "gain_test_var",
    "paired_gain",
    "paired_t",
    "rescaled",
    "welch_t",
    "with_test_var",
]


def _t() -> Any:
    sp: Any = require("scipy.stats", "stats", "the t interval of a gain")
    return sp.t


def _summary(gain: float, se: float, df: float, level: float, method: str) -> dict[str, Any]:
    if not (math.isfinite(se) and df >= 1):
        return {
            "gain": gain,
            "se": math.nan,
            "df": math.nan,
            "ci_low": math.nan,
            "ci_high": math.nan,
            "p_value": math.nan,
            "interval": method,
        }
    t = _t()
    q = float(t.ppf((1.0 + level) / 2.0, df))
    if se > 0:
        p = float(2.0 * t.sf(abs(gain) / se, df))
    else:
        p = 0.0 if gain != 0 else 1.0
    return {
        "gain": gain,
        "se": se,
        "df": df,
        "ci_low": gain - q * se,
        "ci_high": gain + q * se,
        "p_value": p,
        "interval": method,
    }


def paired_t(d: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """Mean of paired differences ``d`` with its t interval and two-sided t-test of mean 0.

    ``se = sd(d) / sqrt(n)`` on ``n - 1`` degrees of freedom (``scipy.stats.ttest_rel``);
    NaN interval and p-value with fewer than 2 differences.

    Example:
        >>> r = paired_t(np.array([1.0, 2.0, 3.0, 4.0]))
        >>> r["gain"], r["df"], round(r["p_value"], 4)
        (2.5, 3.0, 0.0305)
    """
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    gain = float(d.mean()) if n else math.nan
    se = float(d.std(ddof=1) / math.sqrt(n)) if n >= 2 else math.nan
    return _summary(gain, se, float(n - 1), level, "paired t")


def binomial_sd(p: Any, n: Any) -> Any:
    """Test-set sampling SD of an accuracy ``p`` measured on ``n`` independent test items:
    ``sqrt(p (1 - p) / n)`` (elementwise on arrays; NaN where ``n`` is not positive).

    Example:
        >>> round(float(binomial_sd(0.9, 250)), 4)
        0.019
    """
    p = np.asarray(p, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(all="ignore"):
        out = np.where(n > 0, np.sqrt(np.clip(p * (1.0 - p), 0.0, None) / n), np.nan)
    return float(out) if out.ndim == 0 else out


def gain_test_var(p_joint: float, p_single: float, n: float) -> float:
    """Upper bound of the test-set variance of a gain ``p_joint - p_single`` (both measured on
    the same ``n`` test items, each the mean over seeds of one model's accuracy).

    ``(p_j (1 - p_j) + p_s (1 - p_s)) / n``: the variance over test sets of the seed-averaged
    per-item difference ``D(x) = a(x) - b(x)`` (``a``, ``b`` the share of seeds that get item
    ``x`` right) is ``Var(a) + Var(b) - 2 Cov(a, b)``; ``Var(a) <= p_j (1 - p_j)`` because ``a``
    lies in ``[0, 1]``, and ``Cov(a, b) >= 0`` when items that are hard for one model are not
    easier for the other. The bound is reached when each model's correctness on an item is
    the same for every seed and the two models' errors are unrelated; shared errors (easy and
    hard items) make the true variance smaller. Without per-item predictions it is the
    tightest bound the accuracies allow.

    Example:
        >>> round(gain_test_var(0.9, 0.88, 250) ** 0.5, 3)
        0.028
    """
    if not n > 0:
        return math.nan
    return float((p_joint * (1.0 - p_joint) + p_single * (1.0 - p_single)) / n)


def paired_gain(d: np.ndarray, test_var: float = 0.0, level: float = 0.95) -> dict[str, Any]:
    """Mean of per-seed paired differences ``d`` with an interval that covers seed variation
    *and* test-set sampling (:func:`with_test_var` on the paired t of ``d``).

    Example:
        >>> r = paired_gain(np.array([0.01, 0.03, 0.02, 0.02, 0.03]), test_var=0.01 ** 2)
        >>> round(r["se_seed"], 4), r["se_test"], round(r["se"], 4), round(r["df"], 1)
        (0.0037, 0.01, 0.0107, 265.2)
    """
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    se = float(d.std(ddof=1) / math.sqrt(n)) if n >= 2 else math.nan
    return with_test_var(float(d.mean()) if n else math.nan, se, float(n - 1), test_var, level)


def with_test_var(
    gain: float, se_seed: float, df_seed: float, test_var: float, level: float = 0.95
) -> dict[str, Any]:
    """A seed-paired gain's t interval widened by the test-set sampling variance.

    All runs are scored on one fixed test set, so the spread of the paired differences over
    seeds (``se_seed`` on ``df_seed`` degrees of freedom) measures the seed variance only; the
    test-set part, ``test_var`` (e.g. :func:`gain_test_var`), does not shrink with more seeds
    and is added: ``se^2 = se_seed^2 + test_var`` on the Welch-Satterthwaite degrees of freedom
    ``se^4 / (se_seed^4 / df_seed)`` (``test_var`` counts as known). Because those degrees of
    freedom exceed ``df_seed``, a small ``test_var`` could make the interval *narrower* than
    the seed-only one; the wider of the two is returned (and its p-value). ``test_var = 0`` (or
    NaN: unknown) gives the seed-only t interval. ``se_seed`` and ``se_test`` are returned
    beside ``se``. Coverage: :func:`gradlens.stats.calibration.gain_test_coverage`.

    Example:
        >>> r = with_test_var(0.02, 0.004, 4.0, 0.0)
        >>> r["df"], round(r["ci_low"], 4), r["interval"]
        (4.0, 0.0089, 'paired t over seeds')
        >>> w = with_test_var(0.02, 0.004, 4.0, 0.002 ** 2)  # seed-only t still the wider
        >>> round(w["ci_low"], 5), round(w["se"], 5), round(w["df"], 2)
        (0.00889, 0.00447, 6.25)
        >>> round(with_test_var(0.02, 0.004, 4.0, 0.003 ** 2)["ci_low"], 5)  # now the total
        0.00882
    """
    tv = float(test_var) if math.isfinite(test_var) and test_var > 0 else 0.0
    seed = _summary(gain, se_seed, df_seed, level, "paired t over seeds")
    out = dict(seed)
    if tv > 0 and math.isfinite(se_seed):
        total = se_seed * se_seed + tv
        df = total * total / (se_seed**4 / df_seed) if se_seed > 0 else math.inf
        out = _summary(gain, math.sqrt(total), df, level, "paired t over seeds + test-set variance")
        if seed["ci_high"] - seed["ci_low"] > out["ci_high"] - out["ci_low"]:
            out.update({k: seed[k] for k in ("ci_low", "ci_high", "p_value")})
    out["se_seed"] = se_seed
    out["se_test"] = math.sqrt(tv) if math.isfinite(test_var) else math.nan
    return out


def welch_t(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """``mean(a) - mean(b)`` with the Welch t interval and test (unequal variances).

    Equals ``scipy.stats.ttest_ind(a, b, equal_var=False)``; NaN interval with fewer than 2
    values on a side.

    Example:
        >>> r = welch_t(np.array([3.0, 4.0, 5.0]), np.array([1.0, 2.0, 3.0, 2.0]))
        >>> r["gain"], round(r["df"], 2), round(r["p_value"], 4)
        (2.0, 3.86, 0.0495)
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    gain = float(a.mean() - b.mean()) if a.size and b.size else math.nan
    if a.size < 2 or b.size < 2:
        return _summary(gain, math.nan, math.nan, level, "Welch t")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    den = va * va / (a.size - 1) + vb * vb / (b.size - 1)
    df = (va + vb) ** 2 / den if den > 0 else float(a.size + b.size - 2)
    return _summary(gain, se, float(df), level, "Welch t")


def equivalence_p(gain: float, se: float, df: float, margin: float) -> float:
    """Two one-sided tests (TOST) of ``|true gain| < margin``: ``max`` of the p-values of
    ``gain <= -margin`` and ``gain >= margin`` against the t distribution on ``df``.

    A value below ``alpha`` shows equivalence within ``+-margin`` at level ``alpha`` (the same
    as the ``1 - 2 alpha`` t interval lying inside ``(-margin, margin)``). NaN when ``se`` is.

    Example:
        >>> round(equivalence_p(0.001, 0.002, 9.0, 0.01), 4)
        0.0007
    """
    if not (math.isfinite(se) and math.isfinite(df) and se > 0):
        return math.nan
    t = _t()
    p_low = float(t.sf((gain + margin) / se, df))  # H0: gain <= -margin
    p_high = float(t.cdf((gain - margin) / se, df))  # H0: gain >= margin
    return max(p_low, p_high)


def cross_fit_gain(
    select: np.ndarray, joint: np.ndarray, single: np.ndarray, level: float = 0.95
) -> dict[str, Any]:
    """Gain at a weight chosen on held-out seeds (leave one seed out), with a paired t interval.

    Args:
        select: ``(K, S)`` selection scores (validation) of ``K`` configurations x ``S`` seeds.
        joint: ``(K, S)`` reported scores (test) of the same runs, for one task.
        single: ``(S,)`` reported scores of the single-task baseline of that task, same seeds.
        level: Confidence level.

    For every seed ``s``, the configuration ``k(-s)`` with the best mean selection score over
    the other seeds (NaN-aware) is picked, and ``d_s = joint[k(-s), s] - single[s]``. The gain
    is ``mean(d)`` with :func:`paired_t`'s interval. Returns that dict plus ``picked`` (the
    ``k(-s)`` per seed) and ``n_seeds``.

    Example:
        >>> sel = np.array([[0.1, 0.2, 0.1], [0.5, 0.6, 0.7]])
        >>> r = cross_fit_gain(sel, sel + 0.1, np.array([0.5, 0.55, 0.6]))
        >>> r["picked"], round(r["gain"], 3)
        ([1, 1, 1], 0.15)
    """
    S = select.shape[1]
    picked: list[int] = []
    d = np.full(S, np.nan)
    for s in range(S):
        others = np.delete(select, s, axis=1)
        with np.errstate(all="ignore"):
            counts = np.isfinite(others).sum(axis=1)
            means = np.where(counts > 0, np.nansum(others, axis=1) / np.maximum(counts, 1), np.nan)
        if S < 2 or not np.isfinite(means).any():
            picked.append(-1)
            continue
        k = int(np.nanargmax(means))
        picked.append(k)
        d[s] = joint[k, s] - single[s]
    d = d[np.isfinite(d)]
    return {**paired_t(d, level), "picked": picked, "n_seeds": int(d.size)}


def rescaled(c: np.ndarray) -> np.ndarray:
    """Seed values spread by ``sqrt(m / (m - 1))`` around their mean, so that the bootstrap
    variance of their mean is the unbiased ``s^2 / m`` instead of ``(m - 1) / m`` of it (a third
    too small with 3 seeds)."""
    m = c.size
    return c if m < 2 else c.mean() + math.sqrt(m / (m - 1.0)) * (c - c.mean())


def gain_pairs(
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


def gain_boot(
    a: np.ndarray, b: np.ndarray, d: np.ndarray | None, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    if d is not None:
        C = rng.multinomial(d.size, np.full(d.size, 1.0 / d.size), size=n_boot)
        return C @ rescaled(d) / d.size
    ca = rng.multinomial(a.size, np.full(a.size, 1.0 / a.size), size=n_boot)
    cb = rng.multinomial(b.size, np.full(b.size, 1.0 / b.size), size=n_boot)
    return ca @ rescaled(a) / a.size - cb @ rescaled(b) / b.size


def gain_stats(
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
        return {
            "gain": nan,
            "se": nan,
            "df": nan,
            "ci_low": nan,
            "ci_high": nan,
            "p_value": nan,
            "interval": "none",
        }
    res = paired_t(d, level) if d is not None else welch_t(a, b, level)
    if interval == "bootstrap":
        boots = gain_boot(a, b, d, n_boot, rng) if n_boot else np.empty(0)
        lo, hi = _core.percentile_interval(boots, level) if boots.size else (math.nan, math.nan)
        res.update({"ci_low": lo, "ci_high": hi, "interval": "percentile bootstrap"})
    return res
