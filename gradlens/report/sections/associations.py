"""The associations part of a task set's section: correlations of weights, interference and
scores across runs in two separately corrected families (the primary one the summary quotes,
and the rest), their permutation floors and the smallest effect the primary family detects."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from gradlens.report import _claims as _claims
from gradlens.report import _render as _r
from gradlens.report.sections._common import (
    CORRECTION_NAME,
    KIND,
    SYMBOL,
    Findings,
    Method,
    Options,
    Verdict,
    describe,
    present,
    scope,
    stat_text,
)

__all__ = ["associations_part"]


def assoc_table(assoc: pd.DataFrame, caption: str) -> _r.Table:
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


def family_n_perm(
    joint: pd.DataFrame,
    common: dict[str, Any],
    methods: list[Method],
    stratify: bool,
    opts: Options,
    level: float,
) -> int:
    """Permutations for a family: enough for its Holm floor to sit at ``level / 2`` at most."""
    from gradlens import stats

    probe = stats.associations(
        joint, methods=methods, stratify=stratify, **{**common, "n_boot": 0, "n_perm": 0}
    )
    m = int(np.isfinite(probe["estimate"].to_numpy(np.float64)).sum())
    return _claims.n_perm_for(m, level, opts.n_perm)


def floor_warning(family: str, table: pd.DataFrame, opts: Options, level: float) -> Verdict:
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


def association_mde(
    joint: pd.DataFrame,
    wcols: list[str],
    size_col: str | None,
    inter: str,
    n_tests: int,
    level: float,
    opts: Options,
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
        method=opts.methods[0],
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


@dataclass
class _Families:
    """The two test families of a task set's associations and how they were computed."""

    main: pd.DataFrame  # primary: the relations the summary quotes, one method
    more: pd.DataFrame  # secondary: every other relation, method and stratum
    n_perm_main: int
    n_perm_more: int
    group_cols: list[str] | None  # the resampling unit: configurations, or runs (None)
    inter: str  # the first interference summary, the one the summary quotes


def associations_part(
    joint: pd.DataFrame,
    wcols: list[str],
    size_col: str | None,
    tasks: Sequence[str],
    opts: Options,
    sec: _r.Section,
    found: Findings,
    out: dict[str, Any],
) -> None:
    """Test the associations of one task set, describe them in ``sec`` and defer the claims."""
    cols = _columns(joint, tasks, opts, found)
    if cols is None:
        return
    fam = _families(joint, wcols, cols[0], cols[1], size_col, opts)
    out["associations"] = fam.main
    out["associations_secondary"] = fam.more
    out["n_perm"] = {"primary": fam.n_perm_main, "secondary": fam.n_perm_more}
    _describe_families(fam, opts, sec)
    n_tests = int(fam.main["n_tests"].iloc[0]) if len(fam.main) else 0
    cache: dict[float, str] = {}

    def mde_at(level: float) -> str:
        if level not in cache:
            cache[level] = association_mde(
                joint, wcols, size_col, fam.inter, n_tests, level, opts, out
            )
        return cache[level]

    _defer_claims(fam, wcols, tasks, opts, found, mde_at)


def _columns(
    joint: pd.DataFrame, tasks: Sequence[str], opts: Options, found: Findings
) -> tuple[list[str], list[str]] | None:
    """The interference and score columns to correlate (None, said so, if either is missing)."""
    icols = [c for c in ("conflict_freq.mean", "cosine.mean") if present(joint, c)]
    acols = [f"{opts.metric}.mean"]
    if len(tasks) <= 4:
        acols = [f"{opts.metric}.{t}" for t in tasks] + acols
    acols = [c for c in acols if present(joint, c)]
    if not icols or not acols:
        missing = "interference summaries" if not icols else f"final {opts.metric} on {opts.split}"
        found.unsupported.append(
            f"Associations on {'|'.join(tasks)} could not be tested: the runs have no {missing}."
        )
        return None
    return icols, acols


def _families(
    joint: pd.DataFrame,
    wcols: list[str],
    icols: list[str],
    acols: list[str],
    size_col: str | None,
    opts: Options,
) -> _Families:
    """The primary and the secondary family, each adjusted within itself."""
    from gradlens import stats

    group_cols = [c for c in [size_col, *wcols] if c] or None
    common: dict[str, Any] = {
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
    # primary family is read at alpha over the report's families (see Findings.resolve);
    # opts.n_families bounds their number, so its n_perm is sized for that level.
    main_common = {
        **common,
        "weight_cols": wcols[:1],
        "interference_cols": icols[:1],
        "accuracy_cols": [c for c in acols if c == f"{opts.metric}.mean"] or acols[-1:],
    }
    level_main = opts.alpha / opts.n_families
    n_perm_main = family_n_perm(joint, main_common, [primary], False, opts, level_main)
    n_perm_more = family_n_perm(joint, common, list(opts.methods), True, opts, opts.alpha)
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
            p_adjusted=stats.adjust(more["p_value"].to_numpy(np.float64), opts.correction),
            n_tests=int(np.isfinite(more["p_value"].to_numpy(np.float64)).sum()),
        )
    return _Families(main, more, n_perm_main, n_perm_more, group_cols, icols[0])


