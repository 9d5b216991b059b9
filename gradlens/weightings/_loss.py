"""Loss-based weightings: baselines that read the task losses, not the Gram.

They are not functions of the Gram, so they give ``prof.backward`` a plain mapping of weights at
each step; their state (learnt parameters, random generator, loss history) is what a trainer must
checkpoint (``state_dict`` / ``load_state_dict``, plain tensors and floats). The protocol:

1. ``w = lw.weights(losses)`` before the backward (a dict task -> weight);
2. ``prof.backward(losses, weights=w)``;
3. ``lw.backward(losses)`` writes the gradients of the weighting's own learnt parameters
   (``lw.parameters()``, which the optimizer must hold; uncertainty weighting only);
4. ``lw.end_epoch()`` at the end of each epoch (DWA's loss history).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradlens._errors import GradlensError

__all__ = ["DWA", "LossWeighting", "RandomLossWeighting", "UncertaintyWeighting"]


def _floats(losses: Mapping[str, Any], tasks: Sequence[str], who: str) -> list[float]:
    if not isinstance(losses, Mapping) or set(losses) != set(tasks):
        found = list(losses) if isinstance(losses, Mapping) else type(losses).__name__
        raise GradlensError(
            f"`losses` given to {who} should map exactly the tasks {list(tasks)}; found {found}."
        )
    vals = [losses[t] for t in tasks]
    out = [float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in vals]
    if not all(math.isfinite(v) for v in out):
        raise GradlensError(f"`losses` given to {who} should be finite; found {out}.")
    return out


class LossWeighting:
    """Base class: weights from the losses, with checkpointable state (see the module doc).

    Example:
        >>> lw = LossWeighting(["a", "b"])
        >>> lw.weights({"a": 1.0, "b": 2.0})
        {'a': 1.0, 'b': 1.0}
    """

    name = "equal"

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = tuple(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise GradlensError(f"`tasks` should be distinct task names; found {list(tasks)}.")

    def weights(self, losses: Mapping[str, Any]) -> dict[str, float]:
        """The weights of this step."""
        _floats(losses, self.tasks, type(self).__name__)
        return dict.fromkeys(self.tasks, 1.0)

    def backward(self, losses: Mapping[str, torch.Tensor]) -> None:
        """Write the gradients of the weighting's own parameters (none by default)."""

    def end_epoch(self) -> None:
        """Called by the trainer at the end of every epoch."""

    def parameters(self) -> list[nn.Parameter]:
        """Learnt parameters the optimizer must update (none by default)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """The state to checkpoint (tensors, floats and lists only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018).

    The objective is ``sum_t L_t / (2 exp(s_t)) + s_t / 2`` with one learnt log-variance ``s_t``
    per task (LibMTL's form, ``s_t = -0.5`` at the start). Its gradient with respect to the
    model is the weighted sum with ``w_t = 1 / (2 exp(s_t))``, which :meth:`weights` returns;
    :meth:`backward` writes the gradient with respect to ``s``
    (``1/2 - L_t / (2 exp(s_t))``), so an optimizer holding :meth:`parameters` learns ``s``.

    Example:
        >>> import torch
        >>> uw = UncertaintyWeighting(["a", "b"])
        >>> losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
        >>> {t: round(v, 4) for t, v in uw.weights(losses).items()}
        {'a': 0.8244, 'b': 0.8244}
        >>> uw.backward(losses)
        >>> [round(v, 4) for v in uw.log_var.grad.tolist()]
        [-1.1487, 0.0878]
    """

    name = "uncertainty"

    def __init__(self, tasks: Sequence[str], init: float = -0.5) -> None:
        super().__init__(tasks)
        init_t = torch.full((len(self.tasks),), float(init), dtype=torch.float64)
        self.log_var = nn.Parameter(init_t)

    def weights(self, losses: Mapping[str, Any]) -> dict[str, float]:
        _floats(losses, self.tasks, "UncertaintyWeighting")
        w = (0.5 * torch.exp(-self.log_var.detach())).tolist()
        return dict(zip(self.tasks, w))

    def backward(self, losses: Mapping[str, torch.Tensor]) -> None:
        L = torch.tensor(_floats(losses, self.tasks, "UncertaintyWeighting"), dtype=torch.float64)
        s = self.log_var
        (L / (2 * torch.exp(s)) + s / 2).sum().backward()

    def parameters(self) -> list[nn.Parameter]:
        return [self.log_var]

    def state_dict(self) -> dict[str, Any]:
        return {"log_var": self.log_var.detach().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            self.log_var.copy_(torch.as_tensor(state["log_var"], dtype=torch.float64))


class RandomLossWeighting(LossWeighting):
    """Random loss weighting (Lin et al., TMLR 2022): ``w = softmax(z)``, ``z ~ N(0, I)`` anew
    at every step (LibMTL's RLW), from its own seeded generator (checkpointed).

    Example:
        >>> rlw = RandomLossWeighting(["a", "b", "c"], seed=0)
        >>> w = rlw.weights({"a": 1.0, "b": 1.0, "c": 1.0})
        >>> round(sum(w.values()), 12), all(v > 0 for v in w.values())
        (1.0, True)
    """

    name = "rlw"

    def __init__(self, tasks: Sequence[str], seed: int = 0) -> None:
        super().__init__(tasks)
        self._gen = torch.Generator().manual_seed(int(seed))

    def weights(self, losses: Mapping[str, Any]) -> dict[str, float]:
        _floats(losses, self.tasks, "RandomLossWeighting")
        z = torch.randn(len(self.tasks), generator=self._gen, dtype=torch.float64)
        return dict(zip(self.tasks, torch.softmax(z, 0).tolist()))

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._gen.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._gen.set_state(state["rng"])


class DWA(LossWeighting):
    """Dynamic weight average (Liu, Johns and Davison, CVPR 2019).

    ``w_t = T softmax(r / temp)_t`` with ``r_t = Lbar_t(e-1) / Lbar_t(e-2)``, the ratio of task
    t's mean training loss over the last two epochs; ``w = 1`` during the first two epochs
    (LibMTL's DWA, ``temp = 2``). The state is the running sums of the current epoch and the
    last two epochs' means.

    Example:
        >>> dwa = DWA(["a", "b"])
        >>> for epoch_losses in ([4.0, 1.0], [2.0, 1.0]):
        ...     _ = dwa.weights(dict(zip("ab", epoch_losses)))
        ...     dwa.end_epoch()
        >>> {t: round(v, 4) for t, v in dwa.weights({"a": 1.0, "b": 1.0}).items()}
        {'a': 0.8756, 'b': 1.1244}
    """

    name = "dwa"

    def __init__(self, tasks: Sequence[str], temp: float = 2.0) -> None:
        super().__init__(tasks)
        if not temp > 0:
            raise GradlensError(f"`temp` should be > 0; found {temp!r}.")
        self.temp = float(temp)
        self._sum = [0.0] * len(self.tasks)
        self._n = 0
        self._means: list[list[float]] = []  # the last two epochs' mean losses

    def weights(self, losses: Mapping[str, Any]) -> dict[str, float]:
        vals = _floats(losses, self.tasks, "DWA")
        self._sum = [s + v for s, v in zip(self._sum, vals)]
        self._n += 1
        if len(self._means) < 2:
            return dict.fromkeys(self.tasks, 1.0)
        prev, last = self._means
        r = torch.tensor([a / b for a, b in zip(last, prev)], dtype=torch.float64)
        w = len(self.tasks) * torch.softmax(r / self.temp, 0)
        return dict(zip(self.tasks, w.tolist()))

    def end_epoch(self) -> None:
        if self._n:
            self._means = [*self._means, [s / self._n for s in self._sum]][-2:]
        self._sum = [0.0] * len(self.tasks)
        self._n = 0

    def state_dict(self) -> dict[str, Any]:
        return {"sum": list(self._sum), "n": self._n, "means": [list(m) for m in self._means]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._sum = [float(v) for v in state["sum"]]
        self._n = int(state["n"])
        self._means = [[float(v) for v in m] for m in state["means"]]
