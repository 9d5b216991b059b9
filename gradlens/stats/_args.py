"""Argument checks of :mod:`gradlens.stats`, on top of :mod:`gradlens._validate` (one template).

The generic checks (a choice, a count, a level in (0, 1)) are ``_validate``'s; this module adds
what only the statistics take: a seed or ``numpy.random.Generator``, a 1-D numeric vector and
the columns of a table.

Example:
    >>> from gradlens.stats import _args
    >>> _args.count(3, "n_boot"), _args.level(0.9)
    (3, 0.9)
    >>> _args.level(1.0)
    Traceback (most recent call last):
    ...
    gradlens._errors.GradlensError: `ci` should be a confidence level in (0, 1); found 1.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from gradlens._validate import check_choice, check_int, check_number, fail

SeedLike = int | np.random.Generator | None


def choice(value: Any, allowed: Sequence[str], name: str) -> Any:
    """``value`` if it is one of ``allowed`` (``Any``: callers keep their own ``Literal`` type)."""
    return check_choice(name, value, allowed)


def count(value: Any, name: str, minimum: int = 0) -> int:
    """``value`` as an ``int >= minimum`` (numpy integers accepted, ``bool`` refused)."""
    out: int = check_int(name, value, minimum=minimum)
    return out


def level(ci: Any) -> float:
    """A confidence level in the open interval (0, 1)."""
    if isinstance(ci, (int, float)) and not isinstance(ci, bool) and 0.0 < float(ci) < 1.0:
        return check_number("ci", ci, low=0.0, high=1.0, strict_low=True, strict_high=True)
    fail("ci", "a confidence level in (0, 1)", repr(ci))


def rng(seed: SeedLike) -> np.random.Generator:
    """A numpy Generator from a seed, a Generator (returned as it is) or None."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)):
        return np.random.default_rng(seed)
    fail("seed", "an int, a numpy Generator or None", repr(seed))


def vector(values: Any, name: str) -> np.ndarray:
    """``values`` as a 1-D float64 array of finite numbers or NaN."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        fail(name, "a 1-D sequence of numbers", type(values).__name__)
    if arr.ndim != 1:
        fail(name, "1-D", f"shape {arr.shape}")
    if np.isinf(arr).any():
        fail(name, "finite numbers or NaN", "an infinity")
    return arr


def columns(table: pd.DataFrame, cols: Sequence[str] | str, name: str) -> list[str]:
    """``cols`` (one name or several) as a list, each a column of ``table``."""
    out = [cols] if isinstance(cols, str) else list(cols)
    missing = [c for c in out if c not in table.columns]
    if missing:
        fail(
            name,
            "columns of the table",
            f"{missing}, which are not among {list(table.columns)}",
        )
    return out


def frame(table: Any, name: str = "table") -> pd.DataFrame:
    """``table`` if it is a DataFrame."""
    if not isinstance(table, pd.DataFrame):
        fail(name, "a pandas DataFrame (e.g. from runs_table)", type(table).__name__)
    return table
