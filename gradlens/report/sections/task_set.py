"""One section per set of jointly trained tasks: its figures and the parts of
:mod:`~gradlens.report.sections` (associations, optimal weight, gain, within-run)."""

from __future__ import annotations

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


def task_set_section(
    number: int,
    tasks: list[str],
    joint: pd.DataFrame,
    single: pd.DataFrame,
    by_id: dict[str, Any],
    opts: Options,
    found: Findings,
) -> tuple[_r.Section, dict[str, Any]]:
    from gradlens import plots as _plots

    plots: Any = _plots if opts.figures else NoFigures()

    label = "|".join(tasks)
    sec = _r.Section(title=f"Tasks: {', '.join(tasks)}")
    out: dict[str, Any] = {"tasks": tasks, "n_joint_runs": len(joint)}
    wcols = weight_cols(joint, tasks)
    size_col = "model.n_params" if present(joint, "model.n_params") else None
    out["weight_cols"], out["size_col"] = wcols, size_col
    n_sizes = joint[size_col].nunique() if size_col else 1
    configs = (
        joint.groupby([c for c in [size_col, *wcols] if c], dropna=False).size()
        if (size_col or wcols)
        else pd.Series([len(joint)])
    )
    sec.paragraphs.append(
        f"{len(joint)} joint runs, {n_sizes} model size(s), swept weights: "
        f"{', '.join(wcols) if wcols else 'none'}; seeds per configuration: "
        f"{int(configs.min())} to {int(configs.max())}."
    )
    figs = sec.figures
    slug = f"set{number}"

    pooled = pd.concat(
        [by_id[r].metrics[by_id[r].metrics["layer"] == TOTAL_LAYER] for r in joint["run_id"]],
        ignore_index=True,
    )
    if not pooled.empty and (pooled["metric"] == "cosine").any():
        fig = plots.conflict_heatmap(
            pooled, tasks=tasks, title=f"Pooled over the {len(joint)} joint runs"
        )
        add_figure(
            figs,
            f"{slug}-heatmap.png",
            fig,
            "Mean cosine between task gradients (all shared parameters), and how often "
            "it is negative, pooled over every probed step of every joint run.",
            opts.dpi,
        )
    if wcols and present(joint, "conflict_freq.mean"):
        fig = plots.weight_vs_interference(
            joint, weight_col=wcols[0], interference_col="conflict_freq.mean", size_col=size_col
        )
        add_figure(
            figs,
            f"{slug}-weight-interference.png",
            fig,
            f"Conflict frequency of each run against {wcols[0]}, with a least-squares line "
            "and 95% band per model size.",
            opts.dpi,
        )

    associations_part(joint, wcols, size_col, tasks, opts, sec, found, out)
    opt = None
    if len(wcols) == 1:
        opt = optimum_part(joint, wcols[0], size_col, opts, sec, found, out)
        if opt is not None:
            scol = size_col or "model size"
            work = joint if size_col else joint.assign(**{"model size": "all runs"})
            fig = plots.accuracy_vs_weight(
                work,
                weight_col=wcols[0],
                score_col=f"{opts.metric}.mean",
                size_col=scol,
                optimum=opt,
            )
            add_figure(
                figs,
                f"{slug}-score-weight.png",
                fig,
                f"Mean {opts.metric} on {opts.split} against {wcols[0]} per model size "
                "(dots: seeds; stars: optimal weight with its interval).",
                opts.dpi,
            )
    elif len(wcols) > 1:
        found.unsupported.append(
            f"The optimal weight of {label} is not estimated: it needs a sweep of one weight; "
            f"found {len(wcols)} varying weights."
        )
    picked = gain_part(joint, single, tasks, wcols, size_col, opts, sec, found, out)
    if picked is not None and len(picked) and {"model.depth", "model.width"} <= set(picked):
        if len(tasks) <= 6:
            grid = picked
            panel: str | None = "task"
            ci: tuple[str, str] | None = ("ci_low", "ci_high")
        else:
            grid = picked.groupby(["model.depth", "model.width"])["gain"].mean().reset_index()
            panel, ci = None, None
        if grid["gain"].notna().any():
            scale, unit, digits = (
                (100.0, "points", 1) if opts.metric == "accuracy" else (1.0, "", 3)
            )
            fig = plots.gain_grid(grid, panel=panel, ci=ci, scale=scale, digits=digits, unit=unit)
            add_figure(
                figs,
                f"{slug}-gain-grid.png",
                fig,
                f"Joint minus single-task {opts.metric} per depth and width at the selected "
                "weight" + (", per task, with intervals." if panel else ", mean over tasks."),
                opts.dpi,
            )
    schedule, end = pbt_schedule(joint, by_id)
    if schedule is not None:
        out["pbt_schedule"] = schedule
        fig = plots.pbt_schedules(schedule, end=end)
        add_figure(
            figs,
            f"{slug}-pbt.png",
            fig,
            f"Loss-weight schedules of the {schedule['member'].nunique()} PBT members "
            "(weights stacked; each change is an exploit/explore step).",
            opts.dpi,
        )
    rep = representative(joint, wcols, size_col, opt)
    run = by_id[rep]
    if len(run.layers) > 2:
        fig = plots.layer_step_heatmap(run, title=f"Run {rep}: mean pairwise cosine per layer")
        add_figure(
            figs,
            f"{slug}-layers.png",
            fig,
            f"Layer x step mean pairwise cosine of the run {rep}.",
            opts.dpi,
        )
    fig = plots.conflict_timeline(run, eval_metric=opts.metric, title=f"Run {rep}")
    add_figure(
        figs,
        f"{slug}-timeline.png",
        fig,
        f"Conflict over training and validation {opts.metric} of the run {rep}.",
        opts.dpi,
    )
    out["representative_run"] = rep
    within_part(joint, by_id, opts, sec, found, out)
    return sec, out
