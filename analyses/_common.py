"""What the four analyses share: the study presets, the one sweep, reading results, writing outputs.

Three presets (``--quick``, the default ``small`` and ``--full``) fix the data size, epochs, model
grid, weights and seeds. ``capacity.py`` and ``optimal_weight.py`` analyse the *same* sweep
directories (:func:`pair_sweep`): the sweep is resumable, so whichever script runs second reuses
every finished run.

Example:
    >>> preset("quick").seeds
    (0,)
    >>> [p.name for p in PAIRS]
    ['multidigits', 'domain_digits']
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses._design import CPU_SIZES, FAMILY_SIZES, STUDY, STUDY_PAIRS
from gradlens import stats
from gradlens.search import SearchConfig, run_sweep

__all__ = [
    "PAIRS",
    "ROOT",
    "Pair",
    "Preset",
    "Timer",
    "base_train",
    "load_tables",
    "pair_sweep",
    "parse_args",
    "preset",
    "run_study",
    "save_figure",
    "sizes",
    "study_pairs",
    "sweep_config",
    "sweep_cost",
    "sweep_units",
    "write_json",
]

ROOT = Path(__file__).resolve().parents[1]
#: Default folder of the committed figures and their JSON.
FIGURES = ROOT / "figures"


@dataclass(frozen=True)
class Preset:
    """One scale of the study (``quick``: seconds, for tests; ``small``: what we ran; ``full``)."""

    name: str
    widths: tuple[float, ...]
    depths: tuple[int, ...]
    p: tuple[float, ...]
    seeds: tuple[int, ...]
    epochs: int
    multidigits_n: int
    domain_sizes: int | None  # None: the dataset's defaults (1,200 original, 300 rotated)
    conflict_epochs: int
    pbt_epochs: int
    pbt_population: int
    attribute_tasks: int
    pbt_replicates: int = 3  # PBT, random-static and best-of-N replicates
    uniform_seeds: int = 3  # seeds of the plain uniform arm of pbt.py
    conflict_seeds: int = 3  # long runs per pair of conflict.py / layers.py
    # The redesigned study (analyses/_design.py): its pairs, families and size grid.
    study: bool = False
    families: tuple[str, ...] = ("mlp",)
    early_stopping: int | None = None  # patience; the best-validation model is restored
    max_priority: int = 1  # study pairs of this priority or lower (1: run first)
    sizes_per_family: int | None = None  # the first k sizes of each family (None: see sizes())
    device: str = "cpu"  # the capacity sweeps' torch device
    only_pairs: tuple[str, ...] | None = None  # --pairs: a subset of the study's pairs
    # --sizes: at most the first K sizes of a family (("*", K) for every family)
    size_cap: tuple[tuple[str, int], ...] | None = None


_P7 = (0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9)
_PRESETS = {
    "quick": Preset(
        name="quick", widths=(0.125,), depths=(1,), p=(0.25, 0.5, 0.75), seeds=(0,), epochs=1,
        multidigits_n=128, domain_sizes=64, conflict_epochs=3, pbt_epochs=2, pbt_population=2,
        attribute_tasks=6, pbt_replicates=1, uniform_seeds=1, conflict_seeds=2,
    ),
    "small": Preset(
        name="small", widths=(0.25, 0.5, 1.0), depths=(1, 2, 4), p=_P7, seeds=(0, 1, 2),
        epochs=12, multidigits_n=2000, domain_sizes=None, conflict_epochs=20, pbt_epochs=12,
        pbt_population=8, attribute_tasks=6,
    ),
    "full": Preset(
        name="full", widths=(0.5, 1.0, 2.0), depths=(1, 2, 4), p=_P7, seeds=(0, 1, 2),
        epochs=12, multidigits_n=2000, domain_sizes=None, conflict_epochs=40, pbt_epochs=24,
        pbt_population=8, attribute_tasks=6, pbt_replicates=10,
    ),
    # The next run: see "Design for the next run" in analyses/README.md.
    "study": Preset(
        name="study", widths=(), depths=(), p=STUDY.p, seeds=STUDY.seeds,
        epochs=STUDY.max_epochs, multidigits_n=2000, domain_sizes=None, conflict_epochs=30,
        pbt_epochs=STUDY.pbt_epochs, pbt_population=STUDY.pbt_population, attribute_tasks=6,
        pbt_replicates=STUDY.pbt_replicates, uniform_seeds=STUDY.pbt_replicates,
        conflict_seeds=STUDY.conflict_runs, study=True, families=STUDY.families,
        early_stopping=STUDY.patience, max_priority=1,
    ),
    # The same code paths at the scale of a test.
    "study-quick": Preset(
        name="study-quick", widths=(), depths=(), p=(0.25, 0.5, 0.75), seeds=(0,), epochs=2,
        multidigits_n=64, domain_sizes=32, conflict_epochs=3, pbt_epochs=2, pbt_population=2,
        attribute_tasks=6, pbt_replicates=1, uniform_seeds=1, conflict_seeds=2, study=True,
        families=("mlp", "resnet"), early_stopping=1, max_priority=1, sizes_per_family=1,
    ),
}  # fmt: skip
QUICK = ("quick", "study-quick")


def preset(name: str) -> Preset:
    """The preset called ``name`` (``"quick"``, ``"small"``, ``"full"``, ``"study"``,
    ``"study-quick"``).

    Example:
        >>> preset("small").widths, preset("full").epochs
        ((0.25, 0.5, 1.0), 12)
    """
    return _PRESETS[name]


@dataclass(frozen=True)
class Pair:
    """A two-task (MultiDigits) or two-domain (DomainDigits) pair."""

    name: str
    dataset: str
    tasks: tuple[str, str]
    kind: str

    #: Dataset options of a study pair (None: built from the preset, as below).
    fixed: Mapping[str, Any] | None = None

    def options(self, pre: Preset) -> dict[str, Any]:
        """The dataset options of this pair at the scale of ``pre``."""
        if self.fixed is not None:
            opts = dict(self.fixed)
            if pre.name in QUICK:  # the study's pairs at the scale of a test
                key = "n" if self.dataset == "multimnist" else "sizes"
                opts[key] = pre.multidigits_n if key == "n" else pre.domain_sizes
            return opts
        if self.dataset == "multidigits":
            return {"n": pre.multidigits_n}
        opts: dict[str, Any] = {"domains": list(self.tasks)}
        if pre.domain_sizes is not None:
            opts["sizes"] = pre.domain_sizes
        return opts


PAIRS = (
    Pair("multidigits", "multidigits", ("left", "right"), "two tasks (loss weights)"),
    Pair("domain_digits", "domain_digits", ("original", "rotated"), "two domains (resampling)"),
)


def base_train(dataset: str, options: Mapping[str, Any], epochs: int) -> dict[str, Any]:
    """The ``[train]`` table every analysis starts from (MLP, Adam, gramian engine every 10 steps).

    Example:
        >>> base_train("multidigits", {"n": 64}, 1)["engine"]
        'gramian'
    """
    return {
        "dataset": dataset,
        "dataset_options": dict(options),
        "model": "mlp",
        "optimizer": "adam",
        "lr": 1e-3,
        "batch_size": 64,
        "epochs": epochs,
        "engine": "gramian",
        "every": 10,
        "seed": 0,
    }


def run_study(cfg: Mapping[str, Any], out: Path, workers: int) -> pd.DataFrame:
    """Run (or resume) one sweep with ``workers`` processes of one torch thread each.

    ``LocalExecutor`` gives each worker ``cpus // workers`` threads: on 2 cores and 2 workers, one.
    """
    full = {**cfg, "executor": {"kind": "local", "workers": workers}}
    return run_sweep(SearchConfig.from_dict(full), out, progress=True)


def study_pairs(pre: Preset) -> tuple[Pair, ...]:
    """The pairs a preset runs: :data:`PAIRS`, or the study's pairs up to ``pre.max_priority``.

    Example:
        >>> [p.name for p in study_pairs(preset("study"))]
        ['multimnist', 'digit_sources']
    """
    if not pre.study:
        return PAIRS
    return tuple(
        Pair(
            sp.name,
            sp.dataset,
            sp.tasks,
            "two domains (resampling)"
            if sp.dataset != "multimnist"
            else "two tasks (loss weights)",
            fixed=sp.options,
        )
        for sp in STUDY_PAIRS
        if sp.priority <= pre.max_priority and (pre.only_pairs is None or sp.name in pre.only_pairs)
    )


def sweep_units(pre: Preset) -> list[tuple[str, Pair, str]]:
    """``(name, pair, family)`` of every capacity sweep (an MLP sweep keeps the pair's name).

    Example:
        >>> [u[0] for u in sweep_units(preset("study-quick"))]
        ['multimnist', 'multimnist-resnet', 'digit_sources', 'digit_sources-resnet']
    """
    return [
        (pair.name if fam == "mlp" else f"{pair.name}-{fam}", pair, fam)
        for pair in study_pairs(pre)
        for fam in pre.families
    ]


def sizes(pre: Preset, family: str) -> list[dict[str, Any]]:
    """The model sizes of a sweep: the width x depth grid, or the study's sizes of ``family``
    (on the CPU those the budget keeps, :data:`analyses._design.CPU_SIZES`; on another device all).

    Example:
        >>> sizes(preset("study-quick"), "resnet")
        [{'width': 0.25, 'depth': 1}]
        >>> len(sizes(preset("study"), "resnet")), len(sizes(preset("study"), "mlp"))
        (4, 6)
    """
    if not pre.study:
        return [{"width": w, "depth": d} for w in pre.widths for d in pre.depths]
    k = pre.sizes_per_family
    if k is None and pre.device == "cpu":
        k = CPU_SIZES[family]
    caps = dict(pre.size_cap or ())
    cap = caps.get(family, caps.get("*"))
    if cap is not None:
        k = cap if k is None else min(k, cap)
    return [{"width": w, "depth": d} for w, d in FAMILY_SIZES[family][:k]]


def sweep_config(pair: Pair, pre: Preset, family: str = "mlp") -> dict[str, Any]:
    """The sweep configuration of :func:`pair_sweep` (a ``SearchConfig`` table).

    Example:
        >>> cfg = sweep_config(study_pairs(preset("study"))[0], preset("study"), "resnet")
        >>> cfg["train"]["model"], cfg["train"]["early_stopping"], len(cfg["sweep"]["sizes"])
        ('resnet', 5, 4)
    """
    train = {
        **base_train(pair.dataset, pair.options(pre), pre.epochs),
        "tasks": list(pair.tasks),
        "model": family,
    }
    if pre.early_stopping is not None:
        train["early_stopping"] = pre.early_stopping
    if pre.device != "cpu":
        train["device"] = pre.device
    return {
        "train": train,
        "sweep": {
            "p": list(pre.p),
            "sizes": sizes(pre, family),
            "seeds": list(pre.seeds),
            "baselines": True,
        },
    }


def pair_sweep(pair: Pair, pre: Preset, runs: Path, workers: int, family: str = "mlp") -> Path:
    """Run (or resume) the capacity sweep of ``pair``: weights x sizes x seeds + baselines.

    Both ``capacity.py`` and ``optimal_weight.py`` call this; the second call finds every run done.
    With ``pre.early_stopping`` each run keeps its best-validation epoch.
    """
    cfg = sweep_config(pair, pre, family)
    out = runs / (f"sweep-{pair.name}" if family == "mlp" else f"sweep-{pair.name}-{family}")
    run_study(cfg, out, workers)
    return out


def load_tables(sweep_dir: Path) -> dict[str, pd.DataFrame]:
    """``runs_table`` of a sweep on the val and test splits.

    The sweep's baselines train with one task (``tasks = [task]``), so ``stats.joint_gain`` finds
    them as single-task runs (``n_tasks == 1``); their model has one head, hence fewer parameters:
    match sizes on width and depth, not ``model.n_params``.
    """
    return {
        split: stats.runs_table(sweep_dir, split=split).reset_index(drop=True)
        for split in ("val", "test")
    }


def sweep_cost(sweep_dir: Path) -> dict[str, float]:
    """Summed wall and CPU seconds of the runs of a sweep (from its ``index.json``).

    Unlike the wall time of the call that last resumed it, this survives a resume.
    """
    runs = json.loads((sweep_dir / "index.json").read_text())["runs"]
    done = [r for r in runs if r.get("status") == "done"]
    return {
        "runs": len(done),
        "run_wall_seconds": float(sum(r.get("seconds") or 0.0 for r in done)),
        "run_cpu_seconds": float(sum(r.get("cpu_seconds") or 0.0 for r in done)),
    }


def write_json(obj: Any, path: Path) -> Path:
    """Strict JSON (NaN as null) via ``gradlens.stats.to_json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.to_json(_tidy(obj), path)
    return path


def _tidy(obj: Any) -> Any:
    if isinstance(obj, pd.DataFrame):
        return json.loads(obj.to_json(orient="records"))
    if isinstance(obj, Mapping):
        return {str(k): _tidy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_tidy(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if not math.isfinite(v) else v
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def save_figure(fig: Any, path: Path) -> Path:
    """Save a figure with ``gradlens.plots.save``."""
    from gradlens import plots

    return plots.save(fig, path)


class Timer:
    """Wall and CPU seconds of a block (CPU of this process and its finished children)."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        self.c0 = _cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = _cpu() - self.c0


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _size_caps(text: str, ap: argparse.ArgumentParser) -> tuple[tuple[str, int], ...]:
    """``"5"`` -> ``(("*", 5),)``; ``"mlp=5,vit=2"`` -> ``(("mlp", 5), ("vit", 2))``."""
    out = []
    for part in text.split(","):
        fam, _, k = part.rpartition("=")
        if not k.strip().isdigit() or int(k) < 1 or (fam and fam.strip() not in FAMILY_SIZES):
            ap.error(
                f"`--sizes` should be a positive integer or 'family=K,...' with families among "
                f"{', '.join(FAMILY_SIZES)}; found {text!r}."
            )
        out.append((fam.strip() or "*", int(k)))
    return tuple(out)


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The common flags: ``--quick`` / ``--full`` / ``--study`` (``--priority``) /
    ``--study-quick``, ``--runs``, ``--figures``, ``--workers``.

    ``--quick`` and ``--study-quick`` write runs and figures under ``runs/analyses-<preset>``
    unless told otherwise, so they never overwrite the committed figures; ``--study`` writes its
    figures under ``figures/study/``.
    """
    ap = argparse.ArgumentParser(description=description)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="tiny data, 1 size: seconds (for tests)")
    g.add_argument("--full", action="store_true", help="the paper-style MLP grid (hours)")
    g.add_argument(
        "--study",
        action="store_true",
        help="the redesigned study (analyses/README.md, 'Design for the next run'); with "
        "--priority 2 or 3 it adds the lower-priority pairs",
    )
    g.add_argument(
        "--study-quick", action="store_true", help="the study's code paths at test scale"
    )
    ap.add_argument("--priority", type=int, default=1, choices=(1, 2, 3), help="with --study")
    ap.add_argument(
        "--device",
        default="cpu",
        help="with --study: the capacity sweeps' torch device (e.g. cuda: every size, results "
        "under figures/study-<device>)",
    )
    ap.add_argument(
        "--families",
        default=None,
        help="with --study: comma-separated model families to run (default: all of the preset; "
        "e.g. 'mlp' runs the priority-1 MLP sweeps first, before the slower ResNet/ViT sizes)",
    )
    ap.add_argument(
        "--replicates",
        type=int,
        default=None,
        help="pbt.py: replicates per arm (default: the preset's; a rerun with more adds to them)",
    )
    ap.add_argument(
        "--pairs",
        default=None,
        help="with --study: comma-separated pairs to run or analyse (default: every pair up to "
        "--priority)",
    )
    ap.add_argument(
        "--sizes",
        default=None,
        help="with --study: only the first K sizes of each family (of those the CPU budget "
        "keeps), K or per family 'mlp=5,vit=2': a cut when the machine is slower than the "
        "budget assumed",
    )
    ap.add_argument(
        "--train-only",
        action="store_true",
        help="capacity.py, conflict.py: run (or resume) the trainings and stop before the "
        "analysis (a later call without it analyses the finished runs)",
    )
    ap.add_argument("--runs", type=Path, default=None, help="where the sweeps are written")
    ap.add_argument("--figures", type=Path, default=None, help="where figures and JSON go")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (1 torch thread)")
    args = ap.parse_args(argv)
    if args.study_quick:
        args.quick = True
        args.preset = preset("study-quick")
    else:
        args.preset = preset("quick" if args.quick else "full" if args.full else "small")
    if args.study:
        args.preset = replace(preset("study"), max_priority=args.priority, device=args.device)
    elif args.device != "cpu":
        ap.error("--device is for --study runs")
    if args.families is not None:
        fams = tuple(f.strip() for f in args.families.split(",") if f.strip())
        unknown = [f for f in fams if f not in args.preset.families]
        if not fams or unknown:
            ap.error(
                f"`--families` should be a comma-separated subset of "
                f"{', '.join(args.preset.families)}; found {args.families!r}."
            )
        args.preset = replace(args.preset, families=fams)
    if args.sizes is not None:
        args.preset = replace(args.preset, size_cap=_size_caps(args.sizes, ap))
    if args.pairs is not None:
        names = tuple(x.strip() for x in args.pairs.split(",") if x.strip())
        known = [p.name for p in study_pairs(args.preset)]
        if not names or any(n not in known for n in names):
            ap.error(
                f"`--pairs` should be a comma-separated subset of {', '.join(known)}; "
                f"found {args.pairs!r}."
            )
        args.preset = replace(args.preset, only_pairs=names)
    if args.replicates is not None:
        if args.replicates < 1:
            ap.error(f"`--replicates` should be a positive integer; found {args.replicates}.")
        args.preset = replace(args.preset, pbt_replicates=args.replicates)
    tag = args.preset.name + ("" if args.preset.device == "cpu" else f"-{args.preset.device}")
    if args.runs is None:
        args.runs = ROOT / "runs" / f"analyses-{tag}"
    if args.figures is None:
        # the study's results go beside, not over, the committed small-run figures
        args.figures = (
            args.runs / "figures"
            if args.preset.name in QUICK
            else FIGURES / tag
            if args.preset.study
            else FIGURES
        )
    if args.quick:
        args.workers = 1
    return args
