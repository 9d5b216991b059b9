"""The design of the next study run, as data: the one source for ``timing.py``, ``power.py`` and
analyses/README.md's "Design for the next run".

Nothing here trains. :data:`FAMILY_SIZES` spans about 2.6 decades of parameters per family,
:data:`STUDY_PAIRS` are the pairs with and without room to gain from sharing, and
:func:`budget` turns measured per-epoch times into the CPU cost of each part of the study.

Example:
    >>> [len(v) for v in FAMILY_SIZES.values()]
    [6, 6, 6]
    >>> STUDY.seeds
    (0, 1, 2, 3, 4)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CPU_SIZES",
    "FAMILY_SIZES",
    "MTO_ARMS",
    "STUDY",
    "STUDY_PAIRS",
    "Study",
    "StudyPair",
    "budget",
    "plan",
]

#: (width, depth) per family: 6 sizes, about 3k-3M parameters on a 16x16 input (2.6-3 decades).
FAMILY_SIZES: dict[str, tuple[tuple[float, int], ...]] = {
    "mlp": ((0.125, 1), (0.25, 2), (0.5, 2), (1.0, 2), (2.0, 3), (4.0, 4)),
    "resnet": ((0.25, 1), (0.5, 1), (1.0, 1), (1.0, 2), (2.0, 2), (4.0, 2)),
    "vit": ((0.25, 1), (0.5, 1), (0.5, 2), (1.0, 2), (2.0, 2), (2.0, 4)),
}

#: Sizes of each family the CPU budget keeps (the first k of FAMILY_SIZES; ``plan`` in
#: figures/timing.json); a GPU run (``--device cuda``) runs them all.
CPU_SIZES: dict[str, int] = {"mlp": 6, "resnet": 4, "vit": 4}

#: The MTO methods of the paper's table, as arms beside uniform / PBT (weightings issue 17).
MTO_ARMS: tuple[str, ...] = (
    "upgrad",
    "mgda",
    "pcgrad",
    "imtl_g",
    "aligned_mtl",
    "cagrad",
    "uncertainty",
)


@dataclass(frozen=True)
class StudyPair:
    """A two-task or two-domain pair of the study and why it is in it."""

    name: str
    dataset: str
    tasks: tuple[str, str]
    options: Mapping[str, Any]
    sharing: str  # what the two tasks can share
    priority: int  # 1: run first; higher numbers are cut first when the budget is short


STUDY_PAIRS: tuple[StudyPair, ...] = (
    StudyPair(
        "multimnist", "multimnist", ("front", "back"),
        {"n": 2000, "image_size": 16},
        "overlapping real digits: stroke features in shared pixels; back digit partly hidden "
        "(asymmetric)", 1,
    ),
    StudyPair(
        "multimnist_agree", "multimnist", ("front", "back"),
        {"n": 2000, "image_size": 16, "agreement": 0.5},
        "as multimnist, and half the back digits share the front digit's class (label transfer)",
        2,
    ),
    StudyPair(
        "multimnist_apart", "multimnist", ("front", "back"),
        {"n": 2000, "image_size": 16, "offset": 28, "jitter": 0},
        "digits on separate pixels, independent labels: little to share (negative control)", 2,
    ),
    StudyPair(
        "digit_sources", "digit_sources", ("sklearn", "mnist"), {},
        "one label space from two real sources (8x8 sklearn vs MNIST)", 1,
    ),
    *(
        StudyPair(
            f"domain_{d}", "domain_digits", ("original", d), {"domains": ["original", d]},
            f"one label space, the original digits vs a '{d}' transform", 3,
        )
        for d in ("rotated", "inverted", "noisy", "blurred", "shifted")
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Study:
    """The run plan: seeds, weights, epochs, PBT and the budget it must fit."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    p: tuple[float, ...] = (0.2, 0.35, 0.5, 0.65, 0.8)
    max_epochs: int = 30
    patience: int = 5
    expected_epochs: float = 15.0  # mean epochs run with early stopping (assumed, see README)
    batch_size: int = 64
    pbt_replicates: int = 20
    pbt_population: int = 8
    pbt_epochs: int = 12
    conflict_runs: int = 20
    cpu_seconds: float = 2 * 90 * 60.0  # 2 cores for 90 minutes
    families: tuple[str, ...] = ("mlp", "resnet", "vit")
    extra: dict[str, Any] = field(default_factory=dict)


STUDY = Study()


