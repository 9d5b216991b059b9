"""The shared parameters of a profiler, grouped by layer, following the module given as
``shared`` (its current parameters, each one's ``requires_grad``) from one probe to the next."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from gradlens._errors import GradlensError, GradlensWarning
from gradlens._types import RENAMED_TOTAL, TOTAL_LAYER

__all__ = ["ROOT_LAYER", "SharedParams", "callable_module", "resolve_shared"]

#: Layer name of parameters owned directly by the root module given as ``shared``.
ROOT_LAYER = "(root)"


@dataclass
class SharedParams:
    """The shared parameters, grouped by layer (the module that owns each one).

    Every parameter is kept, frozen ones too: ``named``, ``params`` and ``layers`` follow
    ``requires_grad`` at the time they are read, so a parameter frozen when the profiler was
    created and unfrozen later joins the Grams from the next probe on (and leaves them when
    frozen again). Given a module, the set also follows the module's current parameters
    (:meth:`follow`, :meth:`sync`): one replaced after the profiler was created
    (``load_state_dict(..., assign=True)``, ``layer.weight = nn.Parameter(...)``) is measured,
    not the stale one.
    """

    all_named: list[tuple[str, torch.Tensor]]
    module: nn.Module | None
    layer_of: dict[int, str]
    all_layers: list[str]
    #: What :meth:`follow` saw at the last probe (unreached trainable shared parameters, reached
    #: leaves outside the set, by id); None before the first.
    _seen: tuple[frozenset[int], frozenset[int]] | None = field(default=None, repr=False)
    _ids: frozenset[int] = field(default=frozenset(), repr=False)
    _warned_kept: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self._ids = frozenset(id(p) for _, p in self.all_named)

    @property
    def named(self) -> list[tuple[str, torch.Tensor]]:
        """The ``(name, parameter)`` pairs that require grad now."""
        return [(n, p) for n, p in self.all_named if p.requires_grad]

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters that require grad now."""
        return [p for _, p in self.all_named if p.requires_grad]

    @property
    def ids(self) -> frozenset[int]:
        """The ids of every shared parameter, frozen or not (kept with the set)."""
        return self._ids

    @property
    def all_params(self) -> list[torch.Tensor]:
        """Every shared parameter, frozen or not."""
        return [p for _, p in self.all_named]

    @property
    def layers(self) -> list[str]:
        """Layers owning at least one parameter that requires grad now, in parameter order."""
        live = {self.layer_of[id(p)] for _, p in self.all_named if p.requires_grad}
        return [layer for layer in self.all_layers if layer in live]

    def follow(self, leaves: Mapping[int, torch.Tensor]) -> bool:
        """Follow the module's current parameters, given the leaves a probe's losses reach (by
        id); True when the set changed (it is then updated in place).

        The module is walked (:meth:`sync`) only when something cheap says a parameter may
        have been replaced since the last probe: the trainable shared parameters the losses do
        not reach, or the reached leaves outside the set, differ from the last probe's (a
        replaced parameter is no longer reached; its replacement is a new leaf outside the set).
        Given parameters rather than a module, a replacement cannot be followed: a trainable
        shared parameter that is not reached while a new leaf of its shape is warns once, naming
        it (see :meth:`check_kept`: routing that skips a parameter looks the same).

        >>> lin = nn.Linear(2, 2)
        >>> shared = resolve_shared(lin)
        >>> lin.weight = nn.Parameter(lin.weight.detach().clone())  # replaced
        >>> shared.follow({id(lin.weight): lin.weight, id(lin.bias): lin.bias})
        True
        >>> shared.params[0] is lin.weight
        True
        """
        seen = self._fingerprint(leaves)
        if seen == self._seen:
            return False
        if self.module is None:
            self.check_kept(leaves, seen)
            self._seen = seen
            return False
        changed = self.sync()
        self._seen = self._fingerprint(leaves) if changed else seen
        return changed

    def sync(self) -> bool:
        """Re-read the module's parameters (one walk of the module); True when they changed
        (this object is then updated in place). Nothing to do for given parameters."""
        if self.module is None:
            return False
        named = list(self.module.named_parameters())
        if len(named) == len(self.all_named) and all(
            p is q and n == m for (n, p), (m, q) in zip(named, self.all_named)
        ):
            return False
        fresh = _grouped(named, self.module)
        self.all_named, self.layer_of, self.all_layers = (
            fresh.all_named,
            fresh.layer_of,
            fresh.all_layers,
        )
        self._ids = fresh._ids
        self._seen = None
        return True

    def check_kept(
        self, leaves: Mapping[int, torch.Tensor], seen: tuple[frozenset[int], frozenset[int]]
    ) -> None:
        """Warn once when a given (not module-owned) trainable shared parameter looks replaced: not
        reached, while a parameter outside the set with its shape, dtype and device is newly
        reached (not at the last probe), and it was reached at the last probe (at the first,
        only when no shared parameter is reached: a shared parameter that no loss uses next to a
        head of its shape is no error)."""
        unreached, rest = seen
        if not unreached:
            return
        if self._seen is None:
            if any(p.requires_grad and id(p) not in unreached for _, p in self.all_named):
                return
            before: frozenset[int] = frozenset()
        else:
            unreached = unreached - self._seen[0]
            before = self._seen[1]
        new = [leaves[i] for i in rest - before if isinstance(leaves[i], nn.Parameter)]
        for n, p in self.all_named:
            if id(p) in unreached and any(
                q.shape == p.shape and q.dtype == p.dtype and q.device == p.device for q in new
            ):
                if self._warned_kept:
                    return
                self._warned_kept = True
                warnings.warn(
                    f"`shared` was given as parameters, which a Profiler keeps as given; found "
                    f"shared parameter {n!r} (shape {tuple(p.shape)}) not reached by the losses "
                    "while a parameter of its shape outside `shared` newly is. If it was replaced "
                    "after the Profiler was created (`load_state_dict(..., assign=True)`, "
                    "`module.weight = nn.Parameter(...)`), its Gram is measured on the old one "
                    "(zero, listed in Snapshot.unreached): create a new Profiler after replacing "
                    "parameters, or pass the module as `shared` (its current parameters are "
                    "followed). Routing (mixture of experts, layer drop) that skips it this step "
                    "is measured right as it is. Warned once.",
                    GradlensWarning,
                    stacklevel=6,
                )
                return

    def _fingerprint(
        self, leaves: Mapping[int, torch.Tensor]
    ) -> tuple[frozenset[int], frozenset[int]]:
        unreached = frozenset(
            [id(p) for _, p in self.all_named if p.requires_grad and id(p) not in leaves]
        )
        return unreached, frozenset(leaves.keys() - self._ids)