def _describe_families(fam: _Families, opts: Options, sec: _r.Section) -> None:
    """The paragraph saying how the families were tested, and their tables."""
    main, more = fam.main, fam.more
    n_tests = int(main["n_tests"].iloc[0]) if len(main) else 0
    n_more = int(more["n_tests"].iloc[0]) if len(more) else 0
    corr = CORRECTION_NAME[opts.correction]
    level = round(100 * float(main["ci_level"].iloc[0])) if len(main) else 95
    unit = (
        f"configurations ({', '.join(fam.group_cols)}), the seeds of one configuration kept "
        "together"
        if fam.group_cols
        else "runs"
    )
    sec.paragraphs.append(
        f"Associations across runs: {opts.methods[0]} correlations of the relations the summary "
        f"quotes, pooled over runs and partial on model size (primary family, {n_tests} tests), "
        f"then {', '.join(opts.methods)} for every summary, pooled, partial and within each "
        f"model size (secondary family, {n_more} tests). Resampling unit of both the {level}% "
        f"bootstrap intervals and the permutation p-values: {unit} ({fam.n_perm_main} and "
        f"{fam.n_perm_more} permutations); each family adjusted with {corr}."
    )
    sec.tables.append(assoc_table(main, f"Primary associations ({corr} over {n_tests} tests)"))
    if len(more):
        sec.tables.append(assoc_table(more, f"Secondary associations ({corr} over {n_more} tests)"))


def _defer_claims(
    fam: _Families,
    wcols: list[str],
    tasks: Sequence[str],
    opts: Options,
    found: Findings,
    mde_at: Callable[[float], str],
) -> None:
    """The families' floor warnings, and one deferred claim per quoted relation."""
    main, more = fam.main, fam.more
    primary = opts.methods[0]
    n_tests = int(main["n_tests"].iloc[0]) if len(main) else 0
    label = "|".join(tasks)
    found.defer(
        f"primary associations of {label}",
        math.nan,  # counted by the claims below
        lambda level: floor_warning(f"primary association family of {label}", main, opts, level),
    )
    found.unsupported += floor_warning(
        f"secondary association family of {label}", more, opts, opts.alpha
    )[1]
    score = f"{opts.metric}.mean"
    relations = [("weight->interference", wcols[0], fam.inter)] if wcols else []
    relations.append(("interference->accuracy", fam.inter, score))
    if wcols:
        relations.append(("weight->accuracy", wcols[0], score))
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

        def verdict(level: float, r0: pd.Series = r0, strata: pd.DataFrame = strata) -> Verdict:
            return association_sentence(r0, strata, primary, opts, n_tests, level, mde_at)

        found.defer(f"primary associations of {label}", float(r0["p_adjusted"]), verdict)


def association_sentence(
    row: pd.Series,
    rows: pd.DataFrame,
    method: str,
    opts: Options,
    n_tests: int,
    level: float,
    mde_at: Callable[[float], str],
) -> Verdict:
    sym = SYMBOL[method]
    bare, y = describe(row["x"], opts.metric), describe(row["y"], opts.metric)
    x = f"the {bare}" if bare.startswith("weight of") else bare
    if not math.isfinite(float(row["estimate"])):
        return [], [f"The association of {x} with {y} could not be estimated ({row['note']})."]
    stat = stat_text(row, sym)
    where = f"{scope(row)}, n = {_r.num(row['n'])} runs, {opts.correction} over {n_tests} tests"
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
            f"{x[0].upper() + x[1:]} and {y} have a {KIND[method]} association: higher {bare} "
            f"goes with {direction} {y} ({stat}; {where}).{strata_txt}"
        ], []
    lo, hi = float(row["ci_low"]), float(row["ci_high"])
    m = opts.margin_r
    if _claims.interval_verdict(lo, hi, m) == "equivalent":
        return [], [
            f"Equivalent to no {KIND[method]} association within |{sym}| < {m:g}: the "
            f"interval of {x} with {y} lies inside (-{m:g}, {m:g}) ({stat}; {where})."
        ]
    bound = ""
    if math.isfinite(lo) and math.isfinite(hi):
        bound = (
            f" The interval leaves room for |{sym}| up to {max(abs(lo), abs(hi)):.2f}, so an "
            f"association is not ruled out (equivalence margin |{sym}| < {m:g})."
        )
    return [], [
        f"Inconclusive: no evidence of a {KIND[method]} association between {x} and {y} "
        f"({stat}; {where}, not significant at the report's level {level:.3g}).{bound}"
        f"{strata_txt}{mde_at(level)}"
    ]
