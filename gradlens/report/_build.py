"""The entry point of a sweep's report, :func:`build_report`: check the options, load the runs,
build a section per task set (:mod:`gradlens.report.sections`) and the methods' arms, sort the
summary's claims, and write ``report.html``, ``report.md``, ``stats.json`` and ``figures/``."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from gradlens._validate import check_choice, check_int, check_number, fail
from gradlens.report import _arms as _arms
from gradlens.report import _render as _r
from gradlens.report.sections import Findings, Options, task_set_section
from gradlens.report.sections._common import (
    CORRECTION_NAME,
    SYMBOL,
    Correction,
    Method,
    present,
)

__all__ = ["ReportPaths", "build_report"]


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`build_report` wrote the report."""

    out_dir: Path
    markdown: Path
    html: Path
    json: Path
    figures: tuple[Path, ...] = ()


def _load(sweep_dir: Path, opts: Options) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    from tqdm.auto import tqdm

    from gradlens import stats
    from gradlens.store import load_run, load_runs

    index = load_runs(sweep_dir)
    runs = [
        load_run(p) for p in tqdm(index["path"], desc="loading runs", disable=not opts.progress)
    ]
    for run in runs:  # derived metrics are cached on the run: computed once, used by all
        _ = run.metrics
    table = stats.runs_table(runs, split=opts.split, eval_metric=opts.metric)
    table["run_id"] = index["run_id"].to_numpy()
    by_id = dict(zip(index["run_id"], runs))
    return table, by_id, index


def _selection_scores(table: pd.DataFrame, index: pd.DataFrame, opts: Options) -> pd.Series:
    """Mean over a run's tasks of its final ``metric`` on the selection split (NaN if missing)."""
    out = []
    for (_, row), tasks in zip(index.iterrows(), table["tasks"].astype(str).str.split("|")):
        vals = [row.get(f"final.{opts.select_split}.{t}.{opts.metric}", math.nan) for t in tasks]
        vals = [float(v) for v in vals if v is not None]
        out.append(float(np.mean(vals)) if vals and np.isfinite(vals).all() else math.nan)
    return pd.Series(out, index=table.index)


def build_report(
    sweep_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    split: str = "test",
    select_split: str = "val",
    eval_metric: str = "accuracy",
    methods: Sequence[str] = ("spearman", "pearson", "kendall"),
    correction: str = "holm",
    alpha: float = 0.05,
    n_boot: int = 2000,
    n_perm: int = 2000,
    seed: int = 0,
    progress: bool = True,
    dpi: int = 100,
    margin_r: float = 0.1,
    margin_gain: float = 0.01,
    power_sims: int = 200,
    figures: bool = True,
) -> ReportPaths:
    """Write ``report.md``, ``report.html``, ``stats.json`` and ``figures/`` for a sweep.

    Runs are every directory under ``sweep_dir`` holding a ``meta.json``; joint runs (several
    tasks) are analysed per task set, single-task runs serve as baselines of the same model
    size. Figures: pooled conflict heatmap, conflict frequency against the weight, score
    against the weight with the optimum, joint-minus-single gain on a depth x width grid
    (``model.depth``/``model.width`` in the meta), and a layer x step heatmap and a conflict
    timeline of one representative run (largest model, weight nearest its optimum).

    Args:
        sweep_dir: Directory holding the run directories.
        out_dir: Where to write (default ``<sweep_dir>/report``); created if needed.
        split: Split of the final scores that are reported.
        select_split: Split on which the weight of the gain table is chosen (so the reported
            gain is not chosen on the scores it reports); falls back to ``split``, said so.
        eval_metric: Eval metric (e.g. ``"accuracy"``).
        methods: Correlation methods; the first is the one the summary quotes.
        correction: ``"holm"``, ``"bh"`` or ``"none"``, applied to the associations of each
            task set and to the within-run tests.
        alpha: Level below which an adjusted p-value counts as evidence in the summary.
        n_boot: Bootstrap resamples per interval.
        n_perm: Permutations per p-value.
        seed: Seed of every resampling.
        progress: Show progress bars.
        dpi: Resolution of the figures.
        margin_r: Smallest correlation of interest: a non-significant association whose
            interval lies inside ``(-margin_r, margin_r)`` is reported as equivalent to none,
            any other as inconclusive.
        margin_gain: Smallest gain of interest (metric units) of the equivalence tests of the
            joint-vs-single gain.
        power_sims: Simulated studies per power computation (the smallest effect each test
            detects with 80 % power); 0 leaves it out.
        figures: Draw the figures (``False``: text, tables and ``stats.json`` only).

    Returns:
        The paths written.

    Raises:
        GradlensError: On a bad argument; StoreError if ``sweep_dir`` holds no run.
    """
    _check_options(
        methods, correction, alpha, n_boot, n_perm, power_sims, dpi, margin_r, margin_gain
    )
    opts = Options(
        split=split,
        select_split=select_split,
        metric=eval_metric,
        methods=cast("tuple[Method, ...]", tuple(methods)),  # checked above
        correction=cast("Correction", correction),  # checked above
        alpha=float(alpha),
        n_boot=n_boot,
        n_perm=n_perm,
        seed=seed,
        progress=progress,
        dpi=dpi,
        margin_r=float(margin_r),
        margin_gain=float(margin_gain),
        power_sims=power_sims,
        figures=bool(figures),
    )
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        fail("sweep_dir", "a directory of runs", str(sweep))
    out = Path(out_dir) if out_dir is not None else sweep / "report"
    table, by_id, index = _load(sweep, opts)
    table["_select"] = _selection_scores(table, index, opts).to_numpy()
    analysis = _analyse(table, index, by_id, opts)
    return _write(sweep, out, opts, analysis)


