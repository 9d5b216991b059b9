"""Simulated power of the tests the report runs, for the designs the harness runs.

Re-exported as :func:`gradlens.stats.power` and :func:`gradlens.stats.min_detectable_effect`.
A design is ``sizes x weights x seeds`` runs (the layout of ``gradlens sweep``):

- ``"association"``: across runs, the correlation of the swept weight with an outcome
  (interference or accuracy). The weight of a run is its point of an evenly spaced grid in
  [0.1, 0.9]; the outcome is ``effect * w~ + sqrt(1 - effect^2) (sqrt(icc) u_config +
  sqrt(1 - icc) e_run)`` with ``w~`` the standardised weight, so ``effect`` is the Pearson
  correlation of weight and outcome over runs and ``icc`` the share of the noise common to the
  seeds of one configuration. The test is :func:`gradlens.stats.correlate` with the
  configurations as groups (whole configurations permuted), as the report runs it, at level
  ``alpha / n_tests`` (the first step of Holm over a family of ``n_tests``).
- ``"gain"``: the held-out gain of one (size, task) cell: ``seeds`` paired differences with
  mean ``effect`` in units of their standard deviation (Cohen's d_z), paired t-test at
  ``alpha / n_tests``. The closed form is a noncentral t; the tests check the simulation
  against it.

Power is the fraction of ``n_sim`` simulated studies that reject; :func:`min_detectable_effect`
bisects the effect at which it reaches ``target`` with common random numbers (the same noise
at every effect, so the curve is monotone up to permutation noise).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from gradlens._errors import GradlensError
from gradlens.stats import _args
from gradlens.stats import _core as _core

__all__ = ["min_detectable_effect", "power"]

Design = Literal["association", "gain"]
_DESIGNS: tuple[str, ...] = ("association", "gain")


def _design_args(
    design: str, sizes: int, weights: int, seeds: int, alpha: float, n_tests: int, n_sim: int
) -> None:

    _args.choice(design, _DESIGNS, "design")
    _args.count(sizes, "sizes", 1)
    _args.count(weights, "weights", 1)
    _args.count(seeds, "seeds", 2)
    _args.count(n_tests, "n_tests", 1)
    _args.count(n_sim, "n_sim", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise GradlensError(f"`alpha` should lie in (0, 1); found {alpha!r}.")
    if design == "association" and weights < 3:
        raise GradlensError(
            f"`weights` should be at least 3 for an association across weights; found {weights}."
        )


def _association_pvalues(
    effect: float,
    noise: np.ndarray,
    x: np.ndarray,
    codes: np.ndarray,
    method: str,
    n_perm: int,
    seed: int,
) -> np.ndarray:
    """P-values of the report's association test (:func:`gradlens.stats.correlate` with the
    configurations as groups: whole configurations permuted) on each simulated study. One set
    of configuration permutations serves every study (each p-value stays valid)."""

    xs = (x - x.mean()) / x.std()
    perms, exact, _ = _core.group_permutations(np.random.default_rng([seed, 1]), codes, n_perm)
    ones = np.ones((1, x.size))
    out = np.empty(noise.shape[0])
    for i in range(noise.shape[0]):
        y = effect * xs + math.sqrt(max(0.0, 1.0 - effect * effect)) * noise[i]
        observed = float(_core.correlation_counts(x, y, ones, method)[0])
        null = _core.permutation_null(x, y, perms, method)
        out[i] = _core.permutation_pvalue(observed, null, exact)
    return out


_Parts = tuple[np.ndarray, "np.ndarray | None", "np.ndarray | None"]


def _noise(
    design: str, sizes: int, weights: int, seeds: int, icc: float, n_sim: int, seed: int
) -> _Parts:
    rng = np.random.default_rng([seed, 0])
    if design == "gain":
        return rng.normal(size=(n_sim, seeds)), None, None
    G = sizes * weights
    codes = np.repeat(np.arange(G), seeds)
    x = np.repeat(np.tile(np.linspace(0.1, 0.9, weights), sizes), seeds)
    u = rng.normal(size=(n_sim, G))[:, codes]
    e = rng.normal(size=(n_sim, G * seeds))
    return math.sqrt(icc) * u + math.sqrt(1.0 - icc) * e, x, codes


def _rejections(
    effect: float, parts: _Parts, design: str, level: float, method: str, n_perm: int, seed: int
) -> np.ndarray:
    noise, x, codes = parts
    if design == "gain":
        from gradlens.stats._gain import _t

        d = effect + noise
        n = d.shape[1]
        t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
        return 2.0 * _t().sf(np.abs(t), n - 1) < level
    assert x is not None  # built together with codes by _noise
    assert codes is not None
    return _association_pvalues(effect, noise, x, codes, method, n_perm, seed) < level


def power(
    design: Design,
    *,
    effect: float,
    sizes: int = 1,
    weights: int = 5,
    seeds: int = 3,
    icc: float = 0.0,
    alpha: float = 0.05,
    n_tests: int = 1,
    method: Literal["spearman", "pearson", "kendall"] = "spearman",
    n_sim: int = 400,
    n_perm: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Simulated power of a report test for a ``sizes x weights x seeds`` design.

    Args:
        design: ``"association"`` (weight vs an outcome across runs) or ``"gain"`` (one cell
            of the held-out joint-vs-single gain); see the module docstring for the models.
        effect: Pearson correlation over runs (association) or mean gain in standard
            deviations of the per-seed differences (gain).
        sizes: Model sizes.
        weights: Weight grid points per size.
        seeds: Seeds per configuration.
        icc: Share of the association noise common to the seeds of a configuration.
        alpha: Family-wise level.
        n_tests: Tests in the family (level per test ``alpha / n_tests``).
        method: Correlation of the association test.
        n_sim: Simulated studies.
        n_perm: Permutations per association test (default ``ceil(10 n_tests / alpha)``,
            so that the permutation floor sits well under the level).
        seed: Seed of the simulation.

    Returns:
        ``power``, ``se`` (binomial Monte Carlo error), ``design``, ``effect``, ``alpha``,
        ``n_tests``, ``level`` (``alpha / n_tests``), ``n_runs``, ``n_configs``, ``icc``,
        ``n_sim``, ``test``.

    Example:
        >>> round(power("gain", effect=1.5, seeds=5, n_sim=2000)["power"], 2)
        0.71
    """
    _design_args(design, sizes, weights, seeds, alpha, n_tests, n_sim)
    if design == "association" and not -1 < effect < 1:
        raise GradlensError(f"`effect` should be a correlation in (-1, 1); found {effect!r}.")
    if not 0 <= icc < 1:
        raise GradlensError(f"`icc` should lie in [0, 1); found {icc!r}.")
    level = alpha / n_tests
    n_perm = n_perm if n_perm is not None else math.ceil(10 * n_tests / alpha)
    parts = _noise(design, sizes, weights, seeds, icc, n_sim, seed)
    hits = _rejections(float(effect), parts, design, level, method, n_perm, seed)
    pw = float(np.mean(hits))
    return {
        "power": pw,
        "se": math.sqrt(pw * (1 - pw) / n_sim),
        "design": design,
        "effect": float(effect),
        "alpha": float(alpha),
        "n_tests": n_tests,
        "level": level,
        "n_runs": sizes * weights * seeds if design == "association" else seeds,
        "n_configs": sizes * weights if design == "association" else 1,
        "icc": float(icc),
        "n_sim": n_sim,
        "test": (
            f"{method}, configurations permuted"
            if design == "association"
            else "paired t on held-out gains"
        ),
    }


