"""When to probe: schedules are plain callables ``step -> bool``.

The profiler accepts an ``int`` k (probe every k-th step, starting at step 0) or any callable of the
step number; the classes here have readable ``repr`` so that the run store can record them.

Example:
    >>> from gradlens.schedules import Every, First, LogSpaced, Union
    >>> [s for s in range(10) if Every(3)(s)]
    [0, 3, 6, 9]
    >>> [s for s in range(10) if First(2)(s)]
    [0, 1]
    >>> [s for s in range(200) if LogSpaced(per_decade=2)(s)]
    [0, 1, 3, 10, 32, 100]
    >>> [s for s in range(10) if Union(First(2), Every(4))(s)]
    [0, 1, 4, 8]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from gradlens._errors import GradlensError

__all__ = ["Every", "First", "LogSpaced", "Schedule", "Union", "as_schedule", "first_probe"]

Schedule = Callable[[int], bool]


@dataclass(frozen=True)
class Every:
    """Probe steps ``offset, offset + k, offset + 2k, ...``."""

    k: int
    offset: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise GradlensError(f"`every` should be a positive int; found {self.k!r}.")
        if self.offset < 0:
            raise GradlensError(f"`offset` should be >= 0; found {self.offset!r}.")

    def __call__(self, step: int) -> bool:
        return step >= self.offset and (step - self.offset) % self.k == 0


@dataclass(frozen=True)
class First:
    """Probe the first ``n`` steps."""

    n: int

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 0:
            raise GradlensError(f"`n` should be a non-negative int; found {self.n!r}.")

    def __call__(self, step: int) -> bool:
        return step < self.n


@dataclass(frozen=True)
class LogSpaced:
    """Probe step 0 and the steps nearest to ``10 ** (i / per_decade)``, i = 0, 1, ...

    Dense early in training, where interference changes fastest, and sparse later.
    """

    per_decade: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.per_decade, int) or self.per_decade < 1:
            raise GradlensError(
                f"`per_decade` should be a positive int; found {self.per_decade!r}."
            )

    def __call__(self, step: int) -> bool:
        if step <= 1:
            return True
        # steps are round(10 ** (i / per_decade)); check the two candidate exponents around step
        i = math.log10(step) * self.per_decade
        return any(
            round(10 ** (j / self.per_decade)) == step for j in (math.floor(i), math.ceil(i))
        )


@dataclass(frozen=True)
class Union:
    """Probe where any of the given schedules probes."""

    schedules: tuple[Schedule, ...]

    def __init__(self, *schedules: Schedule) -> None:
        object.__setattr__(self, "schedules", tuple(schedules))

    def __call__(self, step: int) -> bool:
        return any(s(step) for s in self.schedules)


def first_probe(schedule: Schedule) -> bool:
    """``schedule(0)``, read when the profiler is made (before anything is written): a callable
    that cannot be called on a step is a GradlensError naming ``every``.

    >>> first_probe(Every(2)), first_probe(lambda step: step > 3)
    (True, False)
    """
    try:
        return bool(schedule(0))
    except Exception as exc:
        raise GradlensError(
            "`every` should be a positive int or a callable step -> bool; calling it on step 0 "
            f"raised {type(exc).__name__}: {exc}"
        ) from exc


def as_schedule(every: int | Schedule) -> Schedule:
    """Turn the profiler's ``every`` argument into a schedule callable."""
    if isinstance(every, bool):
        raise GradlensError(f"`every` should be a positive int or a callable; found {every!r}.")
    if isinstance(every, numbers.Integral):  # (numpy's integers too)
        return Every(int(every))
    if callable(every):
        return every
    raise GradlensError(
        "`every` should be a positive int or a callable step -> bool; "
        f"found {type(every).__name__}."
    )
