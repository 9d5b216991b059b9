"""Interference metrics as pure functions of per-task Gram matrices ``G``.

``G[..., s, t] = <g_s, g_t>`` as a :class:`torch.Tensor` or :class:`numpy.ndarray` of shape
``(..., T, T)``; leading dimensions broadcast. Results are float64 and of the array type of ``G``
(tensor in, tensor out on the same device). See :mod:`gradlens.metrics` for the NaN policy.

Example:
    >>> import numpy as np
    >>> cosine(np.array([[4.0, -2.0], [-2.0, 1.0]]))[0, 1].item()
    -1.0
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlens.metrics import _kernels as _k
from gradlens.metrics._kernels import ArrayT

__all__ = [
    "conflict",
    "conflict_strength",
    "cos_to_update",
    "cosine",
    "gms",
    "loss_change",
    "loss_change_matrix",
    "norm_cv",
    "norm_ratio",
    "norms",
    "zero_tasks",
]


def norms(G: ArrayT) -> ArrayT:
    """Gradient norm of each task: ``|g_t| = sqrt(G[t, t])``, shape ``(..., T)``.

    Negative diagonal entries (rounding in a Gram that should be PSD) are clamped to 0.

    Args:
        G: Gram matrices, shape ``(..., T, T)``.

    Example:
        >>> import numpy as np
        >>> norms(np.array([[4.0, 0.0], [0.0, 9.0]])).tolist()
        [2.0, 3.0]
    """
    g = _k.as_gram(G)
    return _k.like(G, _k.norms(g))


def zero_tasks(G: ArrayT) -> ArrayT:
    """Flag of zero-gradient tasks: ``G[t, t] == 0`` (or below, from rounding), bool ``(..., T)``.

    These are the tasks whose cosines, conflicts, GMS and cosine with the update are NaN.

    Args:
        G: Gram matrices, shape ``(..., T, T)``.

    Example:
        >>> import numpy as np
        >>> zero_tasks(np.array([[1.0, 0.0], [0.0, 0.0]])).tolist()
        [False, True]
    """
    g = _k.as_gram(G)
    return _k.like(G, ~(np.diagonal(g, axis1=-2, axis2=-1) > 0))


def cosine(G: ArrayT) -> ArrayT:
    """Cosine matrix ``cos[s, t] = G[s, t] / (|g_s| |g_t|)``, shape ``(..., T, T)``.

    The diagonal is exactly 1; values are clipped to ``[-1, 1]`` against rounding. Rows and
    columns of a zero-gradient task (:func:`zero_tasks`), its diagonal entry included, are NaN.

    Args:
        G: Gram matrices, shape ``(..., T, T)``.

    Example:
        >>> import numpy as np
        >>> cosine(np.array([[4.0, -2.0], [-2.0, 1.0]])).tolist()
        [[1.0, -1.0], [-1.0, 1.0]]
    """
    g = _k.as_gram(G)
    return _k.like(G, _k.cosine(g))


def conflict(G: ArrayT) -> ArrayT:
    """Conflict indicator (Yu et al. 2020): ``1.0`` where ``cos[s, t] < 0``, else ``0.0``.

    NaN where the cosine is undefined (a zero-gradient task). Shape ``(..., T, T)``; the diagonal
    is 0 for non-zero tasks.

    Args:
        G: Gram matrices, shape ``(..., T, T)``.

    Example:
        >>> import numpy as np
        >>> conflict(np.array([[1.0, -0.5], [-0.5, 1.0]])).tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    g = _k.as_gram(G)
    return _k.like(G, _k.conflict(_k.cosine(g)))


def conflict_strength(G: ArrayT) -> ArrayT:
    """Conflict strength ``max(0, -cos[s, t])``: 0 without conflict, 1 for opposite gradients.

    NaN where the cosine is undefined. Shape ``(..., T, T)``.

    Args:
        G: Gram matrices, shape ``(..., T, T)``.

    Example:
        >>> import numpy as np
        >>> conflict_strength(np.array([[1.0, -0.5], [-0.5, 1.0]]))[0, 1].item()
        0.5
    """
    g = _k.as_gram(G)
    return _k.like(G, np.maximum(0.0, -_k.cosine(g)))


def gms(G: ArrayT) -> ArrayT:
    """Gradient magnitude similarity (Yu et al. 2020), shape ``(..., T, T)``.

    ``GMS[s, t] = 2 |g_s| |g_t| / (|g_s|^2 + |g_t|^2)``, in ``[0, 1]``: 1 for equal norms, toward 0
    as they diverge; ``2c / (1 + c^2)`` for norms in ratio ``c``. NaN when either gradient is zero
    (the formula gives 0 for exactly one zero, but a zero gradient is flagged, never a silent 0).

    Args:
        G: Gram matrices, shape ``(..., T, T)``.

    Example:
        >>> import numpy as np
        >>> gms(np.array([[1.0, 0.0], [0.0, 4.0]]))[0, 1].item()
        0.8
    """
    g = _k.as_gram(G)
    return _k.like(G, _k.gms(g))


