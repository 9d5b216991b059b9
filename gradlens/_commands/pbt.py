"""``gradlens pbt CONFIG.toml``: resumable population-based training of the task weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "pbt"
HELP = "Run (or resume) population-based training of the task weights from a TOML config."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="TOML file with [train], [pbt], [executor] tables")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="PBT directory (default: [executor].storage, else runs/<config stem>)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="parallel hosts of members (overrides config)"
    )
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default=None,
        help="where members train (overrides [executor].kind)",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (with --executor ray)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--yes",
        action="store_true",
        help="confirm members beyond the model size bounds (over 10^8 parameters or 64 blocks)",
    )


def run(args: argparse.Namespace) -> int:
    from gradlens.search import format_pbt, load_config, run_pbt

    cfg = load_config(args.config).with_executor(
        kind=args.executor, workers=args.workers, address=args.address
    )
    summary = run_pbt(cfg, args.out, progress=not args.no_progress, yes=args.yes)
    metric = cfg.pbt.metric if cfg.pbt is not None else "score"
    sys.stdout.write(format_pbt(summary, metric) + "\n")
    return 0
