"""``load_dataset``: one entry point, one table of datasets (the single source of truth)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from gradlens._errors import GradlensError
from gradlens._validate import check_choice, check_int
from gradlens.data._base import MultiTaskDataset, _check_split
from gradlens.data._digits import _digit_attributes, _domain_digits, _multidigits
from gradlens.data._folders import _celeba, _domainnet
from gradlens.data._mnist import _digit_sources, _multimnist
from gradlens.data._synthetic import _synthetic

__all__ = ["DATASETS", "dataset_options", "load_dataset"]

_Builder = Callable[..., MultiTaskDataset]
#: name -> (builder, whether `root` is required). Builders take (split, seed, root, **options).
_REGISTRY: dict[str, tuple[_Builder, bool]] = {
    "multidigits": (_multidigits, False),
    "digit_attributes": (_digit_attributes, False),
    "domain_digits": (_domain_digits, False),
    "synthetic": (_synthetic, False),
    "multimnist": (_multimnist, False),
    "digit_sources": (_digit_sources, False),
    "celeba": (_celeba, True),
    "domainnet": (_domainnet, True),
}
#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = tuple(_REGISTRY)


def dataset_options(name: str) -> dict[str, object]:
    """The options a dataset accepts, with their defaults (``None``: chosen per split).

    Example:
        >>> dataset_options("multidigits")
        {'n': None}
    """
    builder, _ = _lookup(name)
    return {
        p.name: p.default
        for p in inspect.signature(builder).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _lookup(name: str) -> tuple[_Builder, bool]:
    check_choice("name", name, DATASETS)
    return _REGISTRY[name]


def load_dataset(
    name: str,
    split: str = "train",
    *,
    seed: int = 0,
    root: str | Path | None = None,
    **options: object,
) -> MultiTaskDataset:
    """Load one split of a bundled or on-disk multi-task / multi-domain dataset.

    Args:
        name: one of :data:`DATASETS` (see docs/data.md for each dataset and its options).
        split: ``"train"``, ``"val"`` or ``"test"`` (fixed, seeded partitions).
        seed: fixes the split and every random draw; the same seed gives identical data.
        root: the data folder, required by ``"celeba"`` and ``"domainnet"`` only.
        **options: dataset-specific options (:func:`dataset_options` lists them).

    Example:
        >>> ds = load_dataset("multidigits", "val", seed=0, n=100)
        >>> ds.tasks, ds.input_shape, len(ds)
        (('left', 'right'), (1, 8, 16), 100)
    """
    builder, needs_root = _lookup(name)
    split = _check_split(split)
    check_int("seed", seed, minimum=0)
    valid = dataset_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise GradlensError(
            f"Unknown option(s) {unknown} for dataset {name!r}; valid options: {tuple(valid)}."
        )
    if root is not None and not needs_root:
        raise GradlensError(f"`root` is not used by the bundled dataset {name!r}; found {root!r}.")
    return builder(split, seed, None if root is None else Path(root), **options)