def resolve_shared(shared: nn.Module | Iterable[object]) -> SharedParams:
    """Resolve ``Profiler(shared=...)``: a module, or an iterable of (name, parameter) pairs.

    Frozen parameters are kept (see :class:`SharedParams`); at least one must require grad.
    """
    if isinstance(shared, nn.Module):
        named: list[tuple[str, torch.Tensor]] = list(shared.named_parameters())
        module: nn.Module | None = shared
    else:
        try:
            # a single parameter is one (iterating it would give its rows: computed tensors)
            items = [shared] if isinstance(shared, torch.Tensor) else list(shared)
        except TypeError:
            raise GradlensError(
                "`shared` should be an nn.Module or an iterable of (name, parameter) pairs; "
                f"found {type(shared).__name__}."
            ) from None
        named = []
        for i, item in enumerate(items):
            if (
                isinstance(item, tuple)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)
            ):
                named.append(item)
            elif isinstance(item, torch.Tensor):
                named.append((f"param{i}", item))
            else:
                raise GradlensError(
                    "`shared` should be an nn.Module or an iterable of (name, parameter) pairs; "
                    f"found an item of type {type(item).__name__} at position {i}."
                )
        module = None
        for i, (n, p) in enumerate(named):
            if not p.is_leaf:
                raise GradlensError(
                    f"`shared` should hold parameters (leaf tensors); found {n!r} at position {i}, "
                    "a tensor computed from others (e.g. a row or a view of a parameter)."
                )
    lazy = [n for n, p in named if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise GradlensError(
            f"`shared` should hold initialized parameters; found lazy ones not initialized yet "
            f"{lazy[:5]} (nn.LazyLinear, ...). Run one forward with a batch before creating the "
            "Profiler, as torch asks before anything else uses them."
        )
    if not any(p.requires_grad for _, p in named):
        raise GradlensError(
            "`shared` should hold at least one parameter with requires_grad=True; found none."
        )
    return _grouped(named, module)


def _grouped(named: Sequence[tuple[str, torch.Tensor]], module: nn.Module | None) -> SharedParams:
    """The parameters (each once, the first name kept) grouped by the layer owning them."""
    seen: set[int] = set()
    unique = []
    for n, p in named:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append((n, p))
    layer_of: dict[int, str] = {}
    layers: list[str] = []
    for n, p in unique:
        layer = n.rpartition(".")[0] if module is not None else (n.rpartition(".")[0] or n)
        layer = layer or ROOT_LAYER
        if layer == TOTAL_LAYER:  # a module called like the total is never merged with it
            layer = RENAMED_TOTAL
        layer_of[id(p)] = layer
        if layer not in layers:
            layers.append(layer)
    return SharedParams(unique, module, layer_of, layers)


def callable_module(module: nn.Module) -> bool:
    """Whether the module has a ``forward`` (``nn.ModuleList``, ``nn.ModuleDict`` have none).

    >>> callable_module(nn.Linear(1, 1)), callable_module(nn.ModuleList([nn.Linear(1, 1)]))
    (True, False)
    """
    return type(module).forward is not nn.Module.forward
