"""Run a rule's pure core function through ``torch.compile`` on CUDA, eagerly elsewhere.

A rule keeps its math in one side-effect-free function (tensors in, tensors out; it writes no
``.grad``). :func:`run` calls that same function compiled (one fused graph per layer call: batched
kernels, fewer launches) when its first tensor lives on a device in :data:`DEVICES` (CUDA), and
eagerly otherwise: the eager call is the exact fallback, not a second copy of the math.

Compiled callables are cached per ``(core, static flags, dtype)`` and compiled with
``dynamic=True``, so layers of different sizes share a graph instead of recompiling every step
(a Python loop in the core, such as the Linear rule's task chunks, still gives one graph per trip
count: a handful per run, as the task count is fixed).
Any exception raised while compiling or running the compiled callable switches the fused path off
for the rest of the process, with one :class:`~gradlens._errors.GradlensWarning` that says why, and
the call is redone eagerly (the core has no side effects, so redoing it is safe).

The fused path is opt-in: set the environment variable ``GRADLENS_FUSED=1``. Measured on an
H200 (``benchmarks/gpu_check.sh``, mlp-10m, batch 128, gramian as a ratio to a plain step), it
showed no consistent gain over the eager rule, whose products are already single cuBLAS calls:
fused 3.23x against eager 3.17x at T = 8 and 1.89x against 1.81x at T = 40 in one run, 2.31x
against 2.73x and 2.02x against 2.33x in another. A probed step there is bound by kernel
launches and Python work (profiled: 1.8 ms of kernels in a 17 ms step at T = 8), not by the
rule's arithmetic, and each new shape costs a compilation.

Example:
    >>> import torch
    >>> from gradlens.engines.rules import _fused
    >>> def core(a, n, *, double):
    ...     return a.sum() * n * (2 if double else 1)
    >>> float(_fused.run(core, torch.ones(3), 2, double=True))  # CPU tensors: eager
    12.0
    >>> _fused.enabled_for(torch.device("cpu")), sorted(_fused.DEVICES)  # and opt-in on CUDA
    (False, ['cuda'])
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch

from gradlens._errors import GradlensWarning

__all__ = ["DEVICES", "FusedState", "enabled_for", "run", "state"]

_R = TypeVar("_R")

#: Device types on which :func:`run` compiles the core (tests add ``"cpu"`` to force inductor).
DEVICES: frozenset[str] = frozenset({"cuda"})

_OFF_VALUES = {"0", "false", "off", "no"}
_RECOMPILE_LIMIT = 64


@dataclass
class FusedState:
    """Process-wide state of the fused path: calls that took it, and why it was switched off."""

    calls: int = 0
    disabled: str | None = None


state = FusedState()
_compiled: dict[tuple[Hashable, ...], Callable[..., Any]] = {}


def enabled_for(device: torch.device) -> bool:
    """Whether :func:`run` compiles for tensors on ``device`` (device type, env, earlier failure).

    >>> enabled_for(torch.device("cpu"))
    False
    """
    if state.disabled is not None or device.type not in DEVICES:
        return False
    return os.environ.get("GRADLENS_FUSED", "0").strip().lower() not in _OFF_VALUES


def run(core: Callable[..., _R], *args: Any, **static: Hashable) -> _R:
    """``core(*args, **static)``, compiled when the first tensor argument is on a fused device.

    Args:
        core: a pure function of tensors and ints (no side effects, no ``.grad`` writes).
        *args: its positional arguments; their sizes are dynamic in the compiled graph.
        **static: keyword flags baked into the compiled callable (part of its cache key).

    The compiled callable is cached per ``(core, static, dtype of the first tensor)``. Warnings
    raised by the compiler's internals while compiling or running it are not shown (they are
    about the compiler, e.g. deprecations inside ``torch._dynamo``, not about the user's run).

    >>> run(lambda x, *, k: x + k, torch.zeros(2), k=1).tolist()
    [1.0, 1.0]
    """
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None or not enabled_for(first.device):
        return core(*args, **static)
    key = (core, tuple(sorted(static.items())), first.dtype)
    try:
        with warnings.catch_warnings(), _recompile_room():
            warnings.simplefilter("ignore")
            fn = _compiled.get(key)
            if fn is None:
                fn = torch.compile(core, dynamic=True)
                _compiled[key] = fn
            # the compiled callable computes what ``core`` does: its result has core's type
            out = cast("_R", fn(*args, **static))
    except Exception as exc:  # any compiler/runtime failure: exact eager path from now on
        _disable(core, exc)
        return core(*args, **static)
    state.calls += 1
    return out


def _recompile_room() -> contextlib.AbstractContextManager[object]:
    """Room for this core's graphs while it runs (dynamo's default, 8 per function, is shared by
    every flag, dtype, task count and chunk count, and falls back to eager silently past it)."""
    import torch._dynamo.config as cfg

    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    room = cfg.patch(name, max(int(getattr(cfg, name)), _RECOMPILE_LIMIT))
    return cast("contextlib.AbstractContextManager[object]", room)


def _disable(core: Callable[..., Any], exc: Exception) -> None:
    name = getattr(core, "__qualname__", repr(core))
    lines = str(exc).strip().splitlines()
    reason = type(exc).__name__ + (f": {lines[0]}" if lines else "")
    state.disabled = reason
    _compiled.clear()
    warnings.warn(
        f"gradlens: the fused (torch.compile) path of the gramian engine's rules failed in "
        f"`{name}` ({reason}); it is switched off for this process and the exact eager path "
        f"runs instead. Unset GRADLENS_FUSED (or set it to 0) to skip the attempt.",
        GradlensWarning,
        stacklevel=3,
    )
