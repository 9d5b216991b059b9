"""Per-layer interference: which layers conflict, how it moves over training and with depth.

Over training: the long runs of ``analyses.conflict`` (``p = 0.5``, probes every 2 steps): per
layer and epoch, the mean cosine of the two tasks' gradients (``stats.epoch_table`` with
``metric="cosine"`` and the layer), per run and averaged over runs.

Finding 2 per layer (:func:`layer_within`): per run and layer, the within-run Pearson r of the
layer's per-epoch mean cosine with the validation accuracy (``stats.within_run``), pooled per
layer by Fisher z (``analyses.conflict.pool_within``: random effects, Hartung-Knapp interval),
with the TOST p-value of ``|r| < 0.2`` (the margin stated before the run) and the test of
``r = 0``, each Holm-adjusted over the layers of a pair.

With depth: the capacity sweep's joint runs at ``p = 0.5``: per run, the mean cosine of every
layer over the whole run, by the layer's position from input to output, per depth.

    python -m analyses.layers [--quick | --full]    # after (or instead of) analyses.conflict
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses import _figures
from analyses._common import (
    load_tables,
    pair_sweep,
    parse_args,
    save_figure,
    study_pairs,
    write_json,
)
from analyses.conflict import EQUIVALENCE_R, _long_runs, long_size, pool_within
from gradlens import TOTAL_LAYER, load_run, stats

__all__ = ["layer_epochs", "layer_profile", "layer_within", "main", "pooled_tost_p"]

TOTAL = TOTAL_LAYER


def _layers(metrics: pd.DataFrame) -> list[str]:
    """The run's layers in the order the profiler recorded them (input to output), total last."""
    names = [str(x) for x in dict.fromkeys(metrics["layer"]) if str(x) != TOTAL]
    return [*names, TOTAL]


def layer_epochs(run_dir: Path) -> pd.DataFrame:
    """``[layer, order, epoch, cosine]`` of one run: per layer, the mean cosine of each epoch."""
    run = load_run(run_dir)
    rows = []
    for k, layer in enumerate(_layers(run.metrics)):
        t = stats.epoch_table(run, metric="cosine", layer=layer)
        label = "all shared" if layer == TOTAL else f"layer {layer}"
        rows.append(t[["epoch", "interference"]].assign(layer=label, order=k))
    return (
        pd.concat(rows, ignore_index=True)
        .rename(columns={"interference": "cosine"})
        .assign(run=run_dir.name)
    )


def pooled_tost_p(pool: dict[str, Any], margin: float = EQUIVALENCE_R) -> float:
    """TOST p-value of ``|r| < margin`` for a Fisher-z pool (``pool_within``'s 95 % interval).

    The Hartung-Knapp interval is ``z +- t(k - 1) se`` on the z scale, so ``z`` and ``se`` are
    read back from it; the p-value is the larger of the two one-sided t-tests against
    ``+-atanh(margin)`` (below 0.05 exactly when the 90 % interval lies inside the margin).

    Example:
        >>> import math
        >>> p = {"estimate": 0.05, "ci_low": math.tanh(math.atanh(0.05) - 2.262 * 0.05),
        ...      "ci_high": math.tanh(math.atanh(0.05) + 2.262 * 0.05), "k": 10}
        >>> pooled_tost_p(p) < 0.05, pooled_tost_p({**p, "estimate": 0.18}) < 0.05
        (True, False)
    """
    from scipy import stats as st

    k = int(pool.get("k") or 0)
    vals = [pool.get(key) for key in ("estimate", "ci_low", "ci_high")]
    if k < 2 or any(v is None or not np.isfinite(v) for v in vals):
        return float("nan")
    z = float(np.arctanh(vals[0]))
    q = float(st.t.ppf(0.975, k - 1))
    se = float(np.arctanh(vals[2]) - np.arctanh(vals[1])) / (2 * q)
    if se <= 0:
        return 0.0 if abs(vals[0]) < margin else 1.0
    m = float(np.arctanh(margin))
    return float(max(st.t.sf((z + m) / se, k - 1), st.t.cdf((z - m) / se, k - 1)))


def layer_within(run_dirs: Sequence[Path]) -> pd.DataFrame:
    """Finding 2 per layer: per-run within-run r of each layer's per-epoch mean cosine with the
    validation accuracy, pooled per layer by Fisher z, TOST against ``|r| < 0.2`` and the test
    of ``r = 0``, both Holm-adjusted over the layers (the total, "all shared", is the main test
    of ``analyses.conflict`` and is reported beside them, outside the Holm family).

    Columns: ``layer``, ``order``, ``estimate``, ``ci_low``, ``ci_high`` (95 %), ``ci90_low``,
    ``ci90_high``, ``k``, ``i2``, ``p_value``, ``p_holm``, ``p_tost``, ``p_tost_holm``,
    ``verdict``, ``per_run``.
    """
    per: dict[str, list[dict[str, Any]]] = {}
    order: dict[str, int] = {}
    for d in sorted(run_dirs):
        run = load_run(d)
        for k, layer in enumerate(_layers(run.metrics)):
            r = stats.within_run(run, metric="cosine", layer=layer, n_boot=0)
            label = "all shared" if layer == TOTAL else f"layer {layer}"
            per.setdefault(label, []).append(r)
            order[label] = k
    rows = []
    for label, rs in per.items():
        pool = pool_within(rs)
        rows.append(
            {"layer": label, "order": order[label],
             **{k: pool.get(k) for k in ("estimate", "ci_low", "ci_high", "ci90_low",
                                         "ci90_high", "k", "i2", "p_value")},
             "p_tost": pooled_tost_p(pool), "per_run": pool["per_run_r"]}
        )  # fmt: skip
    t = pd.DataFrame(rows).sort_values("order").reset_index(drop=True)
    fam = (t["layer"] != "all shared").to_numpy()
    for col in ("p_value", "p_tost"):
        t[f"{col.replace('_value', '')}_holm"] = np.nan
        ok = fam & np.isfinite(t[col].to_numpy(float))
        if ok.any():
            t.loc[ok, f"{col.replace('_value', '')}_holm"] = stats.adjust(t.loc[ok, col], "holm")
    t["verdict"] = [_layer_verdict(r) for r in t.itertuples(index=False)]
    return t


