"""One section per set of jointly trained tasks: its figures and the parts of
:mod:`~gradlens.report.sections` (associations, optimal weight, gain, within-run)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from gradlens._types import TOTAL_LAYER
from gradlens.report import _render as _r
from gradlens.report.sections._common import (
    Findings,
    NoFigures,
    Options,
    add_figure,
    present,
    weight_cols,
)
from gradlens.report.sections.associations import associations_part
from gradlens.report.sections.gain import gain_part
from gradlens.report.sections.optimum import optimum_part
from gradlens.report.sections.within import within_part

__all__ = ["task_set_section"]


def representative(
    joint: pd.DataFrame, wcols: list[str], size_col: str | None, opt: pd.DataFrame | None
) -> str:
    """The run drawn alone: of the largest size, at the weight nearest its optimum (else the
    median weight); ties broken by run id."""
    work = joint
    if size_col is not None:
        sizes = pd.to_numeric(work[size_col], errors="coerce")
        work = work[sizes == sizes.max()] if sizes.notna().any() else work
    if wcols:
        w = pd.to_numeric(work[wcols[0]], errors="coerce")
        target = float(w.median())
        if opt is not None and len(opt) and size_col in opt.columns:
            last = opt.sort_values(size_col).iloc[-1]
            target = float(last["p_star"])
        work = work.assign(_dist=(w - target).abs()).sort_values(["_dist", "run_id"])
    return str(work["run_id"].iloc[0])


def pbt_schedule(
    joint: pd.DataFrame, by_id: dict[str, Any]
) -> tuple[pd.DataFrame | None, float | None]:
    """Tidy ``[member, epoch, task, weight]`` of the runs whose meta holds ``pbt.schedule``."""
    rows = []
    end = None
    for rid in joint["run_id"]:
        run = by_id[rid]
        pbt = run.meta.get("pbt")
        if not isinstance(pbt, dict) or not isinstance(pbt.get("schedule"), list):
            continue
        member = pbt.get("member", rid)
        for entry in pbt["schedule"]:
            for task, w in dict(entry.get("weights", {})).items():
                rows.append(
                    {"member": member, "epoch": entry.get("epoch"), "task": task, "weight": w}
                )
        points = run.evals["point"].astype(str)
        epochs = run.evals.loc[points.str.startswith("epoch:"), "epoch"].dropna()
        if len(epochs):
            end = max(end or 0.0, float(epochs.max()))
    if not rows:
        return None, None
    return pd.DataFrame(rows), end


@dataclass
class _Set:
    """One task set being reported: its runs, swept weights, size column and output."""

    number: int
    tasks: list[str]
    joint: pd.DataFrame
    wcols: list[str]
    size_col: str | None
    plots: Any  # gradlens.plots, or NoFigures when the report draws none
    opts: Options
    sec: _r.Section
    out: dict[str, Any]

    def figure(self, kind: str, fig: Any, caption: str) -> None:
        add_figure(self.sec.figures, f"set{self.number}-{kind}.png", fig, caption, self.opts.dpi)


def task_set_section(
    number: int,
    tasks: list[str],
    joint: pd.DataFrame,
    single: pd.DataFrame,
    by_id: dict[str, Any],
    opts: Options,
    found: Findings,
) -> tuple[_r.Section, dict[str, Any]]:
    """The section of one task set (its figures and parts) and its results for ``stats.json``."""
    from gradlens import plots

    wcols = weight_cols(joint, tasks)
    size_col = "model.n_params" if present(joint, "model.n_params") else None
    ts = _Set(
        number,
        tasks,
        joint,
        wcols,
        size_col,
        plots if opts.figures else NoFigures(),
        opts,
        _r.Section(title=f"Tasks: {', '.join(tasks)}"),
        {"tasks": tasks, "n_joint_runs": len(joint), "weight_cols": wcols, "size_col": size_col},
    )
    ts.sec.paragraphs.append(_header(ts))
    _overview_figures(ts, by_id)
    associations_part(joint, wcols, size_col, tasks, opts, ts.sec, found, ts.out)
    opt = None
    if len(wcols) == 1:
        opt = _optimum(ts, found)
    elif len(wcols) > 1:
        found.unsupported.append(
            f"The optimal weight of {'|'.join(tasks)} is not estimated: it needs a sweep of one "
            f"weight; found {len(wcols)} varying weights."
        )
    picked = gain_part(joint, single, tasks, wcols, size_col, opts, ts.sec, found, ts.out)
    if picked is not None and len(picked) and {"model.depth", "model.width"} <= set(picked):
        _gain_figure(ts, picked)
    _pbt_figure(ts, by_id)
    _run_figures(ts, by_id, representative(joint, wcols, size_col, opt))
    within_part(joint, by_id, opts, ts.sec, found, ts.out)
    return ts.sec, ts.out


def _header(ts: _Set) -> str:
    joint, size_col, wcols = ts.joint, ts.size_col, ts.wcols
    n_sizes = joint[size_col].nunique() if size_col else 1
    configs = (
        joint.groupby([c for c in [size_col, *wcols] if c], dropna=False).size()
        if (size_col or wcols)
        else pd.Series([len(joint)])
    )
    return (
        f"{len(joint)} joint runs, {n_sizes} model size(s), swept weights: "
        f"{', '.join(wcols) if wcols else 'none'}; seeds per configuration: "
        f"{int(configs.min())} to {int(configs.max())}."
    )


def _overview_figures(ts: _Set, by_id: dict[str, Any]) -> None:
    """The pooled task x task heatmap, and conflict against the weight."""
    joint = ts.joint
    pooled = pd.concat(
        [by_id[r].metrics[by_id[r].metrics["layer"] == TOTAL_LAYER] for r in joint["run_id"]],
        ignore_index=True,
    )
    if not pooled.empty and (pooled["metric"] == "cosine").any():
        fig = ts.plots.conflict_heatmap(
            pooled, tasks=ts.tasks, title=f"Pooled over the {len(joint)} joint runs"
        )
        ts.figure(
            "heatmap",
            fig,
            "Mean cosine between task gradients (all shared parameters), and how often "
            "it is negative, pooled over every probed step of every joint run.",
        )
    if ts.wcols and present(joint, "conflict_freq.mean"):
        fig = ts.plots.weight_vs_interference(
            joint,
            weight_col=ts.wcols[0],
            interference_col="conflict_freq.mean",
            size_col=ts.size_col,
        )
        ts.figure(
            "weight-interference",
            fig,
            f"Conflict frequency of each run against {ts.wcols[0]}, with a least-squares line "
            "and 95% band per model size.",
        )


def _optimum(ts: _Set, found: Findings) -> pd.DataFrame | None:
    """The optimum part, and the score against the weight with the optimum marked."""
    opts, wcol = ts.opts, ts.wcols[0]
    opt = optimum_part(ts.joint, wcol, ts.size_col, opts, ts.sec, found, ts.out)
    if opt is not None:
        scol = ts.size_col or "model size"
        work = ts.joint if ts.size_col else ts.joint.assign(**{"model size": "all runs"})
        fig = ts.plots.accuracy_vs_weight(
            work, weight_col=wcol, score_col=f"{opts.metric}.mean", size_col=scol, optimum=opt
        )
        ts.figure(
            "score-weight",
            fig,
            f"Mean {opts.metric} on {opts.split} against {wcol} per model size "
            "(dots: seeds; stars: optimal weight with its interval).",
        )
    return opt


def _gain_figure(ts: _Set, picked: pd.DataFrame) -> None:
    """The selected gains on the depth x width grid: per task (up to 6), else their mean."""
    if len(ts.tasks) <= 6:
        grid = picked
        panel: str | None = "task"
        ci: tuple[str, str] | None = ("ci_low", "ci_high")
    else:
        grid = picked.groupby(["model.depth", "model.width"])["gain"].mean().reset_index()
        panel, ci = None, None
    if not grid["gain"].notna().any():
        return
    metric = ts.opts.metric
    scale, unit, digits = (100.0, "points", 1) if metric == "accuracy" else (1.0, "", 3)
    fig = ts.plots.gain_grid(grid, panel=panel, ci=ci, scale=scale, digits=digits, unit=unit)
    ts.figure(
        "gain-grid",
        fig,
        f"Joint minus single-task {metric} per depth and width at the selected weight"
        + (", per task, with intervals." if panel else ", mean over tasks."),
    )


def _pbt_figure(ts: _Set, by_id: dict[str, Any]) -> None:
    schedule, end = pbt_schedule(ts.joint, by_id)
    if schedule is None:
        return
    ts.out["pbt_schedule"] = schedule
    ts.figure(
        "pbt",
        ts.plots.pbt_schedules(schedule, end=end),
        f"Loss-weight schedules of the {schedule['member'].nunique()} PBT members "
        "(weights stacked; each change is an exploit/explore step).",
    )


def _run_figures(ts: _Set, by_id: dict[str, Any], rep: str) -> None:
    """The layer x step heatmap and the conflict timeline of the representative run."""
    run = by_id[rep]
    metric = ts.opts.metric
    if len(run.layers) > 2:
        fig = ts.plots.layer_step_heatmap(run, title=f"Run {rep}: mean pairwise cosine per layer")
        ts.figure("layers", fig, f"Layer x step mean pairwise cosine of the run {rep}.")
    timeline = ts.plots.timeline_data(run, eval_metric=metric)  # computed here, drawn below
    ts.figure(
        "timeline",
        ts.plots.conflict_timeline(timeline, title=f"Run {rep}"),
        f"Conflict over training and validation {metric} of the run {rep}.",
    )
    ts.out["representative_run"] = rep
