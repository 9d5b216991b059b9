"""Exception types raised by gradlens.

Every user-facing error names the argument at fault, what was expected and what was found.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GradlensError", "GradlensWarning", "MissingExtraError", "StoreError"]


class GradlensError(ValueError):
    """Bad input or a misuse of gradlens (subclass of :class:`ValueError`)."""


class StoreError(GradlensError):
    """A run directory cannot be written or read as asked."""


class MissingExtraError(ImportError):
    """An optional dependency is needed for this feature and is not installed."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the optional package `{package}`, which is not installed. "
            f"Install it with `pip install 'gradlens[{extra}]'`."
        )
        self.package = package
        self.extra = extra


class GradlensWarning(UserWarning):
    """Something gradlens measured or was asked to do deserves attention but is not an error."""


def require(package: str, extra: str, feature: str) -> Any:
    """Import an optional dependency or raise :class:`MissingExtraError` naming the extra.

    Typed ``Any``: the module's attributes are the optional package's, unknown to the checker.
    """
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise MissingExtraError(package, extra, feature) from exc
