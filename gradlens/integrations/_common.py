"""What the framework callbacks (Lightning, Hugging Face Trainer) check and look up alike.

Example:
    >>> import torch
    >>> model = torch.nn.Module()
    >>> model.trunk = torch.nn.Linear(2, 2)
    >>> check_callback_args(["a", "b"], "trunk", 10, example="trunk")
    (('a', 'b'), 10)
    >>> shared_module(model, "trunk") is model.trunk
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Any

from gradlens._errors import GradlensError
from gradlens._validate import check_int, check_tasks, fail

__all__ = ["check_callback_args", "shared_module"]


def check_callback_args(
    tasks: Sequence[str], shared_attr: object, keep: object, *, example: str
) -> tuple[tuple[str, ...], int]:
    """The callback's tasks and ``keep`` checked, and ``shared_attr`` an attribute path."""
    checked = check_tasks(tasks)
    if not isinstance(shared_attr, str) or not shared_attr:
        fail("shared_attr", f"an attribute path such as {example!r}", repr(shared_attr))
    return checked, check_int("keep", keep, minimum=0)


def shared_module(model: Any, shared_attr: str) -> Any:
    """``model.<shared_attr>`` (a dotted path), or a GradlensError naming the model's class."""
    try:
        return attrgetter(shared_attr)(model)
    except AttributeError:
        raise GradlensError(
            f"`shared_attr` should name the shared module of {type(model).__name__}; found no "
            f"attribute {shared_attr!r}."
        ) from None
