"""Many tasks: uniform weights vs PBT vs random static weights vs the MTO methods.

DigitAttributes with six tasks (digit, parity, greater_than_4, prime, closed_loop, heavy_ink), an
MLP (width 0.5, depth 2). Ways to choose the six loss weights, run once per replicate with the
replicate's training seed and data (so every difference is paired by replicate):

- uniform: ``w_t = 1/6`` (one training a replicate);
- PBT: ``N`` members (``gradlens.search.run_pbt``), a round every 2 epochs, the worst quarter
  copies one of the best quarter and perturbs its weights; the member with the best final
  validation accuracy is reported on the test split;
- random static: ``N`` Dirichlet(1) weight vectors (a ``random`` sweep), the best on validation
  reported on the test split. ``N`` trainings of the same length: PBT's compute;
- uniform, best of ``N`` seeds: ``N`` uniform trainings with other seeds, the best on validation
  reported on the test split: PBT's compute spent on seeds instead of weights (the control that
  separates "searching weights" from "picking the luckiest of N runs");
- the MTO methods of the paper's table (:data:`analyses._design.MTO_ARMS`: UPGrad, MGDA, PCGrad,
  IMTL-G, Aligned-MTL, CAGrad, uncertainty weighting; ``TrainConfig(weighting=...)``): one
  training a replicate each, the same budget (epochs, data, seed) as the uniform training. The
  Gram methods recompute their weights at every probe (every 10 steps, as the other arms probe)
  and hold them in between (docs/weightings.md).

Differences: paired t by replicate (all arms of a replicate share its training seed and data),
the 95 % interval, and the 90 % interval against an equivalence margin of 0.5 points stated in
advance. Figures: ``pbt_schedules.png`` (every replicate, the
reported member, copy events) and ``pbt_result.png`` (arms and differences).

The score is the mean test accuracy over the six tasks (``gradlens.train.score``).

    python -m analyses.pbt [--quick | --full]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses import _figures
from analyses._common import (
    QUICK,
    Preset,
    Timer,
    base_train,
    parse_args,
    run_study,
    save_figure,
    write_json,
)
from analyses._design import MTO_ARMS
from gradlens import stats
from gradlens.data import DIGIT_ATTRIBUTES
from gradlens.search import SearchConfig, make_executor, run_pbt
from gradlens.train import train

__all__ = ["main", "schedule_table"]

#: Equivalence margin of the arm differences, stated before the run: 0.5 accuracy points (the
#: paper's largest PBT effect is +0.44).
EQUIVALENCE_MARGIN = 0.005


def _train(pre: Preset) -> dict[str, Any]:
    tasks = list(DIGIT_ATTRIBUTES)[: pre.attribute_tasks]
    quick = pre.name in QUICK
    return {
        **base_train("digit_attributes", {"tasks": tasks}, pre.pbt_epochs),
        "width": 0.125 if quick else 0.5,
        "depth": 1 if quick else 2,
        "lr": 3e-3,
    }


def _train_one(cfg: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """One training in a worker; its final mean val and test accuracy and its CPU seconds.

    The result is also written to ``<run_dir>/result.json``, so a rerun skips the training.
    """
    import time

    done = Path(run_dir) / "result.json"
    if done.exists():
        return dict(json.loads(done.read_text()))
    c0 = time.process_time()
    res = train(cfg, run_dir, progress=False, overwrite=True)
    out = {
        s: float(np.mean([m["accuracy"] for m in res.metrics[s].values()])) for s in ("val", "test")
    }
    out["cpu_seconds"] = time.process_time() - c0
    done.write_text(json.dumps(out))
    return out


def _train_many(jobs: dict[str, tuple[dict[str, Any], Path]], workers: int) -> dict[str, Any]:
    """Run ``{key: (config, run_dir)}`` with ``workers`` processes (finished ones are read back)."""
    done = {k: d / "result.json" for k, (_, d) in jobs.items()}
    out = {k: dict(json.loads(p.read_text())) for k, p in done.items() if p.exists()}
    todo = {k: v for k, v in jobs.items() if k not in out}
    if not todo:  # every training finished: no worker processes to start
        return out
    ex = make_executor("local", workers=workers)
    try:
        futs = {k: ex.submit(_train_one, cfg, str(d)) for k, (cfg, d) in todo.items()}
        out.update({k: f.result() for k, f in futs.items()})
    finally:
        ex.close()
    return {k: out[k] for k in jobs}


def _uniform(base: dict[str, Any], seeds: Sequence[int], out: Path, workers: int) -> pd.DataFrame:
    """Uniform-weight trainings with ``seeds`` (resumable run by run)."""
    res = _train_many(
        {str(s): ({**base, "seed": s}, out / f"uniform-seed{s}") for s in seeds}, workers
    )
    return pd.DataFrame([{"seed": s, **res[str(s)]} for s in seeds])


def _replicate_train(base: dict[str, Any], r: int) -> dict[str, Any]:
    """Replicate ``r``'s training table: its own training seed, the same data split."""
    if r == 0:
        return base
    return {**base, "seed": 100 * r, "dataset_options": {**base["dataset_options"], "seed": 0}}


