"""``gradlens heatmap RUN``: the task x task conflict heatmap of one run, as a PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradlens._commands._args import positive_int
from gradlens._types import TOTAL_LAYER

NAME = "heatmap"
HELP = "Draw one run's task x task mean cosine and conflict frequency heatmap."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``RUN``, ``--out``, ``--layer``, ``--dpi``."""
    p.add_argument("run", type=Path, metavar="RUN", help="a run directory")
    p.add_argument("--out", type=Path, default=None, help="output image (default RUN/heatmap.png)")
    p.add_argument(
        "--layer", default=TOTAL_LAYER, help="layer to draw (default: all shared parameters)"
    )
    p.add_argument("--dpi", type=positive_int, default=110, help="resolution (110)")


def run(args: argparse.Namespace) -> int:
    """Draw and save the heatmap; print its path."""
    from gradlens import plots
    from gradlens._errors import GradlensError
    from gradlens.store import load_run

    out = args.out if args.out is not None else args.run / "heatmap.png"
    _check_image_path(out)
    run_ = load_run(args.run)
    if len(run_.tasks) < 2:
        raise GradlensError(
            f"`RUN` should be a run of at least 2 tasks for a task x task heatmap; found "
            f"{list(run_.tasks)} in {args.run}."
        )
    fig = plots.conflict_heatmap(run_, layer=args.layer)
    path = plots.save(fig, out, dpi=args.dpi)
    sys.stdout.write(f"wrote {path}\n")
    return 0


def _check_image_path(out: Path) -> None:
    """Refuse an output name matplotlib cannot write, before anything is drawn."""
    from matplotlib.figure import Figure

    from gradlens._errors import GradlensError

    kinds = sorted(Figure().canvas.get_supported_filetypes())
    if out.suffix.lower().lstrip(".") not in kinds:
        raise GradlensError(
            f"`--out` should end with an image format ({', '.join('.' + k for k in kinds)}); "
            f"found {str(out)!r}."
        )