def norm_ratio(G: ArrayT) -> ArrayT:
    """Norm imbalance ``max_t |g_t| / min_t |g_t|``, shape ``(...)``; NaN if any task is zero.

    Args:
        G: Gram matrices, shape ``(..., T, T)``.

    Example:
        >>> import numpy as np
        >>> norm_ratio(np.diag([1.0, 4.0, 16.0])).item()
        4.0
    """
    g = _k.as_gram(G)
    return _k.like(G, _k.norm_ratio(_k.norms(g)))


def norm_cv(G: ArrayT) -> ArrayT:
    """Coefficient of variation of the task norms, ``std_t |g_t| / mean_t |g_t|``, shape ``(...)``.

    The standard deviation is the population one (divided by ``T``), so equal norms give 0 and the
    value does not depend on the units of the gradients. A zero-gradient task enters with norm 0
    (the norms stay defined); the result is NaN only when every task is zero.

    Args:
        G: Gram matrices, shape ``(..., T, T)``.

    Example:
        >>> import numpy as np
        >>> norm_cv(np.diag([1.0, 9.0])).item()    # norms 1 and 3: std 1, mean 2
        0.5
    """
    g = _k.as_gram(G)
    return _k.like(G, _k.norm_cv(_k.norms(g)))


def cos_to_update(G: ArrayT, w: Any) -> ArrayT:
    """Cosine of each task's gradient with the weighted update ``d = sum_s w_s g_s``.

    ``cos(g_t, d) = (G w)_t / (|g_t| sqrt(w^T G w))``, shape ``(..., T)``. NaN for a zero-gradient
    task and, for every task, when the update itself is zero (``w^T G w == 0``).

    Args:
        G: Gram matrices, shape ``(..., T, T)``.
        w: task weights, shape ``(..., T)`` broadcasting with ``G``'s batch dimensions, or ``(T,)``.

    Example:
        >>> import numpy as np
        >>> G = np.array([[1.0, 0.0], [0.0, 1.0]])              # orthogonal unit gradients
        >>> np.round(cos_to_update(G, np.array([1.0, 1.0])), 6).tolist()
        [0.707107, 0.707107]
    """
    g = _k.as_gram(G)
    return _k.like(G, _k.cos_to_update(g, _k.as_weights(w, g)))


def loss_change(G: ArrayT, w: Any, lr: Any) -> ArrayT:
    """First-order change of each task's loss under the step ``-lr * sum_s w_s g_s``.

    ``dL_t = <g_t, -lr sum_s w_s g_s> = -lr (G w)_t``, shape ``(..., T)``. Negative means the
    step lowers task ``t``'s loss. Defined for zero-gradient tasks (their change is 0).

    Args:
        G: Gram matrices, shape ``(..., T, T)``.
        w: task weights, shape ``(..., T)`` or ``(T,)``.
        lr: step size, a number or an array broadcasting with ``G``'s batch dimensions.

    Example:
        >>> import numpy as np
        >>> loss_change(np.array([[1.0, -1.0], [-1.0, 4.0]]), np.array([1.0, 1.0]), 0.5).tolist()
        [-0.0, -1.5]
    """
    g, w_arr, lr_arr = _k.as_step(G, w, lr)
    return _k.like(G, -lr_arr[..., None] * _k.g_times_w(g, w_arr))


def loss_change_matrix(G: ArrayT, w: Any, lr: Any) -> ArrayT:
    """Who hurts whom: ``M[t, s] = -lr * w_s * G[t, s]``, shape ``(..., T, T)``.

    Entry ``[t, s]`` is the first-order change of task ``t``'s loss caused by task ``s``'s term of
    the step ``-lr * sum_s w_s g_s``; a positive entry means task ``s`` raises task ``t``'s loss.
    The diagonal is each task's own term and each row sums to :func:`loss_change`.

    Args:
        G: Gram matrices, shape ``(..., T, T)``.
        w: task weights, shape ``(..., T)`` or ``(T,)``.
        lr: step size, a number or an array broadcasting with ``G``'s batch dimensions.

    Example:
        >>> import numpy as np
        >>> loss_change_matrix(np.array([[1.0, -1.0], [-1.0, 4.0]]), np.array([1.0, 2.0]), 1.0)
        array([[-1.,  2.],
               [ 1., -8.]])
    """
    g, w_arr, lr_arr = _k.as_step(G, w, lr)
    return _k.like(G, -lr_arr[..., None, None] * g * w_arr[..., None, :])
