"""What every section of a sweep's report shares: the options, the findings of the summary
(held until every test family is known, then sorted at alpha over the families), words for
table columns and statistics, and figures as PNG bytes."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from gradlens.report import _render as _r
from gradlens.stats.correlation import Correction, Method

__all__ = [
    "CORRECTION_NAME",
    "KIND",
    "SYMBOL",
    "Correction",
    "Findings",
    "Method",
    "NoFigures",
    "Options",
    "Verdict",
    "add_figure",
    "describe",
    "present",
    "scope",
    "size_label",
    "stat_text",
    "weight_cols",
]

SYMBOL: dict[str, str] = {"spearman": "rho", "pearson": "r", "kendall": "tau"}
KIND: dict[str, str] = {"spearman": "monotone", "pearson": "linear", "kendall": "monotone"}
CORRECTION_NAME: dict[str, str] = {
    "holm": "Holm (family-wise error rate)",
    "bh": "Benjamini-Hochberg (false discovery rate)",
    "none": "no correction",
}


Verdict = tuple[list[str], list[str]]


@dataclass
class Findings:
    """The summary: adjusted tested claims; inconclusive, equivalent or untestable; estimates."""

    supported: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    descriptive: list[str] = field(default_factory=list)
    pending: list[tuple[str, float, Callable[[float], Verdict], int]] = field(default_factory=list)

    def defer(self, family: str, p: float, verdict: Callable[[float], Verdict]) -> None:
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
class Options:
    split: str
    select_split: str
    metric: str
    methods: tuple[Method, ...]
    correction: Correction
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


def describe(col: str, metric: str) -> str:
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


def scope(row: pd.Series) -> str:
    if row["scope"] == "partial":
        return f"partial correlation controlling for {row['covariates']}"
    if row["scope"] == "stratum":
        return f"model size {row['stratum']} only"
    return "pooled over all runs"


def stat_text(row: pd.Series | dict[str, Any], symbol: str, p_key: str = "p_adjusted") -> str:
    p_name = "p_adj" if p_key == "p_adjusted" else "p"
    return (
        f"{symbol} = {_r.num(row['estimate'], 2, signed=True)} "
        f"{_r.interval(row['ci_low'], row['ci_high'])}, {p_name} = {_r.pval(row[p_key])}"
    )


def weight_cols(joint: pd.DataFrame, tasks: Sequence[str]) -> list[str]:
    cols = [f"weights.{t}" for t in tasks if f"weights.{t}" in joint.columns]
    varying = [c for c in cols if pd.to_numeric(joint[c], errors="coerce").nunique() > 1]
    if len(tasks) == 2 and len(varying) == 2:
        total = joint[varying].apply(pd.to_numeric, errors="coerce").sum(axis=1)
        if float(total.std(ddof=0) or 0.0) < 1e-9:
            return varying[:1]  # the second weight is the complement of the first
    return varying


def size_label(col: str, value: Any) -> str:
    from gradlens.plots.style import size_label

    return size_label(col, value).replace("\\$", "$")


def present(table: pd.DataFrame, col: str) -> bool:
    return col in table.columns and table[col].notna().any()


def png(fig: Any, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


class NoFigures:
    """Stands in for :mod:`gradlens.plots` when a report is built without figures (e.g. the
    calibration of its statistics over hundreds of sweeps): every drawing returns ``None``."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def add_figure(figs: list[_r.Figure], name: str, fig: Any, caption: str, dpi: int) -> None:
    if fig is None:
        return
    figs.append(_r.Figure(name, png(fig, dpi), caption))
