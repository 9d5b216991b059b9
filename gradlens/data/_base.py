"""The dataset container shared by every loader, and the seeded split helpers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch.utils.data import Dataset

from gradlens._errors import GradlensError
from gradlens._paths import check_name
from gradlens._validate import check_choice, check_int

__all__ = [
    "SPLITS",
    "Kind",
    "MultiDomainDataset",
    "MultiTaskDataset",
    "Split",
    "TaskInfo",
]

Split = Literal["train", "val", "test"]
#: The split names every loader accepts.
SPLITS: tuple[str, ...] = get_args(Split)
#: Fractions of an underlying image set that go to train / val / test.
SPLIT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)

Kind = Literal["multitask", "multidomain"]
TaskKind = Literal["classification", "regression"]


@dataclass(frozen=True)
class TaskInfo:
    """What a task's target looks like.

    ``kind == "classification"``: targets are class indices (long) in ``[0, n_outputs)``.
    ``kind == "regression"``: targets are floats; ``n_outputs`` is the number of values per sample
    (1 means a target of shape ``(N,)``).

    Example:
        >>> TaskInfo("classification", 10)
        TaskInfo(kind='classification', n_outputs=10)
    """

    kind: TaskKind
    n_outputs: int

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, get_args(TaskKind))
        check_int("n_outputs", self.n_outputs, minimum=1)


class _ImageSource:
    """Lazy inputs: ``load(i)`` returns sample ``i`` as a float32 tensor of ``shape``."""

    def __init__(self, n: int, shape: tuple[int, ...], load: Callable[[int], torch.Tensor]) -> None:
        self.n = n
        self.shape = shape
        self.load = load

    def __len__(self) -> int:
        return self.n


class MultiTaskDataset(Dataset):
    """In-memory (or lazily loaded) inputs with one target per task.

    ``__getitem__(i)`` returns ``(x, {task: y})``. :meth:`tensors` returns the whole split as
    ``(X, {task: Y})``: ``X`` float32 of shape ``(N, *input_shape)``, ``Y[task]`` long ``(N,)`` for
    classification tasks and float32 ``(N,)`` (or ``(N, k)``) for regression tasks.

    Args:
        inputs: a float tensor ``(N, *input_shape)``.
        targets: task name -> tensor with ``N`` rows.
        task_info: task name -> :class:`TaskInfo`; inferred from ``targets`` when omitted
            (long -> classification with ``max + 1`` classes, float -> regression).
        name: a label for messages and ``repr``.
        split: which split this is.
        meta: free-form facts about how the data were made (documented per dataset).

    Example:
        >>> import torch
        >>> ds = MultiTaskDataset(torch.zeros(4, 2), {"a": torch.tensor([0, 1, 1, 0])})
        >>> ds.tasks, ds.input_shape, ds.task_info["a"]
        (('a',), (2,), TaskInfo(kind='classification', n_outputs=2))
        >>> x, y = ds[1]
        >>> int(y["a"])
        1
    """

    kind: Kind = "multitask"

    def __init__(
        self,
        inputs: torch.Tensor | _ImageSource,
        targets: Mapping[str, torch.Tensor],
        *,
        task_info: Mapping[str, TaskInfo] | None = None,
        name: str = "custom",
        split: str = "train",
        meta: Mapping[str, object] | None = None,
    ) -> None:
        if isinstance(inputs, torch.Tensor):
            if inputs.ndim < 2:
                raise GradlensError(
                    f"`inputs` must have shape (N, *input_shape); "
                    f"found shape {tuple(inputs.shape)}."
                )
            self._x: torch.Tensor | None = inputs.to(torch.float32)
            self._source: _ImageSource | None = None
            n = inputs.shape[0]
            self.input_shape: tuple[int, ...] = tuple(inputs.shape[1:])
        elif isinstance(inputs, _ImageSource):
            self._x, self._source = None, inputs
            n = len(inputs)
            self.input_shape = inputs.shape
        else:
            raise GradlensError(
                f"`inputs` should be a torch.Tensor; found {type(inputs).__name__}."
            )
        if not targets:
            raise GradlensError("`targets` should hold at least one task; found none.")
        for t, y in targets.items():
            if not isinstance(y, torch.Tensor) or y.ndim < 1 or y.shape[0] != n:
                found = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise GradlensError(
                    f"`targets[{t!r}]` should be a tensor with {n} rows (one per input); "
                    f"found {found}."
                )
        self._y = {t: y for t, y in targets.items()}
        self._n = n
        self.name = name
        self.split = split
        self.meta: dict[str, object] = dict(meta or {})
        self.tasks: tuple[str, ...] = self._task_names()
        for t in self.tasks:  # task names from data (headers, folders) may become file names
            check_name(t, f"task name of the dataset {name!r}")
        if task_info is None:
            task_info = {t: _infer_info(y) for t, y in self._y.items()}
        missing = [t for t in self.tasks if t not in task_info]
        if missing:
            raise GradlensError(f"`task_info` misses tasks {missing}; it must cover {self.tasks}.")
        self.task_info: dict[str, TaskInfo] = {t: task_info[t] for t in self.tasks}

    def _task_names(self) -> tuple[str, ...]:
        return tuple(self._y)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} is out of range for a dataset of {self._n} samples")
        i = i % self._n
        x = self._x[i] if self._x is not None else self._source.load(i)  # type: ignore[union-attr]  # one of the two is set (__init__)
        return x, {t: y[i] for t, y in self._y.items()}

    def tensors(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The whole split as ``(X, {target: Y})`` (lazily loaded images are read once, then kept).

        The tensors are the dataset's own (not copies): clone them before changing them in place.

        Example:
            >>> import torch
            >>> X, Y = MultiTaskDataset(torch.ones(3, 1, 2, 2), {"r": torch.zeros(3)}).tensors()
            >>> tuple(X.shape), Y["r"].dtype
            ((3, 1, 2, 2), torch.float32)
        """
        if self._x is None and self._source is not None:
            load = self._source.load
            self._x = (
                torch.stack([load(i) for i in range(self._n)])
                if self._n
                else torch.zeros((0, *self.input_shape))
            )
        return self._x, dict(self._y)  # type: ignore[return-value]  # set above when it was lazy

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={self._n}, "
            f"tasks={self.tasks}, input_shape={self.input_shape})"
        )


