"""Synthetic sweep directories with planted structure, written with ``RunWriter`` (seconds).

Two generators:

- :func:`make_sweep`: a two-task loss-weight sweep over model sizes (depth x width) and seeds,
  plus single-task baselines, the layout ``gradlens.stats`` and ``gradlens.report`` read. Planted:
  the cosine between the tasks falls linearly with the first task's weight ``p`` (scaled by
  ``effect``; ``effect=0`` makes interference independent of the weight), the mean accuracy is a
  parabola in ``p`` with its top at ``p_star`` at every size, and the gain of joint over
  single-task training grows with depth and width. Per-epoch validation accuracy rises over
  training independently of the per-epoch conflict.
- :func:`make_run`: one run with ``n_tasks`` tasks in groups (aligned within a group, opposed
  between groups 0 and 1, noisier in deeper layers), for heatmaps with many tasks.

Every Gram is built from explicit vectors (``V V^T``), so it is a valid Gram matrix and the total
is the sum of the layers, as the profiler writes it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from gradlens import RunWriter, Snapshot

__all__ = ["SIZES", "make_run", "make_sweep", "n_params"]

#: (depth, width) of the model sizes of :func:`make_sweep`.
SIZES: tuple[tuple[int, int], ...] = ((2, 32), (2, 128), (4, 32), (4, 128))


def n_params(depth: int, width: int, n_in: int = 64, n_out: int = 10) -> int:
    """Parameters of an MLP trunk with ``depth`` hidden layers of ``width`` and two heads."""
    return (
        n_in * width + width + (depth - 1) * (width * width + width) + 2 * (width * n_out + n_out)
    )


@contextlib.contextmanager
def _no_fsync() -> Iterator[None]:
    """Skip fsync while writing test data: durability is not under test here, speed is."""
    with mock.patch.object(os, "fsync", return_value=None):
        yield


def _pair_gram(c: float, n1: float, n2: float) -> np.ndarray:
    """The Gram of two vectors of norms ``n1``, ``n2`` at cosine ``c``."""
    c = float(np.clip(c, -0.98, 0.98))
    v = np.array([[n1, 0.0], [n2 * c, n2 * math.sqrt(1.0 - c * c)]])
    return v @ v.T


def _snapshot(
    step: int,
    tasks: Sequence[str],
    layer_grams: dict[str, np.ndarray],
    weights: Sequence[float],
    losses: dict[str, float],
) -> Snapshot:
    lg = {k: torch.tensor(v, dtype=torch.float64) for k, v in layer_grams.items()}
    total = torch.stack(list(lg.values())).sum(0)
    return Snapshot(
        step,
        tuple(tasks),
        total,
        lg,
        torch.tensor(list(weights), dtype=torch.float64),
        losses=losses,
    )


def make_sweep(
    root: str | Path,
    *,
    tasks: tuple[str, str] = ("left", "right"),
    weights: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    sizes: Sequence[tuple[int, int]] = SIZES,
    seeds: Sequence[int] = (0, 1),
    epochs: int = 6,
    probes_per_epoch: int = 4,
    n_layers: int = 3,
    effect: float = 1.0,
    p_star: float = 0.3,
    baselines: bool = True,
    rng_seed: int = 0,
    acc_effect: float = 1.0,
    gain_effect: float = 1.0,
    drift: float = 0.1,
    config_sd: float = 0.0,
) -> Path:
    """Write a two-task weight sweep under ``root`` and return ``root``.

    Layout: ``root/d<depth>-w<width>/p<p>-s<seed>`` (joint runs, ``weights = {t0: p, t1: 1-p}``)
    and ``root/d<depth>-w<width>/single-<i>-s<seed>`` (single-task runs on ``tasks[i]``, meta
    ``config.baseline_of`` naming the joint task set). Final evals on ``test`` and ``val``, and
    per-epoch ``val`` evals at points ``epoch:<k>`` with their step.

    Null and clustered designs for calibration: ``effect=0`` (cosine independent of the weight),
    ``acc_effect=0`` (accuracy independent of the weight: no parabola, no tilt),
    ``gain_effect=0`` (joint and single-task runs of a size share their expected accuracy),
    ``drift=0`` (no trend of the cosine over training, so per-epoch conflict and validation
    accuracy are unrelated within a run). ``config_sd > 0`` adds a random effect per
    configuration (size x weight), independent draws for the cosine and for each task's
    accuracy, shared by the seeds of the configuration: seeds are then clustered. The final
    ``val`` score is the ``test`` score plus a little noise, so the two share the run's noise
    (choosing a weight on ``val`` and reporting ``test`` is optimistic unless held out).
    """
    with _no_fsync():
        _make_sweep(
            Path(root),
            tasks,
            weights,
            sizes,
            seeds,
            epochs,
            probes_per_epoch,
            n_layers,
            effect,
            p_star,
            baselines,
            rng_seed,
            acc_effect,
            gain_effect,
            drift,
            config_sd,
        )
    return Path(root)


def _make_sweep(
    root: Path,
    tasks: tuple[str, str],
    weights: Sequence[float],
    sizes: Sequence[tuple[int, int]],
    seeds: Sequence[int],
    epochs: int,
    probes_per_epoch: int,
    n_layers: int,
    effect: float,
    p_star: float,
    baselines: bool,
    rng_seed: int,
    acc_effect: float,
    gain_effect: float,
    drift: float,
    config_sd: float,
) -> None:
    rng = np.random.default_rng(rng_seed)
    # A separate stream, so the default sweep (config_sd = 0) draws exactly what it always did.
    config_rng = np.random.default_rng([rng_seed, 1])
    config_effect = {
        (size, p): config_sd * config_rng.normal(size=3) for size in sizes for p in weights
    }
    t0, t1 = tasks
    layers = [f"trunk.{i}" for i in range(n_layers)]
    layer_shift = np.linspace(0.25, -0.25, n_layers)
    steps_per_epoch = 10
    for depth, width in sizes:
        size_dir = root / f"d{depth}-w{width}"
        scale = math.log2(width / 32) / 2 + (depth - 2) / 2  # 0, 1, 1, 2 for SIZES
        base = {t0: 0.72 + 0.03 * scale, t1: 0.66 + 0.03 * scale}
        gain = gain_effect * (-0.02 + 0.02 * scale)
        model = {
            "family": "mlp",
            "depth": depth,
            "width": width,
            "n_params": n_params(depth, width),
        }
        for seed in seeds:
            seed_noise = {t: rng.normal(0, 0.003) for t in tasks}
            for p in weights:
                u = config_effect[(depth, width), p]
                cos = 0.05 + effect * 0.6 * (0.5 - p) + u[0]
                curve = acc_effect * (-0.3 * (p - p_star) ** 2)
                tilt = acc_effect * 0.02 * (p - 0.5)
                acc = {
                    t0: base[t0] + gain + curve + tilt + u[1],
                    t1: base[t1] + gain + curve - tilt + u[2],
                }
                acc = {t: a + seed_noise[t] + rng.normal(0, 0.002) for t, a in acc.items()}
                meta = {
                    "tasks": [t0, t1],
                    "weights": {t0: p, t1: round(1.0 - p, 10)},
                    "model": model,
                    "seed": seed,
                    "engine": "gramian",
                    "config": {"lr": 0.05, "epochs": epochs},
                }
                _write_run(
                    size_dir / f"p{p:.2f}-s{seed}",
                    meta,
                    [t0, t1],
                    [p, 1.0 - p],
                    cos,
                    layers,
                    layer_shift,
                    acc,
                    epochs,
                    probes_per_epoch,
                    steps_per_epoch,
                    rng,
                    drift,
                )
            if baselines:
                for i, t in enumerate(tasks):
                    meta = {
                        "tasks": [t],
                        "weights": {t: 1.0},
                        "model": model,
                        "seed": seed,
                        "engine": "gramian",
                        "config": {"lr": 0.05, "epochs": epochs, "baseline_of": f"{t0}|{t1}"},
                    }
                    acc = {t: base[t] + seed_noise[t] + rng.normal(0, 0.002)}
                    _write_run(
                        size_dir / f"single-{i}-s{seed}",
                        meta,
                        [t],
                        [1.0],
                        1.0,
                        layers,
                        layer_shift,
                        acc,
                        epochs,
                        probes_per_epoch,
                        steps_per_epoch,
                        rng,
                        drift,
                    )


def _write_run(
    path: Path,
    meta: dict,
    tasks: list[str],
    weights: list[float],
    cos: float,
    layers: list[str],
    layer_shift: np.ndarray,
    final_acc: dict[str, float],
    epochs: int,
    probes_per_epoch: int,
    steps_per_epoch: int,
    rng: np.random.Generator,
    drift_size: float = 0.1,
) -> None:
    stride = max(1, steps_per_epoch // probes_per_epoch)
    with RunWriter(path, meta=meta, flush_every=1000) as w:
        step = 0
        for epoch in range(1, epochs + 1):
            for k in range(probes_per_epoch):
                step = (epoch - 1) * steps_per_epoch + k * stride
                drift = drift_size * (1.0 - step / (epochs * steps_per_epoch))
                grams = {}
                for name, shift in zip(layers, layer_shift):
                    n1, n2 = rng.uniform(0.5, 2.0, size=2)
                    if len(tasks) == 1:
                        grams[name] = np.array([[n1 * n1]])
                    else:
                        c = cos + shift + drift + rng.normal(0, 0.25)
                        grams[name] = _pair_gram(c, n1, n2)
                losses = {t: float(2.0 * math.exp(-step / 30) + 0.1) for t in tasks}
                w.add_snapshot(_snapshot(step, tasks, grams, weights, losses))
            end = epoch * steps_per_epoch - 1
            val = {
                t: {"accuracy": a - 0.15 * math.exp(-epoch / 2) + rng.normal(0, 0.004)}
                for t, a in final_acc.items()
            }
            w.add_eval(val, split="val", point=f"epoch:{epoch}", epoch=epoch, step=end)
        w.add_eval({t: {"accuracy": a} for t, a in final_acc.items()}, split="test", point="final")
        w.add_eval(
            {t: {"accuracy": a + rng.normal(0, 0.002)} for t, a in final_acc.items()},
            split="val",
            point="final",
        )


def make_run(
    path: str | Path,
    *,
    n_tasks: int = 6,
    tasks: Sequence[str] | None = None,
    n_layers: int = 4,
    n_steps: int = 40,
    dim: int = 32,
    seed: int = 0,
    epochs: int = 5,
    extra_meta: dict | None = None,
) -> Path:
    """Write one run with ``n_tasks`` tasks in three groups and return its path.

    Tasks of one group share a direction; groups 0 and 1 point in opposite directions (they
    conflict), group 2 is orthogonal to both. Deeper layers add more noise (cosines shrink toward
    0) and the shared component decays over training. Per-epoch and final evals are written.
    """
    names = list(tasks) if tasks is not None else [f"task{i:02d}" for i in range(n_tasks)]
    T = len(names)
    rng = np.random.default_rng(seed)
    group = np.arange(T) % 3
    q, _ = np.linalg.qr(rng.normal(size=(dim, 2)))
    directions = np.stack([q[:, 0], -q[:, 0] + 0.3 * q[:, 1], q[:, 1]])
    layers = [f"block{i}" for i in range(n_layers)]
    steps_per_epoch = max(1, n_steps // epochs)
    meta = {
        "tasks": names,
        "weights": {t: 1.0 / T for t in names},
        "model": {"family": "mlp", "depth": n_layers, "width": dim, "n_params": dim * dim},
        "seed": seed,
        "engine": "gramian",
        **(extra_meta or {}),
    }
    with _no_fsync(), RunWriter(Path(path), meta=meta, flush_every=1000) as w:
        for step in range(n_steps):
            signal = 1.5 * math.exp(-step / n_steps)
            grams = {}
            for li, name in enumerate(layers):
                noise = (0.5 + 0.25 * li) * rng.normal(size=(T, dim)) / math.sqrt(dim)
                V = signal * directions[group] + noise
                V *= rng.uniform(0.5, 2.0, size=(T, 1))
                grams[name] = V @ V.T
            w.add_snapshot(_snapshot(step, names, grams, [1.0 / T] * T, {}))
            if (step + 1) % steps_per_epoch == 0:
                epoch = (step + 1) // steps_per_epoch
                acc = {t: {"accuracy": 0.9 - 0.3 * math.exp(-epoch / 2)} for t in names}
                w.add_eval(acc, split="val", point=f"epoch:{epoch}", epoch=epoch, step=step)
        w.add_eval({t: {"accuracy": 0.88} for t in names}, split="test", point="final")
    return Path(path)
