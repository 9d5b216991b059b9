"""Numerical kernels of :mod:`gradlens.stats`: correlations of resampled data, vectorised.

Every resample is described by a *count matrix* ``C`` of shape ``(B, n)``: ``C[b, i]`` is how many
times observation ``i`` appears in resample ``b``. A correlation is invariant to the order of the
pairs, so the statistic of a resample equals the statistic of the expanded sample
``np.repeat(x, C[b])``; computing it from counts lets one code path serve the iid bootstrap, the
cluster bootstrap (whole groups resampled), the stratified bootstrap (members resampled within
their group) and the circular block bootstrap (blocks of a time series), with groups of unequal
size, without a Python loop over resamples.

- Pearson: weighted moments.
- Spearman: Pearson of the average ranks of the expanded sample,
  ``rank_i = #{x_j < x_i} + (#{x_j == x_i} + 1) / 2`` counted with multiplicities.
- Kendall tau-b: ``sum_{i<j} sx_ij sy_ij / sqrt(sum sx_ij^2 sum sy_ij^2)`` over the expanded pairs,
  i.e. ``c^T (Sx * Sy) c / 2`` with ``S`` the sign matrices (pairs of copies of one observation
  have sign 0, as they should).

Permutations permute ``y`` against a fixed ``x``; the p-value is two-sided on ``|statistic|``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Literal

import numpy as np

Method = Literal["spearman", "pearson", "kendall"]
Correction = Literal["holm", "bh", "none"]
METHODS: tuple[str, ...] = ("spearman", "pearson", "kendall")
Resample = Literal["groups", "within"]
RESAMPLES: tuple[str, ...] = ("groups", "within")

#: Largest number of float64 entries a temporary array may hold before work is split in chunks.
_CHUNK_ENTRIES = 1 << 22
#: Relative tolerance when comparing a resampled statistic with the observed one.
_REL_TOL = 1e-12


def _chunks(n_rows: int, row_cost: int) -> Iterator[slice]:
    """Slices over ``n_rows`` rows such that ``rows * row_cost`` stays under the chunk budget."""
    step = max(1, _CHUNK_ENTRIES // max(1, row_cost))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _constant(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Whether the values of ``X`` (broadcast to ``C``) that have a positive count are all equal."""
    X = np.broadcast_to(X, C.shape)
    present = C > 0
    hi = np.where(present, X, -np.inf).max(axis=1)
    lo = np.where(present, X, np.inf).min(axis=1)
    return hi <= lo


def weighted_ranks(x: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) of each ``x_i`` in each resample described by the counts ``C``."""
    less = (x[None, :] < x[:, None]).astype(np.float64)  # less[i, j] = x_j < x_i
    equal = (x[None, :] == x[:, None]).astype(np.float64)
    return C @ less.T + (C @ equal + 1.0) / 2.0


def weighted_pearson(X: np.ndarray, Y: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Pearson correlation of each resample; ``X`` and ``Y`` broadcast to ``C`` (``(B, n)``).

    NaN where either variable is constant within the resample.
    """
    N = C.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        mx = (C * X).sum(axis=1, keepdims=True) / N
        my = (C * Y).sum(axis=1, keepdims=True) / N
        dx = X - mx
        dy = Y - my
        sxy = (C * dx * dy).sum(axis=1)
        sxx = (C * dx * dx).sum(axis=1)
        syy = (C * dy * dy).sum(axis=1)
        r = np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0)
    bad = _constant(X, C) | _constant(Y, C) | ~(sxx > 0) | ~(syy > 0)
    return np.where(bad, np.nan, r)


def _pair_signs(v: np.ndarray) -> np.ndarray:
    return np.sign(v[None, :] - v[:, None])


