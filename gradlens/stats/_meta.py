"""Random-effects pooling of correlations across runs (:func:`pool_correlations`).

Re-exported as :func:`gradlens.stats.pool_correlations`. Each run gives a correlation ``r_i`` on
an (effective) sample size ``n_i``; on Fisher's scale ``z_i = atanh(r_i)`` has variance about
``v_i = 1 / (n_i - 3)``. The between-run variance ``tau^2`` is the DerSimonian-Laird moment
estimate, the pooled ``z`` the inverse-variance mean with weights ``1 / (v_i + tau^2)``. With the
3 to 10 runs of a study the normal interval of DerSimonian-Laird is too short when the runs
differ (0.89 at 3 runs, measured in ``docs/stats.md``), so the interval and test use the
Hartung-Knapp(-Sidik-Jonkman) variance, ``sum w*_i (z_i - mu)^2 / ((k - 1) sum w*_i)``, on
``k - 1`` degrees of freedom (0.94-0.96 at 3, 5 and 10 runs); the plain DerSimonian-Laird
interval is returned too. The Hartung-Knapp variance is itself estimated from the spread of the
runs: when a few runs happen to agree closely it can be narrower than the DerSimonian-Laird one
(when they agree exactly, the DerSimonian-Laird variance is used).

The Hartung-Knapp t-test assumes the weights are right. Within-run correlations come with an
*estimated* effective n (from lag-1 autocorrelations of a few epochs), so the weights carry
noise of their own; when they vary for reasons unrelated to the runs' real precision the
Hartung-Knapp variance is too small and the test too liberal. With 6 runs or more the p-value is
therefore a sign-flip randomization test over runs: under "no correlation in any run" each
``z_i`` is symmetric about 0 (independently of the others), so flipping the signs of any subset
of runs gives a dataset as likely as the observed one; the same studentized statistic
``mu / se_HK`` (tau^2 re-estimated every time) is recomputed for every sign pattern (all
``2^k`` when ``2^k <= n_flip + 1``, else ``n_flip`` random ones with the +1 correction). This
holds its level whatever the weights (measured in ``docs/stats.md``). With fewer than 6 runs
no sign-flip p-value can reach 0.05 (``2 / 2^k``) and the Hartung-Knapp t-test is used.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradlens._errors import GradlensError, require
from gradlens.stats import _args
from gradlens.stats._args import SeedLike

__all__ = ["pool_correlations"]

#: Fewest runs for the sign-flip test: with ``k`` runs its smallest p-value is ``2 / 2^k``.
MIN_RUNS_FLIP = 6


def pool_correlations(
    r: Any, n: Any, *, ci: float = 0.95, n_flip: int = 9999, seed: SeedLike = 0
) -> dict[str, Any]:
    """Pool per-run correlations by Fisher z with DerSimonian-Laird random effects.

    Runs whose ``n`` is not above 3 (no information on Fisher's scale) or whose ``r`` is NaN are
    left out (``n_dropped``).

    Args:
        r: Correlations, one per run.
        n: Sample size of each (e.g. ``within_run``'s ``n_eff``).
        ci: Confidence level.
        n_flip: Random sign patterns of the sign-flip test when ``2^k > n_flip + 1``.
        seed: Seed or Generator of those patterns.

    Returns:
        ``estimate`` (``tanh`` of the pooled z), ``ci_low``, ``ci_high``, ``ci_level``
        (Hartung-Knapp t interval on ``k - 1`` df), ``p_value`` (sign-flip test with 6 runs or
        more, else the Hartung-Knapp t-test), ``p_method``, ``p_floor``, ``p_value_hk``,
        ``ci_low_dl``, ``ci_high_dl``, ``p_value_dl`` (normal, DerSimonian-Laird variance),
        ``tau2`` (on the z scale), ``q`` (Cochran's Q), ``i2``, ``k``, ``n_dropped``,
        ``method``. NaN with fewer than 2 usable runs.

    Example:
        >>> res = pool_correlations([0.3, 0.5, 0.4], [30, 40, 35])
        >>> round(res["estimate"], 3), res["k"], res["tau2"], res["p_method"]
        (0.414, 3, 0.0, 'Hartung-Knapp t')
        >>> res = pool_correlations([0.3, 0.5, 0.4, 0.2, 0.1, 0.3], [30, 40, 35, 30, 30, 30])
        >>> res["p_method"], res["p_value"]
        ('exact sign-flip over runs', 0.03125)
    """
    level = _args.level(ci)
    n_flip = _args.count(n_flip, "n_flip")
    rng = _args.rng(seed)
    rv, nv = _args.vector(r, "r"), _args.vector(n, "n")
    if rv.shape != nv.shape:
        raise GradlensError(
            f"`r` and `n` should have the same length; found {rv.size} and {nv.size}."
        )
    if ((np.abs(rv) > 1) & np.isfinite(rv)).any():
        raise GradlensError(f"`r` should lie in [-1, 1]; found {rv[np.abs(rv) > 1][:3]}.")
    keep = np.isfinite(rv) & np.isfinite(nv) & (nv > 3)
    k = int(keep.sum())
    out: dict[str, Any] = {
        "estimate": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "ci_level": level,
        "p_value": math.nan,
        "p_method": "none",
        "p_floor": math.nan,
        "p_value_hk": math.nan,
        "ci_low_dl": math.nan,
        "ci_high_dl": math.nan,
        "p_value_dl": math.nan,
        "tau2": math.nan,
        "q": math.nan,
        "i2": math.nan,
        "k": k,
        "n_dropped": int(rv.size - k),
        "method": "Fisher z, DerSimonian-Laird, Hartung-Knapp interval",
    }
    if k < 2:
        return out
    sp: Any = require("scipy.stats", "stats", "gradlens.stats.pool_correlations")
    z = np.arctanh(np.clip(rv[keep], -1 + 1e-12, 1 - 1e-12))
    v = 1.0 / (nv[keep] - 3.0)
    fit = _random_effects(z[None, :], v)
    mu, var_dl, var_hk, tau2, q = (
        float(fit[key][0]) for key in ("mu", "var_dl", "var_hk", "tau2", "q")
    )
    tq = float(sp.t.ppf((1 + level) / 2, k - 1))
    nq = float(sp.norm.ppf((1 + level) / 2))
    se_hk, se_dl = math.sqrt(var_hk), math.sqrt(var_dl)
    p_hk = float(2 * sp.t.sf(abs(mu) / se_hk, k - 1))
    out.update(
        {
            "estimate": math.tanh(mu),
            "ci_low": math.tanh(mu - tq * se_hk),
            "ci_high": math.tanh(mu + tq * se_hk),
            "p_value": p_hk,
            "p_method": "Hartung-Knapp t",
            "p_value_hk": p_hk,
            "ci_low_dl": math.tanh(mu - nq * se_dl),
            "ci_high_dl": math.tanh(mu + nq * se_dl),
            "p_value_dl": float(2 * sp.norm.sf(abs(mu) / se_dl)),
            "tau2": tau2,
            "q": q,
            "i2": max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0,
        }
    )
    if k >= MIN_RUNS_FLIP:
        out.update(_sign_flip(z, v, mu / se_hk, n_flip, rng))
    return out


def _random_effects(Z: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """DerSimonian-Laird and Hartung-Knapp for each row of ``Z`` ``(B, k)`` (variances ``v``):
    ``mu``, ``var_dl``, ``var_hk``, ``tau2`` and ``q``, each of shape ``(B,)``."""
    k = Z.shape[1]
    w = 1.0 / v
    z_fe = Z @ w / w.sum()
    q = ((Z - z_fe[:, None]) ** 2) @ w
    c = float(w.sum() - (w @ w) / w.sum())
    tau2 = np.maximum(0.0, (q - (k - 1)) / c) if c > 0 else np.zeros_like(q)
    ws = 1.0 / (v[None, :] + tau2[:, None])
    mu = (ws * Z).sum(axis=1) / ws.sum(axis=1)
    var_dl = 1.0 / ws.sum(axis=1)
    q_hk = (ws * (Z - mu[:, None]) ** 2).sum(axis=1) / (k - 1)
    # Runs that agree exactly leave the Hartung-Knapp variance at 0: use DerSimonian-Laird's.
    var_hk = np.where(q_hk > 0, q_hk * var_dl, var_dl)
    return {"mu": mu, "var_dl": var_dl, "var_hk": var_hk, "tau2": tau2, "q": q}


def _sign_flip(
    z: np.ndarray, v: np.ndarray, t: float, n_flip: int, rng: np.random.Generator
) -> dict[str, Any]:
    """The sign-flip randomization p-value of the studentized pooled ``z`` (``t``)."""
    k = z.size
    exact = 2**k <= n_flip + 1
    if exact:
        signs = 1.0 - 2.0 * ((np.arange(2**k)[:, None] >> np.arange(k)[None, :]) & 1)
    elif n_flip:
        signs = rng.choice(np.array([-1.0, 1.0]), size=(n_flip, k))
    else:
        return {}
    fit = _random_effects(signs * z[None, :], v)
    null = fit["mu"] / np.sqrt(fit["var_hk"])
    hits = int(np.count_nonzero(np.abs(null) >= abs(t) * (1.0 - 1e-12)))
    p = hits / null.size if exact else (hits + 1) / (null.size + 1)
    return {
        "p_value": p,
        "p_method": f"{'exact ' if exact else ''}sign-flip over runs",
        "p_floor": 2.0 / null.size if exact else 1.0 / (null.size + 1),
    }
