"""The profiler's argument checks and the small steps around a probe (private).

Each check raises a :class:`~gradlens.GradlensError` naming the argument, what it should be and
what was found; the general ones come from :mod:`gradlens._validate`.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from gradlens._errors import GradlensError, GradlensWarning
from gradlens.engines._base import Engine, SharedParams, grads_atomic
from gradlens.engines._graph import GraphIndex
from gradlens.engines.gramian import UNRECORDED

if TYPE_CHECKING:
    from gradlens.profiler import Sink
    from gradlens.snapshot import Snapshot

__all__ = [
    "UNSCHEDULED",
    "VMAP_ENGINES",
    "ProbeWarnings",
    "check_device",
    "check_features",
    "check_finite",
    "check_scale",
    "check_sparse",
    "grads_atomic",
    "grads_kept",
    "no_autocast",
    "open_store",
    "probe_notes",
    "record",
    "stack_grams",
    "stack_losses",
    "uncompiled",
    "weight_values",
]

#: Engines that backpropagate T cotangents at once with vmap (unsupported by torch.compile).
VMAP_ENGINES = ("gramian", "batched")


@contextmanager
def grads_kept(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Let an engine write ``.grad`` of ``params`` into fresh tensors, then put the old back."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def graph_index(
    L: torch.Tensor,
    once: bool,
    engine: str = "",
    shared: SharedParams | None = None,
    who: str | None = None,
) -> GraphIndex:
    """The graph index of ``L``'s graph; raises before any side effect where the probe cannot
    run on it: a reentrant checkpoint (:meth:`GraphIndex.build`), a torch.compile'd graph whose
    backward donates its saved buffers (:meth:`GraphIndex.donating`) unless the probe runs that
    backward ``once`` (``who`` runs it more: ``engine`` by default), a vmap ``engine`` on a
    compiled graph that reads ``shared``'s parameters (a compiled model around the shared
    module: :func:`uncompiled` sees only the module).

    >>> graph_index(torch.ones(2, requires_grad=True).sum(), False, "loop").leaves != {}
    True
    """
    graph = GraphIndex.build(L)
    if (
        engine in VMAP_ENGINES
        and shared is not None
        and graph.compiled_reads(shared.ids)
    ):
        raise GradlensError(
            f"`engine={engine!r}` cannot profile `shared` here: the losses come from a "
            "torch.compile'd model whose compiled graph takes the shared parameters, and the "
            "engine needs a batched (vmap) backward through it, which torch.compile does not "
            "support. Use engine='loop' (exact, one backward per task) or 'auto', or compile "
            "only the shared module (engine='features') or the task heads. Nothing was "
            "written: .grad and the profiler's step are unchanged."
        )
    donating = graph.donating()
    if donating and not once:
        passes = who or f"engine={engine!r}"
        raise GradlensError(
            "`losses` run through a torch.compile'd graph whose compiled backward donates its "
            f"saved buffers ({', '.join(donating)}; torch._functorch.config.donated_buffer is "
            "on, the default, and this compilation found buffers to donate, as a recompilation "
            "for new shapes does): autograd can run that backward once per forward, and "
            f"{passes} runs it more than once. Set `torch._functorch.config.donated_buffer = "
            "False` before the compiled module's first forward (then `torch._dynamo.reset()` "
            "to recompile what was compiled with it), or use engine='features' without "
            "retain_graph, a Gram weighting or observe(). Nothing was written: .grad and the "
            "profiler's step are unchanged."
        )
    return graph


def check_device(L: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.device:
    """``L``'s device, checked to be one of the shared parameters'."""
    devices = {p.device for p in params}
    if devices and L.device not in devices:
        raise GradlensError(
            f"`losses` should be on the device of the shared parameters "
            f"({', '.join(sorted(map(str, devices)))}); found {L.device}. Compute the "
            "losses where the model is (move the targets, not the outputs)."
        )
    return L.device


def no_autocast(device_type: str) -> AbstractContextManager[Any]:
    """A block where autocast is off for ``device_type``: ``torch.autocast(enabled=False)``
    when it is on, else nothing (entering and leaving an autocast region costs tens of
    microseconds, a noticeable part of a small model's probe).

    >>> with torch.autocast("cpu"), no_autocast("cpu"):
    ...     torch.is_autocast_enabled("cpu")
    False
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def check_scale(grad_scale: float | torch.Tensor | Any, L: torch.Tensor) -> torch.Tensor | None:
    if grad_scale is None:
        return None
    if isinstance(grad_scale, torch.amp.GradScaler):
        if not grad_scale.is_enabled():
            return None
        # scale() initialises the scaler's state (scaler.step needs it) and reads the scale
        # without a host sync
        one = torch.ones((), dtype=torch.float32, device=L.device)
        return grad_scale.scale(one).reshape(()).to(L.dtype)
    if isinstance(grad_scale, torch.Tensor):
        if grad_scale.numel() != 1:
            raise GradlensError(
                "`grad_scale` should be a torch.amp.GradScaler, a positive finite number or a "
                f"one-element tensor; found a tensor of shape {tuple(grad_scale.shape)}."
            )
        f = float(grad_scale.detach().reshape(()))
    elif isinstance(grad_scale, (int, float)) and not isinstance(grad_scale, bool):
        f = float(grad_scale)
    else:
        raise GradlensError(
            "`grad_scale` should be a torch.amp.GradScaler, a positive finite number or a "
            f"one-element tensor; found {type(grad_scale).__name__}."
        )
    # the Grams are divided by its square: the square and its inverse must be normal numbers
    if not (math.isfinite(f) and f > 0 and sys.float_info.min <= f * f <= sys.float_info.max):
        raise GradlensError(
            "`grad_scale` should be positive and finite, its square a normal float too (the "
            f"Grams are divided by it: about 1.5e-154 to 1.3e154); found {f}."
        )
    s = torch.tensor(f, dtype=L.dtype, device=L.device)
    if not (math.isfinite(float(s)) and float(s) > 0):
        raise GradlensError(
            f"`grad_scale` should be representable in the losses' dtype {L.dtype}; found {f}, "
            f"which is {float(s)} there."
        )
    return s


def uncompiled(
    shared: nn.Module | Iterable[Any], engine: str
) -> tuple[nn.Module | Iterable[Any], bool]:
    """Unwrap a ``torch.compile``'d module; refuse engines that vmap through compiled graphs.

    Returns the module and whether any part of it is compiled.
    """
    dynamo = sys.modules.get("torch._dynamo")  # nothing is compiled before dynamo is imported
    if not isinstance(shared, nn.Module) or dynamo is None:
        return shared, False
    optimized = dynamo.eval_frame.OptimizedModule
    compiled = [
        name or "(root)"
        for name, m in shared.named_modules()
        if isinstance(m, optimized) or getattr(m, "_compiled_call_impl", None) is not None
    ]
    if compiled and engine in VMAP_ENGINES:
        raise GradlensError(
            f"`engine={engine!r}` cannot profile a torch.compile'd `shared` module (compiled: "
            f"{compiled}): it needs a batched (vmap) backward through the compiled graph, which "
            "torch.compile does not support. Use engine='loop' (exact, one backward per task), "
            "or engine='features' with only the trunk compiled, or compile only the task heads."
        )
    while isinstance(shared, optimized):
        shared = shared._orig_mod  # parameter and layer names without the `_orig_mod.` prefix
    return shared, bool(compiled)


def stack_losses(
    losses: Mapping[str, torch.Tensor], tasks: tuple[str, ...]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Validate the losses; return them stacked (T,) and as the per-task scalars stacked.

    The scalars are kept because a backward from ``L[t]`` would run through every task's graph
    (through the stack), where one from the scalar runs through task t's graph only.
    """
    if not isinstance(losses, Mapping):
        raise GradlensError(
            f"`losses` should be a mapping task -> scalar loss; found {type(losses).__name__}."
        )
    unknown = [k for k in losses if k not in tasks]
    if unknown:
        raise GradlensError(
            f"`losses` has undeclared tasks {unknown}; the profiler's tasks are {list(tasks)}."
        )
    missing = [t for t in tasks if t not in losses]
    if missing:
        raise GradlensError(f"`losses` is missing tasks {missing}; expected all of {list(tasks)}.")
    vals = []
    for t in tasks:
        v = losses[t]
        if not isinstance(v, torch.Tensor):
            raise GradlensError(
                f"`losses[{t!r}]` should be a scalar tensor; found {type(v).__name__}."
            )
        if v.numel() != 1:
            raise GradlensError(
                f"`losses[{t!r}]` should be a scalar (one element); found shape "
                f"{tuple(v.shape)}. Reduce it (e.g. .mean()) first."
            )
        if not v.dtype.is_floating_point:
            raise GradlensError(
                f"`losses[{t!r}]` should be a real floating-point scalar; found dtype {v.dtype}."
                + (" Take .abs() or .real of a complex loss first." if v.is_complex() else "")
            )
        if not v.requires_grad:
            raise GradlensError(
                f"`losses[{t!r}]` should require grad (depend on the model's parameters); "
                "found a tensor with requires_grad=False."
            )
        vals.append(v if v.dim() == 0 else v.reshape(()))  # no extra view node for a scalar
    if len({v.device for v in vals}) > 1:
        found = {t: str(v.device) for t, v in zip(tasks, vals)}
        raise GradlensError(f"`losses` should all be on one device; found {found}.")
    dtypes = {v.dtype for v in vals}
    if len(dtypes) > 1:
        dt = torch.promote_types(*dtypes) if len(dtypes) == 2 else torch.float64
        vals = [v.to(dt) for v in vals]
    # finiteness is checked by the caller on probed steps only (see check_finite)
    return torch.stack(vals), vals


def check_sparse(
    shared: SharedParams,
    reached: Sequence[torch.Tensor],
    sparse: Mapping[int, str],
    refusal: str | None,
) -> None:
    """Refuse, before any side effect, a shared parameter whose gradient is sparse (``sparse``:
    leaf id -> what makes it so, :attr:`GraphIndex.sparse_from`) when ``refusal`` names who
    cannot take it."""
    if refusal is None:
        return
    found = {n: sparse[id(p)] for n, p in shared.named if id(p) in sparse}
    names = [n for n, p in shared.named if n in found and any(p is q for q in reached)]
    if names:
        custom = any("autograd.Function" in found[n] for n in names)
        dense = "a backward that returns a dense gradient" if custom else "sparse=False"
        engine = refusal.startswith("engine=")
        fix = (
            f"Use engine='loop' (or 'auto', which serves such graphs with it), or {dense}."
            if engine
            else f"Use {dense}, or a Profiler's observe on every rank under DDP."
        )
        why = "its batched backward takes dense gradients only; " if engine else ""
        sources = ", ".join(dict.fromkeys(found[n] for n in names))
        raise GradlensError(
            f"{refusal} cannot measure shared parameters whose gradient is sparse ({why}sparse "
            f"from {sources}); found {names}. {fix} Nothing was written."
        )


def check_finite(
    L: torch.Tensor, tasks: tuple[str, ...], scaled: bool = False
) -> list[float] | None:
    """The losses' values (one read on the host, reused for the Snapshot), all finite; None
    where one is not and the step is ``scaled`` (a loss scaler's overflow: the step goes on as
    an unprobed one, whose inf/NaN gradients the scaler skips).

    >>> check_finite(torch.tensor([1.0, float("inf")]), ("a", "b"), scaled=True) is None
    True
    """
    vals: list[float] = L.detach().tolist()
    if not all(map(math.isfinite, vals)):
        if scaled:
            return None
        bad = {t: v for t, v in zip(tasks, vals) if not math.isfinite(v)}
        raise GradlensError(f"`losses` should be finite; found {bad}.")
    return vals


def weight_values(
    weights: Mapping[str, float | torch.Tensor] | None, tasks: tuple[str, ...]
) -> tuple[float, ...]:
    """The validated weights as floats, in task order (all 1 for None)."""
    if weights is None:
        return (1.0,) * len(tasks)
    if not isinstance(weights, Mapping):
        hint = (
            " (a loss weighting: pass `lw.weights(losses)` as the weights, then call "
            "`lw.backward(losses)` for its own parameters)"
            if callable(getattr(weights, "weights", None))
            and callable(getattr(weights, "end_epoch", None))
            else ""
        )
        raise GradlensError(
            f"`weights` should be a mapping task -> weight or None; found "
            f"{type(weights).__name__}{hint}."
        )
    if set(weights) != set(tasks):
        raise GradlensError(
            f"`weights` should have exactly the tasks {list(tasks)} as keys; found {list(weights)}."
        )
    vals = []
    for t in tasks:
        v = weights[t]
        if isinstance(v, torch.Tensor) and v.requires_grad:
            raise GradlensError(
                f"`weights[{t!r}]` should be a number or a tensor without grad; found a tensor "
                "that requires grad (a learned loss weight): the profiler uses weights as "
                "numbers, so the weight's own gradient would be lost. Pass it detached and "
                "backpropagate the weights' objective yourself, e.g. `(w * L.detach()).sum()` "
                "plus its regulariser, or use lw = gradlens.weightings.make_weighting("
                "'uncertainty', tasks): prof.backward(losses, lw.weights(losses)), then "
                "lw.backward(losses)."
            )
        if isinstance(v, (str, bytes, bool)):  # float() would accept "0.5" and True
            raise GradlensError(
                f"`weights[{t!r}]` should be a real number; found {type(v).__name__} ({v!r})."
            )
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise GradlensError(
                f"`weights[{t!r}]` should be a real number; found {type(v).__name__}."
            ) from None
        if not math.isfinite(f) or f < 0:
            raise GradlensError(f"`weights[{t!r}]` should be finite and >= 0; found {f}.")
        vals.append(f)
    return tuple(vals)


def meta_of(
    tasks: Sequence[str],
    level: str,
    shared: SharedParams,
    engine: str,
    every: object,
    meta: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """A profiler's run meta: its own keys, then the user's ``meta`` (which may not reuse them:
    ``meta=vars(args)`` with a field named ``layers`` replaced the profiler's silently).

    >>> from torch import nn
    >>> from gradlens.engines._base import resolve_shared
    >>> m = meta_of(["a"], "parameters", resolve_shared(nn.Linear(2, 1)), "loop", 1, {"seed": 0})
    >>> m["layers"], m["shared_params"], m["seed"]
    (['(root)'], 3, 0)
    """
    out: dict[str, Any] = {
        "tasks": list(tasks),
        "engine": engine,
        "level": level,
        "layers": list(shared.layers),
        "every": int(every) if isinstance(every, numbers.Integral) else repr(every),
        "shared_params": sum(p.numel() for p in shared.params),
    }
    if taken := sorted(set(out) & set(meta or {})):
        raise GradlensError(
            f"`meta` should not hold the run's own keys {sorted(out)}; found {taken}. Put "
            "your fields under other names, e.g. meta={'config': vars(args)}."
        )
    return out | dict(meta or {})


def open_store(store: str | Path | Any | None, meta: dict[str, Any]) -> Sink | None:
    if store is None:
        return None
    if isinstance(store, (str, Path)):
        from gradlens.store import RunWriter

        return RunWriter(store, meta=meta)
    if hasattr(store, "add_snapshot") and hasattr(store, "close"):
        if hasattr(store, "update_meta"):
            store.update_meta(**meta)
        return cast("Sink", store)  # duck-typed: it has the Sink methods
    raise GradlensError(
        f"`store` should be a run directory path or a RunWriter; found {type(store).__name__}."
    )


def check_features(
    features: torch.Tensor | Sequence[torch.Tensor] | None, engine: Engine
) -> list[torch.Tensor] | None:
    """``features`` as a list of tensors for an engine that needs them (None for the others)."""
    if not engine.needs_features:
        if features is not None:
            raise GradlensError(
                f"`features` is used only by engine='features'; found it passed to "
                f"engine={engine.name!r}. Drop it or switch engines."
            )
        return None
    if features is None:
        raise GradlensError(
            "`features` should be the shared representation z (a tensor that requires grad) "
            "when engine='features'; found None. Call prof.backward(losses, features=z)."
        )
    feats = [features] if isinstance(features, torch.Tensor) else list(features)
    for z in feats:
        if not isinstance(z, torch.Tensor) or not z.requires_grad:
            raise GradlensError(
                "`features` should be tensors that require grad (the output of the shared "
                f"part); found {type(z).__name__}"
                + (" with requires_grad=False" if isinstance(z, torch.Tensor) else "")
                + "."
            )
    return feats


def stack_grams(
    computed: Mapping[str, torch.Tensor],
    layers: Sequence[str] | None,
    T: int,
    stacked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[str, ...]]:
    """The total Gram, the per-layer Grams on CPU (each exactly symmetric, as
    :class:`~gradlens.Snapshot` makes them) and the layers no loss reached.

    With ``layers`` (parameter-level engines), every trainable shared layer is listed: one that
    no loss reached gets a zero Gram and is named in the third item. ``stacked``: ``computed``'s
    values already stacked in order (``EngineResult.stacked``), used as they are.

    >>> g = {"a": torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)}
    >>> total, by_layer, unreached = stack_grams(g, ["a", "b"], 2)
    >>> total.tolist(), by_layer["b"].tolist(), unreached
    ([[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]], ('b',))
    """
    unreached = tuple(n for n in layers if n not in computed) if layers is not None else ()
    if unreached and layers is not None:
        device = next(iter(computed.values())).device if computed else torch.device("cpu")
        zero = torch.zeros(T, T, dtype=torch.float64, device=device)
        computed = {n: computed.get(n, zero) for n in layers}
        stacked = None
    names = list(computed)
    if not names:
        return torch.zeros(T, T, dtype=torch.float64), {}, unreached
    if stacked is None or stacked.shape[0] != len(names):
        stacked = torch.stack([computed[n] for n in names])
    stacked = stacked.cpu()
    total = stacked.sum(0)
    if stacked.shape[-1] == stacked.shape[-2]:
        # symmetric as a Snapshot makes them (the same numbers, see snapshot._symmetric; halving
        # is exact, as the division by 2 there): the profiler then builds its Snapshot without a
        # second pass (snapshot._symmetric_given)
        total = (total + total.T).mul_(0.5)
        stacked = (stacked + stacked.transpose(1, 2)).mul_(0.5)
    return total, dict(zip(names, stacked.unbind(0))), unreached


#: Note of a probe the schedule did not plan (a Gram weighting without held weights forces one):
#: its forward was not recorded, so the hooked engines served it by their exact generic path.
UNSCHEDULED = "unscheduled-probe"


def probe_notes(notes: Sequence[str], scheduled: bool) -> tuple[str, ...]:
    """A probe's notes, each once; an unrecorded forward of an unscheduled probe is named as
    such (the forward ran before anything asked for a probe, not before the profiler existed).

    >>> probe_notes(["forward-not-recorded", "forward-not-recorded"], scheduled=False)
    ('unscheduled-probe',)
    """
    out = dict.fromkeys(notes)
    if not scheduled and UNRECORDED in out:
        out = dict.fromkeys(UNSCHEDULED if n == UNRECORDED else n for n in out)
    return tuple(out)


class ProbeWarnings:
    """The warnings a profiler gives after a probe: once per task whose gradient is zero or not
    finite, once per profiler for a probe whose forward its hooks did not see."""

    def __init__(self) -> None:
        self.zero: set[str] = set()
        self.nonfinite: set[str] = set()
        self.unrecorded = False
        self.unscheduled = False

    def check(self, snap: Snapshot) -> None:
        """Warn about what ``snap`` shows for the first time (called by the profiler's probe:
        ``stacklevel`` points at the user's ``backward`` or ``observe`` call)."""
        if UNRECORDED in snap.notes and not self.unrecorded:
            self.unrecorded = True
            _warn(
                f"the forward of the probe at step {snap.step} was not seen by the profiler's "
                "hooks on the shared module (was the Profiler created after the forward, the "
                "trunk called through .forward(), or this graph probed already by an earlier "
                "call with retain_graph=True?): the gramian engine served every layer by its "
                "exact but slower generic path (Snapshot.notes records it). Create the Profiler "
                "before the first forward; a second probe of one graph is exact as it is."
            )
        if UNSCHEDULED in snap.notes and not self.unscheduled:
            self.unscheduled = True
            _warn(
                f"a Gram weighting with no weights held yet made step {snap.step} a probe, "
                "which the schedule (`every`) does not probe: its forward was not recorded, so "
                "the hooked engine served every layer by its exact but slower generic path "
                "(Snapshot.notes records it). Probe the step where the weighting starts (e.g. "
                "every=1 until then) to have the rules serve it."
            )
        d = torch.diagonal(snap.gram, dim1=-2, dim2=-1).tolist()
        if all(math.isfinite(x) and x > 0 for x in d):
            return  # the usual case, from one read of the diagonal
        what = "representation" if snap.level == "features" else "parameters"
        bad = [t for t in snap.nonfinite_tasks if t not in self.nonfinite]
        if bad:
            self.nonfinite.update(bad)
            _warn(
                f"tasks {bad} have a non-finite (NaN or infinite) gradient on the shared {what} "
                f"at step {snap.step}, from finite losses (Snapshot.nonfinite_tasks flags them; "
                "e.g. sqrt or log at 0 in the loss)."
            )
        new = [t for t in snap.zero_tasks if t not in self.zero]
        if new:
            self.zero.update(new)
            _warn(
                f"tasks {new} have a zero gradient on the shared {what} at step {snap.step}: "
                "their cosines are NaN (Snapshot.zero_tasks flags them). Does each of these "
                "losses depend on the shared part?"
            )


def record(sinks: Sequence[Sink], snap: Snapshot, step: int) -> None:
    """Hand a probe's Snapshot to every sink. A sink that fails (a full disk, a dashboard's
    error) is raised as a :class:`~gradlens.GradlensError` saying that the step itself
    succeeded, its ``.grad`` written and the step advanced to ``step``: repeating the backward
    would count its gradients twice."""
    for sink in sinks:
        try:
            sink.add_snapshot(snap)
        except Exception as exc:
            raise GradlensError(
                f"the probe of step {snap.step} succeeded (.grad written, the profiler's step "
                f"advanced to {step}), but the sink {type(sink).__name__} failed to record its "
                f"Snapshot: {exc!r}. Do not repeat the backward (its gradients would count "
                "twice); fix the sink and go on with the next step."
            ) from exc


def _warn(message: str) -> None:
    """A GradlensWarning pointing at the user's ``backward``/``observe`` call (this frame,
    ``ProbeWarnings.check``, the profiler's probe, its run, the public method, the caller)."""
    warnings.warn(message, GradlensWarning, stacklevel=6)
