"""The CPU cost of one training per model size, to size the next study (analyses/_design.py).

For every (family, width, depth) of ``FAMILY_SIZES`` it trains the study's main pair (MultiMNIST
``front``/``back`` at 16x16, 2,000 samples per split) for 1 and for 3 epochs in this process
(one torch thread, CPU time of this process, early stopping on, so each epoch includes its
validation pass), and splits the CPU time into a fixed part and a per-epoch part:
``per_epoch = (t3 - t1) / 2``, ``fixed = t1 - per_epoch``. :func:`analyses._design.budget`
extrapolates them to the whole study.

    python -m analyses.timing            # about 5 min of one core; writes figures/timing.json
    python -m analyses.timing --quick    # two tiny sizes, 64 samples (tests)
    python -m analyses.timing --replan A/timing.json B/timing.json   # join, budget, plan
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analyses._common import FIGURES, ROOT, write_json
from analyses._design import FAMILY_SIZES, STUDY, STUDY_PAIRS, budget, plan

__all__ = ["main", "replan", "time_training"]


def time_training(cfg: dict[str, Any], epochs: int) -> dict[str, float]:
    """Wall and CPU seconds of ``gradlens.train.train`` of ``cfg`` for ``epochs`` epochs."""
    from gradlens.train import train

    with tempfile.TemporaryDirectory() as tmp:
        w0, c0 = time.perf_counter(), time.process_time()
        res = train({**cfg, "epochs": epochs}, Path(tmp) / "run", progress=False)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    acc = res.metrics["val"]
    return {
        "wall": wall,
        "cpu": cpu,
        "val_accuracy": float(sum(m["accuracy"] for m in acc.values()) / len(acc)),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Time every size (quick: two tiny ones) and write the measurements and the budget."""
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two tiny sizes, 64 samples")
    ap.add_argument("--out", type=Path, default=None, help="folder of timing.json")
    ap.add_argument(
        "--replan",
        type=Path,
        nargs="+",
        default=None,
        help="recompute budget and plan from these timing.json files (their rows joined)",
    )
    ap.add_argument(
        "--families", nargs="+", default=None, choices=STUDY.families, help="only these families"
    )
    args = ap.parse_args(argv)
    out = args.out or (ROOT / "runs" / "analyses-quick" / "figures" if args.quick else FIGURES)
    if args.replan is not None:
        return replan(args.replan, out)
    torch.set_num_threads(1)
    pair = STUDY_PAIRS[0]
    options = {**pair.options, "n": 64} if args.quick else dict(pair.options)
    sizes = (
        {"mlp": ((0.125, 1),), "resnet": ((0.25, 1),)}
        if args.quick
        else {f: FAMILY_SIZES[f] for f in (args.families or STUDY.families)}
    )
    rows, per_epoch, fixed = [], {}, {}
    warm = True  # the first training pays for imports and reading the digits: not timed
    for family, grid in sizes.items():
        for width, depth in grid:
            cfg = {
                "dataset": pair.dataset,
                "dataset_options": options,
                "tasks": list(pair.tasks),
                "model": family,
                "width": width,
                "depth": depth,
                "batch_size": STUDY.batch_size,
                "engine": "gramian",
                "every": 10,
                "early_stopping": STUDY.patience,
                "seed": 0,
            }
            if warm:
                time_training(cfg, 1)
                warm = False
            t1, t3 = time_training(cfg, 1), time_training(cfg, 3)
            pe = max((t3["cpu"] - t1["cpu"]) / 2, 0.0)
            key = (family, width, depth)
            per_epoch[key], fixed[key] = pe, max(t1["cpu"] - pe, 0.0)
            rows.append(
                {
                    "family": family,
                    "width": width,
                    "depth": depth,
                    "n_params": _n_params(family, width, depth, options),
                    "cpu_1_epoch": t1["cpu"],
                    "cpu_3_epochs": t3["cpu"],
                    "wall_3_epochs": t3["wall"],
                    "cpu_per_epoch": pe,
                    "cpu_fixed": fixed[key],
                    "val_accuracy_3_epochs": t3["val_accuracy"],
                }
            )
            print(rows[-1], flush=True)
    summary = {
        "quick": args.quick,
        "pair": pair.name,
        "dataset_options": options,
        "load_average": os.getloadavg(),
        "sizes": rows,
        "budget_one_pair": budget(per_epoch, fixed),
        "plan": plan(per_epoch, fixed) if ("mlp", 0.5, 2) in per_epoch else None,
    }
    write_json(summary, out / "timing.json")
    return summary


def replan(paths: Sequence[Path], out: Path) -> dict[str, Any]:
    """Recompute ``budget_one_pair`` and ``plan`` from ``timing.json`` files (no training).

    The files' size rows are joined (e.g. one run per family, run side by side); a size measured
    twice keeps its first row (the others go to ``repeats``). ``sources`` records, per file, the
    sizes it measured and its load average, and its path only when it lies inside the repository
    (relative to the root): measurements written to a temporary folder leave no path that a
    reader could open.
    """
    parts = [json.loads(Path(p).read_text()) for p in paths]
    summary = dict(parts[0])
    seen: set[tuple[str, float, int]] = set()
    rows, repeats = [], []
    for part in parts:
        for r in part["sizes"]:
            key = (r["family"], r["width"], r["depth"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
            else:
                repeats.append(r)
    summary["sizes"] = rows
    summary["repeats"] = repeats  # sizes measured again: how repeatable the CPU times are
    summary["sources"] = [_source(Path(p), part) for p, part in zip(paths, parts)]
    keys = [(r["family"], r["width"], r["depth"]) for r in summary["sizes"]]
    per_epoch = {k: r["cpu_per_epoch"] for k, r in zip(keys, summary["sizes"])}
    fixed = {k: r["cpu_fixed"] for k, r in zip(keys, summary["sizes"])}
    summary["budget_one_pair"] = budget(per_epoch, fixed)
    summary["plan"] = plan(per_epoch, fixed) if ("mlp", 0.5, 2) in per_epoch else None
    write_json(summary, out / "timing.json")
    return summary


def _source(path: Path, part: dict[str, Any]) -> dict[str, Any]:
    """What one joined ``timing.json`` measured (its path only if inside the repository).

    Example:
        >>> _source(Path("/tmp/x/timing.json"), {"sizes": [{"family": "vit"}], "load_average": [1]})
        {'file': None, 'families': ['vit'], 'n_sizes': 1, 'load_average': [1]}
    """
    from analyses._common import ROOT

    resolved = path.resolve()
    inside = resolved.is_relative_to(ROOT)
    return {
        "file": str(resolved.relative_to(ROOT)) if inside else None,
        "families": sorted({r["family"] for r in part["sizes"]}),
        "n_sizes": len(part["sizes"]),
        "load_average": part.get("load_average"),
    }


def _n_params(family: str, width: float, depth: int, options: dict[str, Any]) -> int:
    from gradlens.models import build_model

    side = options.get("image_size") or 36
    model = build_model(family, {"a": 10, "b": 10}, (1, side, side), width=width, depth=depth)
    return int(model.n_params()["total"])


if __name__ == "__main__":
    main()
