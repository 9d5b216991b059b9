"""``gradlens report DIR``: report.md, a self-contained report.html and stats.json of a sweep;
for a single run directory, its page ``run.html`` (heatmaps and timelines of that run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "report"
HELP = (
    "Analyse every run under DIR: statistics with intervals and adjusted p-values, figures, "
    "a plain-language summary; writes report.md, report.html and stats.json. DIR may also be "
    "one run directory: then its page run.html, with the heatmaps and timelines of that run."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``DIR``, ``--out``, ``--split``, ``--metric``, ``--correction``, ``--n-boot``, ..."""
    p.add_argument("dir", type=Path, metavar="DIR", help="directory holding the run directories")
    p.add_argument("--out", type=Path, default=None, help="output folder (default DIR/report)")
    p.add_argument("--split", default="test", help="split of the reported scores (test)")
    p.add_argument("--select-split", default="val", help="split on which weights are chosen (val)")
    p.add_argument("--metric", default="accuracy", help="eval metric (accuracy)")
    p.add_argument(
        "--correction",
        choices=["holm", "bh", "none"],
        default="holm",
        help="multiple-testing correction (holm)",
    )
    p.add_argument("--alpha", type=float, default=0.05, help="level of the summary (0.05)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (2000)")
    p.add_argument("--n-perm", type=int, default=2000, help="permutations (2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (0)")
    p.add_argument(
        "--margin-r",
        type=float,
        default=0.1,
        help="smallest correlation of interest: equivalence margin of the associations (0.1)",
    )
    p.add_argument(
        "--margin-gain",
        type=float,
        default=0.01,
        help="smallest gain of interest, metric units: equivalence margin of the gains (0.01)",
    )
    p.add_argument(
        "--power-sims",
        type=int,
        default=200,
        help="simulated studies per power computation, 0 to skip it (200)",
    )
    p.add_argument("--no-figures", action="store_true", help="text, tables and stats.json only")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--open", action="store_true", help="open the HTML page in a web browser")


def run(args: argparse.Namespace) -> int:
    """Build the report (or the page of one run) and print where it was written."""
    from gradlens.report import build_report, build_run_page

    if (args.dir / "meta.json").is_file():  # one run, not a sweep
        page = build_run_page(args.dir, args.out, eval_metric=args.metric)
        sys.stdout.write(f"wrote {page}\n")
        _open(page, args.open)
        return 0
    _check_evals(args.dir, {"--split": args.split, "--select-split": args.select_split},
                 args.metric)  # fmt: skip
    paths = build_report(
        args.dir,
        args.out,
        split=args.split,
        select_split=args.select_split,
        eval_metric=args.metric,
        correction=args.correction,
        alpha=args.alpha,
        n_boot=args.n_boot,
        n_perm=args.n_perm,
        seed=args.seed,
        progress=not args.no_progress,
        margin_r=args.margin_r,
        margin_gain=args.margin_gain,
        power_sims=args.power_sims,
        figures=not args.no_figures,
    )
    sys.stdout.write(f"wrote {paths.html}\nwrote {paths.markdown}\nwrote {paths.json}\n")
    _open(paths.html, args.open)
    return 0


def _check_evals(root: Path, splits: dict[str, str], metric: str) -> None:
    """Refuse a split or metric that no run under ``root`` recorded as a final eval."""
    from gradlens._errors import GradlensError
    from gradlens.store import load_runs

    found = [c.split(".") for c in load_runs(root).columns if c.startswith("final.")]
    have_splits = sorted({parts[1] for parts in found if len(parts) >= 4})
    if not have_splits:
        raise GradlensError(
            f"`DIR` should hold runs with final evaluations (each run's scores per split, which "
            f"a report compares across runs); found none under {root}. Report one run with "
            "`gradlens report RUN` (a directory with meta.json), or evaluate the runs (a sweep "
            "does)."
        )
    for flag, split in splits.items():
        if split not in have_splits:
            raise GradlensError(
                f"`{flag}` should be a split the runs under {root} were evaluated on, one of "
                f"{have_splits}; found {split!r}."
            )
    have_metrics = sorted({parts[-1] for parts in found if len(parts) >= 4})
    if metric not in have_metrics:
        raise GradlensError(
            f"`--metric` should be a metric the runs under {root} recorded, one of "
            f"{have_metrics}; found {metric!r}."
        )


def _open(page: Path, wanted: bool) -> None:
    if wanted:
        import webbrowser

        if not webbrowser.open(page.resolve().as_uri()):
            sys.stderr.write(f"no web browser could be started; open {page} yourself\n")
