"""Many tasks: uniform weights vs population-based training vs the best of random static weights.

DigitAttributes with six tasks (digit, parity, greater_than_4, prime, closed_loop, heavy_ink), an
MLP (width 0.5, depth 2). Three ways to choose the six loss weights, two of them at equal compute:

- uniform: ``w_t = 1/6`` (3 seeds);
- PBT: ``N`` members (``gradlens.search.run_pbt``), a round every 2 epochs, the worst quarter
  copies one of the best quarter and perturbs its weights; the member with the best final
  validation accuracy is reported on the test split;
- random static: ``N`` Dirichlet(1) weight vectors (a ``random`` sweep), the best on validation
  reported on the test split. ``N`` trainings of the same length: PBT's compute;
- uniform, best of ``N`` seeds: ``N`` uniform trainings with other seeds, the best on validation
  reported on the test split: PBT's compute spent on seeds instead of weights (the control that
  separates "searching weights" from "picking the luckiest of N runs").

Differences: Welch t against the independent uniform seeds; paired t (by replicate, same training
seed and data) between the arms run per replicate; the 90 % interval against an equivalence
margin of 0.5 points stated in advance. Figures: ``pbt_schedules.png`` (every replicate, the
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
    """One uniform-weight training in a worker; its final mean val and test accuracy."""
    res = train(cfg, run_dir, progress=False, overwrite=True)
    return {
        s: float(np.mean([m["accuracy"] for m in res.metrics[s].values()])) for s in ("val", "test")
    }


def _uniform(base: dict[str, Any], seeds: Sequence[int], out: Path, workers: int) -> pd.DataFrame:
    done = out / "uniform.json"
    if done.exists():
        return pd.DataFrame(json.loads(done.read_text()))
    ex = make_executor("local", workers=workers)
    try:
        futs = {
            s: ex.submit(_train_one, {**base, "seed": s}, str(out / f"uniform-seed{s}"))
            for s in seeds
        }
        rows = [{"seed": s, **f.result()} for s, f in futs.items()]
    finally:
        ex.close()
    out.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(rows))
    return pd.DataFrame(rows)


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


def _describe(x: np.ndarray) -> dict[str, Any]:
    """Mean test accuracy of an arm and its 95 % t-interval over seeds / replicates."""
    from scipy import stats as st

    out: dict[str, Any] = {"test": x.tolist(), "test_mean": float(x.mean())}
    if len(x) > 1:
        half = float(st.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
        out.update(
            test_sd=float(x.std(ddof=1)),
            ci_low=out["test_mean"] - half,
            ci_high=out["test_mean"] + half,
        )
    return out


def _welch(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Difference of means with Welch's t-test (None with fewer than 2 values per arm)."""
    from scipy import stats as st

    diff = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return {"difference": diff, "p_value": None}
    res = st.ttest_ind(a, b, equal_var=False)
    ci, ci90 = res.confidence_interval(0.95), res.confidence_interval(0.90)
    return {
        "difference": diff,
        "ci_low": float(ci.low),
        "ci_high": float(ci.high),
        "ci90_low": float(ci90.low),
        "ci90_high": float(ci90.high),
        "p_value": float(res.pvalue),
        "equivalent_within_margin": bool(
            ci90.low > -EQUIVALENCE_MARGIN and ci90.high < EQUIVALENCE_MARGIN
        ),
        "test": "Welch t",
    }


def _paired(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Mean paired difference (replicate by replicate) with a paired t-test and its 95 % interval.

    Example:
        >>> round(_paired(np.array([0.9, 0.8, 0.7]), np.array([0.8, 0.8, 0.6]))["difference"], 6)
        0.066667
    """
    from scipy import stats as st

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
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the three arms (resuming), compare them, write the schedule figure and JSON."""
    args = parse_args(__doc__.splitlines()[0], argv)
    pre = args.preset
    base = _train(pre)
    root = args.runs / "pbt"
    n = pre.pbt_population
    seeds = list(range(pre.uniform_seeds))
    with Timer() as t_uni:
        uniform = _uniform(base, seeds, root, args.workers)
    reps = pre.pbt_replicates
    pbt_rows, rand_rows, best_rows, states = [], [], [], []
    t_pbt = t_rand = t_best = 0.0
    for r in range(reps):
        # replicate r: other training seeds and PBT/random choices, the same data split
        train_r = (
            base
            if r == 0
            else {
                **base,
                "seed": 100 * r,
                "dataset_options": {**base["dataset_options"], "seed": 0},
            }
        )
        sfx = "" if r == 0 else f"-r{r}"
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
        "uniform": uniform["test"].to_numpy(float),
        "pbt": np.array([x["test"] for x in pbt_rows]),
        "random_static": np.array([x["test"] for x in rand_rows]),
        "uniform_best_of_n": np.array([x["test"] for x in best_rows]),
    }
    summary = {
        "preset": pre.__dict__,
        "tasks": list(base["dataset_options"]["tasks"]),
        "population": n,
        "replicates": reps,
        "uniform": {"per_seed": uniform, **_describe(arms["uniform"])},
        "pbt": {"per_replicate": pbt_rows, **_describe(arms["pbt"])},
        "random_static": {"per_replicate": rand_rows, **_describe(arms["random_static"])},
        "uniform_best_of_n": {"per_replicate": best_rows, **_describe(arms["uniform_best_of_n"])},
        "differences": {
            **{
                f"{a} - {b}": _welch(arms[a], arms[b])
                for a, b in (("pbt", "uniform"), ("random_static", "uniform"))
            },
            # arms run per replicate with the same training seed and data: paired by replicate
            **{
                f"{a} - {b}": _paired(arms[a], arms[b])
                for a, b in (("pbt", "random_static"), ("pbt", "uniform_best_of_n"))
            },
        },
        "equivalence_margin_points": EQUIVALENCE_MARGIN * 100,
        "wall_seconds": {
            "uniform": t_uni.wall, "pbt": t_pbt, "random": t_rand, "uniform_best_of_n": t_best
        },
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
