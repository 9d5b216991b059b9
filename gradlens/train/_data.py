"""Data side of the training harness: splits on the device, batches, losses and evaluation.

Private to :mod:`gradlens.train`. Multi-task datasets give one target per task and one head per
task; multi-domain datasets give ``domain`` and ``label`` and one head (``"label"``), and a batch
is drawn by resampling: each sample's domain with probability ``p_t``, then a sample of that
domain uniformly (with replacement).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradlens._errors import GradlensError
from gradlens.data import TaskInfo, dataset_options, load_dataset
from gradlens.models import MultiTaskModel

__all__: list[str] = []

#: Name of the single head of a multi-domain model.
DOMAIN_HEAD = "label"
#: Dataset options through which a loader selects its tasks (tried in this order).
TASK_OPTIONS = ("tasks", "attributes", "domains")
#: Batch size of evaluation passes (no gradients kept).
_EVAL_BATCH = 1024


@dataclass
class SplitTensors:
    """One split on the training device: inputs and targets (multi-domain: domain and label)."""

    X: torch.Tensor
    Y: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(self.X.shape[0])


@dataclass
class TrainData:
    """The three splits of a dataset, restricted to the chosen tasks."""

    name: str
    kind: str
    tasks: tuple[str, ...]
    info: dict[str, TaskInfo]
    input_shape: tuple[int, ...]
    splits: dict[str, SplitTensors]
    options: dict[str, Any]
    data_seed: int

    @property
    def heads(self) -> dict[str, int]:
        """Head name -> number of outputs for :func:`gradlens.models.build_model`."""
        if self.kind == "multidomain":
            return {DOMAIN_HEAD: self.info[self.tasks[0]].n_outputs}
        return {t: self.info[t].n_outputs for t in self.tasks}

    def describe(self) -> dict[str, Any]:
        """JSON-able facts for the run's ``meta['dataset']``."""
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "options": self.options,
            "seed": self.data_seed,
            "input_shape": list(self.input_shape),
            "n": {s: len(d) for s, d in self.splits.items()},
            "task_info": {
                t: {"kind": i.kind, "n_outputs": i.n_outputs} for t, i in self.info.items()
            },
        }
        if self.kind == "multidomain":
            out["domain_counts"] = {
                s: dict(
                    zip(
                        self.tasks,
                        torch.bincount(d.Y["domain"], minlength=len(self.tasks)).tolist(),
                    )
                )
                for s, d in self.splits.items()
            }
        return out


def load_train_data(
    dataset: str,
    options: Mapping[str, Any],
    tasks: Sequence[str] | None,
    seed: int,
    device: torch.device,
) -> TrainData:
    """Load train/val/test of ``dataset`` and keep the chosen tasks (or domains).

    ``options`` may hold ``root`` (on-disk datasets) and ``seed`` (the data seed, default
    ``seed``) besides the dataset's own options. When ``tasks`` is given and the dataset selects
    tasks through an option (``tasks``, ``attributes`` or ``domains``) not set in ``options``,
    the tasks are passed through it.
    """
    opts = dict(options)
    root = opts.pop("root", None)
    data_seed = opts.pop("seed", seed)
    valid = dataset_options(dataset)
    if tasks is not None:
        for key in TASK_OPTIONS:
            if key in valid and key not in opts:
                opts[key] = list(tasks)
                break
    raw = {s: load_dataset(dataset, s, seed=data_seed, root=root, **opts) for s in _SPLITS}
    train = raw["train"]
    chosen = tuple(train.tasks) if tasks is None else tuple(tasks)
    unknown = [t for t in chosen if t not in train.tasks]
    if unknown:
        raise GradlensError(
            f"`tasks` should be tasks of the dataset {dataset!r}, i.e. among {list(train.tasks)}; "
            f"found unknown {unknown}."
        )
    splits: dict[str, SplitTensors] = {}
    for split, ds in raw.items():
        X, Y = ds.tensors()
        if train.kind == "multidomain":
            order = list(ds.tasks)
            remap = torch.full((len(order),), -1, dtype=torch.long)
            for k, t in enumerate(chosen):
                remap[order.index(t)] = k
            dom = remap[Y["domain"]]
            keep = dom >= 0
            Xs, Ys = X[keep], {"domain": dom[keep], "label": Y["label"][keep]}
        else:
            Xs, Ys = X, {t: Y[t] for t in chosen}
        if len(Xs) == 0:
            raise GradlensError(
                f"The {split} split of {dataset!r} has no samples of the tasks {list(chosen)}; "
                f"check `tasks` and `dataset_options` ({opts})."
            )
        splits[split] = SplitTensors(Xs.to(device), {k: v.to(device) for k, v in Ys.items()})
    if train.kind == "multidomain":
        counts = torch.bincount(splits["train"].Y["domain"].cpu(), minlength=len(chosen))
        empty = [t for t, c in zip(chosen, counts.tolist()) if c == 0]
        if empty:
            raise GradlensError(
                f"Every chosen domain needs training samples; found none for {empty} in "
                f"{dataset!r}."
            )
    recorded = {k: v for k, v in opts.items()}
    if root is not None:
        recorded["root"] = str(root)
    return TrainData(
        name=dataset,
        kind=train.kind,
        tasks=chosen,
        info={t: train.task_info[t] for t in chosen},
        input_shape=tuple(train.input_shape),
        splits=splits,
        options=recorded,
        data_seed=int(data_seed),
    )


_SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def steps_per_epoch(n: int, batch_size: int) -> int:
    """``floor(n / batch_size)`` full batches (the remainder is dropped), at least one.

    Example:
        >>> steps_per_epoch(1000, 64), steps_per_epoch(10, 64)
        (15, 1)
    """
    return max(1, n // batch_size)


def epoch_batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Index batches of one epoch over a fresh permutation drawn from ``gen``."""
    perm = torch.randperm(n, generator=gen)
    b = min(batch_size, n)
    return [perm[k * b : (k + 1) * b] for k in range(steps_per_epoch(n, batch_size))]


def resample_batch(
    pools: Sequence[torch.Tensor], p: torch.Tensor, batch_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw each sample's domain with probability ``p``, then a sample of it uniformly.

    Returns ``(indices, domains)`` (long, CPU), ``domains[i]`` indexing ``pools``.
    """
    dom = torch.multinomial(p, batch_size, replacement=True, generator=gen)
    idx = torch.empty(batch_size, dtype=torch.long)
    for t, pool in enumerate(pools):
        sel = dom == t
        k = int(sel.sum())
        if k:
            idx[sel] = pool[torch.randint(len(pool), (k,), generator=gen)]
    return idx, dom


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def task_loss(out: torch.Tensor, y: torch.Tensor, info: TaskInfo) -> torch.Tensor:
    """Mean cross-entropy (classification) or mean squared error (regression) of one task."""
    if info.kind == "classification":
        return F.cross_entropy(out, y)
    return F.mse_loss(out.reshape(y.shape), y)


def multitask_losses(
    model: MultiTaskModel, x: torch.Tensor, ys: Mapping[str, torch.Tensor], data: TrainData
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-task losses on one batch, and the shared features ``z``."""
    z = model.trunk(x)
    losses = {t: task_loss(model.heads[t](z), ys[t], data.info[t]) for t in data.tasks}
    return losses, z


def multidomain_losses(
    model: MultiTaskModel,
    x: torch.Tensor,
    label: torch.Tensor,
    dom: torch.Tensor,
    n_domains: int,
) -> tuple[list[torch.Tensor | None], torch.Tensor, torch.Tensor]:
    """Per-domain mean losses (None for a domain absent from the batch), shares and ``z``.

    ``shares[t] = n_t / B``, so ``sum_t shares[t] * L_t`` is the batch mean loss.
    """
    z = model.trunk(x)
    per_sample = F.cross_entropy(model.heads[DOMAIN_HEAD](z), label, reduction="none")
    counts = torch.bincount(dom, minlength=n_domains)
    losses: list[torch.Tensor | None] = []
    for t in range(n_domains):
        losses.append(per_sample[dom == t].mean() if int(counts[t]) else None)
    return losses, counts.to(torch.float64) / len(dom), z


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, data: TrainData, split: str) -> dict[str, dict[str, float]]:
    """Per-task metrics on a whole split (model in eval mode; its mode is restored).

    Classification: ``loss`` (mean cross-entropy) and ``accuracy``. Regression: ``loss`` and
    ``mse`` (the same mean squared error, under an explicit name) and ``r2``
    (``1 - SSE / SST``, SST around the split's mean). Multi-domain: per domain, over its samples.
    """
    d = data.splits[split]
    was_training = model.training
    model.eval()
    try:
        outs: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(d), _EVAL_BATCH):
            for k, v in model(d.X[start : start + _EVAL_BATCH]).items():
                outs.setdefault(k, []).append(v)
        out = {k: torch.cat(v) for k, v in outs.items()}
    finally:
        model.train(was_training)
    if data.kind == "multidomain":
        logits = out[DOMAIN_HEAD]
        label, dom = d.Y["label"], d.Y["domain"]
        ce = F.cross_entropy(logits, label, reduction="none").double()
        hit = (logits.argmax(1) == label).double()
        res = {}
        for k, t in enumerate(data.tasks):
            sel = dom == k
            n = int(sel.sum())
            res[t] = {
                "accuracy": float(hit[sel].sum()) / n if n else math.nan,
                "loss": float(ce[sel].sum()) / n if n else math.nan,
            }
        return res
    res = {}
    for t in data.tasks:
        y, o, info = d.Y[t], out[t], data.info[t]
        if info.kind == "classification":
            ce = F.cross_entropy(o, y, reduction="sum").double()
            res[t] = {
                "accuracy": float((o.argmax(1) == y).double().mean()),
                "loss": float(ce) / len(y),
            }
        else:
            yd = y.double()
            sse = float(((o.reshape(y.shape).double() - yd) ** 2).sum())
            sst = float(((yd - yd.mean(0)) ** 2).sum())
            mse = sse / yd.numel()
            res[t] = {"loss": mse, "mse": mse, "r2": 1.0 - sse / sst if sst > 0 else math.nan}
    return res


def score(metrics: Mapping[str, Mapping[str, float]]) -> float:
    """The mean over tasks of ``accuracy`` (classification) or ``r2`` (regression).

    Higher is better; used for early stopping, and by sweeps and PBT to rank models.

    Example:
        >>> score({"a": {"accuracy": 0.9, "loss": 0.3}, "b": {"accuracy": 0.7, "loss": 0.8}})
        0.8
    """
    if not isinstance(metrics, Mapping) or not metrics:
        raise GradlensError(
            f"`metrics` should be a non-empty mapping {{task: {{metric: value}}}}; found "
            f"{metrics!r:.80}."
        )
    vals = []
    for task, m in metrics.items():
        key = "accuracy" if "accuracy" in m else "r2" if "r2" in m else None
        if key is None:
            raise GradlensError(
                f"`metrics[{task!r}]` should hold 'accuracy' or 'r2'; found {sorted(m)}."
            )
        vals.append(float(m[key]))
    return float(np.mean(vals))
