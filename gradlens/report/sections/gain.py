"""The gain part of a task set's section: joint minus single-task scores per model size and task
at a weight chosen on held-out seeds, with paired t intervals, equivalence tests, the smallest
detectable gain and the trend of the gain with model size."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from gradlens.report import _render as _r
from gradlens.report.sections._common import CORRECTION_NAME, Findings, Options, Verdict, present
from gradlens.stats import equivalence_p

__all__ = ["gain_part"]


def gain_part(
    joint: pd.DataFrame,
    single: pd.DataFrame,
    tasks: Sequence[str],
    wcols: list[str],
    size_col: str | None,
    opts: Options,
    sec: _r.Section,
    found: Findings,
    out: dict[str, Any],
) -> pd.DataFrame | None:
    """The held-out gain per cell of one task set: its table in ``sec``, claims deferred."""
    from gradlens import stats

    label = "|".join(tasks)
    cells = _cells(joint, single, tasks, size_col)
    if cells is None:
        found.unsupported.append(
            f"The gain of joint over single-task training on {label} is not testable: the "
            "sweep has no single-task runs of these tasks."
        )
        return None
    joint, both, gcols = cells
    gain = stats.joint_gain(both, size_cols=gcols, metric=opts.metric)
    out["joint_gain"] = gain
    picked, chosen_on = _selected(joint, both, gcols, opts)
    out["joint_gain_selected"] = picked
    out["joint_gain_selected_on"] = chosen_on
    n_cells = int(np.isfinite(picked["p_adjusted"].to_numpy(np.float64)).sum())
    level = round(100 * float(gain["ci_level"].iloc[0])) if len(gain) else 95
    corr = CORRECTION_NAME[opts.correction]
    sec.paragraphs.append(
        f"Gain of joint over single-task training: per model size, task and seed, {opts.metric} "
        f"on {opts.split} of the joint run minus that of the single-task run of the same size "
        f"and seed, at the weight with the best mean {opts.metric} on {chosen_on} over the "
        f"other seeds (held-out selection, so the evaluated seed took no part in the choice); "
        f"the mean over seeds with a {level}% paired t interval and t-test, {corr} over the "
        f"{n_cells} cells; equivalence: two one-sided t-tests against +-{opts.margin_gain:g}."
    )
    sec.tables.append(_gain_table(picked, gcols, wcols, level, opts))
    ok = picked[np.isfinite(picked["gain"].to_numpy(np.float64))] if len(picked) else picked
    if ok.empty:
        found.unsupported.append(
            f"No gain of joint training on {label} could be computed (it needs at least 2 "
            "seeds shared by the joint runs and the single-task baselines of a size)."
        )
        return picked
    found.defer(
        f"gain cells of {label}",
        float(ok["p_adjusted"].min()),
        _cells_verdict(ok, f"(model size, task) cells of {label}", n_cells, opts, out),
    )
    size_for_trend = size_col if size_col and size_col in joint.columns else None
    if size_for_trend and gcols != ["_size"]:
        _size_trend(ok, joint, gcols, size_for_trend, label, opts, found, out)
    return picked


def _cells(
    joint: pd.DataFrame, single: pd.DataFrame, tasks: Sequence[str], size_col: str | None
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]] | None:
    """``(joint, joint and baselines, cell columns)``: cells are depth x width when the meta has
    them, else the model size, else one cell; None without single-task baselines."""
    base = single[single["tasks"].astype(str).isin(list(tasks))]
    if base.empty:
        return None
    grid_cols = ["model.depth", "model.width"]
    if all(present(joint, c) for c in grid_cols):
        gcols = grid_cols
    elif size_col is not None:
        gcols = [size_col]
    else:
        joint = joint.assign(_size="all")
        base = base.assign(_size="all")
        gcols = ["_size"]
    return joint, pd.concat([joint, base], ignore_index=True), gcols


def _selected(
    joint: pd.DataFrame, both: pd.DataFrame, gcols: list[str], opts: Options
) -> tuple[pd.DataFrame, str]:
    """The gain per cell at the weight chosen on held-out seeds, with adjusted p-values and
    adjusted equivalence p-values; and the split it was chosen on."""
    from gradlens import stats

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
    picked["p_adjusted"] = np.nan
    tost = [
        equivalence_p(r["gain"], r["se"], r["df"], opts.margin_gain)
        for _, r in picked.iterrows()
    ]
    picked["p_equivalence"] = tost
    if len(picked):
        finite = np.isfinite(picked["p_value"].to_numpy(np.float64))
        picked.loc[finite, "p_adjusted"] = stats.adjust(
            picked.loc[finite, "p_value"].to_numpy(np.float64), opts.correction
        )
        eq = np.asarray(tost, dtype=np.float64)
        ok_eq = np.isfinite(eq)
        picked["p_equivalence_adjusted"] = np.nan
        if ok_eq.any():
            picked.loc[ok_eq, "p_equivalence_adjusted"] = stats.adjust(eq[ok_eq], opts.correction)
    return picked, chosen_on


def _gain_table(
    picked: pd.DataFrame, gcols: list[str], wcols: list[str], level: int, opts: Options
) -> _r.Table:
    return _r.Table(
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


def _cells_verdict(
    ok: pd.DataFrame, cells: str, n_cells: int, opts: Options, out: dict[str, Any]
) -> Callable[[float], Verdict]:
    """The claims on the gain cells at a given level: gains, losses, equivalence, unclear."""

    def verdict(level: float) -> Verdict:
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
                f"level {level:.3g}).{gain_mde(ok, n_cells, level, opts, out)}"
            )
        return yes, no

    return verdict


def _size_trend(
    ok: pd.DataFrame,
    joint: pd.DataFrame,
    gcols: list[str],
    size_col: str,
    label: str,
    opts: Options,
    found: Findings,
    out: dict[str, Any],
) -> None:
    """Does the mean gain over tasks change with model size? (Spearman, permutation p.)"""
    from gradlens import stats

    per_size = ok.groupby(gcols)["gain"].mean().reset_index()
    sizes = joint.groupby(gcols)[size_col].first().reset_index()
    per_size = per_size.merge(sizes, on=gcols)
    if len(per_size) < 3:
        return
    res = stats.correlate(
        np.log10(per_size[size_col].astype(float)),
        per_size["gain"],
        method="spearman",
        n_boot=0,
        n_perm=opts.n_perm,
        seed=opts.seed,
    )
    out["gain_size_trend"] = res
    stat = (
        f"spearman rho = {_r.num(res['estimate'], 2, signed=True)} between "
        f"{size_col} and the mean gain over tasks, p = {_r.pval(res['p_value'])} "
        f"({res['p_method']}, {len(per_size)} sizes, smallest attainable p "
        f"{_r.pval(res['p_floor'])})"
    )

    def trend_verdict(level: float) -> Verdict:
        if math.isfinite(res["p_value"]) and res["p_value"] < level:
            word = "grows" if res["estimate"] > 0 else "shrinks"
            return [f"The gain of joint training {word} with model size ({stat})."], []
        return [], [
            f"Inconclusive: no evidence that the gain of joint training changes with "
            f"model size ({stat})."
        ]

    found.defer(f"gain-size trend of {label}", float(res["p_value"]), trend_verdict)


def gain_mde(
    ok: pd.DataFrame, n_cells: int, level: float, opts: Options, out: dict[str, Any]
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
