"""Argument types shared by the commands: argparse reports a bad value in one line, exit 2.

Example:
    >>> positive_int("3"), positive_ints("2,8")
    (3, [2, 8])
"""

from __future__ import annotations

import argparse

__all__: list[str] = []


def positive_int(text: str) -> int:
    """An int >= 1 (argparse ``type=``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"should be a positive integer; found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"should be a positive integer; found {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """A non-empty comma-separated list of ints >= 1 (argparse ``type=``)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = argparse.ArgumentTypeError(f"should be comma-separated positive integers; found {text!r}")
    if not parts:
        raise bad
    try:
        return [positive_int(p) for p in parts]
    except argparse.ArgumentTypeError:
        raise bad from None
