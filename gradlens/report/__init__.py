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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError
from gradlens._types import TOTAL_LAYER
from gradlens.report import _arms as _arms
from gradlens.report import _claims as _claims
from gradlens.report import _render as _r
from gradlens.report._run import build_run_page
from gradlens.stats import _gain as _gain

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


_Verdict = tuple[list[str], list[str]]


@dataclass
class _Findings:
    """The summary: adjusted tested claims; inconclusive, equivalent or untestable; estimates."""

    supported: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    descriptive: list[str] = field(default_factory=list)
    pending: list[tuple[str, float, Callable[[float], _Verdict], int]] = field(
        default_factory=list
    )

    def defer(self, family: str, p: float, verdict: Callable[[float], _Verdict]) -> None:
        """Hold the claims of one test family until every family of the report is known.

        ``p`` is the family's smallest adjusted p-value (NaN: nothing was tested);
        ``verdict(level)`` returns the (supported, not supported) sentences at that level.
        """
        self.pending.append((family, p, verdict, len(self.unsupported)))

    def resolve(self, alpha: float) -> dict[str, Any]:
        """Sort the held claims with Bonferroni over the report's test families: each family
        (already adjusted within, e.g. Holm) is read at ``alpha / F``, so the chance of any
        false "supported" line in the whole report is at most ``alpha``."""
        families = sorted({f for f, p, _, _ in self.pending if math.isfinite(p)})
        level = alpha / max(1, len(families))
        shift = 0
        for family, _p, verdict, pos in self.pending:
            yes, no = verdict(level)
            tag = (
                f" [family '{family}': significant at alpha / {len(families)} = {level:.3g}, "
                f"Bonferroni over the {len(families)} test families of this report]"
            )
            self.supported += [line + tag for line in yes]
            self.unsupported[pos + shift : pos + shift] = no
            shift += len(no)
        self.pending = []
        return {"alpha": alpha, "families": families, "level_per_family": level}


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
    margin_r: float = 0.1
    margin_gain: float = 0.01
    power_sims: int = 200
    figures: bool = True
    n_families: int = 5


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
    from gradlens.plots._util import size_label

    return size_label(col, value).replace("\\$", "$")


def _present(table: pd.DataFrame, col: str) -> bool:
    return col in table.columns and table[col].notna().any()


# --------------------------------------------------------------------------- figures