def _layer_verdict(r: Any) -> str:
    """Equivalent within the margin (Holm-adjusted TOST p < 0.05), correlated (95 % interval
    excludes 0 and Holm-adjusted p < 0.05), both, or inconclusive; the total unadjusted."""
    total = r.layer == "all shared"
    p_eq = r.p_tost if total else r.p_tost_holm
    p_r = r.p_value if total else r.p_holm
    out = []
    if np.isfinite(p_eq) and p_eq < 0.05:
        out.append(f"equivalent within |r| < {EQUIVALENCE_R:g}")
    if np.isfinite(p_r) and p_r < 0.05 and (r.ci_low > 0 or r.ci_high < 0):
        out.append("correlated (r > 0)" if r.ci_low > 0 else "correlated (r < 0)")
    return "; ".join(out) or "inconclusive"


def layer_profile(sweep_dir: Path, weight_col: str) -> pd.DataFrame:
    """Per joint run at ``p = 0.5`` of a sweep: each layer's mean cosine over the run.

    Columns ``[run, model.depth, model.width, model.n_params, layer, position, cosine]``;
    ``position`` is the layer's index from the input (0) among the run's layers.
    """
    test = load_tables(sweep_dir)["test"]
    runs = test[(test["n_tasks"] == 2) & np.isclose(test[weight_col], 0.5)]
    rows = []
    for _, r in runs.iterrows():
        m = load_run(sweep_dir / r["run_id"]).metrics
        cos = m[m["metric"] == "cosine"]
        for pos, layer in enumerate(_layers(cos)[:-1]):
            rows.append(
                {
                    "run": r["run_id"],
                    "model.depth": r["model.depth"],
                    "model.width": r["model.width"],
                    "model.n_params": r["model.n_params"],
                    "layer": layer,
                    "position": pos,
                    "cosine": float(cos.loc[cos["layer"] == layer, "value"].mean()),
                }
            )
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-layer tables of both pairs; figures ``layer_conflict_<pair>.png`` and ``layers.json``."""
    args = parse_args(__doc__.splitlines()[0], argv)
    pre = args.preset
    summary: dict[str, Any] = {"preset": pre.__dict__, "pairs": {}}
    width, depth = long_size(pre)
    for pair in study_pairs(pre):
        long_dir = _long_runs(pair, pre, args.runs, args.workers)
        ep = pd.concat(
            [layer_epochs(d) for d in sorted(long_dir.iterdir()) if d.is_dir()], ignore_index=True
        )
        wcol = f"weights.{pair.tasks[0]}"
        prof = layer_profile(pair_sweep(pair, pre, args.runs, args.workers), wcol)
        by_depth = (
            prof.groupby(["model.depth", "position"])["cosine"].agg(["mean", "std", "count"])
            .reset_index()
            if len(prof)
            else prof
        )  # fmt: skip
        per_layer = ep.groupby(["order", "layer"])["cosine"].agg(["mean", "min", "max"])
        summary["pairs"][pair.name] = {
            "epochs": ep,
            "per_layer_mean_cosine": per_layer.reset_index(),
            "share_of_epochs_with_negative_mean_cosine": ep.groupby("layer")["cosine"]
            .apply(lambda c: float((c.dropna() < 0).mean()) if c.notna().any() else None)
            .to_dict(),
            "by_depth": by_depth,
            # finding 2 per layer: pooled within-run r, TOST |r| < 0.2, Holm over layers
            "within_per_layer": layer_within([d for d in long_dir.iterdir() if d.is_dir()]),
        }
        fig = _figures.layer_conflict(
            ep.dropna(subset=["cosine"]),
            title=f"{pair.name}, {pair.kind}, MLP width {width:g} depth {depth}, p = 0.5: "
            f"per-layer gradient cosine over training ({ep['run'].nunique()} runs)",
        )
        save_figure(fig, args.figures / f"layer_conflict_{pair.name}.png")
        if len(by_depth):
            fig = _figures.layer_depth(
                by_depth,
                title=f"{pair.name}: per-layer mean cosine by depth, joint runs at p = 0.5 "
                "(all widths and seeds; +-1 SE)",
            )
            save_figure(fig, args.figures / f"layer_depth_{pair.name}.png")
    fig = _figures.forest(
        {
            f"{name}, {r['layer']}": {**r, "per_run": r["per_run"]}
            for name, p in summary["pairs"].items()
            for r in p["within_per_layer"].to_dict("records")
        },
        margin=EQUIVALENCE_R,
        ncols=max(len(p["within_per_layer"]) for p in summary["pairs"].values()),
        xlabel="r, layer's epoch cosine vs val. accuracy",
        title="Finding 2 per layer: per-run r (grey) and their Fisher-z pool (random effects; "
        "95 % and 90 % intervals) against the margin stated in advance; verdicts (Holm over "
        "layers) in layers.json",
    )
    save_figure(fig, args.figures / "layer_within_pooled.png")
    write_json(summary, args.figures / "layers.json")
    return summary


if __name__ == "__main__":
    s = main()
    for name, p in s["pairs"].items():
        print(name, p["per_layer_mean_cosine"].to_string(index=False))
