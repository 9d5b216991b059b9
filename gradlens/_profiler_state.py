"""What :meth:`gradlens.Profiler.state_dict` holds and how a saved one is loaded back (private).

A resumed run continues as the interrupted one when its profiler has the same step (the position
in the probe schedule), the same held weights of a Gram weighting (``every=k``: the weights of
the last probe, applied until the next) and, for ``engine="auto"``, the same decisions (each
graph shape served by the engine chosen before, so the numbers are bit-identical, not merely
equal to rounding). The state holds only tensors, dicts, lists, numbers and strings, so
``torch.load(..., weights_only=True)`` reads a saved one back.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from gradlens._errors import GradlensError, GradlensWarning
from gradlens.engines.auto import AutoEngine

if TYPE_CHECKING:
    from gradlens.profiler import Profiler

__all__ = ["FORMAT", "load_state", "log_auto", "save_state"]

#: Version of the state's layout (``state["format"]``).
FORMAT = 1

_KEYS = ("format", "step", "tasks", "engine", "auto", "held")


def save_state(prof: Profiler) -> dict[str, Any]:
    """The profiler's resumable state, copied (later probes do not change it)."""
    auto = prof._engine if isinstance(prof._engine, AutoEngine) else None
    held = prof._held
    return {
        "format": FORMAT,
        "step": prof.step,
        "tasks": list(prof.tasks),
        "engine": prof.engine,
        "auto": None if auto is None else auto.state_dict(),
        "held": None
        if held is None
        else {
            "total": held[0].detach().clone(),
            "layers": {n: w.detach().clone() for n, w in held[1].items()},
        },
    }


def load_state(prof: Profiler, state: object, stacklevel: int = 3) -> None:
    """Restore :func:`save_state`'s ``state`` into ``prof``; every check runs before anything
    changes (a refused state leaves the profiler as it was)."""
    if prof._closed:
        raise GradlensError("`load_state_dict` was called on a closed Profiler; create a new one.")
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        found = type(state).__name__
        if isinstance(state, Mapping):
            found = f"format {state.get('format')!r}"
        raise GradlensError(
            f"`state` should be a Profiler.state_dict() (format {FORMAT}); found {found}."
        )
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise GradlensError(f"`state` is missing {missing}; a Profiler.state_dict() has {_KEYS}.")
    if list(state["tasks"]) != list(prof.tasks):
        raise GradlensError(
            f"`state` was saved for tasks {list(state['tasks'])}; this profiler has "
            f"{list(prof.tasks)}."
        )
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise GradlensError(f"`state['step']` should be an integer >= 0; found {step!r}.")
    held = _parse_held(state["held"], len(prof.tasks))
    auto = prof._engine if isinstance(prof._engine, AutoEngine) else None
    if auto is not None and state["auto"] is not None:
        auto.load_state_dict(state["auto"])  # checks first, changes nothing when it raises
    elif auto is not None:
        by = "an older gradlens" if state["engine"] is None else f"engine={state['engine']!r}"
        warnings.warn(
            f"The state loaded at step {step} holds no decisions of the `auto` engine (saved "
            f"by {by}): auto times its candidates again and may serve the probes with another "
            "exact engine than the saved run, so the Grams can differ from an uninterrupted "
            "run's at float rounding. Name the engine (Profiler(engine=...), "
            "TrainConfig.engine) for bit-identical numbers.",
            GradlensWarning,
            stacklevel=stacklevel,
        )
        auto.decisions = {}
    rewind = getattr(prof.store, "rewind", None)
    if callable(rewind):  # a run store reopened to append: cut back to the checkpoint's step
        rewind(step)
    prof._held = held
    prof.step = step  # (the engine's recording follows the schedule at this step)
    if auto is not None:
        # the run's meta["auto"] then lists the loaded decisions, as the saved run's did
        prof._auto_logged = set()
        log_auto(prof, always=True)


def log_auto(prof: Profiler, always: bool = False) -> None:
    """Write ``auto``'s decisions, as they are made, into the run store's meta (``meta["auto"]``;
    not to dashboards, some of which refuse a parameter that changes); ``always``: even when no
    decision is new (a state just loaded)."""
    auto = prof._engine
    if not isinstance(auto, AutoEngine) or prof.store is None:
        return
    done = {k for k, d in auto.decisions.items() if d.winner is not None}
    if done <= prof._auto_logged and not always:
        return
    prof._auto_logged |= done
    update = getattr(prof.store, "update_meta", None)
    if callable(update):
        update(auto=auto.summary())


def _parse_held(held: object, n_tasks: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """The held weights of a state (None when none were held), as the profiler keeps them."""
    if held is None:
        return None
    ok = (
        isinstance(held, Mapping)
        and isinstance(held.get("total"), torch.Tensor)
        and isinstance(held.get("layers"), Mapping)
        and all(isinstance(w, torch.Tensor) for w in held["layers"].values())
    )
    if not ok:
        raise GradlensError(
            "`state['held']` should be None or {'total': tensor, 'layers': {layer: tensor}}; "
            f"found {type(held).__name__}."
        )
    assert isinstance(held, Mapping)  # (for the type checker: ok says so)
    total = held["total"]
    shapes = {tuple(total.shape), *(tuple(w.shape) for w in held["layers"].values())}
    if shapes != {(n_tasks,)}:
        raise GradlensError(
            f"`state['held']` should hold weights of shape ({n_tasks},) (one per task); found "
            f"shapes {sorted(shapes)}."
        )
    layers = {str(n): w.detach().clone() for n, w in held["layers"].items()}
    return total.detach().clone(), layers
