"""Weight sweeps: the optimal loss weight per model size (:func:`optimal_weight`), whether it
moves with size (:func:`optimal_weight_trend`), and the gain of joint over single-task training
(:func:`joint_gain`; :func:`gradlens.stats.selected_gain` for the gain at a chosen weight).
Re-exported by :mod:`gradlens.stats`.
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
from gradlens.stats import _gain as _gain
from gradlens.stats._args import SeedLike

__all__ = ["Estimator", "joint_gain", "optimal_weight", "optimal_weight_trend"]

Estimator = Literal["grid", "quadratic"]
_ESTIMATORS: tuple[str, ...] = ("grid", "quadratic")


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
        M[:, k] = counts @ _gain.rescaled(c) / c.size
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
    table = _args.frame(table)
    _args.columns(table, [weight_col, score_col], "weight_col/score_col")
    scols = _args.columns(table, size_cols, "size_cols")
    _args.choice(estimator, _ESTIMATORS, "estimator")
    _args.count(n_boot, "n_boot")
    return table, scols, _args.level(ci)


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
    rng = _args.rng(seed)
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
    seed_col: str | None = "seed",
    n_boot: int = 2000,
    n_perm: int = 2000,
    ci: float = 0.95,
    seed: SeedLike = 0,
) -> dict[str, Any]:
    """Does the optimal weight move with model size? Slope of ``p*`` on ``log10(size)``.

    ``p*`` per size is :func:`optimal_weight`'s; the slope is the least-squares slope of ``p*``
    on ``log10(size)`` (the raw size if one is not positive). Its interval is the percentile
    interval of the slopes of the bootstrapped ``p*`` (seeds resampled within each size and
    weight). The two-sided p-value of "slope = 0" is a permutation test: each size's scores are
    centred on that size's level (the mean of its cell means, moved toward each seed's own mean
    by the share of the seed-to-seed spread that is a real seed offset, when every seed ran
    every weight: an offset does not move ``p*`` but would follow a run to another size), then,
    within each weight, the runs are reassigned to sizes at random (each size keeps its number
    of runs there), ``p*`` and the slope are recomputed, and ``p = (1 + #{|b_perm| >= |b|}) /
    (n_perm + 1)``. Under the null "the score curves of the sizes have the same shape" (a size
    may change the level, not where the optimum is) the centred runs of one weight are
    exchangeable across sizes. The bootstrap inversion used before (``p_value_boot``, kept for
    comparison) rejected 0.000-0.003 of null sweeps: when the score curve is flat relative to
    seed noise the bootstrap ``p*`` hardly depends on the observed one, so its slopes straddle 0
    whatever the data (``docs/stats.md``).
    ``spearman`` (of size and ``p*``, descriptive, no test) is reported too.

    Args:
        table: One row per run.
        weight_col: The swept weight.
        score_col: Score to maximise.
        size_col: Numeric model size (e.g. ``"model.n_params"``).
        estimator: ``"grid"`` or ``"quadratic"`` (see :func:`optimal_weight`).
        seed_col: Seed column for the centring of the permutation test (``None``, or a column not
            in the table: centre on the size's level only).
        n_boot: Bootstrap resamples (the interval).
        n_perm: Permutations (the p-value; 0: none).
        ci: Confidence level.
        seed: Seed or Generator.

    Returns:
        ``slope, ci_low, ci_high, ci_level, p_value, p_method, p_floor, p_value_boot, spearman,
        n_sizes, sizes, p_star, x, estimator, score_sd, curvature`` (the last two: the seed
        noise of a score and the curvature of the score in the weight, for
        ``min_detectable_effect("trend", noise=score_sd, curvature=curvature, ...)``).

    Example:
        >>> import numpy as np, pandas as pd
        >>> grid = np.linspace(0.1, 0.9, 9); rows = []
        >>> for size, best in [(1e5, 0.3), (1e6, 0.5), (1e7, 0.7)]:
        ...     for s in range(3):
        ...         rows += [{"size": size, "seed": s, "w": w,
        ...                   "acc": -(w - best) ** 2 + 0.002 * s} for w in grid]
        >>> r = optimal_weight_trend(pd.DataFrame(rows), weight_col="w", score_col="acc",
        ...                          size_col="size", n_boot=200, n_perm=200)
        >>> round(r["slope"], 2), r["p_value"] < 0.05
        (0.2, True)
    """
    table, _, level = _sweep_args(table, weight_col, score_col, [size_col], estimator, n_boot, ci)
    n_perm = _args.count(n_perm, "n_perm")
    rng = _args.rng(seed)
    sizes = np.sort(pd.to_numeric(table[size_col], errors="coerce").dropna().unique())
    if sizes.size < 2:
        raise GradlensError(
            f"`size_col` should hold at least 2 distinct sizes for a trend; found {sizes.tolist()}."
        )
    positive = bool((sizes > 0).all())
    xs = np.log10(sizes) if positive else sizes.astype(np.float64)
    p_star, boots = _p_star_by_size(
        table, sizes, size_col, weight_col, score_col, n_boot, rng, estimator
    )
    xc = xs - xs.mean()
    slope = float(xc @ (p_star - p_star.mean()) / (xc @ xc))
    lo = hi = p_boot = math.nan
    if n_boot:
        bs = (boots - boots.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
        lo, hi = _core.percentile_interval(bs, level)
        le = int(np.count_nonzero(bs <= 0))
        ge = int(np.count_nonzero(bs >= 0))
        p_boot = min(1.0, 2.0 * min(le + 1, ge + 1) / (n_boot + 1))
    p, floor = math.nan, math.nan
    if n_perm:
        cols = (size_col, weight_col, score_col, seed_col if seed_col in table.columns else None)
        perm_p = _permuted_p_star(table, sizes, cols, n_perm, rng)
        null = np.stack([_p_star(m, w, n_k, estimator)[0] for m, w, n_k in perm_p], axis=1)
        null_slopes = (null - null.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
        p = _core.permutation_pvalue(slope, null_slopes, exact=False)
        floor = _core.pvalue_floor(False, n_perm)
    rho = math.nan
    if sizes.size >= 3 and np.ptp(p_star) > 0:
        rho = float(_core.correlation_counts(xs, p_star, np.ones((1, xs.size)), "spearman")[0])
    return {
        "slope": slope,
        "ci_low": lo,
        "ci_high": hi,
        "ci_level": level,
        "p_value": p,
        "p_method": "permutation of runs across sizes within each weight" if n_perm else "none",
        "p_floor": floor,
        "p_value_boot": p_boot,
        "spearman": rho,
        "n_sizes": int(sizes.size),
        "sizes": sizes.tolist(),
        "p_star": p_star.tolist(),
        "x": f"log10({size_col})" if positive else size_col,
        "estimator": estimator,
        **_curve_scale(table, sizes, size_col, weight_col, score_col),
    }


def _curve_scale(
    table: pd.DataFrame, sizes: np.ndarray, size_col: str, weight_col: str, score_col: str
) -> dict[str, float]:
    """``score_sd`` (pooled SD of a run's score within its size and weight) and ``curvature``
    (mean over sizes of ``-c`` of a parabola ``a + b w + c w^2`` fitted to the cell means; NaN
    with fewer than 3 weights): the inputs of ``min_detectable_effect("trend", ...)``."""
    numeric_size = pd.to_numeric(table[size_col], errors="coerce")
    ss, df, curv = 0.0, 0, []
    for size in sizes:
        w, cells = _sweep_cells(table[numeric_size == size], weight_col, score_col)
        ss += float(sum(((c - c.mean()) ** 2).sum() for c in cells))
        df += int(sum(c.size - 1 for c in cells))
        if w.size >= 3:
            curv.append(-float(np.polyfit(w, [c.mean() for c in cells], 2)[0]))
    return {
        "score_sd": math.sqrt(ss / df) if df > 0 else math.nan,
        "curvature": float(np.mean(curv)) if curv else math.nan,
    }


def _permuted_p_star(
    table: pd.DataFrame,
    sizes: np.ndarray,
    cols: tuple[str, str, str, str | None],
    n_perm: int,
    rng: np.random.Generator,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per size, the cell means ``(n_perm, K_size)`` after the runs of each weight are
    reassigned to sizes at random (scores centred first, see :func:`optimal_weight_trend`), with
    the size's weights and seeds per weight: the null distribution of the trend test.
    ``cols``: the size, weight, score and seed (or None) columns."""
    size_col, weight_col, score_col, seed_col = cols
    data = pd.DataFrame(
        {
            "size": pd.to_numeric(table[size_col], errors="coerce"),
            "w": pd.to_numeric(table[weight_col], errors="coerce"),
            "v": pd.to_numeric(table[score_col], errors="coerce"),
            "seed": table[seed_col].astype(str) if seed_col else "",
        }
    ).dropna()
    data = data[data["size"].isin(sizes)]
    s_idx = np.searchsorted(sizes, data["size"].to_numpy())
    level, f = _levels(data)
    centred = data["v"].to_numpy(np.float64) - level
    grid = np.sort(data["w"].unique())
    w_idx = np.searchsorted(grid, data["w"].to_numpy())
    shape = np.bincount(w_idx, weights=centred) / np.bincount(w_idx)
    centred = shape[w_idx] + f * (centred - shape[w_idx])
    sums = np.zeros((n_perm, sizes.size, grid.size))
    counts = np.zeros((sizes.size, grid.size))
    np.add.at(counts, (s_idx, w_idx), 1.0)
    for k in range(grid.size):
        rows = np.flatnonzero(w_idx == k)
        labels = s_idx[rows][rng.permuted(np.tile(np.arange(rows.size), (n_perm, 1)), axis=1)]
        for j in range(sizes.size):
            sums[:, j, k] = (labels == j).astype(np.float64) @ centred[rows]
    out = []
    for j in range(sizes.size):
        have = counts[j] > 0
        out.append((sums[:, j, have] / counts[j, have], grid[have], counts[j, have]))
    return out


def _levels(data: pd.DataFrame) -> tuple[np.ndarray, float]:
    """Per run of ``data`` [size, w, v, seed], the level its score is centred on before the
    runs of a weight are permuted across sizes: its size's mean of cell means ``L``, plus, where
    every seed of the size ran every weight once, ``lambda (seed mean - L)``. ``lambda`` is the
    share of the spread of seed means that is a real seed offset, ``tau^2 / (tau^2 + s^2 / K)``
    (one-way random effects over the seeds, pooled over sizes; ``s^2`` the residual variance of
    the seed + weight fit, ``K`` the weights): 0 without seed offsets, where centring on seed means
    would make the test liberal (it takes a seed's own noise out of the observed shape only),
    near 1 with large ones, which would otherwise follow a run to another size (conservative).

    Also returns ``f``, the factor on the runs' deviations from the weight's mean shape that
    gives a permuted cell-mean contrast the variance of an observed one, ``2 s^2 / m``:
    ``f^2 = s^2 / (s^2 (1 - lambda (2 - lambda) (1 - 1/S) / K) + (1 - lambda)^2 tau^2 (1 - 1/S))``
    over ``S`` sizes (centring leaves a seed's runs correlated, and permuting splits them)."""
    cells = data.groupby(["size", "w"])["v"]
    n_w = data.groupby("size")["w"].transform("nunique").to_numpy(np.float64)
    size_level = (cells.transform("mean") / cells.transform("size")).groupby(
        data["size"]
    ).transform("sum").to_numpy(np.float64) / n_w
    per_seed = data.groupby(["size", "seed"])["w"]
    balanced = (per_seed.transform("nunique") == n_w) & (per_seed.transform("size") == n_w)
    balanced = balanced.groupby(data["size"]).transform("all").to_numpy(bool)
    if not balanced.any():
        return size_level, 1.0
    seed_mean = data.groupby(["size", "seed"])["v"].transform("mean").to_numpy(np.float64)
    resid = (
        data["v"].to_numpy(np.float64) - seed_mean - cells.transform("mean").to_numpy() + size_level
    )
    sub = pd.DataFrame({"size": data["size"], "seed": data["seed"], "a": seed_mean, "r": resid})[
        balanced
    ]
    n_seeds = sub.groupby("size")["seed"].nunique()
    k_w = sub.groupby("size").size() / n_seeds
    df = ((n_seeds - 1) * (k_w - 1)).sum()
    if df <= 0 or (n_seeds < 2).any():
        return size_level, 1.0
    s2 = float((sub["r"] ** 2).sum() / df)
    seed_means = sub.drop_duplicates(["size", "seed"])
    spread = float(seed_means.groupby("size")["a"].var(ddof=1).mean())
    k_mean = float(k_w.mean())
    tau2 = max(0.0, spread - s2 / k_mean)
    lam = tau2 / (tau2 + s2 / k_mean) if tau2 + s2 > 0 else 0.0
    share = 1.0 - 1.0 / float(data["size"].nunique())
    spread_perm = s2 * (1.0 - lam * (2.0 - lam) * share / k_mean) + (1.0 - lam) ** 2 * tau2 * share
    f = math.sqrt(s2 / spread_perm) if spread_perm > 0 and bool(balanced.all()) else 1.0
    return np.where(balanced, size_level + lam * (seed_mean - size_level), size_level), f


def _p_star_by_size(
    table: pd.DataFrame,
    sizes: np.ndarray,
    size_col: str,
    weight_col: str,
    score_col: str,
    n_boot: int,
    rng: np.random.Generator,
    estimator: str,
) -> tuple[np.ndarray, np.ndarray]:
    """``p*`` per size and its bootstrap replicates, ``(B, n_sizes)``."""
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
    return p_star, boots


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
    table = _args.frame(table)
    scols = _args.columns(table, size_cols, "size_cols")
    _args.columns(table, [seed_col, tasks_col], "seed_col/tasks_col")
    interval = _args.choice(interval, ("t", "bootstrap"), "interval")
    n_boot = _args.count(n_boot, "n_boot")
    level = _args.level(ci)
    rng = _args.rng(seed)
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
            row.update(_gain_row(sub, ref, col, task, seed_col, interval, n_boot, level, rng))
            rows.append(row)
    return pd.DataFrame(rows)


def _gain_row(
    sub: pd.DataFrame,
    ref: pd.DataFrame,
    col: str,
    task: str,
    seed_col: str,
    interval: str,
    n_boot: int,
    level: float,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """The gain columns of one joint configuration and task against its single-task runs."""
    a, b, d = _gain.gain_pairs(sub, ref, col, seed_col)
    res = _gain.gain_stats(a, b, d, interval, n_boot, level, rng)
    return {
        "joint_mean": float(sub[col].mean()),
        "single_mean": float(ref[col].mean()) if len(ref) else math.nan,
        **{k: res[k] for k in ("gain", "se", "df", "ci_low", "ci_high")},
        "ci_level": level,
        "p_value": res["p_value"],
        "interval": res["interval"],
        "n_joint": int(sub[col].notna().sum()),
        "n_single": int(ref[col].notna().sum()),
        "paired": d is not None,
        "note": "" if len(ref) else f"no single-task run on {task} at this size",
    }
