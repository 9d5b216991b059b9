"""Simulations that calibrate :mod:`gradlens.stats`: false-positive rates, power and coverage.

Run ``python -m gradlens.stats.calibration`` (optionally ``--quick``) to print the tables quoted
in ``docs/stats.md``; ``tests/stats/test_stats.py`` runs smaller versions of the same simulations.

Designs:

- *Null sweep*: 30 runs, a weight grid of 6 values x 5 seeds (ties, as in a real sweep), and an
  interference or accuracy value drawn independently of the weight (no association).
- *Planted association*: 30 runs of a bivariate normal with correlation ``rho`` (Pearson scale;
  Spearman's rho is ``6/pi asin(rho/2)``, Kendall's tau ``2/pi asin(rho)``).
- *Within a run*: two independent AR(1) series of ``n`` epochs with coefficient ``phi``; the true
  correlation is 0.
- *Optimal weight*: 4 model sizes (1e5 .. 1e8 parameters), a 9-point weight grid, 3 seeds; the
  score is ``-a (w - p*_size)^2 + noise``; under the null ``p*`` is 0.5 at every size, under the
  alternative it moves by ``shift`` per decade of size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Literal

import numpy as np
import pandas as pd

from gradlens import stats
from gradlens._types import TOTAL_LAYER
from gradlens.stats.correlation import Correction, Method
from gradlens.stats.weights import Estimator

_METHODS: tuple[Method, ...] = ("spearman", "pearson", "kendall")

__all__ = [
    "associations_fwer",
    "cluster_coverage",
    "clustered_fpr",
    "gain_coverage",
    "null_pvalues",
    "planted_pvalues",
    "pooled_coverage",
    "pooled_fpr",
    "selection_optimism",
    "trend_pvalues",
    "within_run_calibration",
]

_GRID = np.linspace(0.1, 0.9, 6)


def _null_xy(rng: np.random.Generator, n_runs: int) -> tuple[np.ndarray, np.ndarray]:
    seeds = math.ceil(n_runs / _GRID.size)
    x = np.repeat(_GRID, seeds)[:n_runs]
    return x, rng.normal(size=n_runs)


def null_pvalues(
    n_sweeps: int, *, method: Method, n_runs: int = 30, n_perm: int = 999, seed: int = 0
) -> np.ndarray:
    """Permutation p-values of :func:`gradlens.stats.correlate` over null sweeps."""
    out = np.empty(n_sweeps)
    for i in range(n_sweeps):
        rng = np.random.default_rng([seed, i])
        x, y = _null_xy(rng, n_runs)
        res = stats.correlate(x, y, method=method, n_boot=0, n_perm=n_perm, seed=rng)
        out[i] = res["p_value"]
    return out


def planted_pvalues(
    n_sweeps: int,
    *,
    rho: float,
    method: Method,
    n_runs: int = 30,
    n_perm: int = 999,
    n_boot: int = 0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """P-values and interval-covers-truth flags over sweeps with a planted correlation ``rho``.

    The truth for the coverage flag is the population value of ``method`` under the bivariate
    normal (Pearson ``rho``, Spearman ``6/pi asin(rho/2)``, Kendall ``2/pi asin(rho)``); the flag
    is NaN when ``n_boot`` is 0.
    """
    truth = {
        "pearson": rho,
        "spearman": 6.0 / math.pi * math.asin(rho / 2.0),
        "kendall": 2.0 / math.pi * math.asin(rho),
    }[method]
    cov = np.array([[1.0, rho], [rho, 1.0]])
    p = np.empty(n_sweeps)
    covered = np.full(n_sweeps, np.nan)
    for i in range(n_sweeps):
        rng = np.random.default_rng([seed, i])
        xy = rng.multivariate_normal([0.0, 0.0], cov, size=n_runs)
        res = stats.correlate(
            xy[:, 0],
            xy[:, 1],
            method=method,
            n_boot=n_boot,
            n_perm=n_perm,
            seed=rng,
        )
        p[i] = res["p_value"]
        if n_boot:
            covered[i] = float(res["ci_low"] <= truth <= res["ci_high"])
    return p, covered


def _ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    e = rng.normal(size=n + 50)
    x = np.empty_like(e)
    x[0] = e[0] / math.sqrt(1.0 - phi**2)
    for t in range(1, e.size):
        x[t] = phi * x[t - 1] + e[t]
    return x[50:]


def _series_run(x: np.ndarray, y: np.ndarray) -> SimpleNamespace:
    """A minimal run whose per-epoch cosine is ``x`` and validation accuracy ``y``."""
    k = np.arange(1, x.size + 1)
    metrics = pd.DataFrame(
        {
            "step": k * 10,
            "layer": TOTAL_LAYER,
            "metric": "cosine",
            "task_i": "a",
            "task_j": "b",
            "value": x,
        }
    )
    evals = pd.DataFrame(
        {
            "point": [f"epoch:{i}" for i in k],
            "epoch": pd.array(k, "Int64"),
            "step": pd.array(k * 10, "Int64"),
            "split": "val",
            "task": "a",
            "metric": "accuracy",
            "value": y,
        }
    )
    return SimpleNamespace(meta={"tasks": ["a", "b"]}, metrics=metrics, evals=evals)


def within_run_calibration(
    n_series: int,
    *,
    n: int = 50,
    phi: float = 0.8,
    block: int | Literal["auto"] = "auto",
    n_boot: int = 999,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`gradlens.stats.within_run` on independent AR(1) pairs (true correlation 0).

    Returns the coverage of 0 by the block-bootstrap interval (``coverage_block``) and by the
    effective-n interval (``coverage_neff``), and the rejection rates at 0.05 of the effective-n
    t-test (``fpr_neff``) and of the centred block-bootstrap p-value (``fpr_block``).
    """
    hits = {"coverage_block": 0, "coverage_neff": 0, "fpr_neff": 0, "fpr_block": 0}
    for i in range(n_series):
        rng = np.random.default_rng([seed, i])
        x, y = _ar1(rng, n, phi), _ar1(rng, n, phi)
        res = stats.within_run(
            _series_run(x, y),
            metric="cosine",
            block=block,
            n_boot=n_boot,
            seed=rng,
        )
        hits["coverage_block"] += res["ci_low"] <= 0.0 <= res["ci_high"]
        hits["coverage_neff"] += res["ci_low_neff"] <= 0.0 <= res["ci_high_neff"]
        hits["fpr_neff"] += res["p_value"] < 0.05
        hits["fpr_block"] += res["p_block"] < 0.05
    return {k: v / n_series for k, v in hits.items()}


