"""Tiny training configurations shared by the train, search and command tests (a few steps each)."""

from __future__ import annotations

from typing import Any

#: Synthetic regression with conflicting tasks (120 degrees) and a tiny trunk, trained with plain
#: SGD (ranked by task0's validation loss, the best PBT weights put everything on task0).
SYNTH: dict[str, Any] = {
    "dataset": "synthetic",
    "dataset_options": {"n": 200, "angle": 120.0, "noise": 0.1},
    "model": "mlp",
    "width": 0.05,
    "depth": 1,
    "optimizer": "sgd",
    "lr": 0.05,
    "momentum": 0.0,
    "batch_size": 50,
    "every": 1,
}

#: A two-task MultiDigits run of two steps per epoch, probed at every step (sweeps and PBT).
TINY_SEARCH: dict[str, Any] = {
    "dataset": "multidigits",
    "dataset_options": {"n": 128},
    "width": 0.125,
    "depth": 1,
    "lr": 0.01,
    "batch_size": 64,
    "every": 1,
}


def synth(**fields: Any) -> dict[str, Any]:
    """:data:`SYNTH` with ``fields`` replaced."""
    return {**SYNTH, **fields}


def tiny_train_args(every: int = 2) -> list[str]:
    """``gradlens train`` options of a one-epoch MultiDigits run of a few steps."""
    return [
        "--data-option", "n=128", "--width", "0.125", "--depth", "1", "--batch-size", "32",
        "--epochs", "1", "--every", str(every), "--no-progress",
    ]  # fmt: skip


def tiny(**fields: Any) -> dict[str, Any]:
    """A two-task MultiDigits run of a few steps (a TrainConfig mapping), ``fields`` replaced."""
    cfg: dict[str, Any] = {
        "dataset": "multidigits",
        "dataset_options": {"n": 160},
        "model": "mlp",
        "width": 0.125,
        "depth": 1,
        "batch_size": 32,
        "epochs": 1,
        "every": 2,
    }
    cfg.update(fields)
    return cfg
