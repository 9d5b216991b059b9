"""Argument checks shared across gradlens: each raises :class:`GradlensError` (or the error type
given) built from one template, ``"`{name}` should be {expected}; found {found}."``, and returns
the checked value in its canonical type.

Example:
    >>> from gradlens._validate import check_int, check_tasks
    >>> check_int("epochs", 3, minimum=1)
    3
    >>> check_tasks(["a", "b"])
    ('a', 'b')
    >>> check_int("epochs", 0, minimum=1)
    Traceback (most recent call last):
    ...
    gradlens._errors.GradlensError: `epochs` should be an int >= 1; found 0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, NoReturn

from gradlens._errors import GradlensError

__all__ = [
    "check_choice",
    "check_int",
    "check_number",
    "check_tasks",
    "check_type",
    "fail",
]


def fail(
    name: str, expected: str, found: object, error: type[Exception] = GradlensError
) -> NoReturn:
    """Raise ``error`` with the house message: what ``name`` should be and what was found.

    ``found`` is shown with ``repr`` unless it is already a string describing it (a ``str``
    is shown as it is, so callers may pass e.g. ``type(x).__name__``).

    >>> fail("workers", "a positive int or None", "'2'")
    Traceback (most recent call last):
    ...
    gradlens._errors.GradlensError: `workers` should be a positive int or None; found '2'.
    """
    shown = found if isinstance(found, str) else repr(found)
    raise error(f"`{name}` should be {expected}; found {shown}.")


def check_int(
    name: str,
    value: object,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    none_ok: bool = False,
    error: type[Exception] = GradlensError,
) -> Any:
    """``value`` as an ``int`` (numpy integers accepted, ``bool`` refused) within the bounds.

    Returns ``None`` for ``None`` when ``none_ok``.

    >>> check_int("k", None, none_ok=True) is None
    True
    """
    if value is None and none_ok:
        return None
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
        _int_fail(name, value, minimum, maximum, none_ok, error)
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        _int_fail(name, value, minimum, maximum, none_ok, error)
    return v


def _int_fail(
    name: str,
    value: object,
    minimum: int | None,
    maximum: int | None,
    none_ok: bool,
    error: type[Exception],
) -> NoReturn:
    bounds = [
        f">= {minimum}" if minimum is not None else "",
        f"<= {maximum}" if maximum is not None else "",
    ]
    expected = ("an int " + " and ".join(b for b in bounds if b)).rstrip()
    fail(name, expected + (" or None" if none_ok else ""), repr(value), error)


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    strict_low: bool = False,
    strict_high: bool = False,
    error: type[Exception] = GradlensError,
) -> float:
    """``value`` as a finite ``float`` (``bool`` refused) within ``[low, high]``; ``strict_low``
    and ``strict_high`` make that bound exclusive.

    >>> check_number("p", 0.5, low=0, high=1)
    0.5
    >>> check_number("lr", 0, low=0, strict_low=True)
    Traceback (most recent call last):
    ...
    gradlens._errors.GradlensError: `lr` should be a finite number > 0; found 0.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    v = float(value) if ok else math.nan  # type: ignore[arg-type]  # a Real, checked above
    ok = ok and math.isfinite(v)
    if ok and low is not None:
        ok = v > low if strict_low else v >= low
    if ok and high is not None:
        ok = v < high if strict_high else v <= high
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'>' if strict_low else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if strict_high else '<='} {high:g}")
        fail(name, ("a finite number " + " and ".join(parts)).rstrip(), repr(value), error)
    return v


def check_choice(
    name: str, value: object, valid: Iterable[object], error: type[Exception] = GradlensError
) -> Any:
    """``value`` if it is one of ``valid``.

    >>> check_choice("engine", "loop", ("loop", "gramian"))
    'loop'
    """
    options = list(valid)
    if value not in options:
        fail(name, f"one of {options}", repr(value), error)
    return value


def check_type(
    name: str,
    value: object,
    kind: type | tuple[type, ...],
    what: str,
    error: type[Exception] = GradlensError,
) -> Any:
    """``value`` if it is an instance of ``kind`` (described to the user as ``what``).

    >>> check_type("config", {}, dict, "a dict")
    {}
    """
    if not isinstance(value, kind):
        fail(name, what, type(value).__name__, error)
    return value


def check_tasks(
    tasks: object, name: str = "tasks", error: type[Exception] = GradlensError
) -> tuple[str, ...]:
    """A non-empty sequence of distinct, non-empty task names, as a tuple.

    >>> check_tasks("ab")
    Traceback (most recent call last):
    ...
    gradlens._errors.GradlensError: `tasks` should be a sequence of task names; found str.
    """
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Iterable):
        fail(name, "a sequence of task names", type(tasks).__name__, error)
    out = tuple(tasks)
    if not out or not all(isinstance(t, str) and t for t in out):
        fail(name, "non-empty strings, at least one", repr(out), error)
    if len(set(out)) != len(out):
        dup = sorted({t for t in out if out.count(t) > 1})
        fail(name, "unique", f"duplicates {dup}", error)
    return out
