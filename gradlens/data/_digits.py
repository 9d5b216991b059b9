"""Bundled offline datasets built from scikit-learn's 8x8 digits (1,797 images, no download)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gradlens._errors import GradlensError, require
from gradlens._validate import check_int
from gradlens.data._base import (
    _TAG_SAMPLE,
    MultiDomainDataset,
    MultiTaskDataset,
    TaskInfo,
    _rng,
    _split_indices,
)

__all__ = ["DIGIT_ATTRIBUTES", "DIGIT_DOMAINS"]

#: Random-stream tags (see ``_rng``), one per dataset so their draws are independent.
_TAG_PAIRS = 101
_TAG_DOMAINS = 102


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 sklearn digits as float32 images in [0, 1] of shape (N, 8, 8), and int64 labels."""
    require("sklearn", "data", "The bundled digit datasets")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float64) / 16.0).astype(np.float32)
    images.setflags(write=False)
    labels = np.asarray(bunch.target, dtype=np.int64)
    labels.setflags(write=False)
    return images, labels


def _split_pool(split: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, labels and indices (into the 1,797 digits) of one split (70/15/15, seeded)."""
    images, labels = _digits()
    idx = _split_indices(len(labels), seed)[split]
    return images[idx], labels[idx], idx


# --------------------------------------------------------------------------------------------
# MultiDigits
# --------------------------------------------------------------------------------------------

_MULTIDIGITS_N = {"train": 6000, "val": 1500, "test": 1500}


def _multidigits(
    split: str, seed: int, root: Path | None, *, n: int | None = None
) -> MultiTaskDataset:
    """Two digits of the same split side by side: input (1, 8, 16), tasks "left" and "right"."""
    n = _MULTIDIGITS_N[split] if n is None else check_int("n", n, minimum=1)
    images, labels, pool = _split_pool(split, seed)
    rng = _rng(seed, _TAG_PAIRS, _TAG_SAMPLE[split])
    left = rng.integers(0, len(labels), size=n)
    right = rng.integers(0, len(labels), size=n)
    x = np.concatenate([images[left], images[right]], axis=2)[:, None]  # (n, 1, 8, 16)
    info = TaskInfo("classification", 10)
    return MultiTaskDataset(
        torch.from_numpy(np.ascontiguousarray(x)),
        {"left": torch.from_numpy(labels[left]), "right": torch.from_numpy(labels[right])},
        task_info={"left": info, "right": info},
        name="multidigits",
        split=split,
        meta={"left_index": pool[left], "right_index": pool[right]},
    )


# --------------------------------------------------------------------------------------------
# DigitAttributes
# --------------------------------------------------------------------------------------------


def _ink(x: np.ndarray) -> np.ndarray:
    return x.sum(axis=(1, 2))


def _center_ink(x: np.ndarray) -> np.ndarray:
    return x[:, 2:6, 2:6].sum(axis=(1, 2))


def _member(digits: set[int]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return lambda x, y: np.isin(y, sorted(digits)).astype(np.int64)


def _above_median(
    feature: Callable[[np.ndarray], np.ndarray],
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def attr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # The threshold is a constant of the attribute: the median over all 1,797 digits.
        threshold = np.median(feature(_digits()[0]))
        return (feature(x) > threshold).astype(np.int64)

    return attr


#: name -> (number of classes, definition, function(images, labels) -> int64 targets).
_ATTRIBUTES: dict[str, tuple[int, str, Callable[[np.ndarray, np.ndarray], np.ndarray]]] = {
    "digit": (10, "the digit class 0-9", lambda x, y: y.astype(np.int64)),
    "parity": (2, "1 for an odd digit", lambda x, y: (y % 2).astype(np.int64)),
    "greater_than_4": (2, "1 for digits 5-9", lambda x, y: (y > 4).astype(np.int64)),
    "prime": (2, "1 for 2, 3, 5, 7", _member({2, 3, 5, 7})),
    "closed_loop": (2, "1 for 0, 6, 8, 9 (handwritten 4s are mostly open)", _member({0, 6, 8, 9})),
    "heavy_ink": (2, "1 when total ink exceeds the median over all digits", _above_median(_ink)),
    "mod3": (3, "the digit modulo 3", lambda x, y: (y % 3).astype(np.int64)),
    "square": (2, "1 for perfect squares 0, 1, 4, 9", _member({0, 1, 4, 9})),
    "fibonacci": (2, "1 for Fibonacci numbers 0, 1, 2, 3, 5, 8", _member({0, 1, 2, 3, 5, 8})),
    "top_heavy": (
        2,
        "1 when the top four rows hold more ink than the bottom four",
        lambda x, y: (x[:, :4].sum(axis=(1, 2)) > x[:, 4:].sum(axis=(1, 2))).astype(np.int64),
    ),
    "left_heavy": (
        2,
        "1 when the left four columns hold more ink than the right four",
        lambda x, y: (x[:, :, :4].sum(axis=(1, 2)) > x[:, :, 4:].sum(axis=(1, 2))).astype(np.int64),
    ),
    "center_ink": (
        2,
        "1 when the ink in the central 4x4 block exceeds its median over all digits",
        _above_median(_center_ink),
    ),
}

#: The twelve attributes of DigitAttributes and their definitions (name -> description).
DIGIT_ATTRIBUTES: dict[str, str] = {k: v[1] for k, v in _ATTRIBUTES.items()}
_DEFAULT_ATTRIBUTES = tuple(list(_ATTRIBUTES)[:6])


def _select(
    option: str, value: Sequence[str] | None, valid: Sequence[str], default: Sequence[str]
) -> tuple[str, ...]:
    if value is None:
        return tuple(default)
    if isinstance(value, str):
        value = (value,)
    chosen = tuple(value)
    unknown = [v for v in chosen if v not in valid]
    if unknown:
        raise GradlensError(f"`{option}` has unknown names {unknown}; valid: {tuple(valid)}.")
    if not chosen or len(set(chosen)) != len(chosen):
        raise GradlensError(
            f"`{option}` should be a non-empty list of distinct names; found {chosen}."
        )
    return chosen


def _digit_attributes(
    split: str, seed: int, root: Path | None, *, tasks: Sequence[str] | None = None
) -> MultiTaskDataset:
    """One 8x8 digit, up to 12 attribute tasks derived from it."""
    chosen = _select("tasks", tasks, tuple(_ATTRIBUTES), _DEFAULT_ATTRIBUTES)
    images, labels, pool = _split_pool(split, seed)
    targets = {t: torch.from_numpy(_ATTRIBUTES[t][2](images, labels)) for t in chosen}
    return MultiTaskDataset(
        torch.from_numpy(images[:, None].copy()),
        targets,
        task_info={t: TaskInfo("classification", _ATTRIBUTES[t][0]) for t in chosen},
        name="digit_attributes",
        split=split,
        meta={"index": pool},
    )


# --------------------------------------------------------------------------------------------
# DomainDigits
# --------------------------------------------------------------------------------------------


def _rotate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate each image by a random angle of 20-45 degrees either way (bilinear, zero fill)."""
    angle = np.deg2rad(rng.uniform(20.0, 45.0, size=len(x)) * rng.choice([-1.0, 1.0], size=len(x)))
    cos, sin = np.cos(angle), np.sin(angle)
    theta = np.zeros((len(x), 2, 3))
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    t = torch.from_numpy(x[:, None].astype(np.float64))
    grid = F.affine_grid(torch.from_numpy(theta), list(t.shape), align_corners=False)
    out = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0].numpy().clip(0.0, 1.0).astype(np.float32)


