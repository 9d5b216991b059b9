"""End-to-end calibration of ``gradlens report``: simulated sweeps written with the public store
(``RunWriter``, via ``_sweepgen.make_sweep``), read back by ``build_report``, judged from
``stats.json``.

Kinds of sweep (2 model sizes x 4 weights x ``seeds`` seeds, single-task baselines, 6 epochs):

- ``null``: nothing depends on anything (cosine and accuracy independent of the weight, joint and
  single-task runs with the same expected accuracy, no trend of conflict within a run);
- ``clustered``: the null plus a random effect per configuration on the cosine and on each task's
  accuracy (SD 0.03 against a run noise of 0.25 per probe and 0.002 per score): the seeds of a
  configuration are clustered, weight and outcomes still independent. The gain and the optimal
  weight are then truly non-zero / moving (a configuration's effect is a real effect of that
  configuration), so only the association and within-run tests are judged on it;
- ``planted``: the default planted sweep (cosine falls with the weight, accuracy a parabola in the
  weight, gain growing with size) without the within-run trend.

Run ``python -m tests._calibrate --sweeps 60`` (60 null and 60 clustered reports, 30 planted at
3 and at 5 seeds, 15 at 10 seeds; about 10 s a report on one core) to print the rows quoted in
``docs/stats.md``; ``tests/stats/test_calibration.py`` runs small versions.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gradlens.report import build_report
from tests._sweepgen import make_sweep

__all__ = ["KINDS", "calibrate", "report_once"]

SIZES = ((2, 32), (4, 128))
WEIGHTS = (0.2, 0.4, 0.6, 0.8)
P_STAR = 0.3
KINDS: dict[str, dict[str, float]] = {
    "null": {"effect": 0.0, "acc_effect": 0.0, "gain_effect": 0.0, "drift": 0.0},
    "clustered": {
        "effect": 0.0,
        "acc_effect": 0.0,
        "gain_effect": 0.0,
        "drift": 0.0,
        "config_sd": 0.03,
    },
    "planted": {"effect": 1.0, "acc_effect": 1.0, "gain_effect": 1.0, "drift": 0.0},
}
#: The tests whose p-values are judged on each kind (all are nulls there).
NULL_TESTS = {
    "null": ("primary", "secondary", "gain", "within_run", "within_pooled", "trend"),
    "clustered": ("primary", "secondary", "within_run", "within_pooled"),
    "planted": ("within_run", "within_pooled"),
}


def _true_gain(row: dict[str, Any], kind: str, tasks: tuple[str, str]) -> float:
    """The expected held-out gain of a cell: the generator's gain at each fold's picked weight,
    averaged over folds (the folds' seeds all count once)."""
    if kind == "null":
        return 0.0
    depth, width = row["model.depth"], row["model.width"]
    scale = math.log2(width / 32) / 2 + (depth - 2) / 2
    gain = -0.02 + 0.02 * scale
    sign = 1.0 if row["task"] == tasks[0] else -1.0
    truths = []
    for pick in json.loads(row["picked"]):
        p = pick[f"weights.{tasks[0]}"]
        truths.append(gain - 0.3 * (p - P_STAR) ** 2 + sign * 0.02 * (p - 0.5))
    return float(np.mean(truths)) if truths else math.nan


def report_once(root: Path, kind: str, index: int, *, seeds: int = 3) -> dict[str, Any]:
    """Write one sweep of ``kind`` under ``root``, build its report and collect what it says."""
    tasks = ("left", "right")
    sweep = make_sweep(
        root / "sweep",
        tasks=tasks,
        sizes=SIZES,
        weights=WEIGHTS,
        seeds=tuple(range(seeds)),
        epochs=6,
        p_star=P_STAR,
        rng_seed=index,
        **KINDS[kind],  # type: ignore[arg-type]
    )
    paths = build_report(
        sweep,
        root / "report",
        n_boot=200,
        n_perm=499,
        methods=["spearman"],
        seed=index,
        progress=False,
        figures=False,
        power_sims=0,
    )
    data = json.loads(paths.json.read_text(encoding="utf-8"))
    ts = data["task_sets"][0]
    p: dict[str, list[float]] = {
        "primary": [r["p_value"] for r in ts["associations"]],
        "secondary": [r["p_value"] for r in ts["associations_secondary"]],
        "gain": [r["p_value"] for r in ts.get("joint_gain_selected", [])],
        "within_run": [r.get("p_value") for r in ts.get("within_run", [])],
        "within_pooled": [ts.get("within_run_pooled", {}).get("p_value")],
        "trend": [ts.get("optimal_weight_trend", {}).get("p_value")],
    }
    p = {k: [float(v) for v in vs if v is not None] for k, vs in p.items()}
    cover: dict[str, list[bool]] = {"gain": [], "within_run": [], "within_pooled": []}
    if kind != "clustered":
        for r in ts.get("joint_gain_selected", []):
            truth = _true_gain(r, kind, tasks)
            if r["ci_low"] is not None and math.isfinite(truth):
                cover["gain"].append(r["ci_low"] <= truth <= r["ci_high"])
    for r in ts.get("within_run", []):
        if r.get("ci_low_neff") is not None:
            cover["within_run"].append(r["ci_low_neff"] <= 0.0 <= r["ci_high_neff"])
    pooled = ts.get("within_run_pooled", {})
    if pooled.get("ci_low") is not None:
        cover["within_pooled"].append(pooled["ci_low"] <= 0.0 <= pooled["ci_high"])
    supported = data["summary"]["supported"]
    return {
        "supported": supported,
        "supported_association": any("primary associations" in s for s in supported),
        "p": p,
        "cover": cover,
    }


def calibrate(kind: str, n_sweeps: int, *, seeds: int = 3, start: int = 0) -> dict[str, Any]:
    """Rates over ``n_sweeps`` reports of ``kind``: the fraction of reports with any supported
    claim (and with a supported association), per-test rejection rates at 0.05 of the tests that
    are null on this kind (``fpr.<test>``, every p-value of every report pooled; reports are
    independent, tests within a report are not), interval coverage of the truth (``cover.*``),
    and for ``planted`` the fraction of reports supporting each planted finding (power)."""
    supported = 0
    supported_assoc = 0
    pvals: dict[str, list[float]] = {k: [] for k in NULL_TESTS[kind]}
    cover: dict[str, list[bool]] = {"gain": [], "within_run": [], "within_pooled": []}
    found = {"weight->conflict": 0, "beats/worse": 0}
    by_family: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(start, start + n_sweeps):
            res = report_once(Path(tmp) / f"{kind}{i}", kind, i, seeds=seeds)
            supported += bool(res["supported"])
            supported_assoc += res["supported_association"]
            for k in pvals:
                pvals[k] += res["p"][k]
            for k in cover:
                cover[k] += res["cover"][k]
            for family in {s.split("[family '")[1].split("'")[0] for s in res["supported"]}:
                key = family.split(" of ")[0]
                by_family[key] = by_family.get(key, 0) + 1
            text = " ".join(res["supported"])
            found["weight->conflict"] += "weight of left and conflict frequency" in text
            found["beats/worse"] += "Joint training" in text
    out: dict[str, Any] = {
        "kind": kind,
        "n_sweeps": n_sweeps,
        "seeds": seeds,
        "any_supported": supported / n_sweeps,
        "supported_association": supported_assoc / n_sweeps,
        "supported_by_family": {k: v / n_sweeps for k, v in sorted(by_family.items())},
    }
    for k, v in pvals.items():
        out[f"fpr.{k}"] = float(np.mean(np.asarray(v) < 0.05)) if v else math.nan
        out[f"n.{k}"] = len(v)
    for k, v in cover.items():
        out[f"cover.{k}"] = float(np.mean(v)) if v else math.nan
        out[f"n_cover.{k}"] = len(v)
    if kind == "planted":
        out.update({f"power.{k}": v / n_sweeps for k, v in found.items()})
    return out


def _main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=60, help="reports per row (60)")
    parser.add_argument("--kinds", nargs="*", default=["null", "clustered", "planted"])
    args = parser.parse_args()
    start = time.perf_counter()
    rows = [("null", 3), ("clustered", 3), ("planted", 3), ("planted", 5), ("planted", 10)]
    rows = [(kind, seeds) for kind, seeds in rows if kind in args.kinds]
    for kind, seeds in rows:
        n = args.sweeps if kind != "planted" else max(1, args.sweeps // (2 if seeds <= 5 else 4))
        res = calibrate(kind, n, seeds=seeds)
        print(json.dumps(res, sort_keys=True), flush=True)
    print(f"(total {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
