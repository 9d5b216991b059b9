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

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlens import _plots_render as _r
from gradlens._errors import GradlensError
from gradlens._report_run import build_run_page
from gradlens._snapshot import TOTAL_LAYER

__all__ = ["ReportPaths", "build_report", "build_run_page"]

_SYMBOL = {"spearman": "rho", "pearson": "r", "kendall": "tau"}
_KIND = {"spearman": "monotone", "pearson": "linear", "kendall": "monotone"}
_CORRECTION_NAME = {
    "holm": "Holm (family-wise error rate)",
    "bh": "Benjamini-Hochberg (false discovery rate)",
    "none": "no correction",
}


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`build_report` wrote the report."""

    out_dir: Path
    markdown: Path
    html: Path
    json: Path
    figures: tuple[Path, ...] = ()


@dataclass
class _Findings:
    supported: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)


@dataclass
class _Options:
    split: str
    select_split: str
    metric: str
    methods: tuple[str, ...]
    correction: str
    alpha: float
    n_boot: int
    n_perm: int
    seed: int
    progress: bool
    dpi: int


# --------------------------------------------------------------------------- descriptions


def _describe(col: str, metric: str) -> str:
    """Plain words for a table column."""
    head, _, tail = col.partition(".")
    if head == "weights":
        return f"weight of {tail}"
    if head == "conflict_freq":
        return "conflict frequency" if tail == "mean" else f"conflict frequency of {tail}"
    if head == "cosine":
        return "mean cosine" if tail == "mean" else f"cosine of {tail}"
    if head == metric:
        return f"mean {metric}" if tail == "mean" else f"{metric} on {tail}"
    return col


def _scope(row: pd.Series) -> str:
    if row["scope"] == "partial":
        return f"partial correlation controlling for {row['covariates']}"
    if row["scope"] == "stratum":
        return f"model size {row['stratum']} only"
    return "pooled over all runs"


def _stat(row: pd.Series | dict[str, Any], symbol: str, p_key: str = "p_adjusted") -> str:
    p_name = "p_adj" if p_key == "p_adjusted" else "p"
    return (
        f"{symbol} = {_r.num(row['estimate'], 2, signed=True)} "
        f"{_r.interval(row['ci_low'], row['ci_high'])}, {p_name} = {_r.pval(row[p_key])}"
    )


# --------------------------------------------------------------------------- loading


def _load(sweep_dir: Path, opts: _Options) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
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


def _selection_scores(table: pd.DataFrame, index: pd.DataFrame, opts: _Options) -> pd.Series:
    """Mean over a run's tasks of its final ``metric`` on the selection split (NaN if missing)."""
    out = []
    for (_, row), tasks in zip(index.iterrows(), table["tasks"].astype(str).str.split("|")):
        vals = [row.get(f"final.{opts.select_split}.{t}.{opts.metric}", math.nan) for t in tasks]
        vals = [float(v) for v in vals if v is not None]
        out.append(float(np.mean(vals)) if vals and np.isfinite(vals).all() else math.nan)
    return pd.Series(out, index=table.index)


def _weight_cols(joint: pd.DataFrame, tasks: Sequence[str]) -> list[str]:
    cols = [f"weights.{t}" for t in tasks if f"weights.{t}" in joint.columns]
    varying = [c for c in cols if pd.to_numeric(joint[c], errors="coerce").nunique() > 1]
    if len(tasks) == 2 and len(varying) == 2:
        total = joint[varying].apply(pd.to_numeric, errors="coerce").sum(axis=1)
        if float(total.std(ddof=0) or 0.0) < 1e-9:
            return varying[:1]  # the second weight is the complement of the first
    return varying


def _size_label(col: str, value: Any) -> str:
    from gradlens._plots_util import size_label

    return size_label(col, value).replace("\\$", "$")


def _present(table: pd.DataFrame, col: str) -> bool:
    return col in table.columns and table[col].notna().any()


# --------------------------------------------------------------------------- figures


