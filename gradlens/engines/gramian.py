"""The ``gramian`` engine: per-layer Grams from recorded activations and per-task output gradients.

Forward hooks record, for every shared module that has a rule (Linear, Conv), its input and the
autograd edge of its output, and the edges of the shared part's outputs. At a probed step one
weighted backward through the task heads captures each task's gradient at the shared outputs (see
:mod:`gradlens.engines._capture`; it also writes the heads' gradients), then batched backwards of
those T cotangents yield each task's gradient with respect to the recorded outputs (and, for
modules without a rule, directly with respect to their parameters: the exact generic fallback),
one segment between cut layers at a time (see :mod:`gradlens.engines._segments`; the profiler's
one index of the graph, :mod:`gradlens.engines._graph`, serves the heads' split, the check that
the losses reach the shared part only through its outputs, and the cut plan). Each rule turns
inputs and output gradients into the layer's Gram as soon as they arrive, without ever forming a
``T x P`` tensor for the whole model, and writes ``sum_t w_t g_t`` from the same quantities: there
is no second backward through the shared part. Linear layers of one shape whose gradients arrive
from the same backward call are computed together (one batched product for all of them, see
:mod:`gradlens.engines.rules._groups`): on small layers a probe is bound by the
per-call overhead, not the arithmetic.

A rule serves a module only when its parameters are used exactly once per recorded call in this
graph (counted on the autograd graph); a parameter also used outside the module's ``forward``
(weight tying, functional reuse) sends the module to the generic path, so results stay exact.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge
from torch.nn.modules.module import _global_forward_hooks as _GLOBAL_HOOKS

from gradlens.engines._base import (
    BackwardContext,
    Engine,
    EngineResult,
    SharedParams,
    accumulate_grad,
    accumulate_grads,
    batched_grad,
    batched_grad_from,
    gram_of_rows,
    group_by_layer,
    looped_grad_from,
    per_task_grad,
)
from gradlens.engines._batching import LEGACY_FAST, SDPA_NODE, segment_backward
from gradlens.engines._blocks import (
    Record,
    accumulate_own,
    block_numel,
    blocks_writer,
    rule_args,
)
from gradlens.engines._capture import capture_rows, split_heads, task_scales
from gradlens.engines._graph import GraphIndex
from gradlens.engines._segments import fed_tops, segmented
from gradlens.engines._shared import callable_module
from gradlens.engines._unbatchable import unbatchable
from gradlens.engines.rules import Rule, own_state_reason, served_modules
from gradlens.engines.rules._groups import GROUPED, grouped

__all__ = ["UNRECORDED", "GramianEngine"]

#: Note recorded when a probe finds no forward recorded by the hooks (see ``Snapshot.notes``).
UNRECORDED = "forward-not-recorded"


class GramianEngine(Engine):
    """Per-layer Grams from activations and output gradients; generic fallback per module."""

    name = "gramian"
    uses_hooks = True

    def __init__(self, shared: SharedParams, n_tasks: int) -> None:
        super().__init__(shared, n_tasks)
        self._recording = True
        self._records: dict[str, list[Record]] = {}
        self._boundary: list[Record] = []
        self._forwards = 0  # the shared root's forwards recorded (see KEEP_FORWARDS)
        self._tick_layer: str | None = None  # counts them where the root is never called
        self._last_layer: str | None = None  # (the layer whose call was recorded last)
        self._ends: str | None = None  # (the last layer a rule serves, in module order)
        self._first_hook: dict[str, int] = {}  # layer -> its hook's handle id
        self._modules: dict[str, tuple[nn.Module, Rule]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._finalizer: weakref.finalize[..., GramianEngine] | None = None
        self._attached = False
        self._plan: list[tuple[str, nn.Module, Rule]] | None = None
        #: how the second stage backpropagates the T cotangents through the shared part:
        #: ``"looped"`` (one backward per task), ``"vmap"`` (one batched backward per segment,
        #: chunked over tasks under the memory budget), or None for the default (``"vmap"``)
        self.stage: str | None = None
        #: whether the last probe's second stage ran one backward per task
        self.last_looped: bool | None = None

    # -- hooks -------------------------------------------------------------------------------
    def attach(self) -> None:
        self._attached = True
        if self._recording:
            self._install()

    def _install(self) -> None:
        """Register the forward hooks (a module with a forward hook takes torch's slower call
        path even when the hook returns at once: they are on only while a probed forward may
        come, see :meth:`set_recording`)."""
        root = self.shared.module
        if root is None or self._handles:
            return
        plan = self._served(root)
        self._tick_layer = None if callable_module(root) or not plan else plan[0][0]
        self._ends = plan[-1][0] if plan else None
        # (first, so that a root a rule serves has its layer's hook first: see below)
        self._handles.append(root.register_forward_hook(self._boundary_hook(), prepend=True))
        for layer, mod, rule in plan:
            self._modules[layer] = (mod, rule)
            # first among the module's hooks: a user's hook that returns a new output (noise,
            # clamping, steering) runs after, on the module's own output recorded here (one
            # registered later with prepend=True, or a global one, comes first: the hook then
            # records nothing and the layer takes the generic path)
            handle = mod.register_forward_hook(self._hook(layer, rule), prepend=True)
            self._first_hook[layer] = handle.id
            self._handles.append(handle)
        self._finalizer = weakref.finalize(self, _remove, list(self._handles))

    def _served(self, root: nn.Module) -> list[tuple[str, nn.Module, Rule]]:
        """The modules a rule serves, with their layers (planned once per parameter set)."""
        if self._plan is None:
            shared_ids = {id(p) for p in self.shared.all_params}
            self._plan = [
                (self.shared.layer_of[id(own[0])], mod, rule)
                for mod, own, rule in served_modules(root, shared_ids)
            ]
        return self._plan

    def shared_changed(self) -> None:
        """Plan and hook anew (the coming probe's records are kept: same modules, by layer)."""
        installed = bool(self._handles)
        self._uninstall()
        self._plan, self._modules = None, {}
        if installed:
            self._install()

    def _uninstall(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._handles.clear()

    def detach(self) -> None:
        self._attached = False
        self._uninstall()
        self._records.clear()
        self._boundary.clear()

    def set_recording(self, on: bool) -> None:
        self._recording = on
        if not on:
            self.discard()
        if self._attached:  # the hooks follow: on for a probed forward only
            if on:
                self._install()
            else:
                self._uninstall()

    def discard(self) -> None:
        self._records.clear()
        self._boundary.clear()

    def _boundary_hook(self) -> Callable[..., None]:
        """Record the output edges of the shared root module: the boundary to the task heads."""
        ref = weakref.ref(self)

        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            engine = ref()
            if engine is None or not engine._recording or not torch.is_grad_enabled():
                return
            if module is not engine.shared.module:  # a deep copy (an EMA teacher) carries it
                return
            leaves, _ = torch.utils._pytree.tree_flatten(output)
            n = engine._forwards
            for out in leaves:
                if isinstance(out, torch.Tensor) and out.requires_grad:
                    edge = get_gradient_edge(out)
                    engine._boundary.append(Record(out.detach(), edge, out.shape, out.dtype, n))
            engine._tick()

        return hook

    def _tick(self) -> None:
        """One more forward of the shared part: keep the records of the last KEEP_FORWARDS
        forwards at least (counted at the root's output, or, for a root that is never called,
        a ModuleList, at its first module that a rule serves)."""
        self._forwards = n = self._forwards + 1
        if n % KEEP_FORWARDS == 0:
            keep = n - KEEP_FORWARDS
            self._boundary = [r for r in self._boundary if r.forward >= keep]
            self._records = {
                k: kept for k, recs in self._records.items()
                if (kept := [r for r in recs if r.forward >= keep])
            }  # fmt: skip

    def _hook(self, layer: str, rule: Rule) -> Callable[..., None]:
        ref = weakref.ref(self)

        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            engine = ref()
            if engine is None or not engine._recording or not torch.is_grad_enabled():
                return
            if module is not engine._modules[layer][0]:  # a deep copy's (see the boundary's)
                return
            if layer == engine._tick_layer and engine._last_layer in (None, engine._ends):
                engine._tick()  # (a first module called again within a forward: no new one)
            engine._last_layer = layer
            if _GLOBAL_HOOKS or next(iter(module._forward_hooks)) != engine._first_hook[layer]:
                return  # another hook ran first and may have changed the output
            if rule.record is not None:  # a projection inside the module's forward
                got = rule.record(module, args, output)
                if got is not None:
                    engine._records.setdefault(layer, []).append(Record(*got, engine._forwards))
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            fn = output.grad_fn  # (GradientEdge directly: get_gradient_edge costs a call more)
            edge = get_gradient_edge(output) if fn is None else GradientEdge(fn, output.output_nr)
            engine._records.setdefault(layer, []).append(
                Record(x.detach(), edge, output.shape, output.dtype, engine._forwards)
            )

        return hook

    # -- compute -----------------------------------------------------------------------------
    def compute(self, ctx: BackwardContext) -> EngineResult:
        # a graph a batched backward cannot run (dropout recomputed by a non-reentrant
        # checkpoint, .item() in a backward, anomaly mode): an UnbatchableGraphError
        with unbatchable(self.name):
            return self._compute(ctx)

    def _compute(self, ctx: BackwardContext) -> EngineResult:
        records, self._records = self._records, {}
        boundary, self._boundary = self._boundary, []
        params = ctx.reached
        if not params:
            return EngineResult({})
        by_layer = group_by_layer(self.shared, params)
        notes = []
        # nothing recorded (a forward before the profiler, or off a probe): the generic path serves
        # all; a root never called (ModuleList) records by its modules, if a rule serves one
        root = self.shared.module
        if not (records or boundary) and root is not None:
            notes += [UNRECORDED] if self._served(root) or callable_module(root) else []
        rule_layers, generic = self._serve(ctx, records, by_layer)
        inputs: list[torch.Tensor | GradientEdge] = [
            r.edge for recs in rule_layers.values() for r in recs
        ]
        inputs += generic
        T = ctx.losses.shape[0]
        # a Gram weighting's step: keep every layer's T x output blocks (and the generic
        # layers' T x P_l gradients) when they fit the budget, to write J_l^T w_l afterwards
        keep = ctx.keep_blocks and (
            T * ctx.losses.element_size() * block_numel(rule_layers, generic)
            <= ctx.memory_budget
        )
        u, v, heads, stream = self._output_grads(ctx, inputs, boundary, rule_layers, generic)
        # rows carry u_t (see engines._capture): weight v in the sums, divide Grams by u_s u_t
        unscale = torch.outer(u, u).to(torch.float64).reciprocal()
        grams, rules, gen_grads, kept = self._rule_grams(
            stream, inputs, rule_layers, T, None if keep else v, unscale, ctx.memory_budget
        )
        for layer, ps in group_by_layer(self.shared, generic).items() if generic else ():
            grams[layer] = unscale * gram_of_rows([gen_grads[id(p)] for p in ps])
            rules[layer] = "generic"
            for p in ps if not keep else ():
                g = gen_grads[id(p)]
                accumulate_grad(p, torch.tensordot(v.to(g.dtype), g, dims=1))
        ordered = {layer: grams[layer] for layer in by_layer}
        written = {id(p) for p in params} | {id(p) for p in heads}
        if keep:
            write = blocks_writer(
                self.shared, self._modules, rule_layers, kept, by_layer, generic, gen_grads, u,
                ctx.memory_budget,
            )  # fmt: skip
            return EngineResult(
                ordered, {l_: rules[l_] for l_ in ordered}, set(), writer=write,
                engine=self.name, notes=notes,
            )  # fmt: skip
        return EngineResult(
            ordered, {l_: rules[l_] for l_ in ordered}, written, engine=self.name, notes=notes
        )

    def _serve(
        self,
        ctx: BackwardContext,
        records: Mapping[str, list[Record]],
        by_layer: Mapping[str, list[torch.Tensor]],
    ) -> tuple[dict[str, list[Record]], list[torch.Tensor]]:
        """The layers a rule serves (with their recorded calls in this graph) and the
        parameters of the others (the generic path)."""
        rule_layers: dict[str, list[Record]] = {}
        generic: list[torch.Tensor] = []
        for layer, ps in by_layer.items():
            live = [r for r in records.get(layer, ()) if r.edge.node in ctx.nodes]
            if (
                layer in self._modules
                and live
                and all(ctx.uses.get(id(p), 0) == len(live) for p in ps)
                # the rule computes every trainable parameter of its module: all must be here
                and {id(p) for p in ps} == _trainable(self._modules[layer][0])
                # its own forward on its own parameters (not replaced or parametrized since)
                and own_state_reason(self._modules[layer][0]) is None
            ):
                rule_layers[layer] = live
            else:
                generic.extend(ps)
        return rule_layers, generic

    def _rule_grams(
        self,
        stream: Iterator[list[tuple[int, torch.Tensor | None]]],
        inputs: list[torch.Tensor | GradientEdge],
        rule_layers: dict[str, list[Record]],
        T: int,
        v: torch.Tensor | None,
        unscale: torch.Tensor,
        budget: int,
    ) -> tuple[
        dict[str, torch.Tensor],
        dict[str, str],
        dict[int, torch.Tensor],
        dict[str, list[torch.Tensor | None]],
    ]:
        """Consume the output gradients, one backward call's batch at a time: each rule layer's
        Gram (and its weighted gradient written, unless ``v`` is None: the blocks are then kept
        for a writer), the generic parameters' per-task gradients. Layers of the built-in Linear
        rule completed in the same batch with the same shapes are computed together (see
        :func:`gradlens.engines.rules.linear.linear_group_stacked`). Returns Grams, rule names,
        generic gradients (by id), kept blocks."""
        kept: dict[str, list[torch.Tensor | None]] = {}
        # each layer's Gram is computed as soon as all its outputs' gradients are in, and its
        # T x N x out blocks are dropped then (the backward is cut between layers where it can)
        slot = [(layer, j) for layer, recs in rule_layers.items() for j in range(len(recs))]
        outs: dict[str, list[torch.Tensor | None]] = {
            layer: [None] * len(recs) for layer, recs in rule_layers.items()
        }
        left = {layer: len(recs) for layer, recs in rule_layers.items()}
        grams: dict[str, torch.Tensor] = {}
        rules: dict[str, str] = {}
        gen_grads: dict[int, torch.Tensor] = {}
        for batch in stream:
            ready: list[tuple[str, list[torch.Tensor | None]]] = []
            batch.reverse()
            while batch:
                i, d = batch.pop()
                if i >= len(slot):
                    p = inputs[i]
                    assert isinstance(p, torch.Tensor)
                    gen_grads[id(p)] = (
                        torch.zeros((T, *p.shape), dtype=p.dtype, device=p.device)
                        if d is None
                        else d
                    )
                    continue
                layer, j = slot[i]
                outs[layer][j] = d
                left[layer] -= 1
                if left[layer] == 0:
                    raw = outs.pop(layer)
                    if v is None:
                        kept[layer] = raw
                    ready.append((layer, raw))
            for names, G in self._serve_ready(ready, rule_layers, T, v, budget):
                G = unscale * G  # one product for a group's stacked Grams
                for layer, g in zip(names, G.unbind(0) if G.ndim == 3 else (G,)):
                    grams[layer] = g
                    rules[layer] = self._modules[layer][1].name
        return grams, rules, gen_grads, kept

    def _serve_ready(
        self,
        ready: list[tuple[str, list[torch.Tensor | None]]],
        rule_layers: dict[str, list[Record]],
        T: int,
        v: torch.Tensor | None,
        budget: int,
    ) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Run the rules of the layers completed in one batch; yield ``(layers, Grams)``: one
        layer and its Gram, or a group of layers and their Grams stacked ``(n, T, T)`` (weighted
        gradients written unless ``v`` is None: the writer writes once the weights are known).
        Single-call layers of one kind, shape and dtype (at least float32: half precision is
        widened per layer, as before) go through one grouped computation: Linear, HF Conv1D
        (see :func:`gradlens.engines.rules.linear.linear_group_stacked`), LayerNorm (see
        :func:`gradlens.engines.rules.norm.layer_norm_group`)."""
        groups: dict[tuple[object, ...], list[int]] = {}
        for k, (layer, raw) in enumerate(ready):
            recs = rule_layers[layer]
            d = raw[0]
            kind = GROUPED.get(self._modules[layer][1].fn)
            if kind is not None and len(recs) == 1 and d is not None:
                x = recs[0].input
                if d.dtype == x.dtype and d.dtype.is_floating_point and d.dtype.itemsize >= 4:
                    groups.setdefault((kind, x.shape, d.shape, d.dtype, d.device), []).append(k)
        done: set[int] = set()
        for key, members in groups.items():
            if len(members) < 2:
                continue
            mods = [self._modules[ready[k][0]][0] for k in members]
            xs = [rule_layers[ready[k][0]][0].input for k in members]
            ds = [d for k in members if (d := ready[k][1][0]) is not None]
            out = grouped(str(key[0]), mods, xs, ds, v, budget)
            del xs, ds
            if out is None:
                continue
            G, stacked = out
            ps = [_param(m, name) for name, _ in stacked for m in mods]
            accumulate_grads(ps, [g for _, gs in stacked for g in gs.unbind(0)])
            done.update(members)
            yield [ready[k][0] for k in members], G
        for k, (layer, raw) in enumerate(ready):
            if k not in done:
                mod, rule = self._modules[layer]
                ins, got = rule_args(rule_layers[layer], raw, T)
                G, weighted = rule.fn(mod, ins, got, v, budget)
                del ins, got
                accumulate_own(mod, weighted)
                yield [layer], G

    def _output_grads(
        self,
        ctx: BackwardContext,
        inputs: list[torch.Tensor | GradientEdge],
        boundary: list[Record],
        rule_layers: dict[str, list[Record]],
        generic: list[torch.Tensor],
    ) -> tuple[
        torch.Tensor,
        torch.Tensor,
        list[torch.Tensor],
        Iterator[list[tuple[int, torch.Tensor | None]]],
    ]:
        """Every task's gradient w.r.t. each input (layer output edges, generic parameters).

        Returns ``u``, the weights ``v`` for the weighted sums, the head leaves whose ``.grad``
        was written on the way, and an iterator of ``(index in inputs, gradient)`` (row t scaled
        by ``u_t``; None where no task reaches the input), in the order they become available.

        Two stages when the losses reach the shared part only through its outputs: the rows at
        the shared outputs, from one weighted backward through the heads with a hook per head
        (which also writes the heads' gradients; see :mod:`gradlens.engines._capture`), or from
        one small backward per task where heads share a node; then batched backwards of the T
        cotangents from there through the shared part, one per segment between cut layers (see
        :mod:`gradlens.engines._segments`); on CPU under ``torch.func.vmap``, chunked over tasks
        under the memory budget (see :func:`~gradlens.engines._batching.segment_backward`);
        one backward per task instead with ``stage="looped"``. Otherwise (a loss reaches shared
        parameters another way, e.g. a head tied to a shared weight) one batched backward from
        the losses.
        """
        # each shared output once (a tensor returned twice, ``return z, z``, is one output)
        live = list({(b.edge.node, b.edge.output_nr): b for b in boundary}.values())
        live = [b for b in live if b.edge.node in ctx.nodes]
        T = ctx.losses.shape[0]
        plain: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]] = (
            torch.ones_like(ctx.weights),
            ctx.weights,
            [],
        )
        if not live:
            return *plain, _from_losses(ctx, inputs)
        stop = {b.edge.node for b in live}
        inside = {r.edge.node for recs in rule_layers.values() for r in recs}
        graph = ctx.graph if ctx.graph is not None else GraphIndex.build(ctx.losses)
        if graph.reaches_past(stop, inside, {id(p) for p in self.shared.params}):
            return *plain, _from_losses(ctx, inputs)
        edges = [b.edge for b in live]
        shapes = [b.out_shape for b in live]
        dtypes = [b.input.dtype for b in live]
        split = split_heads(ctx.per_task(), edges, ctx.uses, dtypes, graph)
        if fed_tops(edges, graph) and (split is None or task_scales(ctx.weights)[2]):
            # a shared output computed from another (``return z, f(z)``): a task's gradient at
            # z taken by its own backward (no split heads, or a task of tiny weight computed
            # alone) holds the flow back through f, which the second stage would add again
            return *plain, _from_losses(ctx, inputs)
        if split is None:
            cot = per_task_grad(ctx.per_task(), edges, shapes)
            u, v, heads = plain
        else:
            heads = split.leaves if ctx.write else []
            # no workspace: the rows are the first segment's cotangents, freed once it is done
            cot, u, v = capture_rows(ctx, edges, shapes, split, heads)
        looped = self.last_looped = self._looped(ctx, rule_layers, generic)
        # the backward frees the graph, as a plain backward would, unless the profiler still
        # has leaves to reach (those neither shared nor in the heads) or the caller keeps it
        done = {id(p) for p in ctx.reached} | {id(p) for p in heads}
        keep = ctx.retain_graph or not ctx.write or not set(ctx.leaves) <= done
        itemsize = cot[0].element_size()
        shape_of = {r.edge: r.out_shape for recs in rule_layers.values() for r in recs}
        sizes = [
            T * itemsize * (x.numel() if isinstance(x, torch.Tensor) else shape_of[x].numel())
            for x in inputs
        ]
        fast = ctx.losses.device.type == "cpu" and not _reduced(ctx, rule_layers)
        backward: Callable[..., Sequence[torch.Tensor | None]]
        if looped or not fast:
            backward = looped_grad_from if looped else batched_grad_from
        else:  # on CPU: the batching by the node types the second stage runs
            below = graph.types_between([e.node for e in edges], [_node(x) for x in inputs])
            legacy = below <= LEGACY_FAST
            note = lambda: setattr(self, "last_looped", True)  # noqa: E731  # a segment looped
            backward = segment_backward(
                shape_of, itemsize, ctx.memory_budget, self.stage == "vmap", note,
                loop_above=LOOP_ABOVE, legacy=legacy, rules=not legacy and SDPA_NODE in below,
            )  # fmt: skip
        # segments are merged while their blocks together stay under an eighth of the budget:
        # on small layers one backward call costs less than the memory it would save
        limit = ctx.memory_budget // 8
        return u, v, heads, segmented(edges, cot, inputs, sizes, limit, backward, keep, graph)

    def _looped(
        self,
        ctx: BackwardContext,
        rule_layers: dict[str, list[Record]],
        generic: list[torch.Tensor],
    ) -> bool:
        """Whether every segment runs one backward per task (``stage="looped"``); by default
        vmapped (``segment_backward``), except under autocast on CPU, where functorch's convolution
        rule mixes bf16 and float32: per task there unless Linear-only (legacy vmap then)."""
        if self.stage is not None:
            return self.stage == "looped"
        return _reduced(ctx, rule_layers) and (
            bool(generic) or any(self._modules[layer][1].name != "linear" for layer in rule_layers)
        )


def _from_losses(
    ctx: BackwardContext, inputs: list[torch.Tensor | GradientEdge]
) -> Iterator[list[tuple[int, torch.Tensor | None]]]:
    """The inputs' gradients from one batched backward of the T losses (exact in every case)."""
    return iter([list(enumerate(batched_grad(ctx.losses, inputs)))])


def _reduced(ctx: BackwardContext, rule_layers: Mapping[str, list[Record]]) -> bool:
    """On CPU, whether a recorded layer output is narrower than float32 (autocast)."""
    dts = {r.out_dtype for recs in rule_layers.values() for r in recs} | {ctx.losses.dtype}
    narrow = any(d.is_floating_point and torch.finfo(d).bits < 32 for d in dts)
    return narrow and ctx.losses.device.type == "cpu"


#: Forwards of the shared root whose recorded calls are kept until a probe uses them: a forward
#: no probe follows (a validation loop left with grad enabled, a step backpropagated plainly)
#: kept its activations and graph alive until the next probe, without bound. The records of
#: older forwards are dropped (a probe whose graph still holds such a call serves that layer by
#: the exact generic path); one step may use up to this many forwards (Siamese inputs,
#: multi-crop views) with every layer served by its rule.
KEEP_FORWARDS = 16

#: Per-task bytes of a segment's largest block above which the CPU second stage loops over tasks
#: (one thread, T = 8, vmapped against looped: our BatchNorm CNN at batch 128 1.48x, at batch 4
#: 1.02x; the ``gradlens bench --zoo`` trunks at batch 4, all below, 0.73x-0.94x).
LOOP_ABOVE = 2**20


def _node(x: torch.Tensor | GradientEdge) -> Node:
    return x.node if isinstance(x, GradientEdge) else get_gradient_edge(x).node


def _param(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>``, from ``_parameters`` when registered (skips ``Module.__getattr__``)."""
    p = module._parameters.get(name)
    if p is None:
        p = getattr(module, name)
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"internal: {type(module).__name__}.{name} is not a tensor")
    return p


def _trainable(module: nn.Module) -> set[int]:
    """Ids of the module's own parameters that require grad (``parameters(recurse=False)``,
    read from ``_parameters`` directly: the generator costs more than the set, per layer and
    probe)."""
    return {id(p) for p in module._parameters.values() if p is not None and p.requires_grad}


def _remove(handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    for h in handles:
        h.remove()
