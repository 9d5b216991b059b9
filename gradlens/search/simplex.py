"""Points on the probability simplex: grids, Dirichlet samples and PBT perturbations.

Scalarization weights ``w`` live on the simplex ``{w_t >= 0, sum_t w_t = 1}``. A sweep visits a
grid or a random sample of it; population-based training moves each member's weights with
:func:`perturb_weights`.

Example:
    >>> import numpy as np
    >>> simplex_grid(3, 3)[:3].tolist()
    [[0.0, 0.0, 1.0], [0.0, 0.5, 0.5], [0.0, 1.0, 0.0]]
    >>> w = perturb_weights([0.5, 0.5], np.random.default_rng(0), factors=(0.8, 1.25))
    >>> round(float(w.sum()), 12)
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gradlens._errors import GradlensError
from gradlens._validate import check_int

__all__ = ["dirichlet_weights", "grid_size", "perturb_weights", "simplex_grid"]


def grid_size(n_tasks: int, points: int) -> int:
    """Number of points of :func:`simplex_grid` ``(n_tasks, points)``: ``C(points + T - 2, T - 1)``.

    Example:
        >>> grid_size(2, 11), grid_size(6, 3), grid_size(6, 4)
        (11, 21, 56)
    """
    T = check_int("n_tasks", n_tasks, minimum=1)
    k = check_int("points", points, minimum=2)
    return math.comb(k - 1 + T - 1, T - 1)


def simplex_grid(n_tasks: int, points: int) -> np.ndarray:
    """Every weight vector whose entries are multiples of ``1 / (points - 1)`` and sum to one.

    ``points`` is the number of values each coordinate takes (``0, 1/(points-1), ..., 1``); for
    two tasks this is the usual ``p = 0, 0.1, ..., 1`` grid with ``points = 11``. Rows are in
    lexicographic order of the coordinates; there are :func:`grid_size` of them.

    Args:
        n_tasks: The number of tasks ``T`` (columns).
        points: Points per simplex axis, at least 2.

    Returns:
        A float64 array ``(grid_size(T, points), T)``.

    Example:
        >>> simplex_grid(2, 5).tolist()
        [[0.0, 1.0], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1.0, 0.0]]
    """
    T = check_int("n_tasks", n_tasks, minimum=1)
    m = check_int("points", points, minimum=2) - 1
    rows: list[list[int]] = []

    def _fill(prefix: list[int], left: int, slots: int) -> None:
        if slots == 1:
            rows.append([*prefix, left])
            return
        for v in range(left + 1):
            _fill([*prefix, v], left - v, slots - 1)

    _fill([], m, T)
    return np.asarray(rows, dtype=np.float64) / m


def dirichlet_weights(
    n_tasks: int, n: int, rng: np.random.Generator | int, *, alpha: float = 1.0
) -> np.ndarray:
    """``n`` weight vectors drawn from the symmetric Dirichlet(``alpha``) on the simplex.

    ``alpha = 1`` is uniform on the simplex; larger values concentrate near uniform weights,
    smaller ones near the corners.

    Args:
        n_tasks: The number of tasks ``T``.
        n: How many vectors.
        rng: A numpy Generator or an int seed.
        alpha: The concentration, positive.

    Example:
        >>> w = dirichlet_weights(4, 3, 0)
        >>> w.shape, bool(np.allclose(w.sum(axis=1), 1.0))
        ((3, 4), True)
    """
    T = check_int("n_tasks", n_tasks, minimum=1)
    n = check_int("n", n, minimum=0)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise GradlensError(f"`alpha` should be a positive number; found {alpha!r}.")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    return gen.dirichlet(np.full(T, float(alpha)), size=n)


def perturb_weights(
    weights: Sequence[float] | np.ndarray,
    rng: np.random.Generator,
    *,
    factors: Sequence[float] = (0.8, 1.25),
    resample_probability: float = 0.0,
    alpha: float = 1.0,
) -> np.ndarray:
    """PBT's explore step on the simplex.

    With probability ``resample_probability`` the whole vector is redrawn from Dirichlet(``alpha``)
    (:func:`dirichlet_weights`). Otherwise each weight is multiplied by a factor drawn uniformly
    and independently from ``factors``, and the result is divided by its sum (renormalised to
    the simplex). The same factor on every weight would leave the point where it is, so when
    ``factors`` holds two or more distinct values such a draw is repeated: the point always
    moves (unless all its mass sits on one task). A weight that is exactly zero stays zero.

    Args:
        weights: The current weights (non-negative, positive sum).
        rng: The random generator (the caller owns its state, so runs are reproducible).
        factors: The multiplicative factors to choose from (positive).
        resample_probability: Probability of a fresh Dirichlet draw instead, in ``[0, 1]``.
        alpha: Dirichlet concentration of a resample.

    Example:
        >>> w = perturb_weights([0.2, 0.8], np.random.default_rng(1), factors=(2.0,))
        >>> w.tolist()  # the same factor on every weight leaves the point unchanged
        [0.2, 0.8]
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise GradlensError(
            f"`weights` should be non-negative finite numbers with a positive sum; found "
            f"{np.asarray(weights).tolist()!r}."
        )
    f = np.asarray(factors, dtype=np.float64).reshape(-1)
    if f.size == 0 or not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise GradlensError(
            f"`factors` should be a non-empty list of positive numbers; found {list(factors)!r}."
        )
    p = resample_probability
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        raise GradlensError(f"`resample_probability` should be a number in [0, 1]; found {p!r}.")
    if p > 0 and rng.random() < p:
        return dirichlet_weights(w.size, 1, rng, alpha=alpha)[0]
    distinct = np.unique(f).size > 1 and w.size > 1
    while True:
        draw = rng.choice(f, size=w.size)
        if not distinct or np.unique(draw).size > 1:
            break
    new = w * draw
    return new / new.sum()
