"""Across-run statistics: does interference move with the loss weights, and predict accuracy?

Tables in, tables out. :func:`runs_table` turns runs (``gradlens.store.Run`` objects, or a sweep
directory) into one row per run: configuration, interference summaries and final accuracies.
:func:`associations` then tests weight -> interference, interference -> accuracy and
weight -> accuracy with Spearman, Pearson and Kendall correlations, bootstrap intervals,
permutation p-values, partial correlations controlling for model size, strata by model size, and a
Holm or Benjamini-Hochberg correction named in its output. :func:`within_run` correlates per-epoch
interference with the validation metric with a block bootstrap; :func:`optimal_weight`,
:func:`optimal_weight_trend` and :func:`joint_gain` answer the weight-sweep questions;
:func:`paired_gain` adds the test-set sampling variance (:func:`binomial_sd`,
:func:`gain_test_var`) to a seed-paired gain.
Everything is a tidy :class:`pandas.DataFrame` or a flat dict, and :func:`to_json` writes any of
them as strict JSON (NaN -> null). Methods, their assumptions and the measured calibration are in
``docs/stats.md``.

The resampling kernels are vectorised numpy (``gradlens.stats._core``); scipy (the ``stats``
extra) is needed only for t and normal quantiles. The tests check every statistic against scipy.

Modules (this package re-exports their public functions): ``correlation`` (correlate,
partial_correlation, adjust), ``across`` (associations), ``within`` (within_run), ``tables``
(runs_table, run_summary, epoch_table, to_json), ``weights`` (optimal_weight,
optimal_weight_trend, joint_gain); private helpers ``_args`` (argument checks), ``_core``
(resampling kernels), ``_gain`` (gain intervals and seed resampling), ``_meta``
(pool_correlations), ``_power`` (power, min_detectable_effect), ``_select`` (selected_gain);
``calibration`` runs the calibration simulations.

Example:
    >>> import numpy as np
    >>> from gradlens import stats
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=40); y = x + rng.normal(size=40)
    >>> res = stats.correlate(x, y, method="spearman", n_boot=500, n_perm=500)
    >>> res["ci_low"] < res["estimate"] < res["ci_high"], res["p_value"] < 0.05
    (True, True)
    >>> stats.adjust([0.01, 0.04, 0.03], method="holm").round(2).tolist()
    [0.03, 0.06, 0.06]
"""

from __future__ import annotations

from gradlens.stats._gain import (
    binomial_sd,
    equivalence_p,
    gain_test_var,
    paired_gain,
    paired_t,
    welch_t,
)
from gradlens.stats._meta import pool_correlations
from gradlens.stats._power import min_detectable_effect, power
from gradlens.stats._select import selected_gain
from gradlens.stats.across import associations
from gradlens.stats.correlation import adjust, correlate, partial_correlation
from gradlens.stats.tables import epoch_table, run_summary, runs_table, to_json
from gradlens.stats.weights import joint_gain, optimal_weight, optimal_weight_trend
from gradlens.stats.within import within_run

__all__ = [
    "adjust",
    "associations",
    "binomial_sd",
    "correlate",
    "epoch_table",
    "equivalence_p",
    "gain_test_var",
    "joint_gain",
    "min_detectable_effect",
    "optimal_weight",
    "optimal_weight_trend",
    "paired_gain",
    "paired_t",
    "partial_correlation",
    "pool_correlations",
    "power",
    "run_summary",
    "runs_table",
    "selected_gain",
    "to_json",
    "welch_t",
    "within_run",
]
