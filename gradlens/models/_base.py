"""The multi-task model container: a shared trunk and one head per task."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from gradlens._errors import GradlensError

__all__ = ["MultiTaskModel"]


class MultiTaskModel(nn.Module):
    """A shared ``trunk`` (x -> flat features ``(B, d)``) and a head per task (``(B, n_out)``).

    Args:
        trunk: maps an input batch to features of shape ``(B, feature_dim)``.
        heads: task name -> module mapping features to that task's outputs.
        config: how the model was built (``family``, ``width``, ``depth``, ``input_shape``,
            ``heads``, ...); kept as :attr:`config`.

    Example:
        >>> import torch
        >>> m = MultiTaskModel(torch.nn.Linear(3, 4), {"a": torch.nn.Linear(4, 2)})
        >>> {k: tuple(v.shape) for k, v in m(torch.zeros(5, 3)).items()}
        {'a': (5, 2)}
        >>> m.n_params()
        {'trunk': 16, 'heads': 10, 'total': 26}
    """

    def __init__(
        self,
        trunk: nn.Module,
        heads: Mapping[str, nn.Module],
        config: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__()
        if not heads:
            raise GradlensError("`heads` must hold at least one task; found none.")
        self.trunk = trunk
        self.heads = nn.ModuleDict(dict(heads))
        self.config: dict[str, object] = dict(config or {})

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task names, in head order."""
        return tuple(self.heads.keys())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs of every head on the shared features: ``{task: (B, n_out)}``."""
        z = self.trunk(x)
        return {t: head(z) for t, head in self.heads.items()}

    def n_params(self) -> dict[str, int]:
        """Number of parameters of the trunk, of all heads together, and in total."""
        trunk = sum(p.numel() for p in self.trunk.parameters())
        heads = sum(p.numel() for p in self.heads.parameters())
        return {"trunk": trunk, "heads": heads, "total": trunk + heads}