def _png(fig: Any, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _figure(figs: list[_r.Figure], name: str, fig: Any, caption: str, dpi: int) -> None:
    figs.append(_r.Figure(name, _png(fig, dpi), caption))


# --------------------------------------------------------------------------- one task set


def _assoc_table(assoc: pd.DataFrame, caption: str) -> _r.Table:
    level = round(100 * float(assoc["ci_level"].iloc[0])) if len(assoc) else 95
    return _r.Table(
        caption=caption,
        header=[
            "relation",
            "x",
            "y",
            "method",
            "scope",
            "stratum",
            "n",
            "estimate",
            f"{level}% interval",
            "p",
            "p_adj",
            "p method",
            "note",
        ],
        rows=[
            [
                r["relation"],
                r["x"],
                r["y"],
                r["method"],
                r["scope"],
                r["stratum"],
                _r.num(r["n"]),
                _r.num(r["estimate"], 3, signed=True),
                _r.interval(r["ci_low"], r["ci_high"]),
                _r.pval(r["p_value"]),
                _r.pval(r["p_adjusted"]),
                r["p_method"],
                r["note"],
            ]
            for _, r in assoc.iterrows()
        ],
        text_columns=frozenset({0, 1, 2, 3, 4, 5, 11, 12}),
    )


def _associations_part(
    joint: pd.DataFrame,
    wcols: list[str],
    size_col: str | None,
    tasks: Sequence[str],
    opts: _Options,
    sec: _r.Section,
    found: _Findings,
    out: dict[str, Any],
) -> None:
    from gradlens import stats

    icols = [c for c in ("conflict_freq.mean", "cosine.mean") if _present(joint, c)]
    acols = [f"{opts.metric}.mean"]
    if len(tasks) <= 4:
        acols = [f"{opts.metric}.{t}" for t in tasks] + acols
    acols = [c for c in acols if _present(joint, c)]
    if not icols or not acols:
        missing = "interference summaries" if not icols else f"final {opts.metric} on {opts.split}"
        found.unsupported.append(
            f"Associations on {'|'.join(tasks)} could not be tested: the runs have no {missing}."
        )
        return
    common = {
        "weight_cols": wcols,
        "interference_cols": icols,
        "accuracy_cols": acols,
        "size_col": size_col,
        "correction": opts.correction,
        "group_cols": [c for c in [size_col, *wcols] if c] or None,
        "n_boot": opts.n_boot,
        "n_perm": opts.n_perm,
        "seed": opts.seed,
        "progress": opts.progress,
    }
    primary = opts.methods[0]
    # The family the summary rests on: one method, pooled and partial; kept small so that a
    # correction over it leaves power. Everything else is a second, separately corrected family.
    main = stats.associations(joint, methods=[primary], stratify=False, **common)
    more = stats.associations(joint, methods=list(opts.methods), stratify=True, **common)
    more = more[~((more["method"] == primary) & more["scope"].isin(["pooled", "partial"]))]
    if len(more):
        more = more.assign(
            p_adjusted=stats.adjust(more["p_value"].to_numpy(np.float64), opts.correction),  # type: ignore[arg-type]
            n_tests=int(np.isfinite(more["p_value"].to_numpy(np.float64)).sum()),
        )
    out["associations"] = main
    out["associations_secondary"] = more
    n_tests = int(main["n_tests"].iloc[0]) if len(main) else 0
    n_more = int(more["n_tests"].iloc[0]) if len(more) else 0
    corr = _CORRECTION_NAME[opts.correction]
    level = round(100 * float(main["ci_level"].iloc[0])) if len(main) else 95
    sec.paragraphs.append(
        f"Associations across runs: {primary} correlations pooled over runs and partial on "
        f"model size (primary family, {n_tests} tests), then {', '.join(opts.methods)} "
        f"pooled, partial and within each model size (secondary family, {n_more} "
        f"tests). {level}% bootstrap intervals (configurations resampled), permutation "
        f"p-values, each family adjusted with {corr}."
    )
    sec.tables.append(_assoc_table(main, f"Primary associations ({corr} over {n_tests} tests)"))
    if len(more):
        sec.tables.append(
            _assoc_table(more, f"Secondary associations ({corr} over {n_more} tests)")
        )
    floor = n_tests / (opts.n_perm + 1) if opts.correction == "holm" else 1 / (opts.n_perm + 1)
    if opts.n_perm and floor >= opts.alpha:
        found.unsupported.append(
            f"With {opts.n_perm} permutations and {n_tests} tests, the smallest adjusted "
            f"p-value attainable is {floor:.2g} >= alpha = {opts.alpha}: no association can be "
            f"declared here whatever the data; raise n_perm above "
            f"{math.ceil(n_tests / opts.alpha)}."
        )
    inter = icols[0]
    relations = []
    if wcols:
        relations.append(("weight->interference", wcols[0], inter))
    relations.append(("interference->accuracy", inter, f"{opts.metric}.mean"))
    if wcols:
        relations.append(("weight->accuracy", wcols[0], f"{opts.metric}.mean"))
    for relation, x, y in relations:

        def pick(t: pd.DataFrame, rel: str = relation, a: str = x, b: str = y) -> pd.DataFrame:
            return t[
                (t["relation"] == rel) & (t["x"] == a) & (t["y"] == b) & (t["method"] == primary)
            ]

        sel = pick(main)
        row = sel[sel["scope"] == "partial"]
        row = row if len(row) else sel[sel["scope"] == "pooled"]
        if row.empty:
            continue
        strata = pick(more) if len(more) else more
        strata = strata[strata["scope"] == "stratum"] if len(strata) else strata
        _association_sentence(row.iloc[0], strata, primary, opts, n_tests, found)


def _association_sentence(
    row: pd.Series,
    rows: pd.DataFrame,
    method: str,
    opts: _Options,
    n_tests: int,
    found: _Findings,
) -> None:
    sym = _SYMBOL[method]
    bare, y = _describe(row["x"], opts.metric), _describe(row["y"], opts.metric)
    x = f"the {bare}" if bare.startswith("weight of") else bare
    if not math.isfinite(float(row["estimate"])):
        found.unsupported.append(
            f"The association of {x} with {y} could not be estimated ({row['note']})."
        )
        return
    stat = _stat(row, sym)
    where = f"{_scope(row)}, n = {_r.num(row['n'])} runs, {opts.correction} over {n_tests} tests"
    strata = rows
    strata_txt = ""
    if len(strata):
        same = strata[
            (strata["p_adjusted"] < opts.alpha)
            & (np.sign(strata["estimate"]) == np.sign(row["estimate"]))
        ]
        strata_txt = (
            f" Within single model sizes it is significant (secondary family) in {len(same)} "
            f"of {len(strata)}."
        )
    p_adj = float(row["p_adjusted"])
    if math.isfinite(p_adj) and p_adj < opts.alpha:
        direction = "higher" if row["estimate"] > 0 else "lower"
        found.supported.append(
            f"{x[0].upper() + x[1:]} and {y} have a {_KIND[method]} association: higher {bare} "
            f"goes with {direction} {y} ({stat}; {where}).{strata_txt}"
        )
    else:
        lo, hi = float(row["ci_low"]), float(row["ci_high"])
        bound = ""
        if math.isfinite(lo) and math.isfinite(hi):
            bound = (
                f" The interval leaves room for |{sym}| up to {max(abs(lo), abs(hi)):.2f}, so "
                f"a weaker association is not ruled out."
            )
        found.unsupported.append(
            f"No evidence of a {_KIND[method]} association between {x} and {y} ({stat}; "
            f"{where}).{bound}{strata_txt}"
        )


def _optimum_part(
    joint: pd.DataFrame,
    wcol: str,
    size_col: str | None,
    opts: _Options,
    sec: _r.Section,
    found: _Findings,
    out: dict[str, Any],
) -> pd.DataFrame | None:
    from gradlens import stats

    score = f"{opts.metric}.mean"
    if not _present(joint, score):
        return None
    work = joint
    scol = size_col
    if scol is None:
        work = joint.assign(**{"model size": "all runs"})
        scol = "model size"
    opt = stats.optimal_weight(
        work,
        weight_col=wcol,
        score_col=score,
        size_cols=[scol],
        n_boot=opts.n_boot,
        seed=opts.seed,
    )
    out["optimal_weight"] = opt
    level = round(100 * float(opt["ci_level"].iloc[0])) if len(opt) else 95
    sec.tables.append(
        _r.Table(
            caption=f"Optimal {wcol} per model size (grid optimum of the mean {score} over "
            f"seeds; {level}% bootstrap interval, seeds resampled within each weight)",
            header=[
                scol,
                "p*",
                f"{level}% interval",
                f"{score} at p*",
                "weights",
                "runs",
                "min seeds",
            ],
            rows=[
                [
                    _r.num(r[scol], 4),
                    _r.num(r["p_star"]),
                    _r.interval(r["ci_low"], r["ci_high"]),
                    _r.num(r["score_at_p_star"], 4),
                    _r.num(r["n_weights"]),
                    _r.num(r["n_runs"]),
                    _r.num(r["min_seeds"]),
                ]
                for _, r in opt.iterrows()
            ],
        )
    )
    wdesc = _describe(wcol, opts.metric)
    stars = "; ".join(
        f"{_r.num(r['p_star'])} {_r.interval(r['ci_low'], r['ci_high'])}"
        + (f" at {_size_label(scol, r[scol])}" if size_col else "")
        for _, r in opt.iterrows()
    )
    if len(opt) and int(opt["min_seeds"].min()) < 2:
        found.unsupported.append(
            f"The intervals of the optimal {wdesc} do not reflect seed noise: some weights have "
            "a single seed."
        )
    if size_col is None or len(opt) < 2:
        found.supported.append(f"The best {wdesc} in this sweep is {stars}.")
        return opt
    trend = stats.optimal_weight_trend(
        joint,
        weight_col=wcol,
        score_col=score,
        size_col=size_col,
        n_boot=opts.n_boot,
        seed=opts.seed,
    )
    out["optimal_weight_trend"] = trend
    sec.tables.append(
        _r.Table(
            caption=f"Does the optimal weight move with model size? Slope of p* on {trend['x']}",
            header=["slope", f"{level}% interval", "p", "spearman (sizes, p*)", "sizes"],
            rows=[
                [
                    _r.num(trend["slope"], 3, signed=True),
                    _r.interval(trend["ci_low"], trend["ci_high"], 3),
                    _r.pval(trend["p_value"]),
                    _r.num(trend["spearman"], 2),
                    _r.num(trend["n_sizes"]),
                ]
            ],
        )
    )
    stat = (
        f"slope = {_r.num(trend['slope'], 2, signed=True)} per unit of {trend['x']} "
        f"{_r.interval(trend['ci_low'], trend['ci_high'], 3)}, p = {_r.pval(trend['p_value'])}, "
        f"{trend['n_sizes']} sizes"
    )
    base = f"The optimal {wdesc} per model size is {stars}."
    p = float(trend["p_value"])
    if math.isfinite(p) and p < opts.alpha:
        found.supported.append(f"{base} It moves with model size ({stat}).")
    else:
        found.supported.append(base)
        found.unsupported.append(
            f"No evidence that the optimal {wdesc} moves with model size ({stat}); the data "
            f"are consistent with one weight for all sizes within that interval."
        )
    return opt


def _gain_part(
    joint: pd.DataFrame,
    single: pd.DataFrame,
    tasks: Sequence[str],
    wcols: list[str],
    size_col: str | None,
    opts: _Options,
    sec: _r.Section,
    found: _Findings,
    out: dict[str, Any],
) -> pd.DataFrame | None:
    from gradlens import stats

    base = single[single["tasks"].astype(str).isin(list(tasks))]
    label = "|".join(tasks)
    if base.empty:
        found.unsupported.append(
            f"The gain of joint over single-task training on {label} is not testable: the "
            "sweep has no single-task runs of these tasks."
        )
        return None
    grid_cols = ["model.depth", "model.width"]
    if all(_present(joint, c) for c in grid_cols):
        gcols = grid_cols
    elif size_col is not None:
        gcols = [size_col]
    else:
        gcols = []
        joint = joint.assign(_size="all")
        base = base.assign(_size="all")
        gcols = ["_size"]
    gain = stats.joint_gain(
        pd.concat([joint, base], ignore_index=True),
        size_cols=gcols,
        metric=opts.metric,
        n_boot=opts.n_boot,
        seed=opts.seed,
    )
    out["joint_gain"] = gain
    # one configuration per size, chosen on the selection split, not on the reported scores
    sel_col = "_select" if joint["_select"].notna().all() else f"{opts.metric}.mean"
    chosen_on = opts.select_split if sel_col == "_select" else f"{opts.split} (optimistic)"
    keys = [*gcols, *wcols] if wcols else gcols
    means = joint.groupby(keys, dropna=False)[sel_col].mean().reset_index()
    best = means.loc[means.groupby(gcols, dropna=False)[sel_col].idxmax()]
    picked = gain.merge(best[keys], on=keys, how="inner") if wcols else gain
    out["joint_gain_selected"] = picked
    out["joint_gain_selected_on"] = chosen_on
    level = round(100 * float(gain["ci_level"].iloc[0])) if len(gain) else 95
    sec.paragraphs.append(
        f"Gain of joint over single-task training: mean {opts.metric} on {opts.split} of the "
        f"joint runs minus that of the single-task runs of the same size, per task, at the "
        f"weight with the best mean {opts.metric} on {chosen_on} for each size; {level}% "
        "bootstrap intervals (paired by seed when the seeds match), not adjusted for the "
        "number of cells."
    )
    sec.tables.append(
        _r.Table(
            caption=f"Joint minus single-task {opts.metric} at the selected weight",
            header=[
                *gcols,
                *wcols,
                "task",
                "joint",
                "single",
                "gain",
                f"{level}% interval",
                "paired",
                "note",
            ],
            rows=[
                [
                    *[_r.num(r[c], 4) for c in gcols],
                    *[_r.num(r[c]) for c in wcols],
                    r["task"],
                    _r.num(r["joint_mean"], 4),
                    _r.num(r["single_mean"], 4),
                    _r.num(r["gain"], 3, signed=True),
                    _r.interval(r["ci_low"], r["ci_high"], 3),
                    str(bool(r["paired"])),
                    r["note"],
                ]
                for _, r in picked.iterrows()
            ],
            text_columns=frozenset({len(gcols) + len(wcols), len(gcols) + len(wcols) + 7}),
        )
    )
    ok = picked[np.isfinite(picked["gain"].to_numpy(np.float64))]
    if ok.empty:
        found.unsupported.append(f"No gain of joint training on {label} could be computed.")
        return picked
    above = ok[ok["ci_low"] > 0]
    below = ok[ok["ci_high"] < 0]
    unclear = len(ok) - len(above) - len(below)
    cells = f"(model size, task) cells of {label}"
    if len(above):
        found.supported.append(
            f"Joint training beats single-task training in {len(above)} of {len(ok)} {cells} "
            f"(interval above 0; largest gain {_r.num(above['gain'].max(), 3, signed=True)})."
        )
    if len(below):
        found.supported.append(
            f"Joint training is worse than single-task training in {len(below)} of {len(ok)} "
            f"{cells} (interval below 0; largest loss {_r.num(below['gain'].min(), 3)})."
        )
    if unclear:
        found.unsupported.append(
            f"In {unclear} of {len(ok)} {cells} the interval of the gain includes 0: no evidence "
            "either way."
        )
    size_for_trend = size_col if size_col and size_col in joint.columns else None
    if size_for_trend and gcols != ["_size"]:
        per_size = ok.groupby(gcols)["gain"].mean().reset_index()
        sizes = joint.groupby(gcols)[size_for_trend].first().reset_index()
        per_size = per_size.merge(sizes, on=gcols)
        if len(per_size) >= 3:
            res = stats.correlate(
                np.log10(per_size[size_for_trend].astype(float)),
                per_size["gain"],
                method="spearman",
                n_boot=0,
                n_perm=opts.n_perm,
                seed=opts.seed,
            )
            out["gain_size_trend"] = res
            stat = (
                f"spearman rho = {_r.num(res['estimate'], 2, signed=True)} between "
                f"{size_for_trend} and the mean gain over tasks, p = {_r.pval(res['p_value'])} "
                f"({res['p_method']}, {len(per_size)} sizes)"
            )
            if math.isfinite(res["p_value"]) and res["p_value"] < opts.alpha:
                word = "grows" if res["estimate"] > 0 else "shrinks"
                found.supported.append(
                    f"The gain of joint training {word} with model size ({stat})."
                )
            else:
                found.unsupported.append(
                    f"No evidence that the gain of joint training changes with model size ({stat})."
                )
    return picked


def _within_part(
    joint: pd.DataFrame,
    by_id: dict[str, Any],
    opts: _Options,
    sec: _r.Section,
    found: _Findings,
    out: dict[str, Any],
) -> None:
    from gradlens import stats

    rows = []
    for rid in joint["run_id"]:
        try:
            res = stats.within_run(
                by_id[rid],
                metric="conflict",
                eval_metric=opts.metric,
                split="val",
                n_boot=opts.n_boot,
                seed=opts.seed,
            )
        except GradlensError as exc:
            rows.append({"run_id": rid, "note": str(exc)})
            continue
        rows.append({"run_id": rid, **res})
    table = pd.DataFrame(rows)
    if "p_value" not in table:
        table["p_value"] = np.nan
    tested = table[table["p_value"].notna()]
    if tested.empty:
        found.unsupported.append(
            f"Within-run correlation of per-epoch conflict with validation {opts.metric} is not "
            "testable: the runs have no per-epoch validation evals (points 'epoch:<k>')."
        )
        out["within_run"] = table
        return
    table["p_adjusted"] = np.nan
    table.loc[tested.index, "p_adjusted"] = stats.adjust(
        tested["p_value"].to_numpy(np.float64),
        method=opts.correction,  # type: ignore[arg-type]
    )
    out["within_run"] = table
    tested = table.loc[tested.index]
    level = round(100 * float(tested["ci_level"].iloc[0]))
    corr = _CORRECTION_NAME[opts.correction]
    sec.paragraphs.append(
        f"Within each run, per-epoch conflict frequency against validation {opts.metric} "
        f"(Pearson r; {level}% circular block bootstrap interval; p from a t-test on the "
        f"effective number of epochs of two autocorrelated series; {corr} over the "
        f"{len(tested)} runs)."
    )
    sec.tables.append(
        _r.Table(
            caption=f"Within-run correlation of conflict with validation {opts.metric}",
            header=["run", "epochs", "n_eff", "r", f"{level}% interval", "p", "p_adj", "note"],
            rows=[
                [
                    r["run_id"],
                    _r.num(r.get("n")),
                    _r.num(r.get("n_eff"), 3),
                    _r.num(r.get("estimate"), 3, signed=True),
                    _r.interval(r.get("ci_low"), r.get("ci_high")),
                    _r.pval(r.get("p_value")),
                    _r.pval(r.get("p_adjusted")),
                    r.get("note", ""),
                ]
                for _, r in table.iterrows()
            ],
            text_columns=frozenset({0, 7}),
        )
    )
    r = tested["estimate"].to_numpy(np.float64)
    sig = tested[tested["p_adjusted"] < opts.alpha]
    stat = (
        f"median r = {_r.num(np.nanmedian(r), 2, signed=True)}, range "
        f"{_r.num(np.nanmin(r), 2, signed=True)} to {_r.num(np.nanmax(r), 2, signed=True)}; "
        f"{len(sig)} of {len(tested)} runs significant after {opts.correction}"
    )
    skipped = len(table) - len(tested)
    if skipped:
        stat += f"; {skipped} runs not testable (see the table notes)"
    if len(sig):
        found.supported.append(
            f"Per-epoch conflict tracks validation {opts.metric} within some runs ({stat})."
        )
    else:
        found.unsupported.append(
            f"No evidence within runs that per-epoch conflict tracks validation {opts.metric} "
            f"({stat})."
        )


def _representative(
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


def _pbt_schedule(
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


def _task_set_section(
    number: int,
    tasks: list[str],
    joint: pd.DataFrame,
    single: pd.DataFrame,
    by_id: dict[str, Any],
    opts: _Options,
    found: _Findings,
) -> tuple[_r.Section, dict[str, Any]]:
    from gradlens import plots

    label = "|".join(tasks)
    sec = _r.Section(title=f"Tasks: {', '.join(tasks)}")
    out: dict[str, Any] = {"tasks": tasks, "n_joint_runs": len(joint)}
    wcols = _weight_cols(joint, tasks)
    size_col = "model.n_params" if _present(joint, "model.n_params") else None
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
        _figure(
            figs,
            f"{slug}-heatmap.png",
            fig,
            "Mean cosine between task gradients (all shared parameters), and how often "
            "it is negative, pooled over every probed step of every joint run.",
            opts.dpi,
        )
    if wcols and _present(joint, "conflict_freq.mean"):
        fig = plots.weight_vs_interference(
            joint, weight_col=wcols[0], interference_col="conflict_freq.mean", size_col=size_col
        )
        _figure(
            figs,
            f"{slug}-weight-interference.png",
            fig,
            f"Conflict frequency of each run against {wcols[0]}, with a least-squares line "
            "and 95% band per model size.",
            opts.dpi,
        )

    _associations_part(joint, wcols, size_col, tasks, opts, sec, found, out)
    opt = None
    if len(wcols) == 1:
        opt = _optimum_part(joint, wcols[0], size_col, opts, sec, found, out)
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
            _figure(
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
    picked = _gain_part(joint, single, tasks, wcols, size_col, opts, sec, found, out)
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
            _figure(
                figs,
                f"{slug}-gain-grid.png",
                fig,
                f"Joint minus single-task {opts.metric} per depth and width at the selected "
                "weight" + (", per task, with intervals." if panel else ", mean over tasks."),
                opts.dpi,
            )
    schedule, end = _pbt_schedule(joint, by_id)
    if schedule is not None:
        out["pbt_schedule"] = schedule
        fig = plots.pbt_schedules(schedule, end=end)
        _figure(
            figs,
            f"{slug}-pbt.png",
            fig,
            f"Loss-weight schedules of the {schedule['member'].nunique()} PBT members "
            "(weights stacked; each change is an exploit/explore step).",
            opts.dpi,
        )
    rep = _representative(joint, wcols, size_col, opt)
    run = by_id[rep]
    if len(run.layers) > 2:
        fig = plots.layer_step_heatmap(run, title=f"Run {rep}: mean pairwise cosine per layer")
        _figure(
            figs,
            f"{slug}-layers.png",
            fig,
            f"Layer x step mean pairwise cosine of the run {rep}.",
            opts.dpi,
        )
    fig = plots.conflict_timeline(run, eval_metric=opts.metric, title=f"Run {rep}")
    _figure(
        figs,
        f"{slug}-timeline.png",
        fig,
        f"Conflict over training and validation {opts.metric} of the run {rep}.",
        opts.dpi,
    )
    out["representative_run"] = rep
    _within_part(joint, by_id, opts, sec, found, out)
    return sec, out


# --------------------------------------------------------------------------- entry point


def _check(value: Any, name: str, kind: type, minimum: float | None = None) -> None:
    bad = isinstance(value, bool) or not isinstance(value, kind)
    if not bad and minimum is not None and value < minimum:
        bad = True
    if bad:
        raise GradlensError(
            f"`{name}` should be {'an int' if kind is int else 'a number'}"
            f"{f' >= {minimum}' if minimum is not None else ''}; found {value!r}."
        )


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

    Returns:
        The paths written.

    Raises:
        GradlensError: On a bad argument; StoreError if ``sweep_dir`` holds no run.
    """
    from tqdm.auto import tqdm

    from gradlens import stats

    if correction not in _CORRECTION_NAME:
        raise GradlensError(
            f"`correction` should be one of {list(_CORRECTION_NAME)}; found {correction!r}."
        )
    bad = [m for m in methods if m not in _SYMBOL] if not isinstance(methods, str) else [methods]
    if bad or not methods:
        raise GradlensError(
            f"`methods` should be a non-empty list of {list(_SYMBOL)}; found {methods!r}."
        )
    _check(alpha, "alpha", float)
    if not 0 < alpha < 1:
        raise GradlensError(f"`alpha` should lie in (0, 1); found {alpha!r}.")
    for name, val in (("n_boot", n_boot), ("n_perm", n_perm), ("dpi", dpi)):
        _check(val, name, int, 1 if name == "dpi" else 0)
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise GradlensError(f"`sweep_dir` should be a directory of runs; found {sweep}.")
    opts = _Options(
        split,
        select_split,
        eval_metric,
        tuple(methods),
        correction,
        float(alpha),
        n_boot,
        n_perm,
        seed,
        progress,
        dpi,
    )
    out = Path(out_dir) if out_dir is not None else sweep / "report"

    table, by_id, index = _load(sweep, opts)
    table["_select"] = _selection_scores(table, index, opts).to_numpy()
    joint_all = table[table["n_tasks"] >= 2]
    single = table[table["n_tasks"] == 1]
    found = _Findings()
    sections: list[_r.Section] = []
    results: list[dict[str, Any]] = []
    task_sets = sorted(joint_all["tasks"].astype(str).unique())
    if not task_sets:
        found.unsupported.append(
            "Nothing about interference is testable: the sweep has no run with two or more tasks."
        )
    for number, ts in enumerate(tqdm(task_sets, desc="task sets", disable=not progress), 1):
        joint = joint_all[joint_all["tasks"].astype(str) == ts]
        sec, res = _task_set_section(number, ts.split("|"), joint, single, by_id, opts, found)
        sections.append(sec)
        results.append(res)

    import gradlens

    sizes = table["model.n_params"].nunique() if "model.n_params" in table else 0
    title = f"gradlens report: {sweep.name}"
    meta_lines = [
        f"Sweep: {sweep} ({len(table)} runs: {len(joint_all)} joint, {len(single)} single-task; "
        f"{sizes} model sizes).",
        f"Scores: final {eval_metric} on {split}; weights for the gain chosen on "
        f"{select_split}. Correction: {_CORRECTION_NAME[correction]}; alpha = {alpha}. "
        f"Bootstrap resamples: {n_boot}; permutations: {n_perm}; seed {seed}. "
        f"gradlens {gradlens.__version__}.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    written = []
    for sec in sections:
        for fig in sec.figures:
            path = fig_dir / fig.name
            path.write_bytes(fig.png)
            written.append(path)
    html_path, md_path, json_path = out / "report.html", out / "report.md", out / "stats.json"
    html_path.write_text(
        _r.render_html(title, meta_lines, found.supported, found.unsupported, sections),
        encoding="utf-8",
    )
    md_path.write_text(
        _r.render_markdown(
            title, meta_lines, found.supported, found.unsupported, sections, "figures"
        ),
        encoding="utf-8",
    )
    runs_cols = [c for c in table.columns if not c.startswith(("versions.", "_"))]
    stats.to_json(
        {
            "gradlens_version": gradlens.__version__,
            "sweep": str(sweep),
            "options": {
                "split": split,
                "select_split": select_split,
                "eval_metric": eval_metric,
                "methods": list(methods),
                "correction": correction,
                "alpha": alpha,
                "n_boot": n_boot,
                "n_perm": n_perm,
                "seed": seed,
            },
            "summary": {"supported": found.supported, "not_supported": found.unsupported},
            "task_sets": results,
            "runs": table[runs_cols],
        },
        json_path,
    )
    return ReportPaths(out, md_path, html_path, json_path, tuple(written))
