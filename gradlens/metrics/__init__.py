"""Interference metrics: pure functions of per-task Gram matrices, and a streaming summary.

Every function takes a Gram matrix ``G`` with ``G[..., s, t] = <g_s, g_t>`` (``g_t`` the gradient of
task ``t``), as a :class:`torch.Tensor` or a :class:`numpy.ndarray` of shape ``(..., T, T)``.
Leading dimensions are batch dimensions and broadcast (for instance ``(steps, layers, T, T)``), so
per-layer metrics are the same call on the stack of layer Grams, and the total is the call on their
sum. Results are float64 and of the array type of ``G`` (tensor in, tensor out on the same device;
ndarray in, ndarray out). The functions compute in NumPy and do not propagate autograd.

NaN policy: a task whose gradient is zero (``diag G == 0``, flagged by :func:`zero_tasks`) has no
direction, so every ratio that involves it (cosine, conflict, conflict strength, GMS, norm ratio,
cosine with the update) is NaN, never 0 and never an exception or a warning. Products (norms,
:func:`loss_change`, :func:`loss_change_matrix`) stay defined: their value for such a task is 0.
The formulas are in each docstring and in ``docs/metrics.md``.

Example:
    >>> import numpy as np
    >>> from gradlens import metrics
    >>> J = np.array([[1.0, 0.0], [-2.0, 0.0], [0.0, 3.0]])   # three task gradients, 2 parameters
    >>> G = J @ J.T
    >>> metrics.cosine(G)[0].tolist()
    [1.0, -1.0, 0.0]
    >>> metrics.conflict(G)[0, 1], metrics.gms(G)[0, 1]
    (np.float64(1.0), np.float64(0.8))
    >>> metrics.loss_change(G, w=np.ones(3), lr=0.1).tolist()    # first order: -lr * G w
    [0.1, -0.2, -0.9]
    >>> summary = metrics.StreamingSummary(["a", "b", "c"])
    >>> summary.update(G, step=0)
    >>> table = summary.result()[["task_i", "task_j", "count", "mean", "conflict_freq"]]
    >>> print(table.to_string(index=False))
    task_i task_j  count  mean  conflict_freq
         a      b      1  -1.0            1.0
         a      c      1   0.0            0.0
         b      c      1   0.0            0.0
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from gradlens._errors import GradlensError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "StreamingSummary",
    "conflict",
    "conflict_strength",
    "cos_to_update",
    "cosine",
    "gms",
    "loss_change",
    "loss_change_matrix",
    "metrics_frame",
    "norm_cv",
    "norm_ratio",
    "norms",
    "zero_tasks",
]

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)

#: Quantile levels reported by :meth:`StreamingSummary.result` (columns ``q05`` ... ``q95``).
QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)

_FRAME_COLUMNS = ("step", "layer", "metric", "task_i", "task_j", "value")

# --------------------------------------------------------------------------- conversion helpers


def _gram(G: Any, name: str = "G") -> tuple[np.ndarray, Callable[[np.ndarray], Any]]:
    """``G`` as a float64 ndarray of shape (..., T, T) and a function converting results back."""
    if isinstance(G, torch.Tensor):
        device = G.device
        arr = G.detach().to(device="cpu", dtype=torch.float64).numpy()

        def back(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x)).to(device)

    else:
        try:
            arr = np.asarray(G, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise GradlensError(
                f"`{name}` should be a torch.Tensor or numpy.ndarray of real numbers; "
                f"found {type(G).__name__} ({exc})."
            ) from None

        def back(x: np.ndarray) -> np.ndarray:
            return np.asarray(x)

    if arr.ndim < 2 or arr.shape[-1] != arr.shape[-2]:
        raise GradlensError(
            f"`{name}` should have shape (..., T, T) (a square Gram matrix per batch entry); "
            f"found shape {tuple(arr.shape)}."
        )
    return arr, back


def _as_float_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise GradlensError(
            f"`{name}` should be a number, torch.Tensor or numpy.ndarray; "
            f"found {type(x).__name__} ({exc})."
        ) from None


def _weights(w: Any, g: np.ndarray, name: str = "w") -> np.ndarray:
    arr = _as_float_array(w, name)
    T = g.shape[-1]
    if arr.ndim < 1 or arr.shape[-1] != T:
        raise GradlensError(
            f"`{name}` should have shape (..., T) with T = {T} tasks (one weight per task); "
            f"found shape {tuple(arr.shape)}."
        )
    try:
        np.broadcast_shapes(arr.shape[:-1], g.shape[:-2])
    except ValueError:
        raise GradlensError(
            f"`{name}` leading dimensions {tuple(arr.shape[:-1])} do not broadcast with the batch "
            f"dimensions of `G` {tuple(g.shape[:-2])}."
        ) from None
    return arr


def _lr(lr: Any, g: np.ndarray) -> np.ndarray:
    arr = _as_float_array(lr, "lr")
    try:
        np.broadcast_shapes(arr.shape, g.shape[:-2])
    except ValueError:
        raise GradlensError(
            f"`lr` should be a number or an array broadcasting with the batch dimensions of `G` "
            f"{tuple(g.shape[:-2])}; found shape {tuple(arr.shape)}."
        ) from None
    return arr


# --------------------------------------------------------------------------- NumPy kernels


def _diag(g: np.ndarray) -> np.ndarray:
    return np.clip(np.diagonal(g, axis1=-2, axis2=-1), 0.0, None)


def _norms(g: np.ndarray) -> np.ndarray:
    return np.sqrt(_diag(g))


def _cosine(g: np.ndarray) -> np.ndarray:
    n = _norms(g)
    denom = n[..., :, None] * n[..., None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.clip(g / denom, -1.0, 1.0)
    out = np.where(denom > 0, out, np.nan)
    T = g.shape[-1]
    idx = np.arange(T)
    out[..., idx, idx] = np.where(n > 0, 1.0, np.nan)
    return out


def _conflict(cos: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(cos), np.nan, (cos < 0).astype(np.float64))


def _gms(g: np.ndarray) -> np.ndarray:
    d = _diag(g)
    n = np.sqrt(d)
    num = 2.0 * n[..., :, None] * n[..., None, :]
    den = d[..., :, None] + d[..., None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.clip(num / den, 0.0, 1.0)
    return np.where(num > 0, out, np.nan)


def _norm_ratio(n: np.ndarray) -> np.ndarray:
    lo = n.min(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = n.max(axis=-1) / lo
    return np.where(lo > 0, out, np.nan)


def _norm_cv(n: np.ndarray) -> np.ndarray:
    mean = n.mean(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = n.std(axis=-1) / mean
    return np.where(mean > 0, out, np.nan)


def _gw(g: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.matmul(g, w[..., :, None])[..., 0]


def _cos_to_update(g: np.ndarray, w: np.ndarray) -> np.ndarray:
    gw = _gw(g, w)
    u = np.sqrt(np.clip(np.sum(w * gw, axis=-1), 0.0, None))
    denom = _norms(g) * u[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.clip(gw / denom, -1.0, 1.0)
    return np.where(denom > 0, out, np.nan)


# --------------------------------------------------------------------------- public functions


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
    g, back = _gram(G)
    return back(_norms(g))


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
    g, back = _gram(G)
    return back(~(np.diagonal(g, axis1=-2, axis2=-1) > 0))


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
    g, back = _gram(G)
    return back(_cosine(g))


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
    g, back = _gram(G)
    return back(_conflict(_cosine(g)))


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
    g, back = _gram(G)
    return back(np.maximum(0.0, -_cosine(g)))


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
    g, back = _gram(G)
    return back(_gms(g))


def norm_ratio(G: ArrayT) -> ArrayT:
    """Norm imbalance ``max_t |g_t| / min_t |g_t|``, shape ``(...)``; NaN if any task is zero.

    Args:
        G: Gram matrices, shape ``(..., T, T)``.

    Example:
        >>> import numpy as np
        >>> norm_ratio(np.diag([1.0, 4.0, 16.0])).item()
        4.0
    """
    g, back = _gram(G)
    return back(_norm_ratio(_norms(g)))


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
    g, back = _gram(G)
    return back(_norm_cv(_norms(g)))


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
    g, back = _gram(G)
    return back(_cos_to_update(g, _weights(w, g)))


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
    g, back = _gram(G)
    w_arr = _weights(w, g)
    lr_arr = _lr(lr, g)
    return back(-lr_arr[..., None] * _gw(g, w_arr))


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
    g, back = _gram(G)
    w_arr = _weights(w, g)
    lr_arr = _lr(lr, g)
    return back(-lr_arr[..., None, None] * g * w_arr[..., None, :])


# --------------------------------------------------------------------------- long-format frame


def _tiled_strings(pattern: Sequence[str], reps: int) -> Any:
    """A pandas string array holding ``pattern`` repeated ``reps`` times, built from buffers."""
    import pyarrow as pa

    encoded = [s.encode("utf-8") for s in pattern]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    period = int(lengths.sum())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    offsets = np.empty(len(pattern) * reps + 1, dtype=np.int64)
    np.add(
        np.arange(reps, dtype=np.int64)[:, None] * period,
        starts[None, :],
        out=offsets[:-1].reshape(reps, len(pattern)),
    )
    offsets[-1] = period * reps
    data = np.tile(np.frombuffer(b"".join(encoded) or b"\0", dtype=np.uint8)[:period], reps)
    arr = pa.LargeStringArray.from_buffers(
        len(pattern) * reps, pa.py_buffer(offsets), pa.py_buffer(data)
    )
    return arr.to_pandas()


def _names(values: Sequence[str] | None, n: int, name: str, what: str) -> list[str]:
    if values is None:
        return [str(i) for i in range(n)]
    out = [str(v) for v in values]
    if len(out) != n:
        raise GradlensError(f"`{name}` should name the {n} {what} of `grams`; found {len(out)}.")
    if len(set(out)) != len(out):
        raise GradlensError(f"`{name}` should hold distinct names; found {out}.")
    return out


def metrics_frame(
    grams: Any,
    tasks: Sequence[str],
    weights: Any = None,
    steps: Sequence[int] | np.ndarray | None = None,
    layers: Sequence[str] | None = None,
) -> pd.DataFrame:
    """All metrics of a stack of Grams in tidy long format, vectorised.

    Columns ``step`` (int64), ``layer``, ``metric``, ``task_i``, ``task_j`` (strings) and
    ``value`` (float64); rows are ordered by step, layer, metric, then pair or task. Metrics:

    - ``"cosine"``, ``"conflict"``, ``"gms"``: one row per pair ``i < j`` in task order.
    - ``"norm"``, and ``"cos_to_update"`` when ``weights`` are given: one row per task
      (``task_i`` = the task, ``task_j`` = ``""``).
    - ``"norm_ratio"``, ``"norm_cv"``: one row per step and layer (``task_i = task_j = ""``).

    Args:
        grams: Grams of shape ``(S, L, T, T)`` (steps x layers); pass the total (the sum over
            layers) as one of the layers if you want it, e.g. under ``gradlens.TOTAL_LAYER``.
        tasks: the ``T`` task names, in the order of the Gram's rows.
        weights: the task weights of each step, shape ``(S, T)`` (or ``(T,)`` for all steps);
            ``None`` leaves out ``cos_to_update``.
        steps: the ``S`` step numbers; default ``0 .. S-1``.
        layers: the ``L`` layer names; default ``"0" .. "L-1"``.

    Example:
        >>> import numpy as np
        >>> G = np.array([[[[1.0, -1.0], [-1.0, 4.0]]]])             # 1 step, 1 layer, 2 tasks
        >>> df = metrics_frame(G, ["a", "b"], steps=[7], layers=["trunk"])
        >>> df[df.metric == "cosine"][["step", "task_i", "task_j", "value"]].values.tolist()
        [[7, 'a', 'b', -0.5]]
        >>> df.metric.unique().tolist()
        ['cosine', 'conflict', 'gms', 'norm', 'norm_ratio', 'norm_cv']
    """
    import pandas as pd

    g, _ = _gram(grams, "grams")
    if g.ndim != 4:
        raise GradlensError(
            "`grams` should have shape (S, L, T, T) (steps x layers x tasks x tasks; use "
            f"`grams[:, None]` for a single layer); found shape {tuple(g.shape)}."
        )
    S, L, T, _ = g.shape
    task_names = [str(t) for t in tasks]
    if len(task_names) != T:
        raise GradlensError(
            f"`tasks` should name the {T} tasks of `grams` (its last two dimensions); "
            f"found {len(task_names)}: {task_names}."
        )
    if len(set(task_names)) != T:
        raise GradlensError(f"`tasks` should hold distinct names; found {task_names}.")
    layer_names = _names(layers, L, "layers", "layers (second dimension)")
    if steps is None:
        step_arr = np.arange(S, dtype=np.int64)
    else:
        raw = np.asarray(steps)
        if raw.shape != (S,) or (raw.size and not np.issubdtype(raw.dtype, np.integer)):
            raise GradlensError(
                f"`steps` should hold {S} integers (one per entry of `grams`' first dimension); "
                f"found shape {raw.shape} and dtype {raw.dtype}."
            )
        step_arr = raw.astype(np.int64)
    w = None
    if weights is not None:
        w = _as_float_array(weights, "weights")
        if w.shape not in ((S, T), (T,)):
            raise GradlensError(
                f"`weights` should have shape ({S}, {T}) (steps x tasks) or ({T},); "
                f"found shape {tuple(w.shape)}."
            )
        w = w[:, None, :] if w.ndim == 2 else w

    iu, ju = np.triu_indices(T, k=1)
    cos = _cosine(g)
    n = _norms(g)
    blocks = [cos[..., iu, ju], _conflict(cos)[..., iu, ju], _gms(g)[..., iu, ju], n]
    pair_i = [task_names[i] for i in iu]
    pair_j = [task_names[j] for j in ju]
    metric = ["cosine"] * len(iu) + ["conflict"] * len(iu) + ["gms"] * len(iu) + ["norm"] * T
    task_i = pair_i * 3 + task_names
    task_j = pair_j * 3 + [""] * T
    if w is not None:
        blocks.append(_cos_to_update(g, w))
        metric += ["cos_to_update"] * T
        task_i += task_names
        task_j += [""] * T
    blocks += [_norm_ratio(n)[..., None], _norm_cv(n)[..., None]]
    metric += ["norm_ratio", "norm_cv"]
    task_i += ["", ""]
    task_j += ["", ""]
    M = len(metric)
    values = np.concatenate(blocks, axis=-1).reshape(-1)
    layer_pattern = [name for name in layer_names for _ in range(M)]
    return pd.DataFrame(
        {
            "step": np.repeat(step_arr, L * M),
            "layer": _tiled_strings(layer_pattern, S),
            "metric": _tiled_strings(metric * L, S),
            "task_i": _tiled_strings(task_i * L, S),
            "task_j": _tiled_strings(task_j * L, S),
            "value": values,
        },
        columns=list(_FRAME_COLUMNS),
        copy=False,
    )


# --------------------------------------------------------------------------- streaming summary


class StreamingSummary:
    """Running per-layer, per-pair statistics of the cosine, without keeping the steps.

    For each layer and each pair of tasks ``i < j`` it accumulates, over the probed steps given to
    :meth:`update`: the number of steps where the cosine is defined (``count``) and where it is not
    (``undefined``: a zero-gradient task), the sum of cosines (for the ``mean``), the number of
    conflicts (``cos < 0``; ``conflict_freq = conflicts / count``), a histogram of the cosine over
    ``[-1, 1]`` in ``bins`` equal bins (for the quantiles 5/25/50/75/95 %), and exponential moving
    averages of the cosine and of the conflict indicator.

    Quantiles interpolate linearly inside the histogram bin where the cumulative count reaches
    ``q * count``; that bin also holds the exact sample quantile (``numpy.quantile`` with
    ``method="inverted_cdf"``), so the error is below one bin width, ``2 / bins`` (0.005 by
    default).
    Memory is ``layers * T(T-1)/2 * bins`` int64 counters.

    Moving averages are time-weighted over steps: with ``beta = 2 ** (-1 / halflife)``,
    ``ema = sum_k beta^(last - step_k) c_k / sum_k beta^(last - step_k)`` over the observations
    ``k`` where the cosine ``c_k`` is defined, ``last`` being the latest step seen. Merging two
    summaries decays both to the later ``last`` and adds, which is the same formula over the union
    of their observations: for DDP ranks probed at the same steps it is the moving average of the
    ranks' mean cosine; for runs that follow each other it continues the average.

    :meth:`merge` is exact, associative and order-free for ``count``, ``undefined``, the conflicts
    and the histogram (integers); ``mean`` and the moving averages are sums of floats, equal up to
    rounding (about 1e-15 relative).

    Args:
        tasks: the ``T`` task names, in the order of the Gram's rows.
        layers: layer names; then :meth:`update` takes ``(L, T, T)``. ``None`` means one layer,
            named ``gradlens.TOTAL_LAYER``, and :meth:`update` takes ``(T, T)``.
        bins: number of histogram bins over ``[-1, 1]``.
        halflife: half-life of the moving averages, in steps.

    Example:
        >>> import numpy as np
        >>> rank0, rank1 = StreamingSummary(["a", "b"]), StreamingSummary(["a", "b"])
        >>> rank0.update(np.array([[1.0, -0.5], [-0.5, 1.0]]), step=0)
        >>> rank1.update(np.array([[1.0, 0.5], [0.5, 1.0]]), step=0)
        >>> both = rank0.merge(rank1)
        >>> table = both.result()[["count", "mean", "q50", "conflict_freq", "ema"]]
        >>> print(table.to_string(index=False))
         count  mean    q50  conflict_freq  ema
             2   0.0 -0.495            0.5  0.0
    """

    _FORMAT = "gradlens.StreamingSummary"
    _VERSION = 1

    def __init__(
        self,
        tasks: Sequence[str],
        layers: Sequence[str] | None = None,
        *,
        bins: int = 400,
        halflife: float = 100.0,
    ) -> None:
        task_names = tuple(str(t) for t in tasks)
        if len(task_names) == 0 or len(set(task_names)) != len(task_names):
            raise GradlensError(
                f"`tasks` should be a non-empty sequence of distinct names; found {list(tasks)}."
            )
        if layers is None:
            from gradlens._types import TOTAL_LAYER

            layer_names: tuple[str, ...] = (TOTAL_LAYER,)
            self._layered = False
        else:
            layer_names = tuple(str(x) for x in layers)
            if len(layer_names) == 0 or len(set(layer_names)) != len(layer_names):
                raise GradlensError(
                    "`layers` should be a non-empty sequence of distinct names or None; "
                    f"found {list(layers)}."
                )
            self._layered = True
        if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
            raise GradlensError(f"`bins` should be an integer >= 2; found {bins!r}.")
        if not (isinstance(halflife, (int, float)) and math.isfinite(halflife) and halflife > 0):
            raise GradlensError(
                f"`halflife` should be a positive finite number; found {halflife!r}."
            )
        self.tasks = task_names
        self.layers = layer_names
        self.bins = int(bins)
        self.halflife = float(halflife)
        T, L = len(task_names), len(layer_names)
        self._iu, self._ju = np.triu_indices(T, k=1)
        P = len(self._iu)
        self._last: int | None = None
        self._count = np.zeros((L, P), dtype=np.int64)
        self._undefined = np.zeros((L, P), dtype=np.int64)
        self._conflicts = np.zeros((L, P), dtype=np.int64)
        self._sum = np.zeros((L, P), dtype=np.float64)
        self._hist = np.zeros((L, P, self.bins), dtype=np.int64)
        self._ema_num = np.zeros((L, P), dtype=np.float64)
        self._ema_conf = np.zeros((L, P), dtype=np.float64)
        self._ema_den = np.zeros((L, P), dtype=np.float64)

    # ------------------------------------------------------------------ accumulation
    @property
    def last_step(self) -> int | None:
        """The latest step seen (``None`` before the first update)."""
        return self._last

    def _beta(self) -> float:
        return 2.0 ** (-1.0 / self.halflife)

    def update(self, G: Any, step: int | None = None) -> None:
        """Add one probed step.

        Args:
            G: the step's Gram, ``(T, T)``, or ``(L, T, T)`` with one Gram per layer when the
                summary was built with ``layers`` (``(T, T)`` is also accepted when ``L == 1``).
            step: the training step; ``None`` means the previous step plus one (0 at first).
                Steps given to one summary must not decrease.

        Example:
            >>> import numpy as np
            >>> s = StreamingSummary(["a", "b"], layers=["l1", "l2"])
            >>> s.update(np.stack([np.eye(2), np.ones((2, 2))]))
            >>> s.result()["mean"].tolist()
            [0.0, 1.0]
        """
        g, _ = _gram(G)
        T, L = len(self.tasks), len(self.layers)
        found = tuple(g.shape)
        if g.ndim == 2 and L == 1:
            g = g[None]
        if g.shape != (L, T, T):
            want = f"({L}, {T}, {T})" if self._layered else f"({T}, {T})"
            raise GradlensError(
                f"`G` should have shape {want} for tasks {list(self.tasks)}"
                + (f" and layers {list(self.layers)}" if self._layered else "")
                + f"; found shape {found}."
            )
        if step is None:
            s = 0 if self._last is None else self._last + 1
        else:
            try:
                s = operator.index(step)
            except TypeError:
                raise GradlensError(
                    f"`step` should be an integer or None; found {step!r}."
                ) from None
            if self._last is not None and s < self._last:
                raise GradlensError(
                    f"`step` should not decrease within one summary; found {s} after {self._last}."
                )
        c = _cosine(g)[:, self._iu, self._ju]
        ok = ~np.isnan(c)
        cz = np.where(ok, c, 0.0)
        neg = ok & (c < 0)
        self._count += ok
        self._undefined += ~ok
        self._conflicts += neg
        self._sum += cz
        idx = self._bin_index(cz)
        lp = np.nonzero(ok)
        np.add.at(self._hist, (*lp, idx[lp]), 1)
        decay = 1.0 if self._last is None else self._beta() ** (s - self._last)
        self._ema_num = self._ema_num * decay + cz
        self._ema_conf = self._ema_conf * decay + neg
        self._ema_den = self._ema_den * decay + ok
        self._last = s

    def _bin_index(self, c: np.ndarray) -> np.ndarray:
        return np.clip(np.floor((c + 1.0) * (self.bins / 2.0)), 0, self.bins - 1).astype(np.int64)

    # ------------------------------------------------------------------ merging
    def _check_compatible(self, other: StreamingSummary) -> None:
        if not isinstance(other, StreamingSummary):
            raise GradlensError(
                f"`other` should be a StreamingSummary; found {type(other).__name__}."
            )
        mine = (self.tasks, self.layers, self.bins, self.halflife)
        theirs = (other.tasks, other.layers, other.bins, other.halflife)
        if mine != theirs:
            raise GradlensError(
                "`other` should have the same (tasks, layers, bins, halflife) as this summary; "
                f"expected {mine}, found {theirs}."
            )

    def merge(self, other: StreamingSummary) -> StreamingSummary:
        """A new summary holding the observations of both (neither input is changed).

        Counts, conflicts and histograms add; the moving averages are decayed to the later of
        the two last steps and added (see the class docstring).

        Args:
            other: a summary with the same tasks, layers, bins and half-life.

        Example:
            >>> import numpy as np
            >>> a, b = StreamingSummary(["x", "y"]), StreamingSummary(["x", "y"])
            >>> a.update(np.eye(2), step=0); b.update(np.ones((2, 2)), step=5)
            >>> print(a.merge(b).result()[["count", "mean", "ema"]].to_string(index=False))
             count  mean      ema
                 2   0.5 0.508663
        """
        self._check_compatible(other)
        out = self._empty_like()
        lasts = [x for x in (self._last, other._last) if x is not None]
        out._last = max(lasts) if lasts else None
        beta = self._beta()

        def decay(x: StreamingSummary) -> float:
            return 1.0 if x._last is None else beta ** (out._last - x._last)  # type: ignore[operator]

        da, db = decay(self), decay(other)
        out._count = self._count + other._count
        out._undefined = self._undefined + other._undefined
        out._conflicts = self._conflicts + other._conflicts
        out._sum = self._sum + other._sum
        out._hist = self._hist + other._hist
        out._ema_num = self._ema_num * da + other._ema_num * db
        out._ema_conf = self._ema_conf * da + other._ema_conf * db
        out._ema_den = self._ema_den * da + other._ema_den * db
        return out

    def _empty_like(self) -> StreamingSummary:
        return StreamingSummary(
            self.tasks,
            self.layers if self._layered else None,
            bins=self.bins,
            halflife=self.halflife,
        )

    # ------------------------------------------------------------------ results
    def _quantiles(self) -> np.ndarray:
        """Histogram quantiles, shape (L, P, len(QUANTILES)); NaN where nothing was counted."""
        cum = np.cumsum(self._hist, axis=-1)
        n = cum[..., -1]
        width = 2.0 / self.bins
        out = np.full((*n.shape, len(QUANTILES)), np.nan)
        for qi, q in enumerate(QUANTILES):
            r = q * n
            k = np.argmax(cum >= r[..., None], axis=-1)
            h = np.take_along_axis(self._hist, k[..., None], axis=-1)[..., 0]
            below = np.take_along_axis(cum, k[..., None], axis=-1)[..., 0] - h
            with np.errstate(divide="ignore", invalid="ignore"):
                frac = np.where(h > 0, (r - below) / h, 0.0)
            out[..., qi] = np.where(n > 0, -1.0 + (k + frac) * width, np.nan)
        return out

    def result(self) -> pd.DataFrame:
        """Per layer and pair: ``layer, task_i, task_j, count, undefined, mean, q05, q25, q50,
        q75, q95, conflict_freq, ema, ema_conflict``.

        ``count`` counts the steps with a defined cosine, ``undefined`` those without (a
        zero-gradient task); statistics over no defined step are NaN.

        Example:
            >>> import numpy as np
            >>> s = StreamingSummary(["a", "b"])
            >>> for k, c in enumerate([-0.5, 0.25, 0.5]):
            ...     s.update(np.array([[1.0, c], [c, 1.0]]), step=k)
            >>> round(s.result()["mean"].item(), 6), round(s.result()["conflict_freq"].item(), 6)
            (0.083333, 0.333333)
        """
        import pandas as pd

        L, P = self._count.shape
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(self._count > 0, self._sum / self._count, np.nan)
            freq = np.where(self._count > 0, self._conflicts / self._count, np.nan)
            ema = np.where(self._ema_den > 0, self._ema_num / self._ema_den, np.nan)
            ema_conf = np.where(self._ema_den > 0, self._ema_conf / self._ema_den, np.nan)
        quant = self._quantiles()
        columns: dict[str, Any] = {
            "layer": pd.Series(np.repeat(np.array(self.layers, dtype=object), P), dtype="str"),
            "task_i": pd.Series([self.tasks[i] for i in self._iu] * L, dtype="str"),
            "task_j": pd.Series([self.tasks[j] for j in self._ju] * L, dtype="str"),
            "count": self._count.reshape(-1),
            "undefined": self._undefined.reshape(-1),
            "mean": mean.reshape(-1),
        }
        for qi, q in enumerate(QUANTILES):
            columns[f"q{round(q * 100):02d}"] = quant[..., qi].reshape(-1)
        columns["conflict_freq"] = freq.reshape(-1)
        columns["ema"] = ema.reshape(-1)
        columns["ema_conflict"] = ema_conf.reshape(-1)
        return pd.DataFrame(columns)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (plain lists, ints and floats); the histogram is sparse.

        Example:
            >>> import json, numpy as np
            >>> s = StreamingSummary(["a", "b"]); s.update(np.eye(2), step=3)
            >>> t = StreamingSummary.from_dict(json.loads(json.dumps(s.to_dict())))
            >>> t.last_step, t.result()["count"].item()
            (3, 1)
        """
        flat = self._hist.reshape(-1)
        nz = np.flatnonzero(flat)
        return {
            "format": self._FORMAT,
            "version": self._VERSION,
            "tasks": list(self.tasks),
            "layers": list(self.layers) if self._layered else None,
            "bins": self.bins,
            "halflife": self.halflife,
            "last_step": self._last,
            "count": self._count.tolist(),
            "undefined": self._undefined.tolist(),
            "conflicts": self._conflicts.tolist(),
            "sum": self._sum.tolist(),
            "ema_num": self._ema_num.tolist(),
            "ema_conflict": self._ema_conf.tolist(),
            "ema_den": self._ema_den.tolist(),
            "hist_index": nz.tolist(),
            "hist_count": flat[nz].tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StreamingSummary:
        """Rebuild a summary from :meth:`to_dict`'s output.

        Args:
            data: the dict written by :meth:`to_dict` (possibly through JSON).
        """
        if not isinstance(data, Mapping) or data.get("format") != cls._FORMAT:
            raise GradlensError(
                f"`data` should be a dict written by StreamingSummary.to_dict (format "
                f"{cls._FORMAT!r}); found {type(data).__name__} with format "
                f"{data.get('format') if isinstance(data, Mapping) else None!r}."
            )
        if data.get("version") != cls._VERSION:
            raise GradlensError(
                f"`data` should have version {cls._VERSION}; found {data.get('version')!r}."
            )
        try:
            out = cls(data["tasks"], data["layers"], bins=data["bins"], halflife=data["halflife"])
            shape = out._count.shape
            out._last = None if data["last_step"] is None else int(data["last_step"])
            for attr, key, dtype in (
                ("_count", "count", np.int64),
                ("_undefined", "undefined", np.int64),
                ("_conflicts", "conflicts", np.int64),
                ("_sum", "sum", np.float64),
                ("_ema_num", "ema_num", np.float64),
                ("_ema_conf", "ema_conflict", np.float64),
                ("_ema_den", "ema_den", np.float64),
            ):
                arr = np.asarray(data[key], dtype=dtype).reshape(shape)
                setattr(out, attr, arr)
            flat = out._hist.reshape(-1)
            flat[np.asarray(data["hist_index"], dtype=np.int64)] = np.asarray(
                data["hist_count"], dtype=np.int64
            )
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise GradlensError(
                f"`data` should be a complete StreamingSummary.to_dict output; "
                f"reading it failed with {type(exc).__name__}: {exc}."
            ) from None
        return out
