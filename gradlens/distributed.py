"""Profiling under ``torch.distributed``: DDP-averaged gradients, global or rank-local Grams.

:class:`DistributedProfiler` is a :class:`~gradlens.Profiler` for data-parallel training. After
``prof.backward(losses, weights)`` every parameter of ``model`` holds what DDP alone would give:
the average over ranks of the local gradients of ``sum_t w_t L_t``.

How the gradients are averaged:
    The engines write ``.grad`` of the shared parameters directly, outside autograd's
    ``AccumulateGrad``, so DDP's reducer hooks would not see them. On probed steps the profiler
    therefore switches DDP's gradient sync off for that step (exactly what ``model.no_sync()``
    does; the switch is made when the previous step ends, before the forward) and all-reduces
    every gradient itself, bucketed into flat buffers of ``bucket_bytes``: the same P numbers
    DDP sends, without DDP's overlap of communication with the backward. Unprobed steps are
    plain DDP steps. A module that is not wrapped in DDP is averaged by the profiler at every
    step (its parameters and buffers are broadcast from rank 0 at construction, as DDP does).

Which Grams (``grams=``; recorded in the run's meta as ``grams``, with ``world_size``):
    - ``"local"``: each rank's Grams of its own batch; no communication. Any engine. Rank 0's
      Grams are the ones stored.
    - ``"global"``: the Grams of the global per-task gradients ``g_t = (1/W) sum_r g_t^r`` (the
      gradients DDP averages), identical on every rank. Cross-rank inner products are needed:
      ``engine="batched"`` or ``"loop"`` all-reduce the ``T x P`` per-task gradients of the
      shared parameters (``T * P`` numbers per probed step, formed in layer chunks under
      ``memory_budget``); ``engine="features"`` all-reduces the ``T x T`` Gram (the
      representation of the global batch is the concatenation of the ranks' ones, so its Gram
      is ``(1/W^2) sum_r G^r``: ``T^2`` numbers). The ``gramian`` engine never forms per-task
      parameter gradients, so it is refused here: an exact global Gram would need, per layer,
      either ``T x P_l`` gradients (what ``batched`` sends) or all-gathering activations and
      output gradients (``W * N * (in + T * out)`` numbers per Linear layer).

Only rank 0 writes the store and feeds ``sinks``; on the other ranks ``prof.store`` is None.

Example (one process; the same code runs on every rank of a ``torchrun`` job):
    >>> import tempfile, torch, torch.distributed as dist
    >>> from gradlens.distributed import DistributedProfiler
    >>> init = tempfile.NamedTemporaryFile(delete=False).name
    >>> dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    >>> model = torch.nn.ModuleDict({"trunk": torch.nn.Linear(3, 4),
    ...                              "a": torch.nn.Linear(4, 1), "b": torch.nn.Linear(4, 1)})
    >>> ddp = torch.nn.parallel.DistributedDataParallel(model)
    >>> prof = DistributedProfiler(ddp, model["trunk"], ["a", "b"], engine="batched",
    ...                            grams="global")
    >>> z = model["trunk"](torch.randn(8, 3))
    >>> snap = prof.backward({"a": model["a"](z).mean(), "b": model["b"](z).mean()})
    >>> tuple(snap.gram.shape), prof.world_size
    ((2, 2), 1)
    >>> prof.close(); del snap, prof, ddp  # release DDP before its process group
    >>> dist.destroy_process_group()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import nn

from gradlens._errors import GradlensError
from gradlens._validate import check_choice, check_int
from gradlens.engines._base import (
    BackwardContext,
    Engine,
    EngineResult,
    SharedParams,
    accumulate_grad,
    batched_grad,
    compute_dtype,
    grad_dtype,
    gram_of_rows,
    group_by_layer,
    new_grad,
)
from gradlens.engines._unbatchable import unbatchable
from gradlens.engines.features import FeaturesEngine
from gradlens.engines.loop import loop_task_grads
from gradlens.profiler import Profiler, Sink
from gradlens.schedules import Schedule
from gradlens.snapshot import Snapshot

__all__ = ["DistributedProfiler", "GramScope"]

#: Where the Grams come from: the global batch (communicating) or each rank's own batch.
GramScope = Literal["global", "local"]
_GLOBAL_ENGINES = ("batched", "loop", "features")


class DistributedProfiler(Profiler):
    """A :class:`~gradlens.Profiler` for data-parallel training (see the module docstring).

    Args:
        model: the whole model whose gradients are averaged: a ``DistributedDataParallel``
            instance or a plain module (then the profiler does all the averaging).
        shared: the shared part (a submodule of ``model``) or ``(name, parameter)`` pairs.
        tasks, engine, every, store, sinks, memory_budget, meta: as in
            :class:`~gradlens.Profiler`; ``store`` and ``sinks`` are used on rank 0 only.
            ``engine`` defaults to ``"gramian"``, not ``"auto"``: ``auto`` decides from each
            rank's own timings, so ranks may choose differently (exact either way, but rank 0's
            recorded choice would not describe the others), and agreeing on one choice would
            need a collective per timed probe whose count follows each rank's graph shapes
            (uneven batches or conditional computation would leave ranks waiting on each other).
            ``engine="auto"`` may still be passed with ``grams="local"``.
        grams: ``"local"`` (default; each rank's Grams, no communication) or ``"global"``
            (Grams of the averaged per-task gradients; ``engine`` "batched", "loop" or
            "features").
        process_group: the group to average over (default: the world).
        bucket_bytes: size of the flat buffers the gradients are all-reduced in.
    """

    def __init__(
        self,
        model: nn.Module,
        shared: nn.Module | Iterable[Any],
        tasks: Sequence[str],
        engine: str = "gramian",
        every: int | Schedule = 1,
        store: str | Path | Any | None = None,
        *,
        grams: GramScope = "local",
        process_group: dist.ProcessGroup | None = None,
        bucket_bytes: int = 25 * 2**20,
        sinks: Sequence[Sink] = (),
        memory_budget: int = 256 * 2**20,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise GradlensError(
                "DistributedProfiler needs torch.distributed initialized "
                "(dist.init_process_group) before it is created; found it uninitialized. "
                "In a single process use gradlens.Profiler."
            )
        check_choice("grams", grams, get_args(GramScope))
        if grams == "global" and engine not in _GLOBAL_ENGINES:
            raise GradlensError(
                f"`engine` should be one of {list(_GLOBAL_ENGINES)} with grams='global'; found "
                f"{engine!r}. The gramian engine never forms per-task parameter gradients, which "
                "global Grams must all-reduce: use engine='batched' (T x P numbers per probed "
                "step), engine='features' (T x T), or grams='local' (no communication)."
            )
        if not isinstance(model, nn.Module):
            raise GradlensError(
                "`model` should be the nn.Module whose gradients are averaged (a "
                f"DistributedDataParallel or a plain module); found {type(model).__name__}."
            )
        bucket_bytes = check_int("bucket_bytes", bucket_bytes, minimum=1)
        self._group = process_group
        self.world_size: int = dist.get_world_size(process_group)
        self.rank: int = dist.get_rank(process_group)
        self.grams: GramScope = grams
        self._bucket_bytes = bucket_bytes
        self._ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        self._params = _unique([p for p in model.parameters() if p.requires_grad])
        info: dict[str, Any] = {
            "grams": grams,
            "world_size": self.world_size,
            "backend": str(dist.get_backend(process_group)),
            "grams_rank": None if grams == "global" else 0,
        }
        lead = self.rank == 0
        super().__init__(
            shared,
            tasks,
            engine,
            every,
            store if lead else None,
            sinks=sinks if lead else (),
            memory_budget=memory_budget,
            meta={**info, **(meta or {})},
        )
        ours = {id(p) for p in self._params}
        stray = [n for n, p in self._shared.named if id(p) not in ours]
        if stray:
            self.close()
            raise GradlensError(
                "`shared` should be part of `model` (its parameters are averaged with the "
                f"model's); found parameters outside it: {stray[:5]}."
            )
        if self._ddp is None:
            self._broadcast(model)
        self._synced_step = False
        self._set_ddp_sync()

    def observe(self, *args: Any, **kwargs: Any) -> Snapshot | None:
        """Not available here: the caller's own backward must be averaged by DDP itself.

        Use a plain :class:`~gradlens.Profiler` and its ``observe`` on every rank instead (it
        never touches ``.grad``, so DDP averages as usual; its Grams are rank-local; give
        ``store`` on rank 0 only).
        """
        raise GradlensError(
            "`observe` is not supported by DistributedProfiler: the backward belongs to the "
            "caller, and DDP must average it. Use gradlens.Profiler(...).observe on every rank "
            "(rank-local Grams; pass `store` on rank 0 only)."
        )

    def close(self) -> None:
        """As :meth:`Profiler.close`; DDP's own gradient sync is switched back on."""
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = True
        super().close()

    def __repr__(self) -> str:
        return (
            f"DistributedProfiler(tasks={list(self.tasks)}, engine={self.engine!r}, "
            f"grams={self.grams!r}, rank={self.rank}, world_size={self.world_size}, "
            f"step={self.step})"
        )

    # -- hooks of Profiler ----------------------------------------------------------------------
    def _make_engine(self, engine: str) -> Engine:
        if self.grams == "local":
            return super()._make_engine(engine)
        T = len(self.tasks)
        if engine == "features":
            return _GlobalFeatures(self._shared, T, self._group, self.world_size)
        cls = _GlobalLoop if engine == "loop" else _GlobalBatched
        return cls(self._shared, T, self._group, self.world_size)

    def _sparse_refusal(self) -> str | None:
        return "DistributedProfiler (its gradient all-reduce is dense)"

    def _step_moved(self) -> None:
        super()._step_moved()
        self._set_ddp_sync()  # a step set from outside (a resumed run): DDP follows it too

    def _check_write(self, probe: bool, held_per_layer: bool) -> None:
        if not self._synced_step:  # the profiler averages this step itself
            return
        if probe:  # a Gram weighting with no weights held yet forces a probe on this step
            raise GradlensError(
                f"step {self.step} should be one the schedule probes: a Gram weighting with no "
                "weights held yet makes it a probe, but DDP was set to average it (the "
                "schedule does not probe it), and DDP cannot average a probe's gradients. "
                "Probe the step where the weighting starts (a schedule that probes it, e.g. "
                "every=1 until then). Nothing was written."
            )
        if not held_per_layer:
            return
        raise GradlensError(
            "`weights=gl.per_layer(...)` with unprobed steps under DDP: an unprobed step writes "
            "the held per-layer weights outside autograd, where DDP's reducer cannot average "
            "them. Use every=1 (the profiler averages every probed step), whole-model weights, "
            "or pass the unwrapped module as `model` (the profiler then averages every step). "
            "Nothing was written."
        )

    def _after(self, snap: Snapshot | None, wrote: bool) -> Snapshot | None:
        if wrote and not self._synced_step:
            self._average_grads()
        self._set_ddp_sync()
        return snap

    # -- internals -------------------------------------------------------------------------------
    def _set_ddp_sync(self) -> None:
        """Let DDP reduce the coming step unless it is probed (then the profiler reduces)."""
        sync = self._ddp is not None and not self.will_probe()
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = sync
        self._synced_step = sync

    def _broadcast(self, model: nn.Module) -> None:
        src = dist.get_global_rank(self._group, 0) if self._group is not None else 0
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=src, group=self._group)

    def _average_grads(self) -> None:
        """All-reduce (average) every gradient of ``model``, bucketed; None where unused."""
        params = self._params
        if not params:
            return
        used = torch.tensor(
            [p.grad is not None for p in params], dtype=torch.float32, device=params[0].device
        )
        dist.all_reduce(used, group=self._group)
        live = [p for p, u in zip(params, used.tolist()) if u > 0]
        for bucket in _buckets(live, self._bucket_bytes):
            flat = torch.cat(
                [
                    (
                        p.grad if p.grad is not None else torch.zeros_like(p, dtype=grad_dtype(p))
                    ).reshape(-1)
                    for p in bucket
                ]
            )
            dist.all_reduce(flat, group=self._group)
            flat.div_(self.world_size)
            k = 0
            for p in bucket:
                part = flat[k : k + p.numel()].view_as(p)
                k += p.numel()
                if p.grad is None:
                    part = part.to(grad_dtype(p))  # (a bucket's sum of mixed dtypes)
                    p.grad = part.clone() if part.stride() == p.stride() else new_grad(p, part)
                else:
                    p.grad.copy_(part)


