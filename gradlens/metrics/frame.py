"""Tidy (long-format) tables of the metrics: :func:`metrics_frame`, with its string columns built
as tiled pyarrow buffers (a frame of millions of rows is built without a Python loop per row).

Example:
    >>> import numpy as np
    >>> metrics_frame(np.eye(2)[None, None], ["a", "b"]).shape   # 3 pair, 2 task, 2 step rows
    (7, 6)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gradlens._errors import GradlensError
from gradlens.metrics import _kernels as _k

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["metrics_frame"]

_FRAME_COLUMNS = ("step", "layer", "metric", "task_i", "task_j", "value")


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

    g = _k.as_gram(grams, "grams")
    if g.ndim != 4:
        raise GradlensError(
            "`grams` should have shape (S, L, T, T) (steps x layers x tasks x tasks; use "
            f"`grams[:, None]` for a single layer); found shape {tuple(g.shape)}."
        )
    S, L, T, _ = g.shape
    task_names = _names(tasks, T, "tasks", "tasks (its last two dimensions)")
    layer_names = _names(layers, L, "layers", "layers (second dimension)")
    step_arr = _steps(steps, S)
    w = None if weights is None else _weights(weights, S, T)
    values, metric, task_i, task_j = _blocks(g, task_names, w)
    M = len(metric)
    layer_pattern = [name for name in layer_names for _ in range(M)]
    return pd.DataFrame(
        {
            "step": np.repeat(step_arr, L * M),
            "layer": _tiled_strings(layer_pattern, S),
            "metric": _tiled_strings(metric * L, S),
            "task_i": _tiled_strings(task_i * L, S),
            "task_j": _tiled_strings(task_j * L, S),
            "value": values.reshape(-1),
        },
        columns=list(_FRAME_COLUMNS),
        copy=False,
    )


def _steps(steps: Sequence[int] | np.ndarray | None, S: int) -> np.ndarray:
    if steps is None:
        return np.arange(S, dtype=np.int64)
    raw = np.asarray(steps)
    if raw.shape != (S,) or (raw.size and not np.issubdtype(raw.dtype, np.integer)):
        raise GradlensError(
            f"`steps` should hold {S} integers (one per entry of `grams`' first dimension); "
            f"found shape {raw.shape} and dtype {raw.dtype}."
        )
    return raw.astype(np.int64)


def _weights(weights: Any, S: int, T: int) -> np.ndarray:
    """The weights as ``(S, 1, T)`` (per step) or ``(T,)``, broadcasting over the layers."""
    w = _k.as_float_array(weights, "weights")
    if w.shape not in ((S, T), (T,)):
        raise GradlensError(
            f"`weights` should have shape ({S}, {T}) (steps x tasks) or ({T},); "
            f"found shape {tuple(w.shape)}."
        )
    return w[:, None, :] if w.ndim == 2 else w


def _blocks(
    g: np.ndarray, tasks: list[str], w: np.ndarray | None
) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    """Values ``(S, L, M)`` of the ``M`` metric rows of each step and layer, and their labels
    (metric, task_i, task_j), in the frame's row order."""
    T = len(tasks)
    iu, ju = np.triu_indices(T, k=1)
    cos = _k.cosine(g)
    n = _k.norms(g)
    blocks = [cos[..., iu, ju], _k.conflict(cos)[..., iu, ju], _k.gms(g)[..., iu, ju], n]
    pair_i = [tasks[i] for i in iu]
    pair_j = [tasks[j] for j in ju]
    metric = ["cosine"] * len(iu) + ["conflict"] * len(iu) + ["gms"] * len(iu) + ["norm"] * T
    task_i = pair_i * 3 + tasks
    task_j = pair_j * 3 + [""] * T
    if w is not None:
        blocks.append(_k.cos_to_update(g, w))
        metric += ["cos_to_update"] * T
        task_i += tasks
        task_j += [""] * T
    blocks += [_k.norm_ratio(n)[..., None], _k.norm_cv(n)[..., None]]
    metric += ["norm_ratio", "norm_cv"]
    task_i += ["", ""]
    task_j += ["", ""]
    return np.concatenate(blocks, axis=-1), metric, task_i, task_j
