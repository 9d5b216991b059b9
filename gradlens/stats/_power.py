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
- ``"trend"``: the optimal-weight trend (:func:`gradlens.stats.optimal_weight_trend`, quadratic
  optimum, permutation p-value) over ``sizes`` model sizes a decade apart: the score of a run is
  ``-curvature (w - p*_size)^2 + noise N(0, 1)`` on the grid of ``weights`` points in
  [0.1, 0.9], with ``p*`` centred on 0.5 and moving by ``effect`` per decade of size.
- ``"pooled"``: the pooled within-run correlation (:func:`gradlens.stats.pool_correlations`)
  over the ``sizes x weights x seeds`` runs of the design, each a correlation ``effect`` measured
  on ``n_eff`` effective epochs (Fisher's approximation: ``atanh(r_i) ~ N(atanh(effect),
  1 / (n_eff - 3))``).

Power is the fraction of ``n_sim`` simulated studies that reject; :func:`min_detectable_effect`
bisects the effect at which it reaches ``target`` with common random numbers (the same noise
at every effect, so the curve is monotone up to permutation noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gradlens._errors import GradlensError
from gradlens.stats import _args
from gradlens.stats import _core as _core

__all__ = ["min_detectable_effect", "power"]

Design = Literal["association", "gain", "trend", "pooled"]
_DESIGNS: tuple[str, ...] = ("association", "gain", "trend", "pooled")


@dataclass(frozen=True)
class _Model:
    """The parameters of the ``trend`` and ``pooled`` designs (see the module docstring)."""

    n_eff: float = 6.0
    noise: float = 0.01
    curvature: float = 0.3
    n_perm: int = 199


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
    if design in ("association", "trend") and weights < 3:
        raise GradlensError(
            f"`weights` should be at least 3 for an association across weights or a fitted "
            f"optimum; found {weights}."
        )
    if design == "trend" and sizes < 2:
        raise GradlensError(f"`sizes` should be at least 2 for a trend over sizes; found {sizes}.")


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
    if design in ("trend", "pooled"):
        return rng.normal(size=(n_sim, sizes * weights * seeds)), None, None
    G = sizes * weights
    codes = np.repeat(np.arange(G), seeds)
    x = np.repeat(np.tile(np.linspace(0.1, 0.9, weights), sizes), seeds)
    u = rng.normal(size=(n_sim, G))[:, codes]
    e = rng.normal(size=(n_sim, G * seeds))
    return math.sqrt(icc) * u + math.sqrt(1.0 - icc) * e, x, codes


def _rejections(
    effect: float,
    parts: _Parts,
    design: str,
    level: float,
    method: str,
    n_perm: int,
    seed: int,
    model: _Model = _Model(),
    shape: tuple[int, int, int] = (1, 1, 1),
) -> np.ndarray:
    noise, x, codes = parts
    if design == "pooled":
        return _pooled_pvalues(effect, noise, model, seed) < level
    if design == "trend":
        return _trend_pvalues(effect, noise, model, shape, seed) < level
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
    n_eff: float = 6.0,
    noise: float = 0.01,
    curvature: float = 0.3,
    seed: int = 0,
) -> dict[str, Any]:
    """Simulated power of a report test for a ``sizes x weights x seeds`` design.

    Args:
        design: ``"association"`` (weight vs an outcome across runs) or ``"gain"`` (one cell
            of the held-out joint-vs-single gain); see the module docstring for the models.
        effect: Pearson correlation over runs (association), mean gain in standard
            deviations of the per-seed differences (gain), shift of the optimal weight per
            decade of model size (trend), or the correlation within every run (pooled).
        sizes: Model sizes.
        weights: Weight grid points per size.
        seeds: Seeds per configuration.
        icc: Share of the association noise common to the seeds of a configuration.
        alpha: Family-wise level.
        n_tests: Tests in the family (level per test ``alpha / n_tests``).
        method: Correlation of the association test.
        n_sim: Simulated studies.
        n_perm: Permutations per association or trend test (default ``ceil(10 n_tests /
            alpha)``, so that the permutation floor sits well under the level).
        n_eff: Effective epochs of each run (pooled).
        noise: SD of a run's score (trend).
        curvature: Curvature of the score in the weight (trend), in score units.
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
    if design in ("association", "pooled") and not -1 < effect < 1:
        raise GradlensError(f"`effect` should be a correlation in (-1, 1); found {effect!r}.")
    if not 0 <= icc < 1:
        raise GradlensError(f"`icc` should lie in [0, 1); found {icc!r}.")
    level = alpha / n_tests
    n_perm = n_perm if n_perm is not None else math.ceil(10 * n_tests / alpha)
    model = _model(n_eff, noise, curvature, n_perm)
    parts = _noise(design, sizes, weights, seeds, icc, n_sim, seed)
    shape = (sizes, weights, seeds)
    hits = _rejections(float(effect), parts, design, level, method, n_perm, seed, model, shape)
    pw = float(np.mean(hits))
    return {
        "power": pw,
        "se": math.sqrt(pw * (1 - pw) / n_sim),
        "design": design,
        "effect": float(effect),
        "alpha": float(alpha),
        "n_tests": n_tests,
        "level": level,
        "n_runs": seeds if design == "gain" else sizes * weights * seeds,
        "n_configs": 1 if design == "gain" else sizes * weights,
        "icc": float(icc),
        "n_sim": n_sim,
        "test": _TESTS[design].format(method=method),
    }


_TESTS = {
    "association": "{method}, configurations permuted",
    "gain": "paired t on held-out gains",
    "trend": "slope of the quadratic optimum on log10(size), runs permuted across sizes",
    "pooled": "Fisher z, random effects, sign-flip over runs (Hartung-Knapp t below 6 runs)",
}


def _model(n_eff: float, noise: float, curvature: float, n_perm: int) -> _Model:
    if isinstance(n_eff, bool) or not isinstance(n_eff, (int, float)) or not n_eff > 3:
        raise GradlensError(f"`n_eff` should be a number > 3; found {n_eff!r}.")
    for name, value in (("noise", noise), ("curvature", curvature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise GradlensError(f"`{name}` should be a number > 0; found {value!r}.")
    return _Model(float(n_eff), float(noise), float(curvature), n_perm)


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
    n_eff: float = 6.0,
    noise: float = 0.01,
    curvature: float = 0.3,
    tol: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Smallest effect that :func:`power` detects with probability ``target`` (bisection).

    The effect is searched in ``[0, 0.99]`` (association, pooled), ``[0, 50]`` (gain, in SDs)
    or ``[0, 0.8 / (sizes - 1)]`` (trend, per decade: the optimum stays in the grid) to within
    ``tol`` (relative for the gain); every evaluation reuses the same simulated noise. For the
    trend each evaluation runs ``n_sim`` permutation tests: keep ``n_sim`` and ``n_perm`` small
    (e.g. 100 and 199).

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
    model = _model(n_eff, noise, curvature, n_perm)
    parts = _noise(design, sizes, weights, seeds, icc, n_sim, seed)
    shape = (sizes, weights, seeds)

    def pw(effect: float) -> float:
        hits = _rejections(effect, parts, design, level, method, n_perm, seed, model, shape)
        return float(np.mean(hits))

    top = {"association": 0.99, "pooled": 0.99, "gain": 50.0, "trend": 0.8 / max(sizes - 1, 1)}
    lo, hi = 0.0, top[design]
    p_hi = pw(hi)
    base = {
        "target": target,
        "design": design,
        "alpha": float(alpha),
        "n_tests": n_tests,
        "level": level,
        "n_runs": seeds if design == "gain" else sizes * weights * seeds,
        "n_configs": 1 if design == "gain" else sizes * weights,
        "icc": float(icc),
        "n_sim": n_sim,
    }
    if p_hi < target:
        return {**base, "effect": math.nan, "power": p_hi, "reachable": False}
    while hi - lo > tol * (max(hi, 1e-9) if design == "gain" else 1.0):
        mid = 0.5 * (lo + hi)
        p_mid = pw(mid)
        if p_mid >= target:
            hi, p_hi = mid, p_mid
        else:
            lo = mid
    return {**base, "effect": hi, "power": p_hi, "reachable": True}


def _pooled_pvalues(effect: float, noise: np.ndarray, model: _Model, seed: int) -> np.ndarray:
    """P-values of :func:`gradlens.stats.pool_correlations` on each simulated set of runs."""
    from gradlens.stats._meta import pool_correlations

    z = math.atanh(effect) + noise / math.sqrt(model.n_eff - 3.0)
    n = np.full(noise.shape[1], model.n_eff)
    return np.array(
        [
            pool_correlations(np.tanh(zi), n, n_flip=999, seed=np.random.default_rng([seed, 2, i]))[
                "p_value"
            ]
            for i, zi in enumerate(z)
        ]
    )


def _trend_pvalues(
    effect: float, noise: np.ndarray, model: _Model, shape: tuple[int, int, int], seed: int
) -> np.ndarray:
    """P-values of :func:`gradlens.stats.optimal_weight_trend` on each simulated sweep."""
    import pandas as pd

    from gradlens.stats.weights import optimal_weight_trend

    sizes, weights, seeds = shape
    decade = np.repeat(np.arange(sizes, dtype=np.float64), weights * seeds)
    w = np.tile(np.repeat(np.linspace(0.1, 0.9, weights), seeds), sizes)
    best = 0.5 + effect * (decade - (sizes - 1) / 2.0)
    table = pd.DataFrame(
        {"size": 10.0**decade, "w": w, "seed": np.tile(np.arange(seeds), sizes * weights)}
    )
    out = np.empty(noise.shape[0])
    for i, e in enumerate(noise):
        table["acc"] = -model.curvature * (w - best) ** 2 + model.noise * e
        res = optimal_weight_trend(
            table, weight_col="w", score_col="acc", size_col="size", estimator="quadratic",
            n_boot=0, n_perm=model.n_perm, seed=np.random.default_rng([seed, 3, i]),
        )  # fmt: skip
        out[i] = res["p_value"]
    return out