def weighted_kendall(x: np.ndarray, y: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each resample described by the counts ``C`` (``(B, n)``)."""
    sx = _pair_signs(x)
    sy = _pair_signs(y)
    n = x.shape[0]
    out = np.empty(C.shape[0])
    for sl in _chunks(C.shape[0], 3 * n):
        c = C[sl]
        num = ((c @ (sx * sy)) * c).sum(axis=1)
        dx = ((c @ (sx * sx)) * c).sum(axis=1)
        dy = ((c @ (sy * sy)) * c).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[sl] = np.clip(num / np.sqrt(dx * dy), -1.0, 1.0)
    return np.where(_constant(x, C) | _constant(y, C), np.nan, out)


def correlation_counts(x: np.ndarray, y: np.ndarray, C: np.ndarray, method: str) -> np.ndarray:
    """The ``method`` correlation of every resample described by the count matrix ``C``."""
    if method == "kendall":
        return weighted_kendall(x, y, C)
    out = np.empty(C.shape[0])
    n = x.shape[0]
    for sl in _chunks(C.shape[0], (2 * n if method == "spearman" else 1) * n + 4 * n):
        c = C[sl]
        if method == "spearman":
            out[sl] = weighted_pearson(weighted_ranks(x, c), weighted_ranks(y, c), c)
        else:
            out[sl] = weighted_pearson(x[None, :], y[None, :], c)
    return out


def _residualise(V: np.ndarray, D: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Weighted least-squares residuals of ``V`` (``(B, n)``) on designs ``D`` (``(B, n, k)``)."""
    W = C[:, :, None] * D
    A = np.einsum("bnk,bnl->bkl", W, D)
    rhs = np.einsum("bnk,bn->bk", W, V)
    beta = np.einsum("bkl,bl->bk", np.linalg.pinv(A), rhs)
    return V - np.einsum("bnk,bk->bn", D, beta)


def _weighted_ss(V: np.ndarray, C: np.ndarray) -> np.ndarray:
    N = C.sum(axis=1, keepdims=True)
    m = (C * V).sum(axis=1, keepdims=True) / N
    return (C * (V - m) ** 2).sum(axis=1)


def partial_counts(
    x: np.ndarray, y: np.ndarray, Z: np.ndarray, C: np.ndarray, method: str
) -> np.ndarray:
    """Partial correlation of ``x`` and ``y`` given the columns of ``Z`` (``(n, k)``), per resample.

    Both variables are residualised (weighted least squares with an intercept) on the covariates,
    after ranking all of them within the resample for ``method="spearman"``; the result is the
    Pearson correlation of the residuals. NaN where a residual has (numerically) no variance left.
    """
    n, k = Z.shape
    out = np.empty(C.shape[0])
    for sl in _chunks(C.shape[0], (k + 3) * n * (n if method == "spearman" else 1)):
        c = C[sl]
        B = c.shape[0]
        if method == "spearman":
            X = weighted_ranks(x, c)
            Y = weighted_ranks(y, c)
            cols = [weighted_ranks(Z[:, j], c) for j in range(k)]
        else:
            X = np.broadcast_to(x, c.shape)
            Y = np.broadcast_to(y, c.shape)
            cols = [np.broadcast_to(Z[:, j], c.shape) for j in range(k)]
        # Standardise covariates (globally per resample) for a well-conditioned normal matrix.
        std_cols = []
        for col in cols:
            s = col.std(axis=1, keepdims=True)
            std_cols.append((col - col.mean(axis=1, keepdims=True)) / np.where(s > 0, s, 1.0))
        D = np.stack([np.ones((B, n)), *std_cols], axis=2)
        rx = _residualise(np.asarray(X, dtype=np.float64), D, c)
        ry = _residualise(np.asarray(Y, dtype=np.float64), D, c)
        r = weighted_pearson(rx, ry, c)
        tiny_x = _weighted_ss(rx, c) <= 1e-20 * np.maximum(_weighted_ss(X, c), 1e-300)
        tiny_y = _weighted_ss(ry, c) <= 1e-20 * np.maximum(_weighted_ss(Y, c), 1e-300)
        out[sl] = np.where(tiny_x | tiny_y, np.nan, r)
    return out


def residuals_for_partial(
    x: np.ndarray, y: np.ndarray, Z: np.ndarray, method: str
) -> tuple[np.ndarray, np.ndarray]:
    """Residuals of ``x`` and ``y`` on ``Z`` (ranked first for Spearman) over the full sample."""
    n, k = Z.shape
    C = np.ones((1, n))
    if method == "spearman":
        x = weighted_ranks(x, C)[0]
        y = weighted_ranks(y, C)[0]
        Z = np.stack([weighted_ranks(Z[:, j], C)[0] for j in range(k)], axis=1)
    s = Z.std(axis=0)
    Zs = (Z - Z.mean(axis=0)) / np.where(s > 0, s, 1.0)
    D = np.concatenate([np.ones((n, 1)), Zs], axis=1)[None]
    return _residualise(x[None], D, C)[0], _residualise(y[None], D, C)[0]


# --------------------------------------------------------------------------- resampling schemes


def bootstrap_counts(
    rng: np.random.Generator,
    n_boot: int,
    n: int,
    codes: np.ndarray | None = None,
    resample: str = "groups",
) -> np.ndarray:
    """Count matrix ``(n_boot, n)`` of an iid, cluster (``"groups"``) or stratified (``"within"``)
    bootstrap; ``codes`` (``0 .. G-1`` per observation) define the groups."""
    if codes is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    G = int(codes.max()) + 1
    if resample == "groups":
        group_counts = rng.multinomial(G, np.full(G, 1.0 / G), size=n_boot).astype(np.float64)
        return group_counts[:, codes]
    C = np.zeros((n_boot, n))
    for g in range(G):
        idx = np.flatnonzero(codes == g)
        m = idx.size
        C[:, idx] = rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot)
    return C


