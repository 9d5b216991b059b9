"""The ``gradlens`` command line.

Each subcommand lives in its own module under :mod:`gradlens._commands` and defines ``NAME``,
``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; this file only discovers and
dispatches them, so commands share no logic through the CLI layer.

Example:
    >>> from gradlens.cli import main
    >>> main(["--version"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from gradlens import __version__
from gradlens._errors import GradlensError, MissingExtraError

__all__ = ["build_parser", "main"]


def _command_modules() -> list[ModuleType]:
    import gradlens._commands as pkg

    mods = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mods.append(importlib.import_module(f"{pkg.__name__}.{info.name}"))
    return mods


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one subparser per command module."""
    parser = _Parser(
        prog="gradlens",
        description="Measure and report gradient interference between the tasks of one model.",
    )
    parser.add_argument("--version", action="version", version=f"gradlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code: 2 for bad input, 1 for a file system error
    (both reported in one line on stderr, without a traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (GradlensError, MissingExtraError) as exc:
        sys.stderr.write(f"gradlens {args.command}: error: {_one_line(exc)}\n")
        return 2
    except OSError as exc:  # the file system refused: say what and where, no traceback
        where = f" ({exc.filename})" if exc.filename else ""
        what = exc.strerror or str(exc)
        sys.stderr.write(f"gradlens {args.command}: error: {what}{where}\n")
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