def _noisy(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add Gaussian pixel noise of standard deviation 0.25, clipped to [0, 1]."""
    return (x + rng.normal(0.0, 0.25, size=x.shape)).clip(0.0, 1.0).astype(np.float32)


def _blurred(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """5x5 binomial blur (zero padding)."""
    k1 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    kernel = torch.from_numpy(np.outer(k1, k1))[None, None]
    out = F.conv2d(torch.from_numpy(x[:, None].astype(np.float64)), kernel, padding=2)
    return out[:, 0].numpy().astype(np.float32)


def _shifted(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Translate each image by a random (dy, dx) in {-2..2}^2 other than (0, 0), zero fill."""
    out = np.zeros_like(x)
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)]
    picks = rng.integers(0, len(shifts), size=len(x))
    for i, p in enumerate(picks):
        dy, dx = shifts[p]
        src = x[i, max(0, -dy) : 8 - max(0, dy), max(0, -dx) : 8 - max(0, dx)]
        out[i, max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


_Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]
_DOMAINS: dict[str, tuple[str, _Transform]] = {
    "original": ("the digit as is", lambda x, rng: x),
    "inverted": ("1 - pixel", lambda x, rng: (1.0 - x).astype(np.float32)),
    "rotated": ("random rotation of 20-45 degrees either way", _rotate),
    "noisy": ("Gaussian pixel noise, std 0.25, clipped to [0, 1]", _noisy),
    "blurred": ("5x5 binomial blur", _blurred),
    "shifted": ("random translation by up to 2 pixels", _shifted),
}
#: The domains of DomainDigits and their transforms (name -> description).
DIGIT_DOMAINS: dict[str, str] = {k: v[0] for k, v in _DOMAINS.items()}
_DOMAIN_SIZES = {
    "train": {
        "original": 1200,
        "noisy": 800,
        "inverted": 500,
        "rotated": 300,
        "blurred": 200,
        "shifted": 100,
    },
    "val": dict.fromkeys(_DOMAINS, 250),
    "test": dict.fromkeys(_DOMAINS, 250),
}


