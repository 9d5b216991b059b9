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
    "FAMILY_SIZES",
    "MTO_ARMS",
    "STUDY",
    "STUDY_PAIRS",
    "Study",
    "StudyPair",
    "budget",
]

#: (width, depth) per family: 6 sizes, about 3k-3M parameters on a 16x16 input (2.6-3 decades).
FAMILY_SIZES: dict[str, tuple[tuple[float, int], ...]] = {
    "mlp": ((0.125, 1), (0.25, 2), (0.5, 2), (1.0, 2), (2.0, 3), (4.0, 4)),
    "resnet": ((0.25, 1), (0.5, 1), (1.0, 1), (1.0, 2), (2.0, 2), (4.0, 2)),
    "vit": ((0.25, 1), (0.5, 1), (0.5, 2), (1.0, 2), (2.0, 2), (2.0, 4)),
}

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
    pbt_replicates: int = 10
    pbt_population: int = 8
    pbt_epochs: int = 12
    conflict_runs: int = 10
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