def _sweep_table(
    rng: np.random.Generator,
    shift: float,
    noise: float,
    seeds: int = 3,
    design: Literal["4x9", "report"] = "4x9",
) -> pd.DataFrame:
    """``"4x9"``: 4 sizes x 9 weights, score ``level(size) - 0.5 (w - p*)^2 + noise``, ``p*``
    0.5 moving by ``shift`` per decade. ``"report"``: the end-to-end null of ``tests/_calibrate``
    (2 sizes x 4 weights, a score flat in the weight, a seed offset of SD 0.003 shared by a
    seed's runs of one size, run noise ``noise``); ``shift`` then plants a parabola of curvature
    0.3 whose optimum moves by ``shift`` between the two sizes."""
    rows = []
    if design == "report":
        for j, size in enumerate([1e5, 1e6]):
            best = 0.5 + shift * (j - 0.5)
            curve = 0.3 if shift else 0.0
            for s in range(seeds):
                offset = rng.normal(0.0, 0.003)
                for w in (0.2, 0.4, 0.6, 0.8):
                    score = 0.7 + 0.03 * j - curve * (w - best) ** 2 + offset
                    score += rng.normal(0.0, noise)
                    rows.append({"model.n_params": size, "seed": s, "w": w, "acc": score})
        return pd.DataFrame(rows)
    grid = np.linspace(0.1, 0.9, 9)
    for decade, size in enumerate([1e5, 1e6, 1e7, 1e8]):
        best = 0.5 + shift * (decade - 1.5)
        level = 0.6 + 0.05 * decade
        for s in range(seeds):
            for w in grid:
                score = level - 0.5 * (w - best) ** 2 + rng.normal(0.0, noise)
                rows.append({"model.n_params": size, "seed": s, "w": w, "acc": score})
    return pd.DataFrame(rows)


