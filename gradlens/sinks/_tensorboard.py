"""The TensorBoard sink (``tensorboard`` extra)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from gradlens import metrics
from gradlens._errors import GradlensError, require
from gradlens.snapshot import Snapshot

__all__ = ["TensorBoardSink"]


def _mean(values: np.ndarray) -> float:
    ok = values[~np.isnan(values)]
    return float(ok.mean()) if ok.size else float("nan")


class TensorBoardSink:
    """Log gradient interference to TensorBoard, beside the loss curves already there.

    Per probed step (``global_step`` = the snapshot's step), from the total Gram of the shared
    parameters:

    - ``gradlens/mean_cosine``: mean cosine over the task pairs ``i < j``;
    - ``gradlens/conflict_frequency``: fraction of those pairs whose cosine is negative;
    - ``gradlens/norm_ratio``: largest over smallest task gradient norm;
    - ``gradlens/cosine/<task_i>|<task_j>``: each pair's cosine, when there are at most
      ``pair_limit`` tasks.

    Pairs involving a task with a zero gradient (undefined cosine) are left out of the mean and
    the frequency (NaN if no pair is left); the norm ratio is then NaN, as in
    :mod:`gradlens.metrics`. Pointing ``log_dir`` at the training's own TensorBoard directory puts
    these curves in the same run as the losses. Needs the ``tensorboard`` extra.

    Args:
        log_dir: TensorBoard log directory (created if missing).
        pair_limit: Log per-pair cosines only for at most this many tasks.

    Example:
        >>> import tempfile, torch
        >>> from gradlens import Snapshot
        >>> sink = TensorBoardSink(tempfile.mkdtemp())
        >>> g = torch.tensor([[4.0, -2.0], [-2.0, 1.0]], dtype=torch.float64)
        >>> sink.add_snapshot(Snapshot(0, ("a", "b"), g, {}, torch.ones(2)))
        >>> sink.last
        {'gradlens/mean_cosine': -1.0, 'gradlens/conflict_frequency': 1.0, \
'gradlens/norm_ratio': 2.0, 'gradlens/cosine/a|b': -1.0}
        >>> sink.close()
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, pair_limit: int = 10) -> None:
        if isinstance(pair_limit, bool) or not isinstance(pair_limit, int) or pair_limit < 0:
            raise GradlensError(f"`pair_limit` should be a non-negative int; found {pair_limit!r}.")
        require("tensorboard", "tensorboard", "TensorBoardSink")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = os.fspath(log_dir)
        self.pair_limit = pair_limit
        self._writer: Any = SummaryWriter(log_dir=self.log_dir)
        #: The scalars logged for the latest snapshot, by tag.
        self.last: dict[str, float] = {}

    def add_snapshot(self, snap: Snapshot) -> None:
        """Log the interference scalars of one probed step."""
        if self._writer is None:
            raise GradlensError(f"Cannot log to {self.log_dir}: the TensorBoardSink is closed.")
        g = snap.gram.detach().cpu().double().numpy()
        n = len(snap.tasks)
        iu, ju = np.triu_indices(n, k=1)
        pair_cos = metrics.cosine(g)[iu, ju]
        pair_conflict = metrics.conflict(g)[iu, ju]
        out: dict[str, float] = {}
        if n > 1:
            out["gradlens/mean_cosine"] = _mean(pair_cos)
            out["gradlens/conflict_frequency"] = _mean(pair_conflict)
        out["gradlens/norm_ratio"] = float(metrics.norm_ratio(g))
        if n <= self.pair_limit:
            for i, j, c in zip(iu, ju, pair_cos):
                out[f"gradlens/cosine/{snap.tasks[i]}|{snap.tasks[j]}"] = float(c)
        step = int(snap.step)
        for tag, value in out.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self.last = out

    def flush(self) -> None:
        """Write pending events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; idempotent."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def __enter__(self) -> TensorBoardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorBoardSink({self.log_dir!r}, pair_limit={self.pair_limit})"
