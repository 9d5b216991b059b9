"""Many tasks: uniform weights vs population-based training vs the best of random static weights.

DigitAttributes with six tasks (digit, parity, greater_than_4, prime, closed_loop, heavy_ink), an
MLP (width 0.5, depth 2). Three ways to choose the six loss weights, two of them at equal compute:

- uniform: ``w_t = 1/6`` (3 seeds);
- PBT: ``N`` members (``gradlens.search.run_pbt``), a round every 2 epochs, the worst quarter
  copies one of the best quarter and perturbs its weights; the member with the best final
  validation accuracy is reported on the test split;
- random static: ``N`` Dirichlet(1) weight vectors (a ``random`` sweep), the best on validation
  reported on the test split. ``N`` trainings of the same length: PBT's compute.

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

from analyses._common import (
    Preset,
    Timer,
    base_train,
    parse_args,
    run_study,
    save_figure,
    write_json,
)
from gradlens import plots
from gradlens.data import DIGIT_ATTRIBUTES
from gradlens.search import SearchConfig, make_executor, run_pbt
from gradlens.train import train

__all__ = ["main", "schedule_table"]


def _train(pre: Preset) -> dict[str, Any]:
    tasks = list(DIGIT_ATTRIBUTES)[: pre.attribute_tasks]
    quick = pre.name == "quick"
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the three arms (resuming), compare them, write the schedule figure and JSON."""
    args = parse_args(__doc__.splitlines()[0], argv)
    pre = args.preset
    base = _train(pre)
    root = args.runs / "pbt"
    n = pre.pbt_population
    seeds = [0] if pre.name == "quick" else [0, 1, 2]
    with Timer() as t_uni:
        uniform = _uniform(base, seeds, root, args.workers)
    with Timer() as t_pbt:
        pbt_cfg = {
            "train": base,
            "pbt": {
                "population": n,
                "epochs": pre.pbt_epochs,
                "interval_epochs": 1 if pre.name == "quick" else 2,
                "quantile": 0.25,
                "metric": "accuracy",
                "seed": 0,
            },
            "executor": {"kind": "local", "workers": args.workers},
        }
        members = run_pbt(SearchConfig.from_dict(pbt_cfg), root / "pbt", progress=True)
    with Timer() as t_rand:
        rand = run_study(
            {"train": base, "sweep": {"random": n, "random_seed": 0}}, root / "random", args.workers
        )
    best_pbt = members.loc[members["val"].idxmax()]
    best_rand = rand.loc[rand["val"].idxmax()]
    state = json.loads((root / "pbt" / "pbt.json").read_text())
    u = uniform["test"].to_numpy(float)
    summary = {
        "preset": pre.__dict__,
        "tasks": list(base["dataset_options"]["tasks"]),
        "population": n,
        "uniform": {
            "per_seed": uniform,
            "test_mean": float(u.mean()),
            "test_sd": float(u.std(ddof=1)) if len(u) > 1 else None,
        },
        "pbt": {
            "best_member": int(best_pbt["member"]),
            "val": float(best_pbt["val"]),
            "test": float(best_pbt["test"]),
            "final_weights": best_pbt["weights"],
            "members": members,
        },
        "random_static": {
            "best_run": best_rand["id"],
            "val": float(best_rand["val"]),
            "test": float(best_rand["test"]),
            "weights": best_rand["weights"],
            "runs": rand,
        },
        "wall_seconds": {"uniform": t_uni.wall, "pbt": t_pbt.wall, "random": t_rand.wall},
    }
    fig = plots.pbt_schedules(
        schedule_table(state),
        end=pre.pbt_epochs,
        title=f"PBT weight schedules, DigitAttributes ({len(summary['tasks'])} tasks), {n} members",
    )
    save_figure(fig, args.figures / "pbt_schedules.png")
    write_json(summary, args.figures / "pbt.json")
    return summary


if __name__ == "__main__":
    s = main()
    print(
        f"uniform {s['uniform']['test_mean']:.4f}  PBT {s['pbt']['test']:.4f}  "
        f"random-best {s['random_static']['test']:.4f}  walls {s['wall_seconds']}"
    )
