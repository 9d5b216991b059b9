"""The analyses' own figures: they draw the tables the scripts computed, and compute nothing.

Shared conventions: accuracies and gains in points (x 100), parameter counts written as "35.6k",
axis labels in words ("loss weight of 'left' (p)"), one colour per model width inside a panel per
depth (at most a few colours a panel), legends outside the data.

Example:
    >>> params_label(35604)
    '35.6k'
    >>> weight_label("weights.left", "two tasks (loss weights)")
    "loss weight of 'left' (p)"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "accuracy_vs_weight",
    "forest",
    "gain_vs_params",
    "layer_conflict",
    "layer_depth",
    "params_label",
    "pbt_result",
    "pbt_schedules",
    "size_ticks",
    "weight_label",
]

_DEPTH_MARKERS = "os^Dv<>"


def params_label(n: float) -> str:
    """A parameter count in words: 9556 -> '9.56k', 1234567 -> '1.23M'."""
    n = float(n)
    if n >= 1e6:
        return f"{n / 1e6:.3g}M"
    if n >= 1e3:
        return f"{n / 1e3:.3g}k"
    return f"{n:.0f}"


def weight_label(col: str, kind: str) -> str:
    """The x-axis label of a weight column: loss weight or sampling probability of a task."""
    task = col.split(".", 1)[-1]
    what = "sampling probability" if "domain" in kind else "loss weight"
    return f"{what} of '{task}' (p)"


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def gain_vs_params(
    gains: pd.DataFrame,
    *,
    weight_col: str,
    fit: Mapping[str, float] | None,
    ylim: tuple[float, float] | None,
    title: str,
    series: str = "depth",
) -> Any:
    """Gain (points) against parameters (log axis), one panel per task, with 95 % intervals.

    ``series="depth"``: one line per depth (a width x depth grid); ``"family"``: one line through
    every size (the study's sizes grow in width and depth together; each point is labelled with
    its width and depth).

    ``gains``: rows of ``stats.joint_gain`` at the chosen weight, with ``model.n_params``,
    ``model.depth``, ``task``, ``gain``, ``ci_low``, ``ci_high`` and ``weight_col`` (the chosen
    weight is written beside each point); with ``ci_low_seed``/``ci_high_seed`` (the seed-only
    part, ``analyses.capacity.with_test_noise``) that interval is drawn thick over the thin one.
    ``fit``: the OLS line over all cells (``intercept``, ``slope`` per decade, in points, and
    ``ci_low``/``ci_high`` of the slope).
    """
    tasks = list(dict.fromkeys(gains["task"]))
    fig = _figure(5.2 * len(tasks) + 1.5, 4.2)
    axes = fig.subplots(1, len(tasks), sharey=True, squeeze=False)[0]
    depths = sorted(gains["model.depth"].unique()) if series == "depth" else [None]
    for ax, task in zip(axes, tasks):
        sub = gains[gains["task"] == task]
        for k, d in enumerate(depths):
            s = (sub if d is None else sub[sub["model.depth"] == d]).sort_values("model.n_params")
            y = 100 * s["gain"].to_numpy(float)
            # no interval (one seed): no bar
            err = np.nan_to_num(np.abs(100 * s[["ci_low", "ci_high"]].to_numpy(float).T - y))
            line = ax.errorbar(
                s["model.n_params"],
                y,
                yerr=err,
                marker=_DEPTH_MARKERS[k % 7],
                ls="-",
                lw=1,
                capsize=3,
                label=f"depth {d}"
                if d is not None
                else "seed mean; 95 %: thin seeds + test set, thick seeds only"
                if "ci_low_seed" in s.columns
                else "seed mean, 95 % interval",
            )
            if "ci_low_seed" in s.columns:  # the seed-only part of the interval, thick
                seed_err = np.abs(100 * s[["ci_low_seed", "ci_high_seed"]].to_numpy(float).T - y)
                ax.errorbar(s["model.n_params"], y, yerr=np.nan_to_num(seed_err), ls="none",
                            elinewidth=3.5, alpha=0.45, color=line[0].get_color())  # fmt: skip
            for n, yy, p, w, dd in zip(
                s["model.n_params"], y, s[weight_col], s["model.width"], s["model.depth"]
            ):
                ax.annotate(
                    f"p={p:g}" if d is not None else f"w{w:g} d{dd}\np={p:g}",
                    (n, yy),
                    xytext=(4, 4),
                    textcoords="offset points",
                    fontsize=7,
                    color="0.35",
                )
        if fit is not None:
            xs = np.logspace(*np.log10(gains["model.n_params"].agg(["min", "max"])), 20)
            ax.plot(
                xs,
                fit["intercept"] + fit["slope"] * np.log10(xs),
                "k--",
                lw=1,
                label=f"OLS of the per-size mean over tasks: {fit['slope']:+.1f} pts/decade "
                f"[{fit['ci_low']:+.1f}, {fit['ci_high']:+.1f}]",
            )
        ax.axhline(0, color="0.5", lw=0.8)
        size_ticks(ax, gains["model.n_params"])
        ax.set_xlabel("parameters (joint model, log scale)")
        ax.set_title(f"task '{task}'", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("joint - single-task test accuracy (points)")
    if ylim is not None:
        axes[0].set_ylim(*ylim)
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.suptitle(_wrap(title, 110), fontsize=10)
    return fig


def size_ticks(ax: Any, n_params: Any) -> None:
    """A log x axis ticked at the model sizes, labelled as parameter counts ("8.9k"); a size within
    a factor 1.3 of the last ticked one gets no tick of its own (labels would overprint), nor do
    minor ticks (they overprint on a short range)."""
    ticks: list[float] = []
    for n in sorted(float(x) for x in set(n_params)):
        if not ticks or n > 1.3 * ticks[-1]:
            ticks.append(n)
    ax.set_xscale("log")
    ax.set_xticks(ticks, [params_label(n) for n in ticks], fontsize=7, rotation=45)
    ax.minorticks_off()


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.fill(part, width) for part in text.split("\n"))


def accuracy_vs_weight(
    cells: pd.DataFrame,
    optimum: pd.DataFrame,
    *,
    weight_col: str,
    xlabel: str,
    title: str,
) -> Any:
    """Validation accuracy (points) against the weight, one panel per depth, a colour per width.

    ``cells``: per (depth, width, n_params, weight) the seed ``mean`` and ``se`` of the accuracy.
    ``optimum``: per size ``p_star``, ``ci_low``, ``ci_high`` (the quadratic estimate) and
    ``best_p`` (the best grid point). The star sits on the *observed* mean at ``best_p``; the
    quadratic ``p*`` and its interval are a bar under the curves, in the size's colour.
    """
    depths = sorted(cells["model.depth"].unique())
    fig = _figure(4.6 * len(depths) + 1.0, 4.4)
    axes = fig.subplots(1, len(depths), sharey=True, squeeze=False)[0]
    lo = 100 * float((cells["mean"] - cells["se"]).min())
    hi = 100 * float((cells["mean"] + cells["se"]).max())
    span = max(hi - lo, 1.0)  # flat curves (one seed, tiny data) still get a readable range
    for ax, d in zip(axes, depths):
        sub = cells[cells["model.depth"] == d]
        for k, (n, s) in enumerate(sub.groupby("model.n_params")):
            s = s.sort_values(weight_col)
            color = f"C{k}"
            y = 100 * s["mean"].to_numpy(float)
            ax.errorbar(
                s[weight_col],
                y,
                yerr=100 * s["se"].to_numpy(float),
                color=color,
                marker="o",
                ms=4,
                lw=1.2,
                capsize=2,
                label=f"width {s['model.width'].iloc[0]:g} ({params_label(n)} params)",
            )
            o = optimum[optimum["model.n_params"] == n]
            if len(o):
                o = o.iloc[0]
                best = s.loc[np.isclose(s[weight_col], o["best_p"])]
                if len(best):
                    ax.plot(
                        o["best_p"],
                        100 * best["mean"].iloc[0],
                        marker="*",
                        ms=15,
                        color=color,
                        mec="k",
                        zorder=5,
                    )
                yb = lo - span * (0.08 + 0.07 * k)
                # an interval that misses its estimate (possible for a bootstrap) is clipped
                xerr = [
                    [max(o["p_star"] - o["ci_low"], 0.0)],
                    [max(o["ci_high"] - o["p_star"], 0.0)],
                ]
                ax.errorbar(o["p_star"], yb, xerr=xerr, color=color, marker="|", ms=10, capsize=3)
        ax.set_title(f"depth {d}", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.18), ncol=1)
    axes[0].set_ylabel("validation accuracy, mean over tasks (points)")
    axes[0].set_ylim(lo - span * 0.35, hi + span * 0.05)
    fig.suptitle(
        _wrap(
            title + "\n* best grid point (observed mean over seeds, +-1 SE); bars below: "
            "quadratic p* with its 95 % interval",
            50 * len(depths) + 20,
        ),
        fontsize=9,
    )
    return fig


def weight_vs_metric(
    cells: pd.DataFrame, *, weight_col: str, xlabel: str, ylabel: str, scale: float, title: str
) -> Any:
    """A run-level metric against the weight: seed mean +-1 SE per size, one panel per depth.

    No line is fitted: the points are joined, so a hump in the weight stays a hump.
    """
    depths = sorted(cells["model.depth"].unique())
    fig = _figure(4.4 * len(depths) + 1.0, 3.9)
    axes = fig.subplots(1, len(depths), sharey=True, squeeze=False)[0]
    for ax, d in zip(axes, depths):
        for k, (n, s) in enumerate(cells[cells["model.depth"] == d].groupby("model.n_params")):
            s = s.sort_values(weight_col)
            ax.errorbar(
                s[weight_col],
                scale * s["mean"],
                yerr=scale * s["se"],
                marker="o",
                ms=4,
                capsize=2,
                color=f"C{k}",
                label=f"width {s['model.width'].iloc[0]:g} ({params_label(n)})",
            )
        ax.set_title(f"depth {d}", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(_wrap(title + " (mean over seeds +-1 SE)", 50 * len(depths) + 20), fontsize=10)
    return fig


def pbt_schedules(replicates: Sequence[Mapping[str, Any]], *, end: int, title: str) -> Any:
    """Weight schedules of every PBT member, one row per replicate and one column per task.

    ``replicates[i]``: ``{"members": [{"schedule": [...], "lineage": [...]}], "best": k}`` (the
    ``pbt.json`` state and the reported member). Grey: members; thick: the reported member;
    x: a copy event (the member copied another and perturbed its weights).
    """
    tasks = list(replicates[0]["members"][0]["schedule"][0]["weights"])
    fig = _figure(2.5 * len(tasks) + 0.5, 1.9 * len(replicates) + 0.8)
    axes = fig.subplots(len(replicates), len(tasks), sharex=True, sharey=True, squeeze=False)
    for i, rep in enumerate(replicates):
        for j, task in enumerate(tasks):
            ax = axes[i, j]
            for k, m in enumerate(rep["members"]):
                ep = [e["epoch"] for e in m["schedule"]] + [end]
                w = [e["weights"][task] for e in m["schedule"]]
                w = [*w, w[-1]]
                best = k == rep["best"]
                ax.step(
                    ep,
                    w,
                    where="post",
                    color="C3" if best else "0.6",
                    lw=2.2 if best else 0.8,
                    zorder=3 if best else 1,
                )
                for c in m.get("lineage", []):
                    wc = next(e["weights"][task] for e in m["schedule"] if e["epoch"] == c["epoch"])
                    ax.plot(c["epoch"], wc, "x", color="C3" if best else "0.3", ms=5, zorder=4)
            if i == 0:
                ax.set_title(task, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"replicate {rep.get('replicate', i)}\nweight", fontsize=8)
            if i == len(replicates) - 1:
                ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    fig.suptitle(
        title + "\nred: the member reported on test; x: copy events (exploit + perturb)", fontsize=9
    )
    return fig


def pbt_result(
    arms: Mapping[str, Sequence[float]],
    differences: Mapping[str, Mapping[str, Any]],
    *,
    margin: float,
    title: str,
) -> Any:
    """Left: each arm's test accuracy per replicate (points) with its mean and 95 % interval.
    Right: the differences between arms with their 95 % intervals and the equivalence band."""
    from scipy import stats as st

    fig = _figure(12, max(3.8, 1.6 + 0.32 * max(len(differences), len(arms) / 2)))
    a1, a2 = fig.subplots(1, 2, width_ratios=[1.1, 1])
    for k, vals in enumerate(arms.values()):
        v = 100 * np.asarray(vals, float)
        a1.plot(np.full(len(v), k) + np.linspace(-0.12, 0.12, len(v)), v, "o", color="0.55", ms=4)
        if len(v) > 1:
            half = st.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
            a1.errorbar(k + 0.25, v.mean(), yerr=half, fmt="D", color="C0", capsize=4)
    a1.set_xticks(
        range(len(arms)),
        [f"{n}\n(n={len(v)})" for n, v in arms.items()],
        fontsize=8,
        rotation=45 if len(arms) > 5 else 0,
        ha="right" if len(arms) > 5 else "center",
    )
    a1.set_ylabel("test accuracy, mean over tasks (points)")
    a1.set_title("per replicate (grey), mean and 95 % t-interval (blue)", fontsize=9)
    a1.grid(alpha=0.3, axis="y")
    names = list(differences)
    for k, n in enumerate(names):
        d = differences[n]
        x = 100 * d["difference"]
        if d.get("ci_low") is not None:
            a2.errorbar(
                x,
                k,
                xerr=[[x - 100 * d["ci_low"]], [100 * d["ci_high"] - x]],
                fmt="o",
                color="C0",
                capsize=4,
            )
            if d.get("ci90_low") is not None:
                a2.plot(
                    [100 * d["ci90_low"], 100 * d["ci90_high"]],
                    [k, k],
                    color="C0",
                    lw=4,
                    alpha=0.5,
                    label="90 % interval (TOST)" if k == 0 else None,
                )
        else:
            a2.plot(x, k, "o", color="C0")
    # a far-off arm (e.g. an unstable method) would squash the rest: such rows are written, not
    # drawn to scale
    spans = [
        (100 * d["ci_low"], 100 * d["ci_high"])
        for d in differences.values()
        if d.get("ci_low") is not None
    ]
    if spans:
        lo = min(min(a for a, _ in spans), -100 * margin)
        hi = max(max(b for _, b in spans), 100 * margin)
        core = [(a, b) for a, b in spans if b - a < 4 * 100 * margin * 2]
        if core and (hi - lo) > 3 * (max(b for _, b in core) - min(a for a, _ in core)):
            lo = min(min(a for a, _ in core), -100 * margin) - 0.3
            hi = max(max(b for _, b in core), 100 * margin) + 0.3
            a2.set_xlim(lo, hi)
            for k, n in enumerate(names):
                d = differences[n]
                x = 100 * d["difference"]
                if not lo <= x <= hi:
                    a2.annotate(
                        f"{x:+.2f} [{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}] off scale",
                        (hi if x > hi else lo, k), ha="right" if x > hi else "left",
                        va="center", fontsize=7, color="C3",
                    )  # fmt: skip
    a2.axvspan(
        -100 * margin,
        100 * margin,
        color="C2",
        alpha=0.15,
        label=f"equivalence margin +-{100 * margin:g} pts",
    )
    a2.axvline(0, color="0.4", lw=0.8)
    a2.set_yticks(range(len(names)), names, fontsize=8)
    a2.set_xlabel("paired difference (points): 95 % interval (bars), 90 % (thick)")
    a2.legend(fontsize=8, loc="lower left")
    a2.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=10)
    return fig


def layer_conflict(table: pd.DataFrame, *, title: str) -> Any:
    """Per-layer mean gradient cosine between the two tasks: layer x epoch, and its profile.

    ``table``: rows ``layer``, ``order`` (input to output), ``epoch``, ``cosine`` (mean over
    runs); the right panel is the mean over epochs with the spread over runs (``run`` column
    optional: ``cosine`` per run and epoch).
    """
    layers = table.sort_values("order")["layer"].drop_duplicates().tolist()
    piv = table.groupby(["layer", "epoch"])["cosine"].mean().unstack("epoch").loc[layers]
    fig = _figure(11, 0.45 * len(layers) + 2.2)
    a1, a2 = fig.subplots(1, 2, width_ratios=[2.2, 1], sharey=True)
    lim = max(0.05, float(np.nanmax(np.abs(piv.to_numpy()))))
    im = a1.imshow(
        piv.to_numpy(),
        aspect="auto",
        cmap="RdBu",
        vmin=-lim,
        vmax=lim,
        extent=(piv.columns.min() - 0.5, piv.columns.max() + 0.5, len(layers) - 0.5, -0.5),
    )
    a1.set_yticks(range(len(layers)), layers, fontsize=8)
    from matplotlib.ticker import MaxNLocator

    a1.xaxis.set_major_locator(MaxNLocator(integer=True))
    a1.set_xlabel("epoch")
    a1.set_title("mean cosine of the two tasks' gradients (red: conflict)", fontsize=9)
    fig.colorbar(im, ax=a1, label="cosine", shrink=0.8)
    per = table.groupby(["layer", "run"] if "run" in table else ["layer"])["cosine"].mean()
    prof = per.groupby(level="layer").agg(["mean", "min", "max"]).loc[layers]
    y = np.arange(len(layers))
    a2.errorbar(
        prof["mean"],
        y,
        xerr=[prof["mean"] - prof["min"], prof["max"] - prof["mean"]],
        fmt="o",
        capsize=3,
    )
    a2.axvline(0, color="0.4", lw=0.8)
    a2.set_xlabel("mean over epochs (bars: range over runs)")
    a2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return fig


def layer_depth(by_depth: pd.DataFrame, *, title: str) -> Any:
    """Mean cosine per layer position (input to output), one line per depth, +-1 SE over runs.

    ``by_depth``: ``model.depth``, ``position`` (0 = the input layer), ``mean``, ``std``, ``count``.
    """
    fig = _figure(6.5, 4.0)
    ax = fig.subplots()
    for k, (d, s) in enumerate(by_depth.groupby("model.depth")):
        s = s.sort_values("position")
        se = (s["std"] / np.sqrt(s["count"])).fillna(0.0)
        ax.errorbar(
            s["position"],
            s["mean"],
            yerr=se,
            marker=_DEPTH_MARKERS[k % 7],
            capsize=3,
            label=f"depth {d}",
        )
    ax.axhline(0, color="0.4", lw=0.8)
    positions = sorted(int(v) for v in by_depth["position"].unique())
    ax.set_xticks(positions)
    ax.set_xlim(-0.5, positions[-1] + 0.5)
    ax.set_xlabel("layer position (0 = first layer of the trunk)")
    ax.set_ylabel("mean gradient cosine over the run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(_wrap(title, 80), fontsize=10)
    return fig


def forest(
    groups: Mapping[str, Mapping[str, Any]],
    *,
    margin: float,
    xlabel: str,
    title: str,
    ncols: int | None = None,
) -> Any:
    """Per group (a panel each, ``ncols`` to a row; default all in one row): every run's
    estimate, the pooled estimate with its 95 % (thin) and 90 % (thick) intervals, 0 and the
    equivalence band ``+-margin``.

    ``groups[name]``: ``per_run`` (estimates), ``estimate``, ``ci_low``, ``ci_high``,
    ``ci90_low``, ``ci90_high`` and optionally ``verdict`` (written under the panel title).
    """
    cols = ncols or len(groups)
    rows = -(-len(groups) // cols)
    fig = _figure(5.0 * cols, 3.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, squeeze=False)).ravel()
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    for ax, (name, g) in zip(axes, groups.items()):
        runs = np.asarray(g["per_run"], float)
        ax.plot(runs, np.arange(len(runs)) + 1, "o", color="0.55", ms=4, label="one run")
        if g.get("estimate") is not None and np.isfinite(g["estimate"]):
            ax.plot([g["ci_low"], g["ci_high"]], [0, 0], color="C0", lw=1.2)
            ax.plot([g["ci90_low"], g["ci90_high"]], [0, 0], color="C0", lw=4, alpha=0.6)
            ax.plot(g["estimate"], 0, "D", color="C0", label="pooled: 95 % (thin), 90 % (thick)")
        ax.axvspan(-margin, margin, color="C2", alpha=0.15, label=f"|r| < {margin:g}")
        ax.axvline(0, color="0.4", lw=0.8)
        ax.set_yticks([0], ["pooled"], fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_xlim(-1, 1)
        ax.set_title(_wrap(f"{name}: {g.get('verdict', '')}", 60), fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    return fig