def _single_arms(
    base: dict[str, Any], r: int, root: Path, workers: int
) -> dict[str, dict[str, Any]]:
    """The one-training arms of replicate ``r``: uniform and each MTO method, run together."""
    train_r = _replicate_train(base, r)
    sfx = "" if r == 0 else f"-r{r}"
    jobs = {"uniform": (train_r, root / f"uniform{sfx}")}
    for m in MTO_ARMS:
        jobs[m] = ({**train_r, "weighting": m}, root / f"mto-{m}{sfx}")
    return _train_many(jobs, workers)


def _cpu_cost(root: Path, reps: int, single: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Training CPU seconds per arm, summed over replicates (each worker's process time).

    PBT: its members' ``cpu_seconds`` in ``pbt.json``; random static: the sweep's ``index.json``;
    best-of-N uniform and the one-training arms: each training's ``result.json``.
    """
    out = {"pbt": 0.0, "random_static": 0.0, "uniform_best_of_n": 0.0}
    for r in range(reps):
        sfx = "" if r == 0 else f"-r{r}"
        state = json.loads((root / f"pbt{sfx}" / "pbt.json").read_text())
        out["pbt"] += float(sum(m.get("cpu_seconds") or 0.0 for m in state["members"]))
        index = json.loads((root / f"random{sfx}" / "index.json").read_text())
        out["random_static"] += float(sum(x.get("cpu_seconds") or 0.0 for x in index["runs"]))
        for f in (root / f"uniform-best{sfx}").glob("*/result.json"):
            out["uniform_best_of_n"] += float(json.loads(f.read_text()).get("cpu_seconds") or 0.0)
    for k, rows in single.items():
        out[k] = float(sum(x.get("cpu_seconds") or 0.0 for x in rows))
    out["total"] = float(sum(out.values()))
    return out


def schedule_table(state: dict[str, Any]) -> pd.DataFrame:
    """``pbt.json`` -> tidy ``[member, epoch, task, weight]`` for ``plots.pbt_schedules``.

    Example:
        >>> schedule_table({"members": [{"schedule": [{"epoch": 0, "weights": {"a": 1.0}}]}]})
           member  epoch task  weight
        0       0      0    a     1.0
    """
    rows = [
        {"member": k, "epoch": e["epoch"], "task": t, "weight": w}
        for k, m in enumerate(state["members"])
        for e in m["schedule"]
        for t, w in e["weights"].items()
    ]
    return pd.DataFrame(rows)


def _describe(x: np.ndarray, n_test: int | None = None) -> dict[str, Any]:
    """Mean test accuracy of an arm and its 95 % t-interval over seeds / replicates; with
    ``n_test``, ``sd_test``: the test-set sampling SD of the mean accuracy
    (``stats.binomial_sd``; the score is a mean over tasks scored on the same items, whose
    variance over test sets is at most that of one task at the same accuracy: a bound)."""
    from scipy import stats as st

    out: dict[str, Any] = {"test": x.tolist(), "test_mean": float(x.mean())}
    if len(x) > 1:
        half = float(st.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
        out.update(
            test_sd=float(x.std(ddof=1)),
            ci_low=out["test_mean"] - half,
            ci_high=out["test_mean"] + half,
        )
    if n_test:
        out.update(n_test=n_test, sd_test=float(stats.binomial_sd(out["test_mean"], n_test)))
    return out


def _paired(a: np.ndarray, b: np.ndarray, n_test: int | None = None) -> dict[str, Any]:
    """Mean paired difference (replicate by replicate) with a paired t-test and its 95 % interval.

    The interval is over replicates scored on one test set. With ``n_test``, beside it:
    ``se_test_bound`` (``stats.gain_test_var``: the bound of the test-set variance of the
    difference, both arms scored on the same items) and ``ci_low_with_test`` /
    ``ci_high_with_test`` (``stats._gain.with_test_var``: replicates and test-set sampling).

    Example:
        >>> round(_paired(np.array([0.9, 0.8, 0.7]), np.array([0.8, 0.8, 0.6]))["difference"], 6)
        0.066667
    """
    from scipy import stats as st

    from gradlens.stats._gain import with_test_var

    d = a - b
    out: dict[str, Any] = {"difference": float(d.mean()), "p_value": None, "test": "paired t"}
    if len(d) < 2:
        return out
    res = st.ttest_rel(a, b)
    ci = res.confidence_interval(0.95)
    ci90 = res.confidence_interval(0.90)
    out.update(
        ci_low=float(ci.low),
        ci_high=float(ci.high),
        ci90_low=float(ci90.low),
        ci90_high=float(ci90.high),
        p_value=float(res.pvalue),
        equivalent_within_margin=bool(
            ci90.low > -EQUIVALENCE_MARGIN and ci90.high < EQUIVALENCE_MARGIN
        ),
    )
    if n_test:
        tv = stats.gain_test_var(float(a.mean()), float(b.mean()), n_test)
        wt = with_test_var(out["difference"], float(d.std(ddof=1) / np.sqrt(len(d))),
                           float(len(d) - 1), tv)  # fmt: skip
        out.update(se_test_bound=wt["se_test"], ci_low_with_test=wt["ci_low"],
                   ci_high_with_test=wt["ci_high"])  # fmt: skip
    return out


def _n_test(root: Path) -> int | None:
    """Test items of the many-task data, from the first uniform run's store."""
    meta = root / "uniform" / "meta.json"
    if not meta.exists():
        return None
    return int(json.loads(meta.read_text())["dataset"]["n"]["test"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the three arms (resuming), compare them, write the schedule figure and JSON."""
    args = parse_args(__doc__.splitlines()[0], argv)
    pre = args.preset
    base = _train(pre)
    root = args.runs / "pbt"
    n = pre.pbt_population
    reps = pre.pbt_replicates
    pbt_rows, rand_rows, best_rows, states = [], [], [], []
    single: dict[str, list[dict[str, Any]]] = {k: [] for k in ("uniform", *MTO_ARMS)}
    t_pbt = t_rand = t_best = t_single = 0.0
    for r in range(reps):
        # replicate r: other training seeds and PBT/random choices, the same data split
        train_r = _replicate_train(base, r)
        sfx = "" if r == 0 else f"-r{r}"
        with Timer() as tm:
            for k, res in _single_arms(base, r, root, args.workers).items():
                single[k].append({"replicate": r, "seed": train_r["seed"], **res})
        t_single += tm.wall
        with Timer() as tm:
            pbt_cfg = {
                "train": train_r,
                "pbt": {
                    "population": n,
                    "epochs": pre.pbt_epochs,
                    "interval_epochs": 1 if pre.name in QUICK else 2,
                    "quantile": 0.25,
                    "metric": "accuracy",
                    "seed": r,
                },
                "executor": {"kind": "local", "workers": args.workers},
            }
            members = run_pbt(SearchConfig.from_dict(pbt_cfg), root / f"pbt{sfx}", progress=True)
        t_pbt += tm.wall
        with Timer() as tm:
            rand = run_study(
                {"train": train_r, "sweep": {"random": n, "random_seed": r}},
                root / f"random{sfx}",
                args.workers,
            )
        t_rand += tm.wall
        with Timer() as tm:
            # uniform weights, N seeds, the best on validation: PBT's compute without weights
            seeds_r = [1000 * (r + 1) + k for k in range(n)]
            uni_n = _uniform(train_r, seeds_r, root / f"uniform-best{sfx}", args.workers)
        t_best += tm.wall
        bu = uni_n.loc[uni_n["val"].idxmax()]
        best_rows.append(
            {"replicate": r, "best_seed": int(bu["seed"]), "val": float(bu["val"]),
             "test": float(bu["test"]), "runs": uni_n}
        )  # fmt: skip
        bp, br = members.loc[members["val"].idxmax()], rand.loc[rand["val"].idxmax()]
        states.append(
            {"replicate": r, "best": int(bp["member"]),
             **json.loads((root / f"pbt{sfx}" / "pbt.json").read_text())}
        )  # fmt: skip
        pbt_rows.append(
            {
                "replicate": r,
                "best_member": int(bp["member"]),
                "val": float(bp["val"]),
                "test": float(bp["test"]),
                "final_weights": bp["weights"],
                "members": members,
            }
        )
        rand_rows.append(
            {
                "replicate": r,
                "best_run": br["id"],
                "val": float(br["val"]),
                "test": float(br["test"]),
                "weights": br["weights"],
                "runs": rand,
            }
        )
    arms = {
        "uniform": np.array([x["test"] for x in single["uniform"]]),
        "pbt": np.array([x["test"] for x in pbt_rows]),
        "random_static": np.array([x["test"] for x in rand_rows]),
        "uniform_best_of_n": np.array([x["test"] for x in best_rows]),
        **{m: np.array([x["test"] for x in single[m]]) for m in MTO_ARMS},
    }
    # every arm of a replicate shares its training seed and data: all differences are paired
    pairs = [
        ("pbt", "uniform"),
        ("random_static", "uniform"),
        ("uniform_best_of_n", "uniform"),
        ("pbt", "random_static"),
        ("pbt", "uniform_best_of_n"),
        *((m, "uniform") for m in MTO_ARMS),
        *(("pbt", m) for m in MTO_ARMS),
    ]
    nt = _n_test(root)
    summary = {
        "preset": pre.__dict__,
        "tasks": list(base["dataset_options"]["tasks"]),
        "n_test": nt,
        "population": n,
        "replicates": reps,
        "uniform": {"per_replicate": single["uniform"], **_describe(arms["uniform"], nt)},
        "mto": {
            m: {"per_replicate": single[m], **_describe(arms[m], nt)} for m in MTO_ARMS
        },
        "pbt": {"per_replicate": pbt_rows, **_describe(arms["pbt"], nt)},
        "random_static": {"per_replicate": rand_rows, **_describe(arms["random_static"], nt)},
        "uniform_best_of_n": {"per_replicate": best_rows,
                              **_describe(arms["uniform_best_of_n"], nt)},
        "differences": {f"{a} - {b}": _paired(arms[a], arms[b], nt) for a, b in pairs},
        "equivalence_margin_points": EQUIVALENCE_MARGIN * 100,
        "wall_seconds": {
            "uniform_and_mto": t_single, "pbt": t_pbt, "random": t_rand,
            "uniform_best_of_n": t_best,
        },
        "cpu_seconds": _cpu_cost(root, reps, single),
    }  # fmt: skip
    fig = _figures.pbt_schedules(
        states,
        end=pre.pbt_epochs,
        title=f"PBT weight schedules, DigitAttributes ({len(summary['tasks'])} tasks), "
        f"{n} members, {reps} replicate(s)",
    )
    save_figure(fig, args.figures / "pbt_schedules.png")
    fig = _figures.pbt_result(
        {k: v.tolist() for k, v in arms.items()},
        summary["differences"],
        margin=EQUIVALENCE_MARGIN,
        title=f"DigitAttributes, {len(summary['tasks'])} tasks: test accuracy of each arm "
        f"(PBT, random static, best of uniform: {n} trainings per replicate)",
    )
    save_figure(fig, args.figures / "pbt_result.png")
    write_json(summary, args.figures / "pbt.json")
    return summary


if __name__ == "__main__":
    s = main()
    print(
        f"uniform {s['uniform']['test_mean']:.4f}  PBT {s['pbt']['test_mean']:.4f}  "
        f"random-best {s['random_static']['test_mean']:.4f}  walls {s['wall_seconds']}"
    )
