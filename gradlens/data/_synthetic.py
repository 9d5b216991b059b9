"""Synthetic multi-task regression with planted gradient angles and scales."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gradlens._errors import GradlensError
from gradlens._validate import check_int, check_number
from gradlens.data._base import _TAG_SAMPLE, MultiTaskDataset, TaskInfo, _rng

__all__ = ["expected_gradient_cosine", "expected_gradient_gram"]

_TAG_DIRECTIONS = 201
_TAG_INPUTS = 202
_SYNTHETIC_N = {"train": 2000, "val": 500, "test": 500}


def _check_angle(n_tasks: int, angle: float) -> float:
    """Validate the planted angle and return its cosine."""
    check_int("n_tasks", n_tasks, minimum=1)
    check_number("angle", angle, low=0.0, high=180.0)  # degrees
    c = math.cos(math.radians(float(angle)))
    if abs(c) < 1e-15:
        c = 0.0
    if n_tasks > 1 and c < -1.0 / (n_tasks - 1) - 1e-12:
        limit = math.degrees(math.acos(-1.0 / (n_tasks - 1)))
        raise GradlensError(
            f"`angle` {angle} is infeasible for {n_tasks} equiangular tasks: their pairwise cosine "
            f"must be >= -1/(T-1) = {-1.0 / (n_tasks - 1):.4f}, i.e. angle <= {limit:.4f} degrees."
        )
    return c


def _check_scales(n_tasks: int, scales: Sequence[float] | None) -> np.ndarray:
    if scales is None:
        return np.ones(n_tasks)
    s = np.asarray(scales, dtype=np.float64).reshape(-1)
    if s.shape != (n_tasks,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise GradlensError(
            f"`scales` should hold {n_tasks} positive finite numbers (one per task); "
            f"found {scales!r}."
        )
    return s


def _equiangular(n_tasks: int, cos: float, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``n_tasks`` unit vectors in R^dim with pairwise cosine ``cos``, randomly rotated."""
    C = (1.0 - cos) * np.eye(n_tasks) + cos * np.ones((n_tasks, n_tasks))
    evals, evecs = np.linalg.eigh(C)
    A = evecs * np.sqrt(np.clip(evals, 0.0, None))  # rows: coordinates with A A^T = C
    Q, R = np.linalg.qr(rng.standard_normal((dim, n_tasks)))
    Q = Q * np.sign(np.diag(R))
    U = A @ Q.T  # (T, dim), U U^T = C
    return U / np.linalg.norm(U, axis=1, keepdims=True)