def _png(fig: Any, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


class _NoFigures:
    """Stands in for :mod:`gradlens.plots` when a report is built without figures (e.g. the
    calibration of its statistics over hundreds of sweeps): every drawing returns ``None``."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _figure(figs: list[_r.Figure], name: str, fig: Any, caption: str, dpi: int) -> None:
    if fig is None:
        return
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


def _family_n_perm(
    joint: pd.DataFrame,
    common: dict[str, Any],
    methods: list[str],
    stratify: bool,
    opts: _Options,
    level: float,
) -> int:
    """Permutations for a family: enough for its Holm floor to sit at ``level / 2`` at most."""
    from gradlens import stats

    probe = stats.associations(
        joint, methods=methods, stratify=stratify, **{**common, "n_boot": 0, "n_perm": 0}
    )
    m = int(np.isfinite(probe["estimate"].to_numpy(np.float64)).sum())
    return _claims.n_perm_for(m, level, opts.n_perm)


def _floor_warning(family: str, table: pd.DataFrame, opts: _Options, level: float) -> _Verdict:
    """The warnings of a family whose tests cannot reach ``level`` whatever the data."""
    if not len(table) or not opts.n_perm:
        return [], []
    floor, stuck = _claims.family_floor(table, opts.correction, level)
    n = int(np.isfinite(table["p_value"].to_numpy(np.float64)).sum())
    if not math.isfinite(floor):
        return [], []
    if floor >= level:
        return [], [
            f"The {family} ({n} tests) cannot reject anything whatever the data: its "
            f"smallest attainable adjusted p-value is {floor:.2g} >= its level {level:.3g} "
            f"(too few permutations, or too few configurations to permute)."
        ]
    if stuck:
        return [], [
            f"{stuck} of the {n} tests of the {family} cannot reach its level {level:.3g} "
            "after the correction whatever the data: they permute whole configurations and "
            "have too few of them (e.g. within one model size); their smallest attainable p "
            "is in the p_floor column of stats.json."
        ]
    return [], []


def _association_mde(
    joint: pd.DataFrame,
    wcols: list[str],
    size_col: str | None,
    inter: str,
    n_tests: int,
    level: float,
    opts: _Options,
    out: dict[str, Any],
) -> str:
    """The smallest weight -> outcome correlation the primary family detects with 80 % power
    at the report's level for the family, ``level`` (before the family's own Holm)."""
    from gradlens import stats

    if not opts.power_sims or not wcols or not opts.n_perm:
        return ""
    keys = [c for c in [size_col, *wcols] if c]
    configs = joint.groupby(keys, dropna=False).size()
    n_sizes = int(joint[size_col].nunique()) if size_col else 1
    n_weights = max(3, round(len(configs) / max(n_sizes, 1)))
    seeds = max(2, int(configs.min()))
    codes = joint.groupby(keys, dropna=False).ngroup().to_numpy()
    rho_icc = _claims.icc(pd.to_numeric(joint[inter], errors="coerce").to_numpy(), codes)
    mde = stats.min_detectable_effect(
        "association",
        sizes=n_sizes,
        weights=n_weights,
        seeds=seeds,
        icc=rho_icc,
        alpha=level,
        n_tests=max(1, n_tests),
        method=opts.methods[0],  # type: ignore[arg-type]
        n_sim=opts.power_sims,
        tol=0.02,
        seed=opts.seed,
    )
    out["association_mde"] = mde
    design = (
        f"{n_sizes} size(s) x {n_weights} weights x {seeds} seeds, seeds sharing "
        f"{rho_icc:.2f} of the noise of {inter} (ICC)"
    )
    if not mde["reachable"]:
        return (
            f" Power: with this design ({design}), {n_tests} tests and the family's level "
            f"{level:.3g}, no correlation reaches 80 % power (simulated, {opts.power_sims} "
            "studies)."
        )
    return (
        f" Power: with this design ({design}), {n_tests} tests and the family's level "
        f"{level:.3g}, a correlation of the weight with an outcome is detected with 80 % power "
        f"from |r| = {mde['effect']:.2f} (simulated, {opts.power_sims} studies; "
        "gradlens.stats.min_detectable_effect)."
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
    group_cols = [c for c in [size_col, *wcols] if c] or None
    common = {
        "weight_cols": wcols,
        "interference_cols": icols,
        "accuracy_cols": acols,
        "size_col": size_col,
        "correction": opts.correction,
        "group_cols": group_cols,
        "n_boot": opts.n_boot,
        "seed": opts.seed,
        "progress": opts.progress,
    }
    primary = opts.methods[0]
    # The family the summary rests on: the relations it quotes (first weight, first
    # interference summary, mean score), one method, pooled and partial; kept small so that a
    # correction over it leaves power. Everything else is a second, separately corrected family.
    # Each family gets enough permutations for its correction to be able to reject. The
    # primary family is read at alpha over the report's families (see _Findings.resolve);
    # opts.n_families bounds their number, so its n_perm is sized for that level.
    main_common = {
        **common,
        "weight_cols": wcols[:1],
        "interference_cols": icols[:1],
        "accuracy_cols": [c for c in acols if c == f"{opts.metric}.mean"] or acols[-1:],
    }
    level_main = opts.alpha / opts.n_families
    n_perm_main = _family_n_perm(joint, main_common, [primary], False, opts, level_main)
    n_perm_more = _family_n_perm(joint, common, list(opts.methods), True, opts, opts.alpha)
    main = stats.associations(
        joint, methods=[primary], stratify=False, n_perm=n_perm_main, **main_common
    )
    more = stats.associations(
        joint, methods=list(opts.methods), stratify=True, n_perm=n_perm_more, **common
    )
    keys = ["relation", "x", "y", "method", "scope"]
    in_main = more[keys].merge(main[keys], how="left", on=keys, indicator=True)["_merge"]
    more = more[(in_main == "left_only").to_numpy()]
    if len(more):
        more = more.assign(
            p_adjusted=stats.adjust(more["p_value"].to_numpy(np.float64), opts.correction),  # type: ignore[arg-type]
            n_tests=int(np.isfinite(more["p_value"].to_numpy(np.float64)).sum()),
        )
    out["associations"] = main
    out["associations_secondary"] = more
    out["n_perm"] = {"primary": n_perm_main, "secondary": n_perm_more}
    n_tests = int(main["n_tests"].iloc[0]) if len(main) else 0
    n_more = int(more["n_tests"].iloc[0]) if len(more) else 0
    corr = _CORRECTION_NAME[opts.correction]
    level = round(100 * float(main["ci_level"].iloc[0])) if len(main) else 95
    unit = (
        f"configurations ({', '.join(group_cols)}), the seeds of one configuration kept "
        "together" if group_cols else "runs"
    )
    cache: dict[float, str] = {}

    def mde_at(level: float) -> str:
        if level not in cache:
            cache[level] = _association_mde(
                joint, wcols, size_col, icols[0], n_tests, level, opts, out
            )
        return cache[level]

    sec.paragraphs.append(
        f"Associations across runs: {primary} correlations of the relations the summary quotes, "
        f"pooled over runs and partial on model size (primary family, {n_tests} tests), then "
        f"{', '.join(opts.methods)} for every summary, pooled, partial and within each model "
        f"size (secondary family, {n_more} tests). Resampling unit of both the {level}% "
        f"bootstrap intervals and the permutation p-values: {unit} ({n_perm_main} and "
        f"{n_perm_more} permutations); each family adjusted with {corr}."
    )
    sec.tables.append(_assoc_table(main, f"Primary associations ({corr} over {n_tests} tests)"))
    if len(more):
        sec.tables.append(
            _assoc_table(more, f"Secondary associations ({corr} over {n_more} tests)")
        )
    label = "|".join(tasks)
    found.defer(
        f"primary associations of {label}",
        math.nan,  # counted by the claims below
        lambda level: _floor_warning(f"primary association family of {label}", main, opts, level),
    )
    found.unsupported += _floor_warning(
        f"secondary association family of {label}", more, opts, opts.alpha
    )[1]
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
        r0 = row.iloc[0]
        found.defer(
            f"primary associations of {'|'.join(tasks)}",
            float(r0["p_adjusted"]),
            lambda level, r0=r0, strata=strata: _association_sentence(
                r0, strata, primary, opts, n_tests, level, mde_at
            ),
        )


def _association_sentence(
    row: pd.Series,
    rows: pd.DataFrame,
    method: str,
    opts: _Options,
    n_tests: int,
    level: float,
    mde_at: Callable[[float], str],
) -> _Verdict:
    sym = _SYMBOL[method]
    bare, y = _describe(row["x"], opts.metric), _describe(row["y"], opts.metric)
    x = f"the {bare}" if bare.startswith("weight of") else bare
    if not math.isfinite(float(row["estimate"])):
        return [], [f"The association of {x} with {y} could not be estimated ({row['note']})."]
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
    if math.isfinite(p_adj) and p_adj < level:
        direction = "higher" if row["estimate"] > 0 else "lower"
        return [
            f"{x[0].upper() + x[1:]} and {y} have a {_KIND[method]} association: higher {bare} "
            f"goes with {direction} {y} ({stat}; {where}).{strata_txt}"
        ], []
    lo, hi = float(row["ci_low"]), float(row["ci_high"])
    m = opts.margin_r
    if _claims.interval_verdict(lo, hi, m) == "equivalent":
        return [], [
            f"Equivalent to no {_KIND[method]} association within |{sym}| < {m:g}: the "
            f"interval of {x} with {y} lies inside (-{m:g}, {m:g}) ({stat}; {where})."
        ]
    bound = ""
    if math.isfinite(lo) and math.isfinite(hi):
        bound = (
            f" The interval leaves room for |{sym}| up to {max(abs(lo), abs(hi)):.2f}, so an "
            f"association is not ruled out (equivalence margin |{sym}| < {m:g})."
        )
    return [], [
        f"Inconclusive: no evidence of a {_KIND[method]} association between {x} and {y} "
        f"({stat}; {where}, not significant at the report's level {level:.3g}).{bound}"
        f"{strata_txt}{mde_at(level)}"
    ]


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
    best = f"The best {wdesc} in this sweep (grid optimum of the mean over seeds) is {stars}."
    if size_col is None or len(opt) < 2:
        found.descriptive.append(best)
        return opt
    # The test of a moving optimum fits a parabola per size when every size has 3 weights or
    # more: the grid optimum's bootstrap test has atoms at slope 0 and rejects 0.00-0.01 of null
    # sweeps (docs/stats.md); the table above stays the grid optimum, a description.
    quadratic = int(opt["n_weights"].min()) >= 3
    trend = stats.optimal_weight_trend(
        joint,
        weight_col=wcol,
        score_col=score,
        size_col=size_col,
        estimator="quadratic" if quadratic else "grid",
        n_boot=opts.n_boot,
        seed=opts.seed,
    )
    out["optimal_weight_trend"] = trend
    sec.tables.append(
        _r.Table(
            caption=f"Does the optimal weight move with model size? Slope of p* "
            f"({trend['estimator']} optimum) on {trend['x']}",
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
        f"{trend['n_sizes']} sizes, {trend['estimator']} optimum per size"
    )
    found.descriptive.append(best)
    p = float(trend["p_value"])

    def verdict(level: float) -> _Verdict:
        if math.isfinite(p) and p < level:
            return [f"The optimal {wdesc} moves with model size ({stat}; one test)."], []
        return [], [
            f"Inconclusive: no evidence that the optimal {wdesc} moves with model size "
            f"({stat}); slopes inside that interval are not ruled out, so this is not evidence "
            "of one weight for all sizes."
        ]

    found.defer(f"optimal-weight trend of {wcol}", p, verdict)
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
    both = pd.concat([joint, base], ignore_index=True)
    gain = stats.joint_gain(both, size_cols=gcols, metric=opts.metric)
    out["joint_gain"] = gain
    # Selection on the selection split when every joint run has it, else on the reported split:
    # either way on the other seeds only, so the evaluated seed never takes part in the choice.
    on_select = bool(joint["_select"].notna().all())
    sel_col = "_select" if on_select else f"{opts.metric}.mean"
    chosen_on = opts.select_split if on_select else f"{opts.split} (no {opts.select_split} scores)"
    # One configuration per size and seed, chosen on the selection scores of the other seeds:
    # the evaluated seed takes no part in the choice (see stats.selected_gain).
    picked = stats.selected_gain(
        both.assign(_sel=both[sel_col]), select_col="_sel", size_cols=gcols, metric=opts.metric
    )
    finite = np.isfinite(picked["p_value"].to_numpy(np.float64)) if len(picked) else []
    picked["p_adjusted"] = np.nan
    if len(picked):
        picked.loc[finite, "p_adjusted"] = stats.adjust(
            picked.loc[finite, "p_value"].to_numpy(np.float64),
            opts.correction,  # type: ignore[arg-type]
        )
    n_cells = int(np.count_nonzero(finite))
    tost = [
        _gain.equivalence_p(r["gain"], r["se"], r["df"], opts.margin_gain)
        for _, r in picked.iterrows()
    ]
    picked["p_equivalence"] = tost
    if len(picked):
        eq = np.asarray(tost, dtype=np.float64)
        ok_eq = np.isfinite(eq)
        picked["p_equivalence_adjusted"] = np.nan
        if ok_eq.any():
            picked.loc[ok_eq, "p_equivalence_adjusted"] = stats.adjust(
                eq[ok_eq],
                opts.correction,  # type: ignore[arg-type]
            )
    out["joint_gain_selected"] = picked
    out["joint_gain_selected_on"] = chosen_on
    level = round(100 * float(gain["ci_level"].iloc[0])) if len(gain) else 95
    corr = _CORRECTION_NAME[opts.correction]
    sec.paragraphs.append(
        f"Gain of joint over single-task training: per model size, task and seed, {opts.metric} "
        f"on {opts.split} of the joint run minus that of the single-task run of the same size "
        f"and seed, at the weight with the best mean {opts.metric} on {chosen_on} over the "
        f"other seeds (held-out selection, so the evaluated seed took no part in the choice); "
        f"the mean over seeds with a {level}% paired t interval and t-test, {corr} over the "
        f"{n_cells} cells; equivalence: two one-sided t-tests against +-{opts.margin_gain:g}."
    )
    sec.tables.append(
        _r.Table(
            caption=f"Joint minus single-task {opts.metric}, held-out selected weight",
            header=[
                *gcols,
                *wcols,
                "task",
                "gain",
                f"{level}% interval",
                "p",
                "p_adj",
                "p_adj equivalence",
                "seeds",
                "note",
            ],
            rows=[
                [
                    *[_r.num(r[c], 4) for c in gcols],
                    *[_r.num(r.get(c)) for c in wcols],
                    r["task"],
                    _r.num(r["gain"], 3, signed=True),
                    _r.interval(r["ci_low"], r["ci_high"], 3),
                    _r.pval(r["p_value"]),
                    _r.pval(r["p_adjusted"]),
                    _r.pval(r.get("p_equivalence_adjusted")),
                    _r.num(r["n_seeds"]),
                    r["note"],
                ]
                for _, r in picked.iterrows()
            ],
            text_columns=frozenset({len(gcols) + len(wcols), len(gcols) + len(wcols) + 7}),
        )
    )
    ok = picked[np.isfinite(picked["gain"].to_numpy(np.float64))] if len(picked) else picked
    if ok.empty:
        found.unsupported.append(
            f"No gain of joint training on {label} could be computed (it needs at least 2 "
            "seeds shared by the joint runs and the single-task baselines of a size)."
        )
        return picked
    cells = f"(model size, task) cells of {label}"

    def verdict(level: float) -> _Verdict:
        sig = ok["p_adjusted"] < level
        above, below = ok[sig & (ok["gain"] > 0)], ok[sig & (ok["gain"] < 0)]
        equiv = ok[~sig & (ok["p_equivalence_adjusted"] < opts.alpha)]
        unclear = len(ok) - len(above) - len(below) - len(equiv)
        how = f"paired t on held-out gains, {opts.correction} over {n_cells} cells"
        yes, no = [], []
        if len(above):
            yes.append(
                f"Joint training beats single-task training in {len(above)} of {len(ok)} "
                f"{cells} (largest gain {_r.num(above['gain'].max(), 3, signed=True)}; {how})."
            )
        if len(below):
            yes.append(
                f"Joint training is worse than single-task training in {len(below)} of "
                f"{len(ok)} {cells} (largest loss {_r.num(below['gain'].min(), 3)}; {how})."
            )
        if len(equiv):
            no.append(
                f"Joint and single-task training are equivalent within +-{opts.margin_gain:g} "
                f"in {len(equiv)} of {len(ok)} {cells} (two one-sided t-tests, "
                f"{opts.correction} at {opts.alpha})."
            )
        if unclear:
            no.append(
                f"Inconclusive in {unclear} of {len(ok)} {cells}: neither a gain, a loss nor "
                f"equivalence within +-{opts.margin_gain:g} is shown ({how}, at the report's "
                f"level {level:.3g}).{_gain_mde(ok, n_cells, level, opts, out)}"
            )
        return yes, no

    found.defer(f"gain cells of {label}", float(ok["p_adjusted"].min()), verdict)
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
                f"({res['p_method']}, {len(per_size)} sizes, smallest attainable p "
                f"{_r.pval(res['p_floor'])})"
            )

            def trend_verdict(level: float) -> _Verdict:
                if math.isfinite(res["p_value"]) and res["p_value"] < level:
                    word = "grows" if res["estimate"] > 0 else "shrinks"
                    return [f"The gain of joint training {word} with model size ({stat})."], []
                return [], [
                    f"Inconclusive: no evidence that the gain of joint training changes with "
                    f"model size ({stat})."
                ]

            found.defer(f"gain-size trend of {label}", float(res["p_value"]), trend_verdict)
    return picked


def _gain_mde(
    ok: pd.DataFrame, n_cells: int, level: float, opts: _Options, out: dict[str, Any]
) -> str:
    """The smallest gain a cell detects with 80 % power, in metric units (observed seed SD)."""
    from gradlens import stats

    if not opts.power_sims:
        return ""
    seeds = int(ok["n_seeds"].min())
    sd = float(np.sqrt(np.nanmean((ok["se"] ** 2 * ok["n_seeds"]).to_numpy(np.float64))))
    if seeds < 2 or not math.isfinite(sd):
        return ""
    mde = stats.min_detectable_effect(
        "gain",
        seeds=seeds,
        alpha=level,
        n_tests=max(1, n_cells),
        n_sim=max(opts.power_sims, 1000),
        seed=opts.seed,
    )
    out["gain_mde"] = {**mde, "sd_of_differences": sd, "in_metric_units": mde["effect"] * sd}
    if not mde["reachable"]:
        return f" With {seeds} seeds and {n_cells} cells no gain reaches 80 % power."
    return (
        f" With {seeds} seeds, {n_cells} cells and the observed SD of per-seed differences "
        f"({sd:.3g}), a gain of {mde['effect'] * sd:.3g} ({mde['effect']:.2f} SD) is detected "
        "with 80 % power (simulated; gradlens.stats.min_detectable_effect)."
    )


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
    pooled = stats.pool_correlations(
        tested["estimate"].to_numpy(np.float64), tested["n_eff"].to_numpy(np.float64), ci=0.95
    )
    out["within_run_pooled"] = pooled
    sec.paragraphs.append(
        f"Within each run, per-epoch conflict frequency against validation {opts.metric} "
        f"(Pearson r). Epochs are autocorrelated, so the interval and p-value use the "
        f"effective number of epochs of two AR(1) series (n_eff): a {level}% Fisher-z "
        f"interval on n_eff and a t-test on n_eff - 2 df, {corr} over the {len(tested)} runs. "
        f"The circular block-bootstrap interval is shown for reference only: at a few dozen "
        f"epochs it covers well under {level}% (docs/stats.md). Across runs, the per-run "
        f"correlations are pooled by Fisher z with DerSimonian-Laird random effects and a "
        f"Hartung-Knapp interval (runs with n_eff <= 3 carry no information and are left out)."
    )
    sec.tables.append(
        _r.Table(
            caption=f"Within-run correlation of conflict with validation {opts.metric}",
            header=[
                "run",
                "epochs",
                "n_eff",
                "r",
                f"{level}% interval (effective n)",
                "p (effective n)",
                "p_adj",
                "block bootstrap interval (undercovers)",
                "note",
            ],
            rows=[
                [
                    r["run_id"],
                    _r.num(r.get("n")),
                    _r.num(r.get("n_eff"), 3),
                    _r.num(r.get("estimate"), 3, signed=True),
                    _r.interval(r.get("ci_low_neff"), r.get("ci_high_neff")),
                    _r.pval(r.get("p_value")),
                    _r.pval(r.get("p_adjusted")),
                    _r.interval(r.get("ci_low"), r.get("ci_high")),
                    r.get("note", ""),
                ]
                for _, r in table.iterrows()
            ],
            text_columns=frozenset({0, 8}),
        )
    )
    r = tested["estimate"].to_numpy(np.float64)
    sig = tested[tested["p_adjusted"] < opts.alpha]
    stat = (
        f"median r = {_r.num(np.nanmedian(r), 2, signed=True)} over {len(tested)} runs; "
        f"{len(sig)} of {len(tested)} runs significant after {opts.correction}"
    )
    skipped = len(table) - len(tested)
    if skipped:
        stat += f"; {skipped} runs not testable (see the table notes)"
    if pooled["k"] < 2:
        found.unsupported.append(
            f"Within-run correlation of per-epoch conflict with validation {opts.metric}: "
            f"fewer than 2 runs with n_eff > 3 to pool ({stat}); inconclusive."
        )
        return
    pstat = (
        f"pooled r = {_r.num(pooled['estimate'], 2, signed=True)} "
        f"{_r.interval(pooled['ci_low'], pooled['ci_high'])}, p = {_r.pval(pooled['p_value'])}, "
        f"{pooled['k']} runs, tau^2 = {pooled['tau2']:.3g}; {stat}"
    )

    def verdict(level: float) -> _Verdict:
        if math.isfinite(pooled["p_value"]) and pooled["p_value"] < level:
            direction = "rises" if pooled["estimate"] > 0 else "falls"
            return [
                f"Within runs, validation {opts.metric} {direction} with per-epoch conflict "
                f"({pstat}; random-effects pooling, one test). Curves that both trend over "
                "training correlate without one driving the other."
            ], []
        lo, hi = pooled["ci_low"], pooled["ci_high"]
        if _claims.interval_verdict(lo, hi, opts.margin_r) == "equivalent":
            return [], [
                f"Within runs, per-epoch conflict and validation {opts.metric} are equivalent "
                f"to uncorrelated within |r| < {opts.margin_r:g} ({pstat})."
            ]
        return [], [
            f"Inconclusive: no evidence within runs that per-epoch conflict tracks validation "
            f"{opts.metric} ({pstat}); the interval does not rule out |r| up to "
            f"{max(abs(lo), abs(hi)):.2f}."
        ]

    found.defer("within-run pooled correlation", float(pooled["p_value"]), verdict)


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
    from gradlens import plots as _plots

    plots: Any = _plots if opts.figures else _NoFigures()

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
    counts = (("n_boot", n_boot), ("n_perm", n_perm), ("dpi", dpi), ("power_sims", power_sims))
    for name, val in counts:
        _check(val, name, int, 1 if name == "dpi" else 0)
    for name, val in (("margin_r", margin_r), ("margin_gain", margin_gain)):
        _check(val, name, float, 0.0)
    if not margin_r < 1:
        raise GradlensError(f"`margin_r` should be a correlation below 1; found {margin_r!r}.")
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
        float(margin_r),
        float(margin_gain),
        power_sims,
        bool(figures),
    )
    out = Path(out_dir) if out_dir is not None else sweep / "report"

    table, by_id, index = _load(sweep, opts)
    table["_select"] = _selection_scores(table, index, opts).to_numpy()
    # runs trained with a multi-task optimization method are arms, not weight points
    table, with_methods = _arms.split_methods(table, index)
    joint_all = table[table["n_tasks"] >= 2]
    single = table[table["n_tasks"] == 1]
    found = _Findings()
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
    for number, ts in enumerate(tqdm(task_sets, desc="task sets", disable=not progress), 1):
        joint = joint_all[joint_all["tasks"].astype(str) == ts]
        sec, res = _task_set_section(number, ts.split("|"), joint, single, by_id, opts, found)
        sections.append(sec)
        results.append(res)
    arms = _arms.method_arms(
        with_methods,
        size_col="model.n_params" if _present(with_methods, "model.n_params") else None,
        score_col=f"{eval_metric}.mean",
        n_boot=n_boot,
        seed=seed,
    )
    if len(arms):
        sections.append(_arms.arms_section(arms, eval_metric, split))

    decision = found.resolve(float(alpha))
    import gradlens

    # Sizes of the joint runs: a single-task baseline has its own parameter count (one head).
    sizes = joint_all["model.n_params"].nunique() if "model.n_params" in joint_all else 0
    title = f"gradlens report: {sweep.name}"
    meta_lines = [
        f"Sweep: {sweep} ({len(table)} runs: {len(joint_all)} joint, {len(single)} single-task; "
        f"{sizes} model sizes among the joint runs).",
        f"Scores: final {eval_metric} on {split}; weights for the gain chosen on "
        f"{select_split}. Correction: {_CORRECTION_NAME[correction]}; alpha = {alpha}. "
        f"Bootstrap resamples: {n_boot}; permutations: at least {n_perm}, more where a "
        f"family needs them to be able to reject; equivalence margins: |r| < {margin_r:g}, "
        f"|gain| < {margin_gain:g}; seed {seed}. "
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
        _r.render_html(
            title, meta_lines, found.supported, found.unsupported, sections, found.descriptive
        ),
        encoding="utf-8",
    )
    md_path.write_text(
        _r.render_markdown(
            title,
            meta_lines,
            found.supported,
            found.unsupported,
            sections,
            "figures",
            found.descriptive,
        ),
        encoding="utf-8",
    )
    runs_cols = [c for c in with_methods.columns if not c.startswith(("versions.", "_"))]
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
                "margin_r": margin_r,
                "margin_gain": margin_gain,
                "power_sims": power_sims,
                "figures": figures,
            },
            "summary": {
                "supported": found.supported,
                "not_supported": found.unsupported,
                "descriptive": found.descriptive,
                "decision": decision,
            },
            "task_sets": results,
            "arms": arms,
            "runs": with_methods[runs_cols],
        },
        json_path,
    )
    return ReportPaths(out, md_path, html_path, json_path, tuple(written))
