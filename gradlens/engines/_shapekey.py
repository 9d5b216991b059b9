"""The call shapes that key ``auto``'s decisions (see :meth:`gradlens.engines.auto.AutoEngine.key`):
forward hooks on the shared root, and, where the root is never called itself (an
``nn.ModuleList`` of the trunk's pieces, a model whose parts are called one by one), on the
modules called below it."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradlens.engines._shared import callable_module

__all__ = ["KEY_MODULES", "ShapeKey", "frontier"]

#: Where the shared root is never called itself, the decisions are keyed by the call shapes of
#: at most this many of the modules called below it (a hook each, at every forward).
KEY_MODULES = 2

Shapes = tuple[tuple[int, ...], ...]


class ShapeKey:
    """The shapes of the last calls of the hooked modules since :meth:`reset`.

    >>> net = nn.Sequential(nn.Linear(2, 3))
    >>> key = ShapeKey()
    >>> key.hook(net)
    >>> _ = net(torch.zeros(4, 2))
    >>> key.shapes()  # the root's call: its input and output
    ((4, 2), (4, 3))
    >>> key.unhook()
    """

    def __init__(self) -> None:
        #: whether the hooks note the shapes (``auto``: a probed forward may come)
        self.recording = True
        self._seen: dict[int, Shapes] = {}
        #: the hooks: the root's first (when it has a forward), then the modules called below
        #: it (see :func:`frontier`) until a probe finds the root called
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._keyed: dict[int, nn.Module] = {}
        self._root_hooked = False

    @property
    def hooked(self) -> bool:
        return bool(self._handles)

    def hook(self, root: nn.Module | None) -> None:
        """Hook ``root`` and the modules called below it (anew: old hooks are removed)."""
        self.unhook()
        if root is None:
            return
        mods = frontier(root)
        self._root_hooked = bool(mods) and mods[0] is root
        self._keyed = dict(enumerate(mods))  # (a hook checks its module: a deep copy carries it)
        self._handles = {i: m.register_forward_hook(self._hook(i)) for i, m in enumerate(mods)}

    def unhook(self) -> None:
        for h in self._handles.values():
            h.remove()
        self._handles = {}

    def reset(self) -> None:
        self._seen = {}

    def shapes(self) -> tuple[object, ...]:
        """The root's last call shapes; where it was not called, those of the first
        :data:`KEY_MODULES` modules called below it, in module order. Once a probe has seen the
        root called, only its hook stays; else the hooks of the modules the key takes."""
        seen = self._seen
        keep = [0] if self._root_hooked and 0 in seen else sorted(seen)[:KEY_MODULES]
        if keep and len(self._handles) > len(keep):  # each hook costs every forward
            for i in set(self._handles) - set(keep):
                self._handles.pop(i).remove()
        return tuple(s for i in keep for s in seen[i])

    def _hook(self, index: int) -> Callable[..., None]:
        ref = weakref.ref(self)

        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            key = ref()
            # (module: a deep copy of the model, an EMA teacher, carries the hook along)
            if key is None or not key.recording or module is not key._keyed.get(index):
                return
            if isinstance(output, torch.Tensor) and all(isinstance(a, torch.Tensor) for a in args):
                leaves: list[Any] = [*args, output]  # the common case, without a pytree walk
            else:
                leaves, _ = torch.utils._pytree.tree_flatten((args, output))
            key._seen[index] = tuple(tuple(x.shape) for x in leaves if isinstance(x, torch.Tensor))

        return hook


def frontier(root: nn.Module) -> list[nn.Module]:
    """The modules whose calls key ``auto``'s decisions: the root (when it has a ``forward``:
    ``nn.ModuleList`` and ``nn.ModuleDict`` have none), then its children, each replaced by its
    own children while it has no ``forward``.

    >>> body = nn.Sequential(nn.Linear(2, 2))
    >>> [type(m).__name__ for m in frontier(nn.ModuleList([body, nn.ModuleDict({"a": body})]))]
    ['Sequential']
    >>> [type(m).__name__ for m in frontier(body)]
    ['Sequential', 'Linear']
    """
    out: list[nn.Module] = [root] if callable_module(root) else []
    todo = list(root.children())
    while todo:
        m = todo.pop(0)
        if callable_module(m):
            if all(m is not o for o in out):
                out.append(m)
        else:
            todo[:0] = list(m.children())
    return out