class MultiDomainDataset(MultiTaskDataset):
    """One label space, samples from several domains: the "tasks" are the domains.

    ``__getitem__(i)`` returns ``(x, {"domain": d, "label": y})`` and :meth:`tensors` returns
    ``(X, {"domain": D, "label": Y})`` (both long). ``domain[i]`` indexes :attr:`tasks`; every task
    (domain) has the same :class:`TaskInfo` (classification over :attr:`n_classes`). The loss of
    domain ``t`` on a batch is the mean loss over the batch samples whose domain is ``t``.

    Args:
        inputs: a float tensor ``(N, *input_shape)``.
        domain: long ``(N,)``, index into ``domains``.
        labels: long ``(N,)`` in ``[0, n_classes)``.
        domains: the domain names, in index order.
        n_classes: size of the shared label space.
        name: a label for messages and ``repr``.
        split: which split this is.
        meta: free-form facts about how the data were made.

    Example:
        >>> import torch
        >>> ds = MultiDomainDataset(torch.zeros(3, 2), torch.tensor([0, 1, 1]),
        ...                         torch.tensor([2, 0, 1]), domains=("a", "b"), n_classes=3)
        >>> ds.tasks, ds.domain_counts().tolist(), ds[0][1]["label"].item()
        (('a', 'b'), [1, 2], 2)
    """

    kind: Kind = "multidomain"

    def __init__(
        self,
        inputs: torch.Tensor | _ImageSource,
        domain: torch.Tensor,
        labels: torch.Tensor,
        *,
        domains: Sequence[str],
        n_classes: int,
        name: str = "custom",
        split: str = "train",
        meta: Mapping[str, object] | None = None,
    ) -> None:
        self._domains = tuple(domains)
        if len(set(self._domains)) != len(self._domains) or not self._domains:
            raise GradlensError(f"`domains` should be distinct names; found {self._domains}.")
        domain = torch.as_tensor(domain, dtype=torch.long)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if domain.numel() and (domain.min() < 0 or domain.max() >= len(self._domains)):
            raise GradlensError(
                f"`domain` must index into {len(self._domains)} domains; found values in "
                f"[{int(domain.min())}, {int(domain.max())}]."
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
            raise GradlensError(
                f"`labels` must lie in [0, {n_classes}); found values in "
                f"[{int(labels.min())}, {int(labels.max())}]."
            )
        info = TaskInfo("classification", int(n_classes))
        super().__init__(
            inputs,
            {"domain": domain, "label": labels},
            task_info={d: info for d in self._domains},
            name=name,
            split=split,
            meta=meta,
        )
        self.n_classes = int(n_classes)

    def _task_names(self) -> tuple[str, ...]:
        return self._domains

    @property
    def domain(self) -> torch.Tensor:
        """Long ``(N,)``: the index into :attr:`tasks` of each sample's domain."""
        return self._y["domain"]

    @property
    def labels(self) -> torch.Tensor:
        """Long ``(N,)``: each sample's class in the shared label space."""
        return self._y["label"]

    def domain_counts(self) -> torch.Tensor:
        """Number of samples of each domain, in :attr:`tasks` order (long ``(T,)``)."""
        return torch.bincount(self.domain, minlength=len(self.tasks))


def _infer_info(y: torch.Tensor) -> TaskInfo:
    if y.is_floating_point():
        return TaskInfo("regression", 1 if y.ndim == 1 else int(np.prod(y.shape[1:])))
    return TaskInfo("classification", int(y.max()) + 1 if y.numel() else 1)


def _rng(seed: int, *tags: int) -> np.random.Generator:
    """An independent numpy stream for ``seed`` and a tuple of integer tags."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *tags]))


#: Integer tags separating the random streams derived from one seed.
_TAG_SPLIT = 1
_TAG_SAMPLE = {"train": 11, "val": 12, "test": 13}


def _split_indices(n: int, seed: int, tag: int = 0) -> dict[str, np.ndarray]:
    """Seeded 70/15/15 partition of ``range(n)`` into train / val / test index arrays.

    Sizes are ``round(0.7 n)``, ``round(0.15 n)`` and the rest; the partition depends only on
    ``(n, seed, tag)``.
    """
    perm = _rng(seed, _TAG_SPLIT, tag).permutation(n)
    n_train = round(SPLIT_FRACTIONS[0] * n)
    n_val = round(SPLIT_FRACTIONS[1] * n)
    return {
        "train": np.sort(perm[:n_train]),
        "val": np.sort(perm[n_train : n_train + n_val]),
        "test": np.sort(perm[n_train + n_val :]),
    }


def _check_split(split: object) -> str:
    return str(check_choice("split", split, SPLITS))
