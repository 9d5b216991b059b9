"""Graphs that a batched (vmap) backward cannot run, though a backward per task can.

The ``batched`` and ``gramian`` engines push the T tasks' cotangents through the backward at once
under vmap (``autograd.grad(..., is_grads_batched=True)`` or ``torch.func.vmap``). Some backwards
cannot run under vmap and raise torch's own ``RuntimeError``:

- a random operation: dropout inside a non-reentrant activation checkpoint
  (``checkpoint(..., use_reentrant=False)``, Hugging Face ``gradient_checkpointing``) runs again
  when the backward recomputes the checkpointed segment, under vmap there;
- ``.item()`` in a backward (a custom ``autograd.Function``'s), or anomaly mode
  (``torch.autograd.set_detect_anomaly(True)``), whose NaN check calls it under torch's legacy
  vmap;
- a backward that branches on a tensor's value, reads a gradient's data on the host
  (``.numpy()``, ``.tolist()``), or writes a batched gradient in place into an unbatched tensor;
- an operation with no batching rule and no fallback.

:func:`unbatchable` turns exactly those errors, recognised by a named list of torch's messages
(:data:`CAUSES`), into an :class:`UnbatchableGraphError` naming the engine, the cause and the fix;
anything else (a user's own error raised in a backward, an out-of-memory error) propagates as
raised. The ``auto`` engine catches :class:`UnbatchableGraphError` from a candidate and serves the
probe with the next one (``loop`` last), see :mod:`gradlens.engines.auto`.

Example:
    >>> import torch
    >>> try:
    ...     with unbatchable("batched"):
    ...         raise RuntimeError("Batching rule not implemented for aten::item. We could not "
    ...                            "generate a fallback.")
    ... except UnbatchableGraphError as err:
    ...     print(err.reason, "engine='loop'" in str(err))
    item True
    >>> with unbatchable("batched"):  # a user's error: as raised
    ...     raise RuntimeError("my own error")
    Traceback (most recent call last):
    ...
    RuntimeError: my own error
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from gradlens._errors import GradlensError

__all__ = ["CAUSES", "UnbatchableGraphError", "cause_of", "unbatchable"]

_VMAP = "the batched (vmap) backward cannot batch it"

#: ``(fragment of torch's message, short reason, cause in words)``, the first match wins.
CAUSES: tuple[tuple[str, str, str], ...] = (
    (
        # torch's legacy vmap (autograd.grad(is_grads_batched=True)) and torch.func.vmap
        "vmap: We do not yet support calling random operations inside of vmap",
        "random-op",
        "a random operation runs in the backward, under vmap there: dropout inside a "
        "non-reentrant activation checkpoint (checkpoint(..., use_reentrant=False), Hugging "
        "Face gradient_checkpointing) runs again when the backward recomputes the segment",
    ),
    (
        "vmap: called random operation while in randomness error mode",
        "random-op",
        "a random operation runs in the backward, under vmap there: dropout inside a "
        "non-reentrant activation checkpoint (checkpoint(..., use_reentrant=False), Hugging "
        "Face gradient_checkpointing) runs again when the backward recomputes the segment",
    ),
    (
        "Batching rule not implemented for aten::item.",
        "item",
        f"a backward calls .item() (e.g. a custom autograd.Function's), and {_VMAP}",
    ),
    (
        "vmap: It looks like you're calling .item() on a Tensor",
        "item",
        f"a backward calls .item() (e.g. a custom autograd.Function's), and {_VMAP}",
    ),
    (
        "Batching rule not implemented for aten::is_nonzero.",
        "data-dependent",
        "a backward branches on a tensor's value (e.g. `if g.norm() > 1` in a custom "
        f"autograd.Function), and {_VMAP}",
    ),
    (
        "Batching rule not implemented for aten::_local_scalar_dense.",
        "data-dependent",
        "a backward reads a tensor's value as a number (e.g. `float(g.norm())` in a custom "
        f"autograd.Function), and {_VMAP}",
    ),
    (
        "vmap: It looks like you're attempting to use a Tensor in some data-dependent control",
        "data-dependent",
        "a backward branches on a tensor's value (e.g. `if g.norm() > 1` in a custom "
        f"autograd.Function), and {_VMAP}",
    ),
    (
        "in extra_args that has more elements than `self`",
        "in-place",
        "a backward writes a gradient in place into a tensor of one task (e.g. "
        "`y.mul_(grad)` in a custom autograd.Function), which the batched (vmap) backward "
        "cannot do",
    ),
    (
        "Cannot access data pointer of Tensor that doesn't have storage",
        "data-access",
        "a backward reads a gradient's data on the host (.numpy(), .tolist()), which the "
        "batched (vmap) backward cannot do",
    ),
    (
        "Batching rule not implemented for aten::",
        "no-batching-rule",
        "an operation in the backward has no vmap batching rule and no fallback",
    ),
)

#: The cause of an ``item`` failure under anomaly mode with its NaN check on.
ANOMALY = (
    "anomaly-mode",
    "anomaly mode (torch.autograd.set_detect_anomaly(True)) checks each gradient for NaN with "
    f".item(), and {_VMAP}",
)


class UnbatchableGraphError(GradlensError):
    """An engine's batched (vmap) backward cannot run this graph; a backward per task can.

    ``engine``: the engine; ``reason``: a short tag of the cause (``random-op``, ``item``,
    ``anomaly-mode``, ... see :data:`CAUSES`); ``cause``: the cause in words.
    """

    def __init__(self, engine: str, reason: str, cause: str, torch_message: str) -> None:
        super().__init__(
            f"engine={engine!r} cannot measure this graph: {cause} (torch: "
            f"{torch_message.splitlines()[0] if torch_message else ''}). Use engine='loop' "
            "(exact, one backward per task) or engine='auto' (the default, which serves such "
            "a graph with loop). Nothing was written: .grad and the profiler's step are "
            "unchanged."
        )
        self.engine = engine
        self.reason = reason
        self.cause = cause


def cause_of(exc: BaseException) -> tuple[str, str] | None:
    """``(reason, cause)`` of an error that says the batched backward cannot run the graph
    (:data:`CAUSES`); None for any other error (an out-of-memory error among them).

    >>> cause_of(RuntimeError("vmap: called random operation while in randomness error mode."))[0]
    'random-op'
    >>> cause_of(RuntimeError("CUDA out of memory")) is None
    True
    """
    if not isinstance(exc, RuntimeError) or isinstance(exc, torch.OutOfMemoryError):
        return None
    message = str(exc)
    for fragment, reason, cause in CAUSES:
        if fragment in message:
            if reason == "item" and _anomaly_checks_nan():
                return ANOMALY
            return reason, cause
    return None


@contextmanager
def unbatchable(engine: str) -> Iterator[None]:
    """Raise an error of the block that :func:`cause_of` recognises as an
    :class:`UnbatchableGraphError` of ``engine`` (torch's error chained); any other as raised."""
    try:
        yield
    except RuntimeError as exc:
        found = cause_of(exc)
        if found is None:
            raise
        raise UnbatchableGraphError(engine, found[0], found[1], str(exc)) from exc


def _anomaly_checks_nan() -> bool:
    """Whether anomaly mode is on with its NaN check (which calls ``.item()``)."""
    return torch.is_anomaly_enabled() and torch.is_anomaly_check_nan_enabled()
