"""The per-run page of ``gradlens report``: heatmaps and timelines of one run, in one HTML file.

:func:`build_run_page` reads one run directory and writes ``run.html`` (self-contained: figures
as base64 PNG, inline CSS, no script, every user string escaped) with

- the run's meta (tasks, engine, layers, probes, final evals);
- the task x task mean cosine and conflict frequency over all probes
  (:func:`gradlens.plots.conflict_heatmap`);
- layer x step heatmaps of the mean pairwise cosine and of the fraction of pairs in conflict
  (:func:`gradlens.plots.layer_step_heatmap`);
- the conflict timeline above the per-epoch validation metric
  (:func:`gradlens.plots.conflict_timeline`);
- a table per layer: mean cosine over probes, conflict frequency, and the latest probe's cosine
  of every pair (from :attr:`gradlens.Run.metrics`).

Example:
    >>> import tempfile, torch, gradlens as gl
    >>> d = tempfile.mkdtemp()
    >>> with gl.RunWriter(d + "/run", meta={"tasks": ["a", "b"]}) as w:
    ...     for s in range(4):
    ...         g = torch.tensor([[1.0, 0.5 - s / 4], [0.5 - s / 4, 1.0]], dtype=torch.float64)
    ...         w.add_snapshot(gl.Snapshot(s, ("a", "b"), g, {"fc": g}, torch.ones(2)))
    >>> page = build_run_page(d + "/run", dpi=40)
    >>> page.name, page.parent.name
    ('run.html', 'report')
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError
from gradlens._types import TOTAL_LAYER
from gradlens._validate import check_int
from gradlens.report._render import CSS, html_text, num

if TYPE_CHECKING:
    from gradlens.store import Run

__all__ = ["build_run_page"]


def _png(fig: Any, dpi: int) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(fig: Any, caption: str, dpi: int) -> str:
    return (
        f'<figure><img alt="{html_text(caption)}" src="data:image/png;base64,{_png(fig, dpi)}">'
        f"<figcaption>{html_text(caption)}</figcaption></figure>"
    )


def _table(caption: str, header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html_text(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="s">{html_text(c)}</td>' if k == 0 else f"<td>{html_text(c)}</td>"
            for k, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return (
        f"<table><caption>{html_text(caption)}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def _layer_table(metrics: pd.DataFrame, layers: tuple[str, ...]) -> tuple[list[str], list[list]]:
    """Per layer: mean cosine, conflict frequency, and the latest probe's cosine of each pair."""
    cos = metrics[metrics["metric"].astype(str) == "cosine"]
    last = cos[cos["step"] == cos["step"].max()]
    pairs = list(dict.fromkeys(zip(cos["task_i"].astype(str), cos["task_j"].astype(str))))
    header = ["layer", "mean cosine", "conflict frequency"] + [
        f"{a}|{b} (latest)" for a, b in pairs
    ]
    rows = []
    for layer in layers:
        mine = cos[cos["layer"].astype(str) == layer]["value"].to_numpy(np.float64)
        ok = mine[np.isfinite(mine)]
        lrow = last[last["layer"].astype(str) == layer]
        latest = {
            (str(a), str(b)): v for a, b, v in zip(lrow["task_i"], lrow["task_j"], lrow["value"])
        }
        rows.append(
            [
                "all shared" if layer == TOTAL_LAYER else layer,
                num(ok.mean() if ok.size else float("nan"), 3),
                num((ok < 0).mean() if ok.size else float("nan"), 3),
                *[num(latest.get(p, float("nan")), 3, signed=True) for p in pairs],
            ]
        )
    return header, rows


def build_run_page(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    eval_metric: str = "accuracy",
    split: str = "val",
    dpi: int = 100,
) -> Path:
    """Write ``run.html`` for one run (see the module docstring); returns its path.

    Args:
        run_dir: The run directory (holding ``meta.json``).
        out_dir: Where to write (default ``<run_dir>/report``); created if needed.
        eval_metric: Eval metric of the timeline's lower panel.
        split: Split of the per-epoch evals in the timeline.
        dpi: Resolution of the figures.

    Raises:
        GradlensError: If ``dpi`` is not a positive int or the run has no probed step; a
            StoreError if ``run_dir`` is not a run.
    """
    from gradlens.store import load_run

    check_int("dpi", dpi, minimum=1)
    run = load_run(run_dir)
    if not len(run.probed_steps):
        raise GradlensError(
            f"`run_dir` should hold at least one committed probed step to draw; found none in "
            f"{run.path}."
        )
    out = Path(out_dir) if out_dir is not None else run.path / "report"
    title = f"gradlens run: {run.path.name}"
    if len(run.tasks) >= 2:
        body = _body(run, eval_metric, split, dpi)
    else:
        body = ["<p>A single task: there is no pair whose interference could be drawn.</p>"]
    html = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html_text(title)}</title>",
            f"<style>{CSS}</style></head><body>",
            f"<h1>{html_text(title)}</h1>",
            *[f'<p class="meta">{html_text(line)}</p>' for line in _meta_lines(run)],
            *body,
            "</body></html>",
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    page = out / "run.html"
    page.write_text(html + "\n", encoding="utf-8")
    return page


def _meta_lines(run: Run) -> list[str]:
    """The run's path, tasks, engine, layers, probes and final evals."""
    steps = run.probed_steps
    lines = [
        f"Run: {run.path}",
        f"Tasks: {', '.join(run.tasks)}. Engine: {run.meta.get('engine', 'n/a')} "
        f"({run.meta.get('level', 'parameters')} level). Layers: {len(run.layers) - 1}.",
        f"Probed steps: {len(steps)}, from {steps[0]} to {steps[-1]}.",
    ]
    final = run.evals[run.evals["point"] == "final"]
    if len(final):
        scores = ", ".join(
            f"{t} {m} ({s}) {num(v, 3)}"
            for s, t, m, v in zip(final["split"], final["task"], final["metric"], final["value"])
        )
        lines.append(f"Final evals: {scores}.")
    return lines


def _body(run: Run, eval_metric: str, split: str, dpi: int) -> list[str]:
    """The figures and the per-layer table of a run with two tasks or more."""
    from gradlens import plots

    steps = run.probed_steps
    body = ["<h2>Interference between tasks</h2>"]
    body.append(
        _figure(
            plots.conflict_heatmap(run),
            "Mean cosine of each task pair over all probes (red: conflict) and the fraction "
            "of probes in which the pair conflicts (cos < 0), over all shared parameters.",
            dpi,
        )
    )
    body.append("<h2>Per layer over training</h2>")
    for metric, caption in (
        ("cosine", "Mean pairwise cosine per layer (rows) at each probe (columns)."),
        ("conflict", "Fraction of task pairs in conflict per layer at each probe."),
    ):
        body.append(_figure(plots.layer_step_heatmap(run, metric=metric), caption, dpi))
    body.append("<h2>Conflict over training</h2>")
    timeline = plots.timeline_data(run, eval_metric=eval_metric, split=split)
    body.append(
        _figure(
            plots.conflict_timeline(timeline),
            f"Fraction of pairs in conflict at each probe (dots), its rolling mean (line) and "
            f"per epoch; below, {eval_metric} on {split} per epoch where stored.",
            dpi,
        )
    )
    header, rows = _layer_table(run.metrics, run.layers)
    body.append(
        _table(
            f"Per layer: cosine over {len(steps)} probes and at the latest (step {steps[-1]}).",
            header,
            rows,
        )
    )
    return body