def block_bootstrap_counts(rng: np.random.Generator, n_boot: int, n: int, block: int) -> np.ndarray:
    """Count matrix of a circular block bootstrap: ``ceil(n / block)`` blocks of ``block``
    consecutive indices (wrapping around), starts uniform, truncated to ``n`` indices."""
    n_blocks = math.ceil(n / block)
    starts = rng.integers(0, n, size=(n_boot, n_blocks))
    idx = ((starts[:, :, None] + np.arange(block)) % n).reshape(n_boot, -1)[:, :n]
    C = np.zeros((n_boot, n))
    np.add.at(C, (np.arange(n_boot)[:, None], idx), 1.0)
    return C


def auto_block_length(x: np.ndarray, y: np.ndarray) -> int:
    """Block length for the circular block bootstrap of a correlation of two series.

    ``max(ceil(n^(1/3)), round(b_pw))``, capped at ``n // 2``, where ``b_pw`` is the
    Politis-White (2004; corrected by Patton, Politis and White 2009) optimal circular block length
    under an AR(1) model, ``(6 rho^2 / (1 - rho^2)^2)^(1/3) n^(1/3)``, with ``rho`` the lag-1
    autocorrelation (clipped to ``[0, 0.95]``) of the standardised product ``z_t = x~_t y~_t``,
    whose mean is the Pearson correlation.
    """
    n = x.shape[0]
    base = math.ceil(n ** (1.0 / 3.0))
    sx, sy = x.std(), y.std()
    if n < 4 or sx == 0 or sy == 0:
        return max(1, min(base, max(1, n // 2)))
    z = (x - x.mean()) / sx * (y - y.mean()) / sy
    zc = z - z.mean()
    denom = float(zc @ zc)
    rho = float(zc[1:] @ zc[:-1]) / denom if denom > 0 else 0.0
    rho = min(max(rho, 0.0), 0.95)
    b_pw = (6.0 * rho**2 / (1.0 - rho**2) ** 2) ** (1.0 / 3.0) * n ** (1.0 / 3.0)
    return int(max(1, min(max(base, round(b_pw)), n // 2)))


def lag1_autocorrelation(v: np.ndarray) -> float:
    """Sample lag-1 autocorrelation ``sum (v_t - m)(v_{t-1} - m) / sum (v_t - m)^2``."""
    c = v - v.mean()
    denom = float(c @ c)
    return float(c[1:] @ c[:-1]) / denom if denom > 0 else 0.0


def effective_n(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Effective sample size of the correlation of two AR(1)-like series, with the lag-1
    autocorrelations used: ``n (1 - r_x r_y) / (1 + r_x r_y)`` (Bretherton et al. 1999), clipped
    to ``[3, n]``."""
    n = x.shape[0]
    rx, ry = lag1_autocorrelation(x), lag1_autocorrelation(y)
    a = rx * ry
    n_eff = n * (1.0 - a) / (1.0 + a) if a > -1.0 else float(n)
    return float(min(max(n_eff, 3.0), n)), rx, ry


def permutations(rng: np.random.Generator, n: int, n_perm: int) -> tuple[np.ndarray, bool]:
    """Permutation index rows and whether they are all ``n!`` permutations (an exact test).

    All permutations are enumerated when ``n! <= n_perm``; otherwise ``n_perm`` random ones.
    """
    if n <= 10 and math.factorial(n) <= n_perm:
        return np.array(list(itertools.permutations(range(n))), dtype=np.intp), True
    base = np.tile(np.arange(n), (n_perm, 1))
    return rng.permuted(base, axis=1), False


def group_permutations(
    rng: np.random.Generator, codes: np.ndarray, n_perm: int
) -> tuple[np.ndarray, bool, int]:
    """Index rows that permute whole groups, among the groups with the same number of members.

    Row ``b`` maps member ``j`` of group ``g`` to member ``j`` of group ``pi_b(g)``, so
    ``y[rows[b]]`` moves every group's values together onto another group's ``x`` (the
    permutation unit is the group, e.g. the seeds of one configuration). Groups of different
    sizes are not exchanged. Returns the rows, whether they are all ``prod_c k_c!`` distinct
    permutations (``k_c`` groups of size class ``c``; enumerated when that is at most
    ``n_perm``) and that number of distinct permutations (capped at ``10**18``).
    """
    n = codes.shape[0]
    G = int(codes.max()) + 1 if n else 0
    members = [np.flatnonzero(codes == g) for g in range(G)]
    classes: dict[int, list[int]] = {}
    for g, m in enumerate(members):
        classes.setdefault(m.size, []).append(g)
    n_distinct = 1
    for gs in classes.values():
        n_distinct = min(n_distinct * math.factorial(min(len(gs), 20)), 10**18)
    exact = n_distinct <= n_perm
    R = n_distinct if exact else n_perm
    rows = np.tile(np.arange(n, dtype=np.intp), (R, 1))
    blocks = []
    for gs in classes.values():
        M = np.stack([members[g] for g in gs])  # (k, m)
        k = len(gs)
        if exact:
            perms = np.array(list(itertools.permutations(range(k))), dtype=np.intp)
        else:
            perms = rng.permuted(np.tile(np.arange(k), (R, 1)), axis=1)
        blocks.append((M, perms))
    if exact:
        # Cartesian product of the per-class permutations.
        sizes = [p.shape[0] for _, p in blocks]
        grid = np.indices(sizes).reshape(len(sizes), -1) if sizes else np.zeros((0, 1), int)
        for c, (M, perms) in enumerate(blocks):
            pick = perms[grid[c]]
            rows[:, M.ravel()] = M[pick].reshape(R, -1)
    else:
        for M, perms in blocks:
            rows[:, M.ravel()] = M[perms].reshape(R, -1)
    return rows, exact, int(n_distinct)


def pvalue_floor(exact: bool, n_rows: int) -> float:
    """Smallest p-value a permutation test can return: ``1 / N`` over ``N`` enumerated
    permutations (the identity always counts), ``1 / (n_perm + 1)`` over random ones."""
    return 1.0 / n_rows if exact else 1.0 / (n_rows + 1)


def _standardise(v: np.ndarray) -> np.ndarray:
    c = v - v.mean()
    return c / np.sqrt(c @ c)


def permutation_null(x: np.ndarray, y: np.ndarray, perms: np.ndarray, method: str) -> np.ndarray:
    """The ``method`` correlation of ``x`` with ``y[perm]`` for each permutation row."""
    n = x.shape[0]
    if method == "kendall":
        iu, ju = np.triu_indices(n, k=1)
        sx = np.sign(x[ju] - x[iu])
        sy = np.sign(y[ju] - y[iu])
        denom = math.sqrt(float(sx @ sx) * float(sy @ sy))
        out = np.empty(perms.shape[0])
        for sl in _chunks(perms.shape[0], 2 * iu.size):
            yp = y[perms[sl]]
            out[sl] = np.sign(yp[:, ju] - yp[:, iu]) @ sx / denom
        return out
    if method == "spearman":
        ones = np.ones((1, n))
        x = weighted_ranks(x, ones)[0]
        y = weighted_ranks(y, ones)[0]
    u = _standardise(x)
    v = _standardise(y)
    return np.clip(v[perms] @ u, -1.0, 1.0)


def permutation_pvalue(observed: float, null: np.ndarray, exact: bool) -> float:
    """Two-sided p-value ``P(|T| >= |t|)``; with the +1 correction unless the null is exact."""
    hits = int(np.count_nonzero(np.abs(null) >= abs(observed) * (1.0 - _REL_TOL)))
    if exact:
        return hits / null.size
    return (hits + 1) / (null.size + 1)


def centered_bootstrap_pvalue(observed: float, boots: np.ndarray) -> float:
    """Two-sided bootstrap p-value of ``H0: statistic = 0`` from the centred bootstrap
    distribution, ``(1 + #{|T*_b - t| >= |t|}) / (B + 1)``."""
    hits = int(np.count_nonzero(np.abs(boots - observed) >= abs(observed) * (1.0 - _REL_TOL)))
    return (hits + 1) / (boots.size + 1)


def percentile_interval(boots: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile interval of the finite bootstrap values (NaN, NaN when there are none)."""
    finite = boots[np.isfinite(boots)]
    if finite.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(finite, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
    return float(lo), float(hi)


def adjust_pvalues(p: np.ndarray, method: str) -> np.ndarray:
    """Holm or Benjamini-Hochberg adjusted p-values of the finite entries (NaN stays NaN)."""
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    if m == 0:
        return out
    q = p[finite]
    order = np.argsort(q, kind="stable")
    sorted_p = q[order]
    ranks = np.arange(1, m + 1)
    if method == "holm":
        adj = np.maximum.accumulate(np.minimum(1.0, (m - ranks + 1) * sorted_p))
    elif method == "bh":
        adj = np.minimum.accumulate((m * sorted_p / ranks)[::-1])[::-1]
        adj = np.minimum(1.0, adj)
    else:
        adj = sorted_p.copy()
    res = np.empty(m)
    res[order] = adj
    out[finite] = res
    return out
