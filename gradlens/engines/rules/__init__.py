"""Per-layer Gram rules for the ``gramian`` engine, one small file per layer type.

A rule turns what the forward hook recorded for one module (its input at each call) and what the
batched backward produced (each task's gradient with respect to the module's output at each call)
into the module's ``T x T`` Gram matrix and the weighted gradients ``sum_t w_t g_t`` of its
parameters. A rule is a pure function: it returns both and writes nothing (the engine accumulates
``.grad``). Modules without a rule fall back to the exact generic path (per-task parameter
gradients from the batched backward).

Rules are matched by ``isinstance``: the rule registered for the nearest class in the module's
MRO serves it when (1) the module's class does not override that class's ``forward`` (the hook
records the input of ``forward``; a subclass that pads or transforms it first, like timm's
``Conv2dSame``, would be served wrongly) and (2) the rule's ``applies(module)`` accepts it.
Otherwise the module takes the generic path; :func:`decline_reason` says why.

Built in: ``nn.Linear`` (and subclasses such as ``NonDynamicallyQuantizableLinear``), Hugging
Face's ``Conv1D`` (transposed weight; registered when ``transformers`` is imported),
``nn.Conv1d/2d/3d``, ``nn.Embedding``, and the affine parameters of ``nn.LayerNorm``,
``nn.GroupNorm`` and ``nn.BatchNorm1d/2d/3d``. Opt-in: ``nn.MultiheadAttention``'s packed
in-projection in self-attention (:func:`gradlens.engines.rules.attention.enable`; exact, but
no faster on CPU than the generic path it replaces).

A rule whose layer's input and output are not the module's own (a projection applied inside the
module's forward) also gives a ``record(module, args, output)`` function: it returns, for one call,
the input, the :class:`~torch.autograd.graph.GradientEdge` whose gradient is the rule's output
gradient, that output's shape and dtype, or None to leave the call (and so the layer, that probe)
to the generic path. Without it the engine records ``args[0]`` and the module's output.

A custom rule, from one file (the Gram of a layer ``y = x * scale`` with a per-feature scale):

    >>> import torch
    >>> from torch import nn
    >>> from gradlens.engines.rules import register_rule, rule_for
    >>> class Scale(nn.Module):
    ...     def __init__(self, n):
    ...         super().__init__()
    ...         self.scale = nn.Parameter(torch.ones(n))
    ...     def forward(self, x):
    ...         return x * self.scale
    >>> @register_rule(Scale, name="scale")
    ... def scale_rule(module, inputs, out_grads, weights, budget):
    ...     # task t's gradient: sum over calls and rows of x * d_t
    ...     g = sum((d * x).reshape(d.shape[0], -1, x.shape[-1]).sum(1)
    ...             for x, d in zip(inputs, out_grads))
    ...     return (g @ g.T).double(), {"scale": weights @ g}
    >>> rule_for(Scale(3)).name, rule_for(nn.Linear(2, 2)).name, rule_for(nn.GRU(2, 2)) is None
    ('scale', 'linear', True)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import GradientEdge

__all__ = [
    "RecordFn",
    "Rule",
    "RuleFn",
    "decline_reason",
    "own_state_reason",
    "register_rule",
    "rule_for",
    "served_modules",
]

#: ``fn(module, inputs, out_grads, weights, budget) -> (Gram, {param name: weighted grad})``:
#: ``inputs[k]`` is the module's input at call k, ``out_grads[k]`` the (T, *output.shape) task
#: gradients of its output, ``weights`` the T weights of the weighted sum, ``budget`` the bytes
#: a block of per-task quantities may take. The Gram is float64 ``T x T``; the mapping gives, for
#: each of the module's own parameters (by attribute name) that requires grad, ``sum_t w_t g_t``.
#: ``weights=None`` asks for the Gram only (an empty mapping): a Gram weighting's step, whose
#: weights are known only once every Gram is (see :mod:`gradlens.weightings`).
RuleFn = Callable[
    [nn.Module, list[torch.Tensor], list[torch.Tensor], torch.Tensor | None, int],
    tuple[torch.Tensor, Mapping[str, torch.Tensor]],
]


#: ``record(module, args, output) -> (input, output edge, output shape, output dtype) | None``.
RecordFn = Callable[
    [nn.Module, tuple[object, ...], object],
    tuple[torch.Tensor, GradientEdge, torch.Size, torch.dtype] | None,
]


@dataclass(frozen=True)
class Rule:
    """A named per-layer rule, plus a predicate saying whether it applies to a module instance."""

    name: str
    fn: RuleFn
    applies: Callable[[nn.Module], bool]
    #: The class the rule was registered for (subclasses must keep its ``forward``).
    cls: type[nn.Module] = nn.Module
    #: What the forward hook records for one call (see the module doc); None: the module's
    #: first argument and its output.
    record: RecordFn | None = None


_RULES: dict[type[nn.Module], Rule] = {}


def _always(module: nn.Module) -> bool:
    return True


def register_rule(
    *types: type[nn.Module],
    name: str,
    applies: Callable[[nn.Module], bool] | None = None,
    record: RecordFn | None = None,
) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` as the Gram rule for modules of these types (and subclasses that keep
    their ``forward``), for the instances ``applies`` accepts (all by default); ``record``
    says what to record of a call when it is not the module's input and output (see above).

    A later registration for the same type replaces the earlier one.
    """

    def deco(fn: RuleFn) -> RuleFn:
        for t in types:
            _RULES[t] = Rule(name, fn, applies or _always, t, record)
        return fn

    return deco


