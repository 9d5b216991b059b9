"""The :class:`Profiler`: measure per-task gradient interference inside a training loop.

``prof.backward(losses, weights)`` replaces ``loss.backward()``. Afterwards every parameter's
``.grad`` is what ``sum_t w_t * L_t`` ``.backward()`` gives (same accumulation), on probed and
unprobed steps alike, so profiling never changes the training trajectory. On probed steps it
returns a :class:`~gradlens.Snapshot` of float64 per-layer and total Gram matrices.

Example:
    >>> import torch, gradlens as gl
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> trunk = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    >>> heads = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 1)})
    >>> x, y = torch.randn(16, 4), torch.randn(16)
    >>> with gl.Profiler(trunk, tasks=["a", "b"], engine="gramian", every=2) as prof:
    ...     for step in range(4):
    ...         z = trunk(x)
    ...         losses = {t: ((heads[t](z).squeeze(1) - y) ** 2).mean() for t in prof.tasks}
    ...         snap = prof.backward(losses, weights={"a": 0.3, "b": 0.7})
    ...         if snap is not None:
    ...             print(snap.step, tuple(snap.gram.shape), sorted(snap.layer_grams))
    0 (2, 2) ['0']
    2 (2, 2) ['0']
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn

from gradlens._errors import GradlensError
from gradlens._profiler_checks import (
    ProbeWarnings,
    check_device,
    check_features,
    check_finite,
    check_scale,
    check_sparse,
    grads_atomic,
    grads_kept,
    graph_index,
    meta_of,
    no_autocast,
    open_store,
    probe_notes,
    record,
    stack_grams,
    stack_losses,
    uncompiled,
    weight_values,
)
from gradlens._profiler_state import load_state, log_auto, save_state
from gradlens._validate import check_int, check_tasks, check_type
from gradlens.engines import engine_class
from gradlens.engines._base import BackwardContext, Engine, resolve_shared
from gradlens.engines._graph import GraphIndex
from gradlens.engines.auto import AutoEngine
from gradlens.schedules import Schedule, as_schedule, first_probe
from gradlens.snapshot import Snapshot, _symmetric, _symmetric_given
from gradlens.weightings import _apply as _weighting

__all__ = ["Profiler", "Sink"]

_FREED = "Trying to backward through the graph a second time"


#: A Gram weighting: T x T float64 Gram -> T non-negative weights (see gradlens.weightings).
Weighting = Callable[[torch.Tensor], Any]


class Sink(Protocol):
    """Anything that receives snapshots (the run store, a TensorBoard sink...)."""

    def add_snapshot(self, snap: Snapshot) -> None: ...

    def close(self) -> None: ...


class Profiler:
    """Attach to the shared part of a model and measure its per-task Gram matrices.

    Args:
        shared: the shared module (its trainable parameters are the shared ones), or an iterable
            of ``(name, parameter)`` pairs.
        tasks: task names, in the order of the Gram's rows.
        engine: ``"auto"`` (default: the fastest of the exact engines ``"loop"``,
            ``"batched"`` and ``"gramian"``, timed on the first probes; see
            :mod:`gradlens.engines.auto`), one of those three, or ``"features"``.
        every: probe every k-th step (an int), or any callable ``step -> bool``
            (see :mod:`gradlens.schedules`).
        store: a run directory path (a :class:`gradlens.store.RunWriter` is created there) or a
            writer; snapshots are written to it and it is closed with the profiler.
        sinks: more receivers of snapshots (e.g. :class:`gradlens.sinks.TensorBoardSink`); a
            sink with an ``update_meta(**meta)`` method is first given the run's meta.
        memory_budget: bytes an engine may use for one block of per-task quantities (the batched
            engine's task chunks, the rules' output-row blocks).
        meta: extra fields for the run store's ``meta.json`` (model, seed, config...).
    """

    def __init__(
        self,
        shared: nn.Module | Iterable[Any],
        tasks: Sequence[str],
        engine: str = "auto",
        every: int | Schedule = 1,
        store: str | Path | Any | None = None,
        *,
        sinks: Sequence[Sink] = (),
        memory_budget: int = 256 * 2**20,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.tasks: tuple[str, ...] = check_tasks(tasks)
        module, self._compiled = uncompiled(shared, engine)
        self._shared = resolve_shared(module)
        self._engine: Engine = self._make_engine(engine)
        self._schedule = as_schedule(every)
        self._budget: int = check_int("memory_budget", memory_budget, minimum=1)
        self._step = 0
        self._closed = False
        self._warnings = ProbeWarnings()
        self._device_ok: torch.device | None = None
        self._auto_logged: set[tuple[object, ...]] = set()
        self._w_cache: tuple[tuple[object, ...], torch.Tensor] | None = None
        #: A Gram weighting's last weights (total, per layer), held between probes.
        self._held: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self._learned: dict[object, dict[int, str]] = {}  # GraphIndex.sparse_leaves' facts
        # the store first: a refused one (a run already there) leaves no hook on the model
        run_meta = meta_of(self.tasks, self._engine.level, self._shared, engine, every, meta)
        first = first_probe(self._schedule)  # (a schedule that fails: no store made)
        self.store = open_store(store, run_meta)
        self._engine.attach()
        self._engine.set_recording(first)
        self._sinks: list[Sink] = list(sinks)
        for sink in self._sinks:  # dashboards log the run meta as config/params
            update = getattr(sink, "update_meta", None)
            if callable(update):
                update(**run_meta)
        if self.store is not None:
            self._sinks.insert(0, self.store)
        self._finalizer = weakref.finalize(self, _finalize, self._engine, list(self._sinks))

    # -- public --------------------------------------------------------------------------------
    @property
    def engine(self) -> str:
        """Name of the engine in use."""
        return self._engine.name

    @property
    def step(self) -> int:
        """The training step the next ``backward``/``observe`` call is (the schedule's input);
        set it to continue a run elsewhere than at 0 (as :meth:`load_state_dict` does)."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = check_int("step", value, minimum=0)
        self._step_moved()

    def _sparse_refusal(self) -> str | None:
        """Who cannot take a shared parameter with a sparse gradient (None: this profiler can)."""
        return None if self._engine.sparse_grads else f"engine={self.engine!r}"

    def _step_moved(self) -> None:
        """The next call is at a new step: the engine records its forward only if it is
        probed (a subclass adds what else follows the schedule)."""
        self._engine.set_recording(bool(self._schedule(self._step)))

    @property
    def layers(self) -> tuple[str, ...]:
        """Layer names (modules owning shared parameters that require grad now), in parameter
        order: the layers of every Snapshot from now on (a layer no loss reaches has a zero
        Gram there, listed in ``Snapshot.unreached``); those of the module's current parameters
        (one replaced since the profiler was created is followed)."""
        self._follow(None)
        return tuple(self._shared.layers)

    def _follow(self, leaves: Mapping[int, torch.Tensor] | None) -> None:
        """Follow the shared module's current parameters (:meth:`SharedParams.follow`, given a
        probe's reached leaves; :meth:`SharedParams.sync` without); the engine replans."""
        changed = self._shared.sync() if leaves is None else self._shared.follow(leaves)
        if changed:
            self._device_ok = None
            self._engine.shared_changed()

    def will_probe(self, step: int | None = None) -> bool:
        """Whether ``step`` (default: the coming one) is probed."""
        return bool(self._schedule(self.step if step is None else step))

    def backward(
        self,
        losses: Mapping[str, torch.Tensor],
        weights: Mapping[str, float | torch.Tensor] | Weighting | None = None,
        *,
        features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        retain_graph: bool = False,
        grad_scale: torch.amp.GradScaler | float | torch.Tensor | None = None,
    ) -> Snapshot | None:
        """Replace ``loss.backward()``: write the weighted gradient; measure on probed steps.

        Args:
            losses: one scalar loss per task, keyed by task name (all tasks, no others); checked
                finite on probed steps (reading them on the host every step would stall a GPU).
            weights: one non-negative finite weight per task; None means 1 for every task, the
                plain sum ``sum_t L_t``. Or a Gram weighting: a callable from the T x T float64
                total Gram to T non-negative weights (any ``torchjd.aggregation.*Weighting``,
                see :mod:`gradlens.weightings`); ``.grad`` is then ``J^T w(G)`` on the shared
                parameters and the same weighted gradient on the others, written after the
                weights are checked, and the Snapshot records them. ``gl.per_layer(w)`` weights
                each layer by its own Gram instead. A step with no weights yet is always probed;
                between probes (``every=k``) the last weights are held: an approximation of the
                method, which would recompute them every step.
            features: the shared representation ``z`` (required by the ``features`` engine).
            retain_graph: as in ``Tensor.backward``.
            grad_scale: mixed precision: the ``torch.amp.GradScaler`` (or its scale, a number),
                with ``losses`` unscaled. ``.grad`` then equals that of
                ``scaler.scale(sum_t w_t L_t).backward()``, so ``scaler.step(opt)`` follows as
                usual, and the Grams are unscaled (divided by ``scale**2``). A probed step whose
                scaled gradients overflow, or, with an enabled GradScaler, whose losses are not
                finite (an fp16 forward's overflow), returns None and stores nothing: the
                scaler skips it too.

        Returns:
            A :class:`Snapshot` on probed steps, else None.
        """
        return self._run(losses, weights, features, retain_graph, grad_scale, write=True)

    def observe(
        self,
        losses: Mapping[str, torch.Tensor],
        weights: Mapping[str, float | torch.Tensor] | Weighting | None = None,
        *,
        features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        grad_scale: torch.amp.GradScaler | float | torch.Tensor | None = None,
    ) -> Snapshot | None:
        """Measure without touching ``.grad``, for loops that own their backward call.

        The graph is kept, so the caller's own ``loss.backward()`` still works afterwards and
        gives exactly the gradients it would have given without gradlens. The cost on a probed
        step is the engine's measurement (its weighted sum is computed and discarded: one
        transient ``.grad``-sized buffer per shared parameter) plus keeping the graph alive until
        the caller's backward; unprobed steps cost nothing. Arguments as in :meth:`backward`.

        Example:
            >>> import torch, gradlens as gl
            >>> trunk, head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
            >>> prof = gl.Profiler(trunk, tasks=["a", "b"], engine="gramian")
            >>> out = head(trunk(torch.randn(5, 3)))
            >>> losses = {"a": out[:, 0].mean(), "b": out[:, 1].mean()}
            >>> snap = prof.observe(losses)
            >>> trunk.weight.grad is None
            True
            >>> sum(losses.values()).backward()  # the framework's own backward
            >>> tuple(snap.gram.shape), trunk.weight.grad is not None
            ((2, 2), True)
            >>> prof.close()
        """
        return self._run(losses, weights, features, True, grad_scale, write=False)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on as this one: the step (the position in the probe
        schedule), a Gram weighting's held weights and ``auto``'s decisions (so each graph
        shape is served by the engine it chose: bit-identical numbers). Save it with the model
        and optimizer; only tensors, dicts, lists, numbers and strings.

        Example:
            >>> import torch, gradlens as gl
            >>> trunk = torch.nn.Linear(3, 2)
            >>> def losses():
            ...     out = trunk(torch.randn(5, 3))
            ...     return {"a": out[:, 0].mean(), "b": out[:, 1].mean()}
            >>> with gl.Profiler(trunk, tasks=["a", "b"]) as prof:
            ...     for _ in range(30):  # auto times its candidates, then keeps the fastest
            ...         _ = prof.backward(losses())
            ...     state = prof.state_dict()
            >>> chosen = state["auto"]["decisions"][0]["winner"]
            >>> with gl.Profiler(trunk, tasks=["a", "b"]) as resumed:  # e.g. after a restart
            ...     resumed.load_state_dict(state)
            ...     snap = resumed.backward(losses())
            >>> snap.step, snap.engine == chosen
            (30, True)
        """
        return save_state(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` saved by a profiler with the same tasks (raises
        :class:`~gradlens.GradlensError` for anything else, changing nothing). A state without
        ``auto`` decisions loaded into an ``auto`` profiler warns: its candidates are timed anew.
        """
        load_state(self, state)

    def close(self) -> None:
        """Remove every hook from the model and flush and close the store and sinks."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> Profiler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        chose = ""
        if isinstance(self._engine, AutoEngine):
            chose = f", chose={self._engine.describe()!r}"
        return (
            f"Profiler(tasks={list(self.tasks)}, engine={self.engine!r}{chose}, "
            f"layers={len(self.layers)}, step={self.step})"
        )

    # -- internals -----------------------------------------------------------------------------
    def _make_engine(self, engine: str) -> Engine:
        """The engine instance (subclasses may substitute one, e.g. a communicating engine)."""
        cls = engine_class(engine)
        if cls is AutoEngine and self._compiled:
            # the vmap engines cannot run through a torch.compile'd trunk: time loop only
            return AutoEngine(self._shared, len(self.tasks), only=("loop",))
        return cls(self._shared, len(self.tasks))

    def _after(self, snap: Snapshot | None, wrote: bool) -> Snapshot | None:
        """Hook run after the gradients are written and before sinks see the snapshot."""
        return snap

    def _check_write(self, probe: bool, held_per_layer: bool) -> None:
        """Hook run before anything is written: whether this step is probed, and whether an
        unprobed one writes held per-layer weights (a subclass may refuse either)."""

    def _run(
        self,
        losses: Mapping[str, torch.Tensor],
        weights: Mapping[str, float | torch.Tensor] | Weighting | None,
        features: torch.Tensor | Sequence[torch.Tensor] | None,
        retain_graph: bool,
        grad_scale: torch.amp.GradScaler | float | torch.Tensor | None,
        write: bool,
    ) -> Snapshot | None:
        what = "backward" if write else "observe"
        if self._closed:
            raise GradlensError(f"`{what}` was called on a closed Profiler; create a new one.")
        retain_graph = bool(check_type("retain_graph", retain_graph, (bool, type(None)), "a bool"))
        step = self.step
        # is_weighting tells a Gram weighting (a callable) from a mapping of weights
        gw = cast("Weighting", weights) if _weighting.is_weighting(weights) else None
        per_layer = isinstance(gw, _weighting.PerLayer)
        if per_layer and self._engine.level != "parameters":
            raise GradlensError(
                f"`weights=gl.per_layer(...)` needs per-layer parameter Grams; found engine="
                f"{self.engine!r}, whose Gram is {self._engine.level}-level. Use another engine "
                "or a whole-model weighting."
            )
        held = self._held if gw is not None else None
        if held is not None and per_layer and not held[1]:
            held = None  # whole-model weights are held; per-layer ones are needed
        probe = bool(self._schedule(step)) or (gw is not None and held is None)
        self._check_write(probe, bool(per_layer and held is not None and write))
        # finiteness is checked on probed steps only: the check reads the losses on the host,
        # which on a GPU would stall every step (an unprobed step then behaves as plain training)
        L, parts = stack_losses(losses, self.tasks)
        self._check_device(L)
        values = check_finite(L, self.tasks, _scaler_on(grad_scale)) if probe else None
        probe = probe and values is not None  # (a scaler's overflow: a plain step, skipped by it)
        if gw is None:
            w = self._weights_on(cast("Mapping[str, float | torch.Tensor] | None", weights), L)
        else:
            w = (held[0] if held is not None else torch.ones(len(self.tasks))).to(L.device, L.dtype)
        scale = check_scale(grad_scale, L)
        feats = check_features(features, self._engine)
        snap = None
        try:
            if probe:
                snap = self._probe(
                    step, L, parts, w, feats, retain_graph, scale, write, gw, values
                )
            elif write and per_layer and held is not None:
                Ls = L if scale is None else L * scale
                self._write_weighted(Ls, w, held[1], retain_graph)
            elif write:
                Ls = L if scale is None else L * scale
                torch.autograd.backward(w @ Ls, retain_graph=retain_graph)
        except RuntimeError as exc:
            self._engine.discard()
            if _FREED in str(exc):
                raise GradlensError(
                    "`losses` should come from a graph that has not been backpropagated yet; "
                    "found a graph already freed by an earlier backward. Compute the losses "
                    "anew at each step (or keep the graph with retain_graph=True)."
                ) from exc
            raise
        except BaseException:
            self._engine.discard()
            raise
        # the step advances only when the call succeeded: a failed call can be retried
        self._step = step + 1
        self._engine.set_recording(bool(self._schedule(self._step)))
        snap = self._after(snap, write)
        if snap is not None:
            record(self._sinks, snap, self._step)
        return snap

    def _check_device(self, L: torch.Tensor) -> None:
        if L.device != self._device_ok:  # checked once per device, not every step
            self._device_ok = check_device(L, self._shared.params)

    def _weights_on(
        self, weights: Mapping[str, float | torch.Tensor] | None, L: torch.Tensor
    ) -> torch.Tensor:
        """The weights as a tensor like ``L``; the last one is reused when the values repeat
        (no host-to-device copy per step on a GPU)."""
        vals = weight_values(weights, self.tasks)
        key = (vals, L.dtype, L.device)
        if self._w_cache is None or self._w_cache[0] != key:
            self._w_cache = (key, torch.tensor(vals, dtype=L.dtype, device=L.device))
        return self._w_cache[1]

    def _probe(
        self,
        step: int,
        L: torch.Tensor,
        parts: list[torch.Tensor],
        w: torch.Tensor,
        feats: list[torch.Tensor] | None,
        retain_graph: bool,
        scale: torch.Tensor | None,
        write: bool,
        weighting: Weighting | None = None,
        values: list[float] | None = None,
    ) -> Snapshot | None:
        once = write and weighting is None and not retain_graph and self._engine.one_pass
        graph = graph_index(L, once, self.engine, self._shared)  # raises: nothing written yet
        leaves = graph.leaves
        self._follow(leaves)  # parameters replaced since the last probe (or raises: no change)
        reached = [p for p in self._shared.params if id(p) in leaves]
        sparse = graph.sparse_leaves(L, self._learned)  # a custom Function's: learned
        if sparse:
            check_sparse(self._shared, reached, graph.sparse_from, self._sparse_refusal())
        notes: list[str] = []  # (an unrecorded forward: noted by the engine that served)
        Ls = L if scale is None else L * scale
        # a Gram weighting: the engine measures only (as for observe), the writes come after
        measure_only = not write or weighting is not None
        ctx = BackwardContext(
            losses=Ls,
            task_losses=parts if scale is None else [v * scale for v in parts],
            weights=w,
            reached=reached,
            uses=graph.uses,
            nodes=graph.pos.keys(),
            features=feats,
            memory_budget=self._budget,
            leaves=leaves,
            write=not measure_only,
            retain_graph=retain_graph or weighting is not None,
            keep_blocks=weighting is not None and write,
            graph=graph,
            sparse=sparse,
        )
        with grads_atomic(leaves.values() if write else ()):  # a failed call changes nothing
            # engines compute in the dtypes of the recorded tensors, never under an autocast region
            with no_autocast(L.device.type):
                if not measure_only:
                    result = self._engine.compute(ctx)
                else:
                    with grads_kept(reached):
                        result = self._engine.compute(ctx)
            rest = [v for i, v in leaves.items() if i not in result.written]
            if rest and not measure_only:
                torch.autograd.backward(w @ Ls, inputs=rest, retain_graph=retain_graph)
            layers = self._shared.layers if self._engine.level == "parameters" else None
            gram, layer_grams, unreached = stack_grams(
                result.layer_grams, layers, len(self.tasks), result.stacked
            )
            if scale is not None:
                inv2 = 1.0 / float(scale) ** 2 if float(scale) else math.inf  # (powers of two)
                if not (math.isfinite(inv2) and bool(torch.isfinite(gram).all())):
                    if weighting is not None and write:  # inf gradients: the scaler skips the step
                        torch.autograd.backward(w @ Ls, retain_graph=retain_graph)
                    return None  # overflowed scaled gradients: the scaler skips this step too
                gram = gram * inv2
                layer_grams = {n: g * inv2 for n, g in layer_grams.items()}
            extra: dict[str, Any] = {}
            held = None
            if weighting is not None:
                reached_grams = {n: g for n, g in layer_grams.items() if n not in unreached}
                w, extra, held = self._apply_weighting(
                    weighting, gram, reached_grams, Ls, write, retain_graph, result.writer, leaves
                )
            with _symmetric_given():  # stack_grams made every Gram exactly symmetric
                snap = Snapshot(
                    step=step,
                    tasks=self.tasks,
                    gram=gram,
                    layer_grams=layer_grams,
                    weights=w.detach().to("cpu", torch.float64),
                    engine=result.engine or self.engine,
                    level=self._engine.level,
                    rules=result.rules,
                    losses=dict(zip(self.tasks, L.detach().tolist() if values is None else values)),
                    timings=dict(result.timings),
                    unreached=unreached,
                    notes=probe_notes([*notes, *result.notes], bool(self._schedule(step))),
                    **extra,
                )
            self._warnings.check(snap)
            log_auto(self)
        self._held = self._held if held is None else held  # once the probe succeeded
        return snap

    def _apply_weighting(
        self,
        weighting: Weighting,
        gram: torch.Tensor,
        layer_grams: dict[str, torch.Tensor],
        Ls: torch.Tensor,
        write: bool,
        retain_graph: bool,
        writer: Callable[[Mapping[str, torch.Tensor]], None] | None,
        leaves: Mapping[int, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Call a Gram weighting on this probe's Grams and write its update; returns the weights
        as a tensor like ``Ls``, the Snapshot's fields, and the weights to hold.

        Everything is checked before anything is written. Where the engine kept the per-task
        blocks of its pass (``writer``: they fit ``memory_budget``), ``J_l^T w_l`` is written
        from them, then the other leaves (the heads) by a backward restricted to them:
        ``"kept_blocks"``. Otherwise the whole model gets one more backward of
        ``sum_t w_t L_t`` (``"second_backward"``) and per-layer weights batched backwards over
        task chunks (``"per_layer_batched"``, see
        :func:`gradlens.weightings._apply.write_per_layer`).
        """
        per_layer = isinstance(weighting, _weighting.PerLayer)
        # the Snapshot's exactly symmetric Grams: the weights are those of what it records
        gram = _symmetric(gram)
        w64 = _weighting.call_weighting(weighting, gram)
        layer_w = {
            n: _weighting.call_weighting(weighting, _symmetric(g), n)
            for n, g in (layer_grams.items() if per_layer else ())
        }
        w = w64.to(Ls.device, Ls.dtype)
        if writer is not None:
            path = "kept_blocks"
        else:
            path = "per_layer_batched" if per_layer else "second_backward"
        if write:
            if writer is not None:
                writer(layer_w if per_layer else dict.fromkeys(layer_grams, w64))
                self._write_rest(Ls, w, retain_graph, leaves)
            elif per_layer:
                self._write_weighted(Ls, w, layer_w, retain_graph)
            else:
                torch.autograd.backward(w @ Ls, retain_graph=retain_graph)
        extra = {
            "weighting": _weighting.weighting_name(weighting),
            "weighting_path": path,
            "layer_weights": layer_w,
        }
        return w, extra, (w64, layer_w)

    def _write_rest(
        self,
        Ls: torch.Tensor,
        w: torch.Tensor,
        retain_graph: bool,
        leaves: Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        """``sum_t w_t`` of the gradients of every leaf outside the shared parameters."""
        if leaves is None:
            leaves = GraphIndex.build(Ls).leaves
        ids = {id(p) for p in self._shared.params}
        rest = [v for i, v in leaves.items() if i not in ids]
        if rest:
            torch.autograd.backward(w @ Ls, inputs=rest, retain_graph=retain_graph)

    def _write_weighted(
        self,
        Ls: torch.Tensor,
        w: torch.Tensor,
        layer_w: Mapping[str, torch.Tensor],
        retain_graph: bool,
    ) -> None:
        """``J_l^T w_l`` on each shared layer, ``sum_t w_t`` of the gradients on other leaves."""
        graph = graph_index(Ls, False, who="the held per-layer weights' write (a backward each)")
        leaves = graph.leaves
        self._follow(leaves)
        shared = [p for p in self._shared.params if id(p) in leaves]
        # a layer the held probe did not reach (conditional computation) takes the total weights
        missing = {self._shared.layer_of[id(p)] for p in shared} - set(layer_w)
        lw = {**layer_w, **dict.fromkeys(missing, w.detach().cpu())}
        sparse = graph.sparse_leaves(Ls, self._learned)
        with grads_atomic(leaves.values()):  # (an unprobed step's: a failure writes nothing)
            _weighting.write_per_layer(Ls, shared, self._shared.layer_of, lw, self._budget, sparse)
            self._write_rest(Ls, w, retain_graph, leaves)


def _scaler_on(grad_scale: object) -> bool:
    """Whether ``grad_scale`` is an enabled GradScaler (its overflow step is skipped by it)."""
    return isinstance(grad_scale, torch.amp.GradScaler) and grad_scale.is_enabled()


def _finalize(engine: Engine, sinks: list[Sink]) -> None:
    engine.detach()
    for sink in sinks:
        sink.close()