def _unique(params: list[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _pack(
    groups: list[list[torch.Tensor]], nbytes: Callable[[list[torch.Tensor]], int], limit: int
) -> list[list[torch.Tensor]]:
    """Consecutive groups joined while their bytes stay within ``limit`` (a group that alone
    exceeds it stands alone); groups of different dtype or device are never joined."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for g in groups:
        n = nbytes(g)
        last = out[-1] if out else None
        if (
            last is None
            or last[0].dtype != g[0].dtype
            or last[0].device != g[0].device
            or size + n > limit
        ):
            out.append(list(g))
            size = n
        else:
            last.extend(g)
            size += n
    return out


def _buckets(params: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive parameters of one dtype and device, at most ``limit`` bytes a bucket."""
    return _pack([[p] for p in params], lambda g: g[0].numel() * g[0].element_size(), limit)


class _GlobalParams(Engine):
    """Per-task parameter gradients, all-reduced in layer chunks; Grams of their average."""

    def __init__(
        self, shared: SharedParams, n_tasks: int, group: dist.ProcessGroup | None, world: int
    ) -> None:
        super().__init__(shared, n_tasks)
        self.group = group
        self.world = world

    def _task_grads(
        self, ctx: BackwardContext, params: list[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        raise NotImplementedError

    def compute(self, ctx: BackwardContext) -> EngineResult:
        # every rank walks the same parameters in the same order, reached locally or not
        params = self.shared.params
        reached = {id(p) for p in ctx.reached}
        T = ctx.losses.shape[0]
        grams: dict[str, torch.Tensor] = {}
        hit: dict[str, bool] = {}
        for chunk in _layer_chunks(self.shared, params, T, ctx.memory_budget):
            grads = self._task_grads(ctx, chunk)
            rows = [
                torch.zeros((T, *p.shape), dtype=p.dtype, device=p.device) if g is None else g
                for p, g in zip(chunk, grads)
            ]
            for p, g in zip(chunk, rows):
                if id(p) in reached:
                    accumulate_grad(p, torch.tensordot(ctx.weights.to(g.dtype), g, dims=1))
            dtype = compute_dtype(rows[0].dtype)
            flags = torch.tensor(
                [[float(id(p) in reached) for p in chunk]] * T, dtype=dtype, device=rows[0].device
            )
            flat = torch.cat([*(g.reshape(T, -1).to(dtype) for g in rows), flags], dim=1)
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.world)
            k = 0
            per: list[torch.Tensor] = []
            for p in chunk:
                per.append(flat[:, k : k + p.numel()])
                k += p.numel()
            seen = (flat[0, k:] > 0).tolist()
            index = {id(p): i for i, p in enumerate(chunk)}
            for layer, ps in group_by_layer(self.shared, chunk).items():
                idx = [index[id(p)] for p in ps]
                hit[layer] = any(seen[i] for i in idx)
                grams[layer] = gram_of_rows([per[i] for i in idx])
        ordered = {layer: grams[layer] for layer in self.shared.layers if hit.get(layer)}
        return EngineResult(ordered, {layer: self.name for layer in ordered}, reached)


class _GlobalBatched(_GlobalParams):
    name = "batched"

    def _task_grads(
        self, ctx: BackwardContext, params: list[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        with unbatchable(self.name):  # a graph vmap cannot run: a GradlensError naming the fix
            return list(batched_grad(ctx.losses, params))


class _GlobalLoop(_GlobalParams):
    name = "loop"

    def _task_grads(
        self, ctx: BackwardContext, params: list[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        per_task = loop_task_grads(ctx.per_task(), params)
        return [torch.stack([g[k] for g in per_task]) for k in range(len(params))]


def _layer_chunks(
    shared: SharedParams, params: list[torch.Tensor], T: int, budget: int
) -> list[list[torch.Tensor]]:
    """Whole layers grouped so that a chunk's ``T x P_chunk`` gradients fit in ``budget``."""
    layers = [list(ps) for ps in group_by_layer(shared, params).values()]
    return _pack(layers, lambda ps: T * sum(p.numel() * p.element_size() for p in ps), budget)


class _GlobalFeatures(FeaturesEngine):
    """Representation-level Grams summed over ranks: ``(1/W^2) sum_r G^r``."""

    def __init__(
        self, shared: SharedParams, n_tasks: int, group: dist.ProcessGroup | None, world: int
    ) -> None:
        super().__init__(shared, n_tasks)
        self.group = group
        self.world = world

    def compute(self, ctx: BackwardContext) -> EngineResult:
        res = super().compute(ctx)
        out = {}
        for layer, G in res.layer_grams.items():
            G = G.clone()
            dist.all_reduce(G, group=self.group)
            out[layer] = G / self.world**2
        return EngineResult(out, res.rules, res.written)
