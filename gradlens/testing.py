"""Public slow reference for checking engines and custom layers: one backward per task.

Example:
    >>> import torch
    >>> from gradlens.testing import reference_grams
    >>> lin = torch.nn.Linear(3, 1)
    >>> x = torch.randn(8, 3)
    >>> ref = reference_grams({"a": lin(x).mean(), "b": -lin(x).mean()}, lin)
    >>> round(float(ref.gram[0, 1] / ref.gram[0, 0]), 6)
    -1.0
    >>> sorted(ref.layer_grams)
    ['(root)']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradlens._errors import GradlensError
from gradlens.engines._base import resolve_shared
from gradlens.engines.loop import layer_grams_from_grads, loop_task_grads

__all__ = ["ReferenceGrams", "reference_grams"]


@dataclass(frozen=True)
class ReferenceGrams:
    """Total and per-layer float64 Grams from the per-task loop."""

    tasks: tuple[str, ...]
    gram: torch.Tensor
    layer_grams: dict[str, torch.Tensor]


def reference_grams(
    losses: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    params: nn.Module | Iterable[Any],
) -> ReferenceGrams:
    """Per-task gradients by one ``torch.autograd.grad`` each, Grams formed in float64.

    Args:
        losses: scalar losses, a mapping task -> loss or a sequence (tasks named "0", "1", ...).
        params: a module (its trainable parameters, grouped by owning module) or an iterable of
            ``(name, parameter)`` pairs.

    The graph is retained, so the same losses can then be given to an engine.
    """
    if isinstance(losses, Mapping):
        tasks = tuple(losses)
        vals = [losses[t] for t in tasks]
    else:
        vals = list(losses)
        tasks = tuple(str(i) for i in range(len(vals)))
    if not vals:
        raise GradlensError("`losses` should hold at least one loss; found none.")
    shared = resolve_shared(params)
    ps = shared.params
    grads = loop_task_grads([v.reshape(()) for v in vals], ps)
    layer = layer_grams_from_grads(shared, ps, grads)
    total = torch.stack(list(layer.values())).sum(0).cpu()
    return ReferenceGrams(tasks, total, {k: v.cpu() for k, v in layer.items()})