def _check_options(
    methods: Sequence[str],
    correction: str,
    alpha: float,
    n_boot: int,
    n_perm: int,
    power_sims: int,
    dpi: int,
    margin_r: float,
    margin_gain: float,
) -> None:
    """A GradlensError naming the first bad option."""
    check_choice("correction", correction, CORRECTION_NAME)
    bad = [m for m in methods if m not in SYMBOL] if not isinstance(methods, str) else [methods]
    if bad or not methods:
        fail("methods", f"a non-empty list of {list(SYMBOL)}", methods)
    check_number("alpha", alpha, low=0.0, high=1.0, strict_low=True, strict_high=True)
    for name, val in (("n_boot", n_boot), ("n_perm", n_perm), ("power_sims", power_sims)):
        check_int(name, val, minimum=0)
    check_int("dpi", dpi, minimum=1)
    check_number("margin_r", margin_r, low=0.0)
    check_number("margin_gain", margin_gain, low=0.0)
    if not margin_r < 1:
        fail("margin_r", "a correlation below 1", margin_r)


@dataclass
class _Analysis:
    """Everything the report says: the runs, the sections, the summary and the JSON results."""

    runs: pd.DataFrame  # every run, methods' runs included
    n_joint: int
    n_single: int
    n_sizes: int
    sections: list[_r.Section]
    results: list[dict[str, Any]]
    arms: pd.DataFrame
    found: Findings
    decision: dict[str, Any]


