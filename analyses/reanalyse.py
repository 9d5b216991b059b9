"""Re-analyse the committed small-run results without training: the numbers the reworded verdicts
of analyses/README.md quote that the original scripts did not compute.

- Finding 2 within runs: the per-run Pearson r of ``conflict.json`` pooled by Fisher z, each run
  weighted by its effective sample size minus 3 (``n_eff`` from ``stats.within_run``), with a
  normal 95 % interval, instead of counting runs whose own interval excludes 0; and a
  random-effects version (t-interval of the runs' mean z, 2 degrees of freedom for 3 runs).
- PBT: the 90 % intervals of the arm differences of ``pbt.json`` (the equivalence margin they
  support: the largest absolute end), and the random-static arm paired with PBT by replicate.

    python -m analyses.reanalyse                     # reads and writes figures/reanalysis.json
    python -m analyses.reanalyse --figures DIR --out DIR

(When the statistics issue's pooled estimators land in ``gradlens.stats``, use them here.)
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analyses._common import FIGURES, write_json

__all__ = ["fisher_pool", "main"]


def fisher_pool(r: Sequence[float], n: Sequence[float]) -> dict[str, float]:
    """Fisher-z pooled correlation of independent estimates ``r`` with sample sizes ``n``.

    Fixed effect: ``z = sum (n_i - 3) atanh(r_i) / sum (n_i - 3)``, standard error
    ``1 / sqrt(sum (n_i - 3))``, 95 % normal interval, back-transformed; random effects: the
    t-interval of the mean of ``atanh(r_i)`` over the ``k`` estimates (``k - 1`` df).

    Example:
        >>> p = fisher_pool([0.3, 0.3], [23, 23])
        >>> round(p["estimate"], 6), round(p["se_z"], 6)
        (0.3, 0.158114)
    """
    from scipy import stats as st

    z = np.arctanh(np.asarray(r, float))
    w = np.asarray(n, float) - 3.0
    zf = float((w * z).sum() / w.sum())
    se = 1.0 / math.sqrt(float(w.sum()))
    out = {
        "estimate": math.tanh(zf),
        "ci_low": math.tanh(zf - 1.959964 * se),
        "ci_high": math.tanh(zf + 1.959964 * se),
        "se_z": se,
        "p_value": float(2 * st.norm.sf(abs(zf) / se)),
        "k": len(z),
    }
    if len(z) > 1:
        m, s = float(z.mean()), float(z.std(ddof=1) / math.sqrt(len(z)))
        t = float(st.t.ppf(0.975, len(z) - 1))
        out.update(
            random_effects_low=math.tanh(m - t * s), random_effects_high=math.tanh(m + t * s)
        )
    return out


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
            "pooled_fisher_z_n_eff": fisher_pool(
                [x["estimate"] for x in ok], [x["n_eff"] for x in ok]
            ),
            "pooled_fisher_z_n": fisher_pool([x["estimate"] for x in ok], [x["n"] for x in ok]),
        }
    summary = {"finding2_within_pooled": within, "pbt_differences": _differences(pbt)}
    write_json(summary, (args.out or args.figures) / "reanalysis.json")
    return summary


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
