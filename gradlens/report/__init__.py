"""Reports of a sweep: ``report.md``, a self-contained ``report.html`` and ``stats.json``.

:func:`build_report` reads every run under a directory, computes the statistics of
:mod:`gradlens.stats` per set of jointly trained tasks (associations between weights, interference
and accuracy with intervals, p-values and a named multiple-testing correction; the optimal weight
per model size and its trend; the gain of joint over single-task training; within-run
correlations of per-epoch conflict with the validation metric), draws the figures of
:mod:`gradlens.plots`, and writes:

- ``report.html``: one file, figures embedded as base64 PNG, inline CSS, no script and no
  external resource; every user string (task names, configuration values) HTML-escaped;
- ``report.md``: the same text and tables, figures linked from ``figures/``;
- ``stats.json``: every table and result as strict JSON (NaN -> ``null``).

The summary sorts each finding into "supported by the data" or "not supported" from the numbers
themselves (adjusted p-values against ``alpha``, intervals against 0), and states the estimate,
interval and adjusted p-value it rests on.

Layout: :mod:`gradlens.report._build` (the entry point), :mod:`gradlens.report.sections` (one
module per section family), :mod:`gradlens.report._arms` (methods as arms),
:mod:`gradlens.report._claims` (permutation floors, equivalence), :mod:`gradlens.report._render`
(HTML and Markdown), :mod:`gradlens.report._run` (the per-run page).

Example:
    >>> import tempfile, torch, gradlens as gl
    >>> from gradlens.report import build_report
    >>> root = tempfile.mkdtemp()
    >>> for p in (0.2, 0.5, 0.8):
    ...     meta = {"tasks": ["a", "b"], "weights": {"a": p, "b": 1 - p}, "seed": 0}
    ...     with gl.RunWriter(f"{root}/p{p}", meta=meta) as w:
    ...         for s in range(3):
    ...             g = torch.tensor([[1.0, 0.5 - p], [0.5 - p, 1.0]], dtype=torch.float64)
    ...             w.add_snapshot(gl.Snapshot(s, ("a", "b"), g, {}, torch.tensor([p, 1 - p])))
    ...         w.add_eval({"a": {"accuracy": p}, "b": {"accuracy": 1 - p}}, split="test",
    ...                    point="final")
    >>> paths = build_report(root, n_boot=100, n_perm=100, progress=False)
    >>> sorted(p.name for p in paths.out_dir.iterdir())
    ['figures', 'report.html', 'report.md', 'stats.json']
"""

from __future__ import annotations

from gradlens.report._build import ReportPaths, build_report
from gradlens.report._run import build_run_page

__all__ = ["ReportPaths", "build_report", "build_run_page"]