def _analyse(
    table: pd.DataFrame, index: pd.DataFrame, by_id: dict[str, Any], opts: Options
) -> _Analysis:
    """A section per task set, the methods' arms, and the summary sorted at ``alpha``."""
    from tqdm.auto import tqdm

    # runs trained with a multi-task optimization method are arms, not weight points
    table, with_methods = _arms.split_methods(table, index)
    joint_all = table[table["n_tasks"] >= 2]
    single = table[table["n_tasks"] == 1]
    found = Findings()
    sections: list[_r.Section] = []
    results: list[dict[str, Any]] = []
    task_sets = sorted(joint_all["tasks"].astype(str).unique())
    # At most 5 test families per task set reach the summary (associations, optimal-weight
    # trend, gain cells, gain-size trend, within-run pooling): sizes the permutations.
    opts.n_families = 5 * max(1, len(task_sets))
    if not task_sets:
        found.unsupported.append(
            "Nothing about interference is testable: the sweep has no run with two or more tasks."
        )
    for number, ts in enumerate(tqdm(task_sets, desc="task sets", disable=not opts.progress), 1):
        joint = joint_all[joint_all["tasks"].astype(str) == ts]
        sec, res = task_set_section(number, ts.split("|"), joint, single, by_id, opts, found)
        sections.append(sec)
        results.append(res)
    arms = _arms.method_arms(
        with_methods,
        size_col="model.n_params" if present(with_methods, "model.n_params") else None,
        score_col=f"{opts.metric}.mean",
    )
    if len(arms):
        sections.append(_arms.arms_section(arms, opts.metric, opts.split))
    decision = found.resolve(opts.alpha)
    # Sizes of the joint runs: a single-task baseline has its own parameter count (one head).
    sizes = joint_all["model.n_params"].nunique() if "model.n_params" in joint_all else 0
    return _Analysis(
        with_methods,
        len(joint_all),
        len(single),
        int(sizes),
        sections,
        results,
        arms,
        found,
        decision,
    )


def _write(sweep: Path, out: Path, opts: Options, res: _Analysis) -> ReportPaths:
    """Write the figures, ``report.html``, ``report.md`` and ``stats.json`` under ``out``."""
    import gradlens

    title = f"gradlens report: {sweep.name}"
    meta_lines = [
        f"Sweep: {sweep} ({len(res.runs)} runs: {res.n_joint} joint, {res.n_single} "
        f"single-task; {res.n_sizes} model sizes among the joint runs).",
        f"Scores: final {opts.metric} on {opts.split}; weights for the gain chosen on "
        f"{opts.select_split}. Correction: {CORRECTION_NAME[opts.correction]}; alpha = "
        f"{opts.alpha}. Bootstrap resamples: {opts.n_boot}; permutations: at least "
        f"{opts.n_perm}, more where a family needs them to be able to reject; equivalence "
        f"margins: |r| < {opts.margin_r:g}, |gain| < {opts.margin_gain:g}; seed {opts.seed}. "
        f"gradlens {gradlens.__version__}.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    written = []
    for sec in res.sections:
        for fig in sec.figures:
            path = fig_dir / fig.name
            path.write_bytes(fig.png)
            written.append(path)
    found = res.found
    html_path, md_path, json_path = out / "report.html", out / "report.md", out / "stats.json"
    html_path.write_text(
        _r.render_html(
            title, meta_lines, found.supported, found.unsupported, res.sections, found.descriptive
        ),
        encoding="utf-8",
    )
    md_path.write_text(
        _r.render_markdown(
            title,
            meta_lines,
            found.supported,
            found.unsupported,
            res.sections,
            "figures",
            found.descriptive,
        ),
        encoding="utf-8",
    )
    _write_json(json_path, sweep, opts, res, gradlens.__version__)
    return ReportPaths(out, md_path, html_path, json_path, tuple(written))


def _write_json(path: Path, sweep: Path, opts: Options, res: _Analysis, version: str) -> None:
    from gradlens import stats

    runs_cols = [c for c in res.runs.columns if not c.startswith(("versions.", "_"))]
    options = {
        "split": opts.split,
        "select_split": opts.select_split,
        "eval_metric": opts.metric,
        "methods": list(opts.methods),
        "correction": opts.correction,
        "alpha": opts.alpha,
        "n_boot": opts.n_boot,
        "n_perm": opts.n_perm,
        "seed": opts.seed,
        "margin_r": opts.margin_r,
        "margin_gain": opts.margin_gain,
        "power_sims": opts.power_sims,
        "figures": opts.figures,
    }
    summary = {
        "supported": res.found.supported,
        "not_supported": res.found.unsupported,
        "descriptive": res.found.descriptive,
        "decision": res.decision,
    }
    stats.to_json(
        {
            "gradlens_version": version,
            "sweep": str(sweep),
            "options": options,
            "summary": summary,
            "task_sets": res.results,
            "arms": res.arms,
            "runs": res.runs[runs_cols],
        },
        path,
    )