def _nearest(module: nn.Module | type[nn.Module]) -> Rule | None:
    _load()
    cls = module if isinstance(module, type) else type(module)
    for klass in cls.__mro__:
        rule = _RULES.get(klass)
        if rule is not None:
            return rule
    return None


def own_state_reason(module: nn.Module) -> str | None:
    """Why what a rule reads of ``module`` is not its own forward on its own parameters (None
    when it is): a ``forward`` replaced on the instance (a monkeypatched adapter, an
    accelerate-style wrapper: the recorded input and output are the replacement's), or a
    ``weight``/``bias`` computed from other parameters (``torch.nn.utils.parametrize``, weight
    norm, pruning: the rule would compute the gradient of the computed tensor, not of the
    parameters it comes from). Checked where the rules are chosen and at every probe (cheap:
    dict lookups).

    >>> lin = nn.Linear(2, 2)
    >>> own_state_reason(lin) is None
    True
    >>> from torch.nn.utils import prune
    >>> _ = prune.l1_unstructured(lin, "weight", amount=0.5)
    >>> own_state_reason(lin)
    'its weight is computed from other parameters (a parametrization, weight norm or pruning)'
    """
    state = module.__dict__
    if "forward" in state:
        return "its forward is replaced on the instance"
    computed = [  # a plain tensor attribute that autograd reaches, or one a pre-hook sets
        t for name in ("weight", "bias") if isinstance(t := state.get(name), torch.Tensor)
    ]
    if "parametrizations" in module._modules or any(
        t.requires_grad or module._forward_pre_hooks for t in computed
    ):
        name = "weight" if "weight" not in module._parameters else "bias"
        return (
            f"its {name} is computed from other parameters (a parametrization, weight norm or "
            "pruning)"
        )
    return None


def decline_reason(module: nn.Module) -> str | None:
    """Why no rule serves ``module`` (None when one does).

    >>> decline_reason(nn.Linear(2, 2)) is None, decline_reason(nn.GRU(2, 2))
    (True, 'no rule registered for GRU or its base classes')
    """
    rule = _nearest(module)
    if rule is None:
        return f"no rule registered for {type(module).__name__} or its base classes"
    if type(module).forward is not rule.cls.forward:
        return (
            f"{type(module).__name__} overrides {rule.cls.__name__}.forward (the recorded input "
            f"may not be what the {rule.name!r} rule assumes)"
        )
    own = own_state_reason(module)
    if own is not None:
        return f"the {rule.name!r} rule declines this {type(module).__name__}: {own}"
    if not rule.applies(module):
        return f"the {rule.name!r} rule declines this {type(module).__name__} (its `applies`)"
    return None


def rule_for(module: nn.Module | type[nn.Module]) -> Rule | None:
    """The rule serving this module instance (or, given a class, registered for it), or None."""
    rule = _nearest(module)
    if rule is None or isinstance(module, type):
        return rule
    return rule if decline_reason(module) is None else None


def served_modules(
    root: nn.Module, shared_ids: set[int]
) -> list[tuple[nn.Module, list[torch.Tensor], Rule]]:
    """The modules under ``root`` a rule serves: each with its own parameters among
    ``shared_ids`` (frozen ones too: one unfrozen later is served from then on) and its rule; a
    module whose parameter another module also holds (tied weights) is left to the generic
    path.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh())
    >>> [(type(m).__name__, r.name) for m, _, r in served_modules(net, {id(net[0].weight)})]
    [('Linear', 'linear')]
    """
    owners: dict[int, int] = {}
    for mod in root.modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    out: list[tuple[nn.Module, list[torch.Tensor], Rule]] = []
    for mod in root.modules():
        own: list[torch.Tensor] = [p for p in mod.parameters(recurse=False) if id(p) in shared_ids]
        rule = rule_for(mod) if own else None
        if rule is not None and all(owners[id(p)] == 1 for p in own):
            out.append((mod, own, rule))
    return out


_loaded = False


def _load() -> None:
    global _loaded
    if not _loaded:
        from gradlens.engines.rules import (  # noqa: F401  (registration side effect)
            conv,
            embedding,
            linear,
            norm,
        )

        _loaded = True
    # Hugging Face's Conv1D, once transformers is imported (never imported from here)
    hf = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(hf, "Conv1D", None)
    if isinstance(conv1d, type) and conv1d not in _RULES:
        from gradlens.engines.rules.linear import conv1d_rule

        register_rule(conv1d, name="conv1d")(conv1d_rule)
