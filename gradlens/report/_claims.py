"""Rules that sort a report's findings into tested, equivalent/inconclusive and descriptive.

Used by :mod:`gradlens.report`: what a family of permutation tests can reach at all, the share of
noise common to the seeds of a configuration, and the smallest effect each test detects with 80 %
power (:func:`gradlens.stats.min_detectable_effect`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["family_floor", "icc", "interval_verdict", "n_perm_for"]


def n_perm_for(n_tests: int, alpha: float, asked: int) -> int:
    """Permutations that put a Holm family's smallest adjusted p at ``alpha / 2`` at most:
    ``max(asked, ceil(2 n_tests / alpha))`` (with fewer, ``n_tests / (n_perm + 1)`` can stay
    above ``alpha`` whatever the data). ``asked = 0`` keeps the tests off.

    Example:
        >>> n_perm_for(132, 0.05, 2000)
        5280
    """
    if asked == 0:
        return 0
    return max(asked, math.ceil(2 * n_tests / alpha))


def family_floor(table: pd.DataFrame, correction: str, alpha: float) -> tuple[float, int]:
    """Smallest adjusted p-value the family in ``table`` can reach, and how many of its tests
    can never reach ``alpha`` on their own (``p_floor`` times the Holm multiplier of the first
    step, ``n_tests``; for BH or no correction the floor itself).

    Example:
        >>> t = pd.DataFrame({"p_value": [0.5, 0.2], "p_floor": [0.001, 0.01]})
        >>> family_floor(t, "holm", 0.015)
        (0.002, 1)
    """
    tested = table[np.isfinite(table["p_value"].to_numpy(np.float64))]
    if tested.empty:
        return math.nan, 0
    floors = tested["p_floor"].to_numpy(np.float64)
    m = len(tested) if correction == "holm" else 1
    per_test = np.minimum(1.0, m * floors)
    return float(np.nanmin(per_test)), int(np.count_nonzero(per_test >= alpha))


def icc(values: Any, groups: Any) -> float:
    """One-way ANOVA intraclass correlation of ``values`` within ``groups``, clipped to
    [0, 0.95] (NaN-free input; 0 when it cannot be estimated).

    Example:
        >>> icc([1.0, 1.1, 3.0, 3.1, 5.0, 5.2], [0, 0, 1, 1, 2, 2]) > 0.9
        True
    """
    frame = pd.DataFrame({"v": np.asarray(values, np.float64), "g": np.asarray(groups)}).dropna()
    sizes = frame.groupby("g")["v"].size()
    k, n = len(sizes), len(frame)
    if k < 2 or n <= k:
        return 0.0
    grand = frame["v"].mean()
    means = frame.groupby("g")["v"].transform("mean")
    msb = float(((frame.groupby("g")["v"].mean() - grand) ** 2 * sizes).sum()) / (k - 1)
    msw = float(((frame["v"] - means) ** 2).sum()) / (n - k)
    m0 = (n - float((sizes**2).sum()) / n) / (k - 1)
    denom = msb + (m0 - 1) * msw
    if not denom > 0:
        return 0.0
    return float(min(max((msb - msw) / denom, 0.0), 0.95))


def interval_verdict(lo: float, hi: float, margin: float) -> str:
    """``"equivalent"`` when ``[lo, hi]`` lies inside ``(-margin, margin)``, else
    ``"inconclusive"`` (also for a missing interval).

    Example:
        >>> interval_verdict(-0.05, 0.08, 0.1), interval_verdict(-0.05, 0.3, 0.1)
        ('equivalent', 'inconclusive')
    """
    if math.isfinite(lo) and math.isfinite(hi) and -margin < lo and hi < margin:
        return "equivalent"
    return "inconclusive"
