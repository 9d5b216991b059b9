"""Within one run: does per-epoch interference move with the validation metric?

:func:`within_run` correlates the per-epoch series of :func:`epoch_table` with a circular block
bootstrap and an AR(1) effective-sample-size t-test. Runs are pooled by
:func:`gradlens.stats.pool_correlations`. Re-exported by :mod:`gradlens.stats`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from gradlens._errors import require
from gradlens._types import TOTAL_LAYER
from gradlens.stats import _args
from gradlens.stats import _core as _core
from gradlens.stats._args import SeedLike
from gradlens.stats.correlation import correlate
from gradlens.stats.tables import epoch_table

if TYPE_CHECKING:
    from gradlens.store import Run

__all__ = ["within_run"]


def within_run(
    run: Run | Any,
    *,
    metric: str = "conflict",
    eval_metric: str = "accuracy",
    split: str = "val",
    layer: str = TOTAL_LAYER,
    task: str | None = None,
    entry: tuple[str, str] | None = None,
    method: Literal["pearson", "spearman"] = "pearson",
    block: int | Literal["auto"] = "auto",
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: SeedLike = 0,
) -> dict[str, Any]:
    """Correlation of per-epoch interference with the validation metric within one run.

    The per-epoch series come from :func:`epoch_table` (epochs without a probe are dropped).
    Training curves are autocorrelated, so neither runs nor epochs can be treated as independent:

    - ``ci_low``/``ci_high``: circular block bootstrap percentile interval (:func:`correlate` with
      ``block``); ``p_block`` its centred bootstrap p-value;
    - ``p_value``: t-test with the effective sample size of two AR(1) series,
      ``n_eff = n (1 - r_x r_y) / (1 + r_x r_y)`` (Bretherton et al. 1999; ``r_x``, ``r_y`` the
      lag-1 autocorrelations, of the ranks for Spearman), ``t = r sqrt((n_eff - 2) / (1 - r^2))``
      on ``n_eff - 2`` degrees of freedom; ``ci_low_neff``/``ci_high_neff`` the Fisher-z interval
      with ``n_eff``. On AR(1) data this test holds its level where the block bootstrap, at the
      few dozen epochs of a run, still undercovers (measured in ``docs/stats.md``).

    The paper reports Pearson ``r = 0.06`` for this statistic; hence the Pearson default.

    Args:
        run: A ``gradlens.store.Run``.
        metric: Interference metric.
        eval_metric: Validation metric.
        split: Split of the per-epoch evals.
        layer: Layer of the interference.
        task: Task of the score (``None``: mean over tasks).
        entry: One entry of the interference metric (see :func:`epoch_table`).
        method: ``"pearson"`` or ``"spearman"``.
        block: Block length or ``"auto"`` (``docs/stats.md``).
        n_boot: Bootstrap resamples.
        ci: Confidence level.
        seed: Seed or Generator.

    Returns:
        The keys of :func:`correlate` (``p_value`` as above), plus ``p_block``, ``n_eff``,
        ``autocorr_x``, ``autocorr_y``, ``ci_low_neff``, ``ci_high_neff``, ``metric``,
        ``eval_metric`` and ``split``.

    Example:
        >>> import numpy as np, pandas as pd, gradlens as gl
        >>> from types import SimpleNamespace
        >>> k = np.arange(1, 31)
        >>> m = pd.DataFrame({"step": k * 10, "layer": gl.TOTAL_LAYER, "metric": "cosine",
        ...                   "task_i": "a", "task_j": "b", "value": np.sin(k)})
        >>> ev = pd.DataFrame({"point": [f"epoch:{i}" for i in k], "epoch": pd.array(k, "Int64"),
        ...     "step": pd.array(k * 10, "Int64"), "split": "val", "task": "a",
        ...     "metric": "accuracy", "value": np.sin(k) + 0.1 * np.cos(3 * k)})
        >>> r = within_run(SimpleNamespace(metrics=m, evals=ev), metric="cosine", n_boot=500)
        >>> round(r["estimate"], 2), r["n"], r["p_value"] < 0.01
        (0.99, 30, True)
    """
    method = _args.choice(method, ("pearson", "spearman"), "method")
    level = _args.level(ci)
    table = epoch_table(
        run,
        metric=metric,
        eval_metric=eval_metric,
        split=split,
        layer=layer,
        task=task,
        entry=entry,
    )
    table = table[np.isfinite(table["interference"].to_numpy())]
    x = table["interference"].to_numpy(np.float64)
    y = table["score"].to_numpy(np.float64)
    res = correlate(x, y, method=method, n_boot=n_boot, n_perm=0, block=block, ci=level, seed=seed)
    extra: dict[str, Any] = {
        "p_block": res["p_value"],
        "n_eff": math.nan,
        "autocorr_x": math.nan,
        "autocorr_y": math.nan,
        "ci_low_neff": math.nan,
        "ci_high_neff": math.nan,
    }
    r = res["estimate"]
    if math.isfinite(r):
        if method == "spearman":
            ones = np.ones((1, x.size))
            x, y = _core.weighted_ranks(x, ones)[0], _core.weighted_ranks(y, ones)[0]
        p, neff = _neff_test(x, y, r, level)
        extra.update(neff)
        res["p_value"] = p
        res["p_method"] = "AR(1) effective-n t-test"
    return {**res, **extra, "metric": metric, "eval_metric": eval_metric, "split": split}


def _neff_test(
    x: np.ndarray, y: np.ndarray, r: float, level: float
) -> tuple[float, dict[str, Any]]:
    """The effective-n t-test of ``r`` and its Fisher-z interval (Bretherton et al. 1999)."""
    sp: Any = require("scipy.stats", "stats", "gradlens.stats.within_run")
    n_eff, ax, ay = _core.effective_n(x, y)
    rc = min(abs(r), 1.0 - 1e-15)
    t = rc * math.sqrt((n_eff - 2.0) / (1.0 - rc * rc)) if n_eff > 2 else 0.0
    p = float(2.0 * sp.t.sf(t, n_eff - 2.0)) if n_eff > 2 else 1.0
    half = float(sp.norm.ppf((1.0 + level) / 2.0)) / math.sqrt(max(n_eff - 3.0, 1e-12))
    z = math.atanh(max(min(r, 1.0 - 1e-15), -1.0 + 1e-15))
    return p, {
        "n_eff": n_eff,
        "autocorr_x": ax,
        "autocorr_y": ay,
        "ci_low_neff": math.tanh(z - half),
        "ci_high_neff": math.tanh(z + half),
    }
