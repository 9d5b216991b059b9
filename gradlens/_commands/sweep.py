"""``gradlens sweep CONFIG.toml``: a resumable sweep of scalarization weights x sizes x seeds."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "sweep"
HELP = "Run (or resume) a sweep of task weights x model sizes x seeds from a TOML config."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="TOML file with [train], [sweep], [executor] tables")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="sweep directory (default: [executor].storage, else runs/<config stem>)",
    )
    p.add_argument("--workers", type=int, default=None, help="parallel runs (overrides config)")
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default=None,
        help="where runs execute (overrides [executor].kind)",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (with --executor ray)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--yes",
        action="store_true",
        help="confirm a sweep beyond the size bounds (over 1000 runs, or models over 10^8 "
        "parameters or 64 blocks)",
    )


def run(args: argparse.Namespace) -> int:
    from gradlens.search import format_sweep, load_config, run_sweep

    cfg = load_config(args.config).with_executor(
        kind=args.executor, workers=args.workers, address=args.address
    )
    summary = run_sweep(cfg, args.out, progress=not args.no_progress, yes=args.yes)
    sys.stdout.write(format_sweep(summary) + "\n")
    failed = summary[summary["status"] != "done"]
    for rec in failed.to_dict("records"):
        sys.stderr.write(f"gradlens sweep: run {rec['id']} failed: {rec['error']}\n")
    if len(failed):
        sys.stderr.write(
            f"gradlens sweep: {len(failed)} of {len(summary)} runs failed; rerun the same "
            f"command to retry them.\n"
        )
        return 1
    return 0
