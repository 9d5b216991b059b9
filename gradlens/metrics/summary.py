"""The :class:`StreamingSummary`: running per-layer, per-pair cosine statistics that merge across
ranks and runs, and its JSON serialisation.

Example:
    >>> import numpy as np
    >>> s = StreamingSummary(["a", "b"]); s.update(np.eye(2), step=0)
    >>> s.result()["count"].item()
    1
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gradlens._errors import GradlensError
from gradlens._types import TOTAL_LAYER
from gradlens._validate import check_int, check_number
from gradlens.metrics import _kernels as _k

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["QUANTILES", "StreamingSummary"]

#: Quantile levels reported by :meth:`StreamingSummary.result` (columns ``q05`` ... ``q95``).
QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)


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
        self.tasks = task_names
        self.layers = layer_names
        self.bins = int(check_int("bins", bins, minimum=2))
        self.halflife = check_number("halflife", halflife, low=0, strict_low=True)
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
        return float(2.0 ** (-1.0 / self.halflife))

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
        g = _k.as_gram(G)
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
        c = _k.cosine(g)[:, self._iu, self._ju]
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
            if x._last is None or out._last is None:
                return 1.0
            return beta ** (out._last - x._last)

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