def min_detectable_effect(
    design: Design,
    *,
    target: float = 0.8,
    sizes: int = 1,
    weights: int = 5,
    seeds: int = 3,
    icc: float = 0.0,
    alpha: float = 0.05,
    n_tests: int = 1,
    method: Literal["spearman", "pearson", "kendall"] = "spearman",
    n_sim: int = 200,
    n_perm: int | None = None,
    tol: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Smallest effect that :func:`power` detects with probability ``target`` (bisection).

    The effect is searched in ``[0, 0.99]`` (association) or ``[0, 50]`` (gain, in SDs) to
    within ``tol`` (relative for the gain); every evaluation reuses the same simulated noise.

    Returns:
        ``effect`` (NaN when even the largest effect in the range stays below ``target``, e.g.
        when the permutation floor of the design is above the level), ``power`` at it,
        ``target``, ``reachable`` and the design fields of :func:`power`.

    Example:
        >>> r = min_detectable_effect("gain", seeds=5, n_sim=2000)
        >>> 1.5 < r["effect"] < 1.9
        True
    """
    _design_args(design, sizes, weights, seeds, alpha, n_tests, n_sim)
    if not 0 < target < 1:
        raise GradlensError(f"`target` should lie in (0, 1); found {target!r}.")
    level = alpha / n_tests
    n_perm = n_perm if n_perm is not None else math.ceil(10 * n_tests / alpha)
    parts = _noise(design, sizes, weights, seeds, icc, n_sim, seed)

    def pw(effect: float) -> float:
        return float(np.mean(_rejections(effect, parts, design, level, method, n_perm, seed)))

    lo, hi = 0.0, (0.99 if design == "association" else 50.0)
    p_hi = pw(hi)
    base = {
        "target": target,
        "design": design,
        "alpha": float(alpha),
        "n_tests": n_tests,
        "level": level,
        "n_runs": sizes * weights * seeds if design == "association" else seeds,
        "n_configs": sizes * weights if design == "association" else 1,
        "icc": float(icc),
        "n_sim": n_sim,
    }
    if p_hi < target:
        return {**base, "effect": math.nan, "power": p_hi, "reachable": False}
    while hi - lo > tol * (1.0 if design == "association" else max(hi, 1e-9)):
        mid = 0.5 * (lo + hi)
        p_mid = pw(mid)
        if p_mid >= target:
            hi, p_hi = mid, p_mid
        else:
            lo = mid
    return {**base, "effect": hi, "power": p_hi, "reachable": True}