def budget(
    per_epoch: Mapping[tuple[str, float, int], float],
    fixed: Mapping[tuple[str, float, int], float],
    study: Study = STUDY,
    *,
    pairs: int = 1,
) -> dict[str, Any]:
    """CPU seconds of one capacity sweep per family on ``pairs`` pairs, from measured times.

    ``per_epoch[(family, width, depth)]`` and ``fixed[...]`` are the measured CPU seconds of one
    training epoch and of a run's fixed cost (start-up, final evaluation, store). A sweep is
    ``len(p)`` joint runs plus 2 single-task baselines per size and seed, each
    ``fixed + expected_epochs * per_epoch`` (baselines train one task at the joint runs' steps).

    Example:
        >>> b = budget({("mlp", 1.0, 2): 1.0}, {("mlp", 1.0, 2): 2.0}, Study(seeds=(0,), p=(0.5,)))
        >>> b["per_family"]["mlp"], b["runs_per_family"]["mlp"]
        (51.0, 3)
    """
    runs_per_cell = len(study.p) + 2
    per_family: dict[str, float] = {}
    runs: dict[str, int] = {}
    for (fam, w, d), sec in per_epoch.items():
        run = fixed[(fam, w, d)] + study.expected_epochs * sec
        per_family[fam] = per_family.get(fam, 0.0) + run * runs_per_cell * len(study.seeds) * pairs
        runs[fam] = runs.get(fam, 0) + runs_per_cell * len(study.seeds) * pairs
    return {
        "per_family": per_family,
        "runs_per_family": runs,
        "total": float(sum(per_family.values())),
        "budget": study.cpu_seconds,
    }


def plan(
    per_epoch: Mapping[tuple[str, float, int], float],
    fixed: Mapping[tuple[str, float, int], float],
    study: Study = STUDY,
) -> dict[str, Any]:
    """What fits the CPU budget, in priority order, from measured per-epoch and fixed CPU seconds.

    Parts, in the order they are kept: the MLP capacity sweeps of the priority-1 pairs; the
    conflict runs (``conflict_runs`` MLP width 0.5 depth 2 runs of ``max_epochs`` per pair);
    the many-task arms (per replicate: PBT, random static and best-of-N uniform, ``population``
    trainings each, plus one uniform and one per MTO arm, ``pbt_epochs`` each, on the MLP width
    0.5 depth 2); then each ResNet and ViT size (smallest first) on the priority-1 pairs; then
    the MLP sweeps of the priority-2 and priority-3 pairs. A part is kept while the running total
    stays within ``study.cpu_seconds``; the rest is listed as cut. The measured costs are those
    of the 16x16 MultiMNIST pair, an upper bound for the 8x8 pairs (fewer pixels, at most as
    many samples).

    Example:
        >>> pe = {("mlp", 0.5, 2): 0.1, ("resnet", 0.25, 1): 100.0}
        >>> fx = {k: 0.0 for k in pe}
        >>> p = plan(pe, fx, Study(families=("mlp", "resnet"), cpu_seconds=1000.0))
        >>> [k["part"] for k in p["kept"]][:2], [k["part"] for k in p["cut"]][:1]
        (['MLP sweeps, priority-1 pairs', 'conflict runs'], ['resnet width 0.25 depth 1'])
    """

    def run(key: tuple[str, float, int], epochs: float) -> float:
        return fixed[key] + epochs * per_epoch[key]

    cell = (len(study.p) + 2) * len(study.seeds)
    p1 = sum(1 for sp in STUDY_PAIRS if sp.priority == 1)
    mlp = [k for k in per_epoch if k[0] == "mlp"]
    parts: list[tuple[str, float]] = [
        (
            "MLP sweeps, priority-1 pairs",
            p1 * cell * sum(run(k, study.expected_epochs) for k in mlp),
        )
    ]
    mid = ("mlp", 0.5, 2)
    parts.append(("conflict runs", p1 * study.conflict_runs * run(mid, study.max_epochs)))
    per_rep = 3 * study.pbt_population + 1 + len(MTO_ARMS)
    parts.append(("many-task arms", study.pbt_replicates * per_rep * run(mid, study.pbt_epochs)))
    for fam in study.families:
        if fam == "mlp":
            continue
        for k in sorted((k for k in per_epoch if k[0] == fam), key=lambda k: per_epoch[k]):
            parts.append(
                (f"{fam} width {k[1]:g} depth {k[2]}", p1 * cell * run(k, study.expected_epochs))
            )
    for prio in (2, 3):
        n = sum(1 for sp in STUDY_PAIRS if sp.priority == prio)
        parts.append(
            (f"MLP sweeps, priority-{prio} pairs ({n})",
             n * cell * sum(run(k, study.expected_epochs) for k in mlp))
        )  # fmt: skip
    kept, cut, total = [], [], 0.0
    for name, cost in parts:
        if total + cost <= study.cpu_seconds:
            kept.append({"part": name, "cpu_seconds": cost})
            total += cost
        else:
            cut.append({"part": name, "cpu_seconds": cost})
    return {"kept": kept, "cut": cut, "total_kept": total, "budget": study.cpu_seconds}