def trend_pvalues(
    n_sweeps: int,
    *,
    shift: float,
    noise: float = 0.01,
    estimator: Estimator = "grid",
    design: Literal["4x9", "report"] = "4x9",
    n_boot: int = 999,
    n_perm: int = 999,
    seed: int = 0,
) -> np.ndarray:
    """P-values of :func:`gradlens.stats.optimal_weight_trend` over simulated weight sweeps
    (``design`` as in ``_sweep_table``): ``(n_sweeps, 2)``, the permutation p-value and the
    bootstrap-inversion one (``p_value_boot``, NaN without ``n_boot``)."""
    out = np.empty((n_sweeps, 2))
    for i in range(n_sweeps):
        rng = np.random.default_rng([seed, i])
        table = _sweep_table(rng, shift, noise, design=design)
        res = stats.optimal_weight_trend(
            table,
            weight_col="w",
            score_col="acc",
            estimator=estimator,
            n_boot=n_boot,
            n_perm=n_perm,
            seed=rng,
        )
        out[i] = res["p_value"], res["p_value_boot"]
    return out


def associations_fwer(
    n_sweeps: int,
    *,
    methods: Sequence[Method] = ("spearman",),
    n_perm: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Family-wise error rate of :func:`gradlens.stats.associations` on null tables (3 sizes x
    6 weights x 3 seeds; 2 interference and 2 accuracy columns, all independent of everything):
    the fraction of tables with any p-value below 0.05 after Holm (``"holm"``), after
    Benjamini-Hochberg (``"bh"``) and uncorrected (``"none"``), from the same p-values."""
    hits = {"holm": 0, "bh": 0, "none": 0}
    for i in range(n_sweeps):
        rng = np.random.default_rng([seed, i])
        n = 3 * 6 * 3
        table = pd.DataFrame(
            {
                "model.n_params": np.repeat([1e5, 1e6, 1e7], 18),
                "weights.a": np.tile(np.repeat(_GRID, 3), 3),
                "cosine.a|b": rng.normal(size=n),
                "gms.a|b": rng.normal(size=n),
                "accuracy.a": rng.normal(size=n),
                "accuracy.mean": rng.normal(size=n),
            }
        )
        res = stats.associations(
            table,
            weight_cols=["weights.a"],
            interference_cols=["cosine.a|b", "gms.a|b"],
            accuracy_cols=["accuracy.a", "accuracy.mean"],
            methods=list(methods),
            correction="none",
            n_boot=0,
            n_perm=n_perm,
            seed=int(rng.integers(2**31)),
        )
        p = res["p_value"].to_numpy()
        corrections: tuple[Correction, ...] = ("holm", "bh", "none")
        for correction in corrections:
            hits[correction] += bool((stats.adjust(p, correction) < 0.05).any())
    return {k: v / n_sweeps for k, v in hits.items()}


def _gain_table(d_joint: np.ndarray, d_single: np.ndarray) -> pd.DataFrame:
    """One size, one configuration of tasks a|b, and the single-task runs on a, per seed."""
    seeds = np.arange(d_joint.size)
    joint = pd.DataFrame({"tasks": "a|b", "seed": seeds, "size": 1, "weights.a": 0.5,
                          "accuracy.a": d_joint, "accuracy.b": 0.5})  # fmt: skip
    single = pd.DataFrame({"tasks": "a", "seed": seeds, "size": 1, "weights.a": 1.0,
                           "accuracy.a": d_single, "accuracy.b": np.nan})  # fmt: skip
    return pd.concat([joint, single], ignore_index=True)


def gain_coverage(
    n_sims: int,
    *,
    seeds: int,
    gain: float = 0.01,
    interval: Literal["t", "bootstrap"] = "t",
    noise: str = "normal",
    n_boot: int = 999,
    seed: int = 0,
) -> dict[str, float]:
    """Coverage of :func:`gradlens.stats.joint_gain`'s 95 % interval of the gain, and the
    rejection rate of its p-value when the true gain is 0, over ``n_sims`` simulated cells.

    Each seed has a shared effect (cancels in the pairing) and independent run noise on the joint
    and the single-task run (``"normal"`` or Student ``"t3"``, heavy tailed).
    """
    covered = 0
    rejected = 0
    for i in range(n_sims):
        rng = np.random.default_rng([seed, i])
        shared = rng.normal(0, 0.01, size=seeds)
        if noise == "t3":
            e = rng.standard_t(3, size=(2, seeds)) * 0.003
        else:
            e = rng.normal(0, 0.003, size=(2, seeds))
        t_planted = _gain_table(0.8 + gain + shared + e[0], 0.8 + shared + e[1])
        t_null = _gain_table(0.8 + shared + e[0], 0.8 + shared + e[1])
        g = stats.joint_gain(
            t_planted, size_cols=["size"], interval=interval, n_boot=n_boot, seed=rng
        ).iloc[0]
        covered += g["ci_low"] <= gain <= g["ci_high"]
        g0 = stats.joint_gain(
            t_null, size_cols=["size"], interval=interval, n_boot=n_boot, seed=rng
        ).iloc[0]
        rejected += (g0["ci_low"] > 0) or (g0["ci_high"] < 0)
    return {"coverage": covered / n_sims, "null_excludes_0": rejected / n_sims}


def selection_optimism(
    n_sims: int, *, seeds: int = 3, weights: int = 5, seed: int = 0
) -> dict[str, float]:
    """A null weight sweep (every weight has true gain 0; validation and test of a run share its
    noise): the mean reported gain and the rate of "beats" (``ci_low > 0``) when the weight is
    chosen on validation over all seeds and reported on test (``naive_*``, what the report
    did), and with the held-out choice of :func:`gradlens.stats.selected_gain` (``held_out_*``).
    """
    naive_gain, naive_beats, held_gain, held_beats = 0.0, 0, 0.0, 0
    grid = np.linspace(0.1, 0.9, weights)
    for i in range(n_sims):
        rng = np.random.default_rng([seed, i])
        shared = rng.normal(0, 0.01, size=seeds)
        rows = []
        for w in grid:
            run = rng.normal(0, 0.005, size=seeds)
            test = 0.8 + shared + run
            val = test + rng.normal(0, 0.002, size=seeds)
            for s in range(seeds):
                rows.append({"tasks": "a|b", "size": 1, "seed": s, "weights.a": w,
                             "sel": val[s], "accuracy.a": test[s], "accuracy.b": 0.5})  # fmt: skip
        base = 0.8 + shared + rng.normal(0, 0.005, size=seeds)
        for s in range(seeds):
            rows.append({"tasks": "a", "size": 1, "seed": s, "accuracy.a": base[s]})
        table = pd.DataFrame(rows)
        joint = table[table.tasks == "a|b"]
        best = joint.groupby("weights.a")["sel"].mean().idxmax()
        g = stats.joint_gain(table, size_cols=["size"])
        naive = g[(g.task == "a") & (g["weights.a"] == best)].iloc[0]
        naive_gain += naive["gain"]
        naive_beats += naive["ci_low"] > 0
        h = stats.selected_gain(table, select_col="sel", size_cols=["size"])
        held = h[h.task == "a"].iloc[0]
        held_gain += held["gain"]
        held_beats += held["ci_low"] > 0
    return {
        "naive_mean_gain": naive_gain / n_sims,
        "naive_beats": naive_beats / n_sims,
        "held_out_mean_gain": held_gain / n_sims,
        "held_out_beats": held_beats / n_sims,
    }


def clustered_fpr(
    n_sims: int,
    *,
    configs: int = 10,
    seeds: int = 3,
    icc: float = 0.5,
    method: Method = "spearman",
    n_perm: int = 999,
    n_boot: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """Weight vs an outcome with a random effect per configuration (share ``icc`` of the noise),
    independent of the weight: rejection rates at 0.05 of :func:`gradlens.stats.correlate`
    with the configurations as groups (whole configurations permuted; ``groups_*``) and without
    (runs permuted; ``runs_*``), and how often the cluster-bootstrap interval excludes 0."""
    grid = np.linspace(0.1, 0.9, configs)
    codes = np.repeat(np.arange(configs), seeds)
    x = grid[codes]
    hits = {"groups_fpr": 0, "runs_fpr": 0, "groups_ci_excludes_0": 0}
    for i in range(n_sims):
        rng = np.random.default_rng([seed, i])
        y = math.sqrt(icc) * rng.normal(size=configs)[codes] + math.sqrt(1 - icc) * rng.normal(
            size=codes.size
        )
        g = stats.correlate(x, y, method=method, n_boot=n_boot, n_perm=n_perm, groups=codes,
                            seed=rng)  # fmt: skip
        r = stats.correlate(x, y, method=method, n_boot=0, n_perm=n_perm, seed=rng)
        hits["groups_fpr"] += g["p_value"] < 0.05
        hits["runs_fpr"] += r["p_value"] < 0.05
        if n_boot:
            hits["groups_ci_excludes_0"] += not g["ci_low"] <= 0 <= g["ci_high"]
    return {k: v / n_sims for k, v in hits.items()}


def cluster_coverage(
    n_sims: int,
    *,
    rho: float = 0.5,
    configs: int = 10,
    seeds: int = 3,
    icc: float = 0.5,
    n_boot: int = 999,
    seed: int = 0,
) -> dict[str, float]:
    """Coverage of a non-zero correlation by the cluster-bootstrap interval of
    :func:`gradlens.stats.correlate` (Pearson, configurations resampled). ``configs`` weights
    in [0.1, 0.9], ``seeds`` runs each; outcome ``b w~ + sqrt(icc) u_config + sqrt(1 - icc) e``
    with ``w~`` the weight standardised over the design and ``b = rho / sqrt(1 - rho^2)``, so
    that ``rho`` is the correlation of weight and outcome over the design's runs. Returns the
    coverage of ``rho`` (``coverage``), how often the interval lies below / above it, and the
    mean estimate."""
    grid = np.linspace(0.1, 0.9, configs)
    codes = np.repeat(np.arange(configs), seeds)
    x = grid[codes]
    xs = (x - x.mean()) / x.std()
    b = rho / math.sqrt(1.0 - rho * rho)
    hits = {"coverage": 0, "below": 0, "above": 0}
    total = 0.0
    for i in range(n_sims):
        rng = np.random.default_rng([seed, i])
        u = rng.normal(size=configs)[codes]
        y = b * xs + math.sqrt(icc) * u + math.sqrt(1 - icc) * rng.normal(size=codes.size)
        r = stats.correlate(x, y, method="pearson", n_boot=n_boot, n_perm=0, groups=codes, seed=rng)
        hits["coverage"] += r["ci_low"] <= rho <= r["ci_high"]
        hits["below"] += r["ci_high"] < rho
        hits["above"] += r["ci_low"] > rho
        total += r["estimate"]
    out = {key: v / n_sims for key, v in hits.items()}
    return {**out, "mean_estimate": total / n_sims}


def pooled_coverage(
    n_sims: int, *, k: int, n: int = 30, rho: float = 0.2, tau: float = 0.0, seed: int = 0
) -> dict[str, float]:
    """Coverage of ``tanh(z0)`` (``z0 = atanh(rho)``) by :func:`gradlens.stats.pool_correlations`
    over ``k`` runs of ``n`` iid points whose true correlations are ``tanh(z0 + tau N(0, 1))``:
    the Hartung-Knapp interval (``hk``), the DerSimonian-Laird normal one (``dl``), and the
    rejection rate of the pooled test when ``rho = 0``."""
    z0 = math.atanh(rho)
    hits = {"hk": 0, "dl": 0, "min_max": 0}
    for i in range(n_sims):
        rng = np.random.default_rng([seed, i])
        rs = np.empty(k)
        for j in range(k):
            rj = math.tanh(z0 + tau * rng.normal())
            x = rng.normal(size=n)
            y = rj * x + math.sqrt(1 - rj * rj) * rng.normal(size=n)
            rs[j] = np.corrcoef(x, y)[0, 1]
        res = stats.pool_correlations(rs, np.full(k, float(n)))
        truth = math.tanh(z0)
        hits["hk"] += res["ci_low"] <= truth <= res["ci_high"]
        hits["dl"] += res["ci_low_dl"] <= truth <= res["ci_high_dl"]
        hits["min_max"] += rs.min() <= truth <= rs.max()
    return {k_: v / n_sims for k_, v in hits.items()}


def pooled_fpr(
    n_sims: int,
    *,
    k: int,
    epochs: int = 6,
    phi: float = 0.5,
    weights: Literal["n_eff", "noise"] = "n_eff",
    seed: int = 0,
) -> dict[str, float]:
    """Rejection rates at 0.05 of :func:`gradlens.stats.pool_correlations` when no run has a
    correlation: ``k`` runs of two independent AR(1) series of ``epochs`` points. ``weights``:
    ``"n_eff"`` pools with each run's estimated effective n (what the report does);
    ``"noise"`` with an n of ``3 + 10^U(0, 2.5)`` unrelated to the run (weights that are pure
    noise, spread over two decades: the case the Hartung-Knapp t-test is not built for). ``p``
    is the p-value the function reports, ``hk`` the Hartung-Knapp t-test, ``cover_hk`` the
    coverage of 0 by the interval."""
    from gradlens.stats import _core

    hits = {"p": 0, "hk": 0, "cover_hk": 0}
    for i in range(n_sims):
        rng = np.random.default_rng([seed, i])
        rs, ns = np.empty(k), np.empty(k)
        for j in range(k):
            x, y = _ar1(rng, epochs, phi), _ar1(rng, epochs, phi)
            rs[j] = np.corrcoef(x, y)[0, 1]
            noise_n = 3.0 + 10.0 ** rng.uniform(0.0, 2.5)
            ns[j] = _core.effective_n(x, y)[0] if weights == "n_eff" else noise_n
        res = stats.pool_correlations(rs, ns, n_flip=999, seed=rng)
        hits["p"] += res["p_value"] < 0.05
        hits["hk"] += res["p_value_hk"] < 0.05
        hits["cover_hk"] += res["ci_low"] <= 0.0 <= res["ci_high"]
    return {key: v / n_sims for key, v in hits.items()}


def gain_test_coverage(
    n_sims: int,
    *,
    seeds: int = 5,
    n_test: int = 250,
    accuracy: float = 0.75,
    gain: float = 0.02,
    sd_item: float = 1.5,
    sd_item_model: float = 0.5,
    sd_seed: float = 0.1,
    seed: int = 0,
) -> dict[str, float]:
    """Coverage of the population gain by :func:`gradlens.stats.paired_gain` when every run is
    scored on one finite test set: the seed-only paired t interval (``seed_only``) against the
    interval with :func:`gradlens.stats.gain_test_var` added (``seed_and_test``).

    Each simulation draws a test set of ``n_test`` items from a population and ``seeds`` pairs
    of runs (joint, single). Run ``m`` of seed ``s`` gets item ``x`` right when
    ``mu_m + b_s + c_ms + a_x + f_mx + e > 0`` (probit): ``a_x ~ N(0, sd_item)`` item difficulty
    shared by both models, ``f_mx ~ N(0, sd_item_model)`` the item's difficulty for that model
    only (fixed over seeds), ``b_s`` (shared by the seed's two runs) and ``c_ms`` run quality
    ``~ N(0, sd_seed)``, ``e ~ N(0, 1)`` fresh per run and item. ``mu_m`` are set so that the
    population accuracy of the single model is ``accuracy`` and the population gain is ``gain``
    (closed form: ``Phi(mu / sqrt(1 + total variance))``). Returns both coverages, how often
    each interval lies above the truth, and the mean ratio of the two standard errors.
    """
    from scipy import stats as st

    total = math.sqrt(1.0 + sd_item**2 + sd_item_model**2 + 2 * sd_seed**2)
    mu_s = float(st.norm.ppf(accuracy)) * total
    mu_j = float(st.norm.ppf(accuracy + gain)) * total
    hits = {"seed_only": 0, "seed_and_test": 0, "seed_only_above": 0, "seed_and_test_above": 0}
    ratio = 0.0
    for i in range(n_sims):
        rng = np.random.default_rng([seed, i])
        a = rng.normal(0.0, sd_item, size=n_test)
        f = rng.normal(0.0, sd_item_model, size=(2, n_test))
        b = rng.normal(0.0, sd_seed, size=(seeds, 1))
        c = rng.normal(0.0, sd_seed, size=(2, seeds, 1))
        e = rng.normal(size=(2, seeds, n_test))
        lat = np.array([mu_j, mu_s])[:, None, None] + b[None] + c + a + f[:, None, :] + e
        acc = (lat > 0).mean(axis=2)  # (model, seed)
        d = acc[0] - acc[1]
        p_j, p_s = acc.mean(axis=1)
        bound = stats.gain_test_var(p_j, p_s, n_test)
        for key, tv in (("seed_only", 0.0), ("seed_and_test", bound)):
            r = stats.paired_gain(d, test_var=tv)
            hits[key] += r["ci_low"] <= gain <= r["ci_high"]
            hits[f"{key}_above"] += r["ci_low"] > gain
            if key == "seed_and_test":
                ratio += r["se"] / r["se_seed"] if r["se_seed"] > 0 else math.nan
    out = {k: v / n_sims for k, v in hits.items()}
    return {**out, "se_ratio": ratio / n_sims}


if __name__ == "__main__":  # pragma: no cover
    from gradlens.stats._calibration_cli import main

    raise SystemExit(main())