def _domain_sizes(sizes: object, domains: tuple[str, ...], split: str) -> dict[str, int]:
    if sizes is None:
        return {d: _DOMAIN_SIZES[split][d] for d in domains}
    if isinstance(sizes, (int, np.integer)) and not isinstance(sizes, bool):
        return {d: check_int("sizes", sizes, minimum=1) for d in domains}
    if isinstance(sizes, Mapping):
        if set(sizes) != set(domains):
            raise GradlensError(
                f"`sizes` must give a size for exactly the domains {domains}; found keys "
                f"{tuple(sizes)}."
            )
        return {d: check_int(f"sizes[{d!r}]", sizes[d], minimum=1) for d in domains}
    if isinstance(sizes, Sequence) and not isinstance(sizes, str):
        if len(sizes) != len(domains):
            raise GradlensError(
                f"`sizes` must hold one size per domain ({len(domains)}: {domains}); found "
                f"{len(sizes)} values."
            )
        return {
            d: check_int(f"sizes[{i}]", s, minimum=1)
            for i, (d, s) in enumerate(zip(domains, sizes))
        }
    raise GradlensError(
        f"`sizes` should be an int, a sequence of ints or a mapping domain -> int; found {sizes!r}."
    )


def _domain_digits(
    split: str,
    seed: int,
    root: Path | None,
    *,
    domains: Sequence[str] | None = None,
    sizes: int | Sequence[int] | Mapping[str, int] | None = None,
) -> MultiDomainDataset:
    """The digit task under several domains of different sizes, input (1, 8, 8)."""
    chosen = _select("domains", domains, tuple(_DOMAINS), tuple(_DOMAINS))
    per_domain = _domain_sizes(sizes, chosen, split)
    images, labels, pool = _split_pool(split, seed)

    def sample(d: str, rng: np.random.Generator, size: int) -> _Drawn:
        idx = draw_indices(rng, len(labels), size)
        return _DOMAINS[d][1](images[idx], rng), labels[idx], pool[idx]

    def stream(i: int) -> np.random.Generator:
        return _rng(seed, _TAG_DOMAINS, _TAG_SAMPLE[split], i)

    return mixed_domains(
        "domain_digits", split, chosen, tuple(_DOMAINS), per_domain, stream, sample
    )


#: One domain's draw: images (n, 8, 8), labels (n,), indices into the split's pool (n,).
_Drawn = tuple[np.ndarray, np.ndarray, np.ndarray]


def draw_indices(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``size`` indices into a pool of ``n``, over as many fresh permutations as it takes.

    >>> sorted(draw_indices(np.random.default_rng(0), 3, 6).tolist())  # two passes over 3
    [0, 0, 1, 1, 2, 2]
    """
    reps = -(-size // n)
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:size]


def mixed_domains(
    name: str,
    split: str,
    chosen: Sequence[str],
    every: Sequence[str],
    per_domain: Mapping[str, int],
    stream: Callable[[int], np.random.Generator],
    sample: Callable[[str, np.random.Generator, int], _Drawn],
) -> MultiDomainDataset:
    """A multi-domain dataset of the ``chosen`` domains, ``per_domain[d]`` samples each, drawn by
    ``sample(d, rng, size)`` from ``stream(i)``, ``i`` the domain's position in ``every`` (so a
    subset of the domains keeps its samples), then shuffled together by ``stream(99)``."""
    xs, ys, ds, base = [], [], [], []
    for k, d in enumerate(chosen):
        x, y, b = sample(d, stream(list(every).index(d)), per_domain[d])
        xs.append(x)
        ys.append(y)
        base.append(b)
        ds.append(np.full(len(y), k, dtype=np.int64))
    order = stream(99).permutation(sum(per_domain.values()))
    x = np.concatenate(xs)[order][:, None]
    return MultiDomainDataset(
        torch.from_numpy(np.ascontiguousarray(x)),
        torch.from_numpy(np.concatenate(ds)[order]),
        torch.from_numpy(np.concatenate(ys)[order]),
        domains=tuple(chosen),
        n_classes=10,
        name=name,
        split=split,
        meta={"sizes": dict(per_domain), "index": np.concatenate(base)[order]},
    )