def _whitened_inputs(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian inputs whitened so that ``X^T X / n == I`` exactly (in float64)."""
    X = rng.standard_normal((n, dim))
    evals, evecs = np.linalg.eigh(X.T @ X / n)
    return X @ (evecs / np.sqrt(evals)) @ evecs.T


def _synthetic(
    split: str,
    seed: int,
    root: Path | None,
    *,
    n_tasks: int = 2,
    angle: float = 60.0,
    scales: Sequence[float] | None = None,
    dim: int = 16,
    n: int | None = None,
    noise: float = 0.1,
) -> MultiTaskDataset:
    """y_t = scale_t <u_t, x> + noise, with equiangular unit vectors u_t."""
    c = _check_angle(n_tasks, angle)
    s = _check_scales(n_tasks, scales)
    check_int("dim", dim, minimum=n_tasks)  # at least one direction per task
    n = _SYNTHETIC_N[split] if n is None else n
    check_int("n", n, minimum=dim + 1)  # more samples than dimensions
    check_number("noise", noise, low=0.0)
    U = _equiangular(n_tasks, c, dim, _rng(seed, _TAG_DIRECTIONS))
    rng = _rng(seed, _TAG_INPUTS, _TAG_SAMPLE[split])
    X = _whitened_inputs(n, dim, rng)
    # Noise orthogonal to the columns of X, rescaled to standard deviation `noise`: it sets the
    # loss floor but leaves the full-batch gradient of any linear model equal to its population
    # value (X^T eps = 0).
    E = rng.standard_normal((n, n_tasks))
    E -= X @ np.linalg.lstsq(X, E, rcond=None)[0]
    E *= noise * math.sqrt(n / (n - dim))
    Y = (X @ U.T) * s + E
    names = tuple(f"task{t}" for t in range(n_tasks))
    info = TaskInfo("regression", 1)
    return MultiTaskDataset(
        torch.from_numpy(X.astype(np.float32)),
        {t: torch.from_numpy(Y[:, k].astype(np.float32)) for k, t in enumerate(names)},
        task_info=dict.fromkeys(names, info),
        name="synthetic",
        split=split,
        meta={
            "angle": float(angle),
            "cosine": c,
            "scales": tuple(s.tolist()),
            "directions": U,
            "noise": float(noise),
            "dim": dim,
        },
    )


def expected_gradient_gram(
    n_tasks: int,
    angle: float,
    scales: Sequence[float] | None = None,
    *,
    noise: float = 0.0,
    dim: int = 16,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Closed-form Gram of the task gradients on the shared layer, for the synthetic data.

    Setting: ``load_dataset("synthetic", ...)``; a shared linear layer ``z = W x``
    (``W`` of shape ``(k, dim)``) evaluated at ``W = 0``; every task's head the same vector
    ``v`` (``pred_t = v^T z``); loss ``L_t = mean_i (pred_t - y_t)^2 / 2``. Then
    ``g_t = dL_t/dW = -v (X^T y_t / m)^T`` over a batch of ``m`` samples, and:

    - full batch (``batch_size=None``): ``G[s, t] = |v|^2 scale_s scale_t cos_st`` exactly, with
      ``cos_st = cos(angle)`` off the diagonal, for any ``noise`` (the generator makes
      ``X^T X / n = I`` and ``X^T noise = 0``); up to float32 rounding of the stored data.
    - minibatch of ``b`` rows: ``E[G[s, t]] = |v|^2 ((b + dim + 1) / b scale_s scale_t cos_st
      + [s == t] noise^2 dim / b)``, exact for i.i.d. Gaussian inputs and noise; the generator's
      whitening perturbs it by O(1/n).

    Returned divided by ``|v|^2`` (float64, ``(T, T)``).

    Args:
        n_tasks: number of tasks ``T``.
        angle: pairwise angle between the task directions, in degrees.
        scales: per-task output scale (default all 1).
        noise: noise standard deviation of the data.
        dim: input dimension.
        batch_size: ``None`` for the full-batch gradient, else the minibatch size ``b``.

    Example:
        >>> expected_gradient_gram(2, 60.0, scales=(1.0, 2.0)).tolist()
        [[1.0, 1.0000000000000002], [1.0000000000000002, 4.0]]
    """
    c = _check_angle(n_tasks, angle)
    s = _check_scales(n_tasks, scales)
    C = (1.0 - c) * np.eye(n_tasks) + c * np.ones((n_tasks, n_tasks))
    G = np.outer(s, s) * C
    if batch_size is not None:
        check_int("batch_size", batch_size, minimum=1)
        check_number("noise", noise, low=0.0)
        b = batch_size
        G = G * (b + dim + 1) / b + np.eye(n_tasks) * noise**2 * dim / b
    return torch.from_numpy(G)


def expected_gradient_cosine(
    n_tasks: int,
    angle: float,
    scales: Sequence[float] | None = None,
    *,
    noise: float = 0.0,
    dim: int = 16,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Cosine matrix of :func:`expected_gradient_gram` (same setting and arguments).

    Full batch: ``cos(angle)`` between every pair of tasks, exactly. Minibatch of ``b`` rows: the
    cosine of the expected Gram, ``scale_s scale_t cos(angle) / sqrt(prod_u (scale_u^2 +
    noise^2 dim / (b + dim + 1)))``, which the mean measured cosine approaches as ``b`` grows.

    Args:
        n_tasks: number of tasks ``T``.
        angle: pairwise angle between the task directions, in degrees.
        scales: per-task output scale (default all 1).
        noise: noise standard deviation of the data.
        dim: input dimension.
        batch_size: ``None`` for the full-batch gradient, else the minibatch size ``b``.

    Example:
        >>> round(expected_gradient_cosine(3, 100.0)[0, 2].item(), 6)
        -0.173648
    """
    G = expected_gradient_gram(n_tasks, angle, scales, noise=noise, dim=dim, batch_size=batch_size)
    d = torch.sqrt(torch.diagonal(G))
    return G / torch.outer(d, d)
