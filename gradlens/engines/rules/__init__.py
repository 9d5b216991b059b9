"""Per-layer Gram rules for the ``gramian`` engine, one small file per layer type.

A rule turns what the forward hook recorded for one module (its input at each call) and what the
batched backward produced (each task's gradient with respect to the module's output at each call)
into the module's ``T x T`` Gram matrix, and writes the weighted gradient of its parameters. It is
registered for exact module types with :func:`register_rule`; modules without a rule fall back to
the exact generic path (per-task parameter gradients from the batched backward).

Example:
    >>> from torch import nn
    >>> from gradlens.engines.rules import rule_for
    >>> rule_for(nn.Linear).name, rule_for(nn.LayerNorm) is None
    ('linear', True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Rule", "RuleFn", "register_rule", "rule_for"]

#: ``fn(module, inputs, out_grads, weights, params, budget) -> float64 Gram``; ``inputs[k]`` is the
#: module's input at call k, ``out_grads[k]`` the (T, *output.shape) task gradients of its output,
#: ``params`` the module's trainable parameters the losses reach (the rule writes their ``.grad``
#: weighted by ``weights``; ``weights=None``: the Gram only, nothing written).
RuleFn = Callable[
    [nn.Module, list[torch.Tensor], list[torch.Tensor], torch.Tensor, list[torch.Tensor], int],
    torch.Tensor,
]


@dataclass(frozen=True)
class Rule:
    """A named per-layer rule, plus a predicate saying whether it applies to a module instance."""

    name: str
    fn: RuleFn
    applies: Callable[[nn.Module], bool]


_RULES: dict[type[nn.Module], Rule] = {}


def register_rule(
    *types: type[nn.Module], name: str, applies: Callable[[nn.Module], bool] | None = None
) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` as the Gram rule for modules of exactly these types."""

    def deco(fn: RuleFn) -> RuleFn:
        for t in types:
            _RULES[t] = Rule(name, fn, applies or (lambda m: True))
        return fn

    return deco


def rule_for(module_type: type[nn.Module]) -> Rule | None:
    """The rule registered for this exact module type, or None."""
    _load()
    return _RULES.get(module_type)


def _load() -> None:
    from gradlens.engines.rules import conv, linear  # noqa: F401  (registration side effect)
