"""Re-analyse the committed small-run results without training: the numbers the reworded verdicts
of analyses/README.md quote that the original scripts did not compute.

- Finding 2 within runs: the per-run Pearson r of ``conflict.json`` pooled by Fisher z
  (``gradlens.stats.pool_correlations``: each run weighted by its effective sample size minus 3,
  ``n_eff`` from ``stats.within_run``; DerSimonian-Laird random effects with the Hartung-Knapp
  t-interval, the normal DerSimonian-Laird interval beside it), instead of counting runs whose own
  interval excludes 0.
- PBT: the 90 % intervals of the arm differences of ``pbt.json`` (the equivalence margin they
  support: the largest absolute end), and the random-static arm paired with PBT by replicate.

    python -m analyses.reanalyse                     # reads and writes figures/reanalysis.json
    python -m analyses.reanalyse --figures DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analyses._common import FIGURES, write_json
from gradlens import stats

__all__ = ["main"]


def _differences(pbt: dict[str, Any]) -> dict[str, Any]:
    from scipy import stats as st

    arms = {k: np.array(pbt[k]["test"]) * 100 for k in ("uniform", "pbt", "random_static")}
    out: dict[str, Any] = {}
    for a, b in (("pbt", "uniform"), ("pbt", "random_static"), ("random_static", "uniform")):
        res = st.ttest_ind(arms[a], arms[b], equal_var=False)
        ci95, ci90 = res.confidence_interval(0.95), res.confidence_interval(0.90)
        out[f"{a} - {b} (Welch)"] = {
            "difference_points": float(arms[a].mean() - arms[b].mean()),
            "ci95_points": [float(ci95.low), float(ci95.high)],
            "ci90_points": [float(ci90.low), float(ci90.high)],
            "equivalence_margin_supported_points": float(max(abs(ci90.low), abs(ci90.high))),
            "p_value": float(res.pvalue),
        }
    res = st.ttest_rel(arms["pbt"], arms["random_static"])
    ci95, ci90 = res.confidence_interval(0.95), res.confidence_interval(0.90)
    out["pbt - random_static (paired by replicate)"] = {
        "difference_points": float((arms["pbt"] - arms["random_static"]).mean()),
        "ci95_points": [float(ci95.low), float(ci95.high)],
        "ci90_points": [float(ci90.low), float(ci90.high)],
        "equivalence_margin_supported_points": float(max(abs(ci90.low), abs(ci90.high))),
        "p_value": float(res.pvalue),
    }
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Read ``conflict.json`` and ``pbt.json`` from ``--figures``; write ``reanalysis.json``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--figures", type=Path, default=FIGURES, help="folder of the results read")
    ap.add_argument("--out", type=Path, default=None, help="folder of reanalysis.json")
    args = ap.parse_args(argv)
    conflict = json.loads((args.figures / "conflict.json").read_text())
    pbt = json.loads((args.figures / "pbt.json").read_text())
    within = {}
    for name, pair in conflict["pairs"].items():
        runs = pair["within"]["per_run"]
        ok = [x for x in runs if x["estimate"] is not None and x.get("n_eff")]
        within[name] = {
            "per_run_r": [x["estimate"] for x in ok],
            "per_run_n_eff": [x["n_eff"] for x in ok],
            "pooled_fisher_z_n_eff": stats.pool_correlations(
                [x["estimate"] for x in ok], [x["n_eff"] for x in ok]
            ),
            "pooled_fisher_z_n": stats.pool_correlations(
                [x["estimate"] for x in ok], [x["n"] for x in ok]
            ),
        }
    summary = {"finding2_within_pooled": within, "pbt_differences": _differences(pbt)}
    write_json(summary, (args.out or args.figures) / "reanalysis.json")
    return summary


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
