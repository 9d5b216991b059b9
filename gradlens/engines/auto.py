"""The ``auto`` engine (the default): the fastest exact engine for this model, timed on its probes.

Every candidate (``loop``, ``batched``, ``gramian``) is exact, so which one serves a probe never
changes a number; only the time differs, by model, device, dtype and task count. ``auto`` times
whole probes (the engine plus the backward to the leaves it left, e.g. the task heads; CPU time
of the process on CPU, synchronized wall time on CUDA), one candidate per probe, and keeps the
fastest for the rest of the run:

- on CPU the ``gramian`` engine is timed twice over when its default second stage ran a
  segment with one backward per task (a segment with large per-task blocks, see
  :data:`gradlens.engines.gramian.LOOP_ABOVE`): as ``gramian`` and as ``gramian-vmap`` (every
  segment vmapped); where its default vmapped every segment the two are the same run, timed once;
- round 1 times each candidate once (``loop`` first: the first probe of a process also pays
  one-time costs, and ``loop`` pays the least of them);
- round 2 times again each candidate within :data:`CLOSE` of the best (a first probe also
  pays the candidate's one-time costs: it only weeds out the far slower candidates, and is left
  out of a candidate's time once it has a second);
- rounds 3 to :data:`MAX_ROUNDS` time again the candidates still within :data:`MARGIN` of the
  leader, as long as there are two of them: every round is interleaved (``A B C A B C``), so a
  slow spell of the machine hits the candidates alike, and only candidates that a noisy timing
  could swap pay for more timings (a probe of one of them costs at most ``MARGIN`` times the
  leader's);
- the winner, the candidate with the fastest timed probe after its first, then serves every
  probe.

A graph where a shared parameter's gradient is sparse (``nn.Embedding(..., sparse=True)``,
``torch.gather(..., sparse_grad=True)``, a custom ``autograd.Function`` whose backward returns
a sparse tensor: the profiler's graph index finds them before the engine runs, see
:meth:`gradlens.engines._graph.GraphIndex.sparse_leaves`) is served by ``loop``, untimed: the
batched candidates cannot take a sparse gradient. The Snapshot's notes say so
(:data:`SPARSE_NOTE`). So is a graph where a torch.compile'd model around the shared module
reads its parameters in a compiled graph, which the batched candidates cannot run through
(:data:`COMPILED_NOTE`).

The decision is kept per graph shape: the shapes of the shared module's outputs (the batch size,
the sequence length), the number of autograd nodes, the device, the dtype and T. A new shape
(e.g. the last, smaller batch of an epoch) is timed anew; a shape seen before reuses its winner.
Each probe's engine and the timings of its shape are in the Snapshot (``engine``, ``timings``).

The decisions are state: :meth:`AutoEngine.state_dict` holds them (per graph shape, the times
of every timed probe and the winner) and :meth:`AutoEngine.load_state_dict` restores them, so a
training run resumed from a checkpoint (:meth:`gradlens.train.Trainer.state_dict` keeps them)
serves each shape with the engine the interrupted run chose instead of timing anew: the
candidates are exact but not bit-identical (float rounding), and a fresh timing could pick
another one. Two separate runs still time separately: for bit-identical numbers across runs,
name the engine.

Example:
    >>> import torch, gradlens as gl
    >>> trunk, head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    >>> prof = gl.Profiler(trunk, tasks=["a", "b"])  # engine="auto"
    >>> for step in range(6):
    ...     out = head(trunk(torch.randn(5, 3)))
    ...     snap = prof.backward({"a": out[:, 0].mean(), "b": out[:, 1].mean()})
    >>> snap.engine in ("loop", "batched", "gramian"), sorted(snap.timings)[:1]
    (True, ['batched'])
    >>> prof.close()
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from gradlens._errors import GradlensError
from gradlens.engines._base import BackwardContext, Engine, EngineResult, SharedParams
from gradlens.engines._shared import callable_module
from gradlens.engines.batched import BatchedEngine
from gradlens.engines.gramian import GramianEngine
from gradlens.engines.loop import LoopEngine

__all__ = [
    "CANDIDATES",
    "CLOSE",
    "COMPILED_NOTE",
    "KEY_MODULES",
    "MARGIN",
    "MAX_ROUNDS",
    "SPARSE_NOTE",
    "STATE_FORMAT",
    "AutoEngine",
    "Decision",
]

#: The exact candidates, in the order of the first round.
CANDIDATES: tuple[type[Engine], ...] = (LoopEngine, BatchedEngine, GramianEngine)
#: Round 2 times again every candidate whose round-1 time is within this factor of the best.
#: Round 1 only weeds out the far slower candidates: each candidate's first probe also pays its
#: one-time costs (its buffers' page faults: ResNet T = 3, ``loop`` 39 ms cold against 12 ms
#: warm), so a close one can look 2x slower in it.
CLOSE = 3.0
#: From round 3 on, a candidate is timed again while its best time is within this factor of
#: the leader's: the rounds go on only for the candidates that a noisy timing could still swap.
MARGIN = 1.1
#: At most this many rounds (every candidate still close is timed once a round, interleaved).
MAX_ROUNDS = 5
#: Where the shared root is never called itself, the decisions are keyed by the call shapes of
#: at most this many of the modules called below it (a hook each, at every forward).
KEY_MODULES = 2
#: Version of :meth:`AutoEngine.state_dict`.
STATE_FORMAT = 1
#: The note of a probe ``auto`` served by ``loop`` untimed: a shared parameter's gradient is
#: sparse, which the batched candidates cannot take.
SPARSE_NOTE = "auto-loop:sparse-grad"
#: Note of a probe served by ``loop`` because a torch.compile'd graph reads shared parameters (a
#: compiled model around the shared module), which the batched candidates cannot run through.
COMPILED_NOTE = "auto-loop:compiled"


@dataclass
class Decision:
    """The timings of one graph shape, and its winner once every round is done.

    The rounds are interleaved (every candidate still in the running once per round, in the
    candidates' order: ``A B C A B C``, so a slow spell of the machine hits them alike), and
    which candidates are in a round follows from the times alone, so a decision restored from
    :meth:`AutoEngine.state_dict` goes on exactly as the interrupted one would have.
    """

    #: candidate -> seconds of each of its timed probes
    times: dict[str, list[float]] = field(default_factory=dict)
    winner: str | None = None

    def best(self) -> dict[str, float]:
        """Each timed candidate's fastest probe after its first (which pays one-time costs),
        in seconds; its first while it has only one.

        Example:
            >>> Decision({"loop": [3.0, 1.2, 1.1], "batched": [2.0]}).best()
            {'loop': 1.1, 'batched': 2.0}
        """
        return {name: min(ts[1:] or ts) for name, ts in self.times.items()}

    def in_round(self, k: int, order: Sequence[str]) -> list[str]:
        """The candidates timed in round ``k`` (1-based), from the times of the rounds before
        it: every candidate in round 1; in round ``k`` those of round ``k - 1`` whose time (as
        :meth:`best`, over rounds ``1 .. k - 1``) is within :data:`CLOSE` (round 2) or
        :data:`MARGIN` (later rounds) of the fastest of them. Needs rounds ``1 .. k - 1`` done.

        Example:
            >>> d = Decision({"loop": [3.5], "batched": [1.0], "gramian": [1.2]})
            >>> d.in_round(2, ["loop", "batched", "gramian"])
            ['batched', 'gramian']
        """
        alive = list(order)
        for r in range(2, k + 1):
            best = Decision({n: self.times[n][: r - 1] for n in alive}).best()
            lead = min(best.values())
            factor = CLOSE if r == 2 else MARGIN
            alive = [n for n in alive if best[n] <= factor * lead]
        return alive

    def next_candidate(self, order: Sequence[str]) -> str | None:
        """The candidate to time on the next probe, or None when every round is done: after
        :data:`MAX_ROUNDS` rounds, or once a round would time a single candidate.

        Example:
            >>> d = Decision({"loop": [3.5], "batched": [1.0], "gramian": [1.2]})
            >>> d.next_candidate(["loop", "batched", "gramian"])
            'batched'
            >>> d.times["batched"].append(1.0); d.times["gramian"].append(1.5)
            >>> d.next_candidate(["loop", "batched", "gramian"]) is None  # 1.5 > MARGIN * 1.0
            True
        """
        for name in order:  # round 1
            if name not in self.times:
                return name
        for k in range(2, MAX_ROUNDS + 1):
            alive = self.in_round(k, order)
            if len(alive) < 2:
                return None
            for name in alive:
                if len(self.times[name]) < k:
                    return name
        return None

    def pick(self) -> str:
        """The winner once the rounds are done: the fastest candidate by :meth:`best`."""
        best = self.best()
        return min(best, key=best.__getitem__)


class AutoEngine(Engine):
    """Times the exact engines on the first probes of each graph shape and keeps the fastest."""

    name = "auto"
    sparse_grads = True  # served by its loop candidate
    uses_hooks = True

    def __init__(
        self, shared: SharedParams, n_tasks: int, only: Sequence[str] | None = None
    ) -> None:
        super().__init__(shared, n_tasks)
        #: candidate name -> engine (``only`` restricts them, e.g. to ``loop`` for a
        #: torch.compile'd trunk, through which the vmap engines cannot run)
        self.candidates: dict[str, Engine] = {
            c.name: c(shared, n_tasks) for c in CANDIDATES if only is None or c.name in only
        }
        #: what is timed: name -> (engine, gramian second stage)
        self.variants: dict[str, tuple[Engine, str | None]] = {
            name: (e, None) for name, e in self.candidates.items()
        }
        if "gramian" in self.candidates:
            self.variants["gramian-vmap"] = (self.candidates["gramian"], "vmap")
        self.decisions: dict[tuple[object, ...], Decision] = {}
        #: shapes seen by the shape hooks since the last probe, by module (see :meth:`key`)
        self._seen: dict[int, tuple[tuple[int, ...], ...]] = {}
        self._recording = True
        #: the shape hooks: the shared root's first (when it has a forward), then the modules
        #: called below it (see :func:`_frontier`) until a probe finds the root called
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._keyed: dict[int, nn.Module] = {}
        self._root_hooked = False
        #: whether the hooked candidates' hooks are installed (see :meth:`_attach_hooked`)
        self._hooked_on = False
        #: whether a probe was served by ``loop`` for a sparse gradient (see :meth:`_sparse`)
        self._served_sparse = False

    def attach(self) -> None:
        for e in self.candidates.values():
            if not e.uses_hooks:
                e.attach()
        self._attach_hooked(self._hooks_needed())
        self._hook_shapes()

    def _hook_shapes(self) -> None:
        """Hook the modules whose call shapes key the decisions (see :meth:`key`)."""
        self._unhook_shapes()
        root = self.shared.module
        if root is None:
            return
        mods = _frontier(root)
        self._root_hooked = bool(mods) and mods[0] is root
        hook = self._shape_hook
        self._keyed = dict(enumerate(mods))  # (a hook checks its module: a deep copy carries it)
        self._handles = {i: m.register_forward_hook(hook(i)) for i, m in enumerate(mods)}

    def _unhook_shapes(self) -> None:
        for h in self._handles.values():
            h.remove()
        self._handles = {}

    def shared_changed(self) -> None:
        for e in self.candidates.values():
            e.shared_changed()
        if self._handles:  # the modules below the root may have been replaced too
            self._hook_shapes()

    def detach(self) -> None:
        for e in self.candidates.values():
            e.detach()
        self._hooked_on = False
        self._unhook_shapes()

    def _attach_hooked(self, on: bool) -> None:
        """Install the hooks of the candidates that record the forward (``gramian``) only while
        one may serve a probe: a module with a forward hook takes torch's slower call path even
        when the hook returns at once (ConvNeXt T = 3: 18 hooked modules, ~0.2 ms of a 12 ms
        probed step, and the same on every unprobed step)."""
        if on == self._hooked_on:
            return
        for e in self.candidates.values():
            if e.uses_hooks:
                if on:
                    e.attach()
                else:
                    e.detach()
        self._hooked_on = on

    def set_recording(self, on: bool) -> None:
        self._recording = on
        needed = self._hooks_needed()
        self._attach_hooked(needed)
        for e in self.candidates.values():
            # a candidate's recording hooks cost the probed forward (BERT, ViT at batch 4: 0.2
            # to 0.3 ms of a 1.2 ms forward): on only when it may serve the coming probe
            e.set_recording(on and needed if e.uses_hooks else on)

    def _hooks_needed(self) -> bool:
        """Whether the next probe may be served by a candidate that records the forward: a
        decision's winner or next candidate, or the first candidate of a new graph shape."""
        if self.variants[self._order("cpu")[0]][0].uses_hooks:
            return True
        for key, d in self.decisions.items():
            name = d.winner or d.next_candidate(self._order(str(key[2])))
            if name is None or self.variants[name][0].uses_hooks:
                return True
        return False

    def _order(self, device_type: str) -> list[str]:
        """The variants timed on this device type, in round order (off CPU the gramian engine
        vmaps already: nothing more to time)."""
        return [n for n in self.variants if n != "gramian-vmap" or device_type == "cpu"]

    def discard(self) -> None:
        for e in self.candidates.values():
            e.discard()

    def _shape_hook(self, index: int) -> Callable[..., None]:
        ref = weakref.ref(self)

        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            engine = ref()
            # (module: a deep copy of the model, an EMA teacher, carries the hook along)
            if engine is None or not engine._recording or module is not engine._keyed.get(index):
                return
            if isinstance(output, torch.Tensor) and all(isinstance(a, torch.Tensor) for a in args):
                leaves: list[Any] = [*args, output]  # the common case, without a pytree walk
            else:
                leaves, _ = torch.utils._pytree.tree_flatten((args, output))
            shapes = tuple(tuple(x.shape) for x in leaves if isinstance(x, torch.Tensor))
            engine._seen[index] = shapes

        return hook

    def key(self, ctx: BackwardContext) -> tuple[object, ...]:
        """The graph shape a decision is kept for (see the module docstring): the shapes of the
        shared root's last call; where the root is never called (a ``ModuleList`` of the trunk's
        pieces, a model whose parts are called one by one), those of the modules called below
        it, the first :data:`KEY_MODULES` of them in module order. Once a probe has seen the
        root called, only its hook stays; else the hooks of the modules the key takes."""
        L = ctx.losses
        seen = self._seen
        keep = [0] if self._root_hooked and 0 in seen else sorted(seen)[:KEY_MODULES]
        shapes = tuple(s for i in keep for s in seen[i])
        if keep and len(self._handles) > len(keep):  # each hook costs every forward
            for i in set(self._handles) - set(keep):
                self._handles.pop(i).remove()
        return (shapes, len(ctx.nodes), L.device.type, L.dtype, L.shape[0])

    def compute(self, ctx: BackwardContext) -> EngineResult:
        if ctx.sparse and any(id(p) in ctx.sparse for p in ctx.reached):
            return self._sparse(ctx)
        if ctx.graph is not None and ctx.graph.compiled_reads({id(p) for p in ctx.reached}):
            return self._sparse(ctx, COMPILED_NOTE)
        key = self.key(ctx)
        self._seen = {}
        decision = self.decisions.get(key)
        if decision is None:
            decision = self.decisions[key] = Decision()
        if decision.winner is not None:
            # decided: the winner alone, as if called directly (the profiler backpropagates to
            # the leaves it left, e.g. the heads)
            engine = self._variant(decision.winner)
            result = engine.compute(ctx)
            self._discard_others(engine)
            result.engine = engine.name
            result.timings = decision.best()
            return result
        order = self._order(ctx.losses.device.type)
        name = decision.next_candidate(order)
        assert name is not None
        engine = self._variant(name)
        clock = _clock_for(ctx.losses.device)
        t0 = clock()
        result = engine.compute(ctx)
        if ctx.write:
            # the backward to every other leaf (the task heads) is part of the probe's cost
            rest = [v for i, v in ctx.leaves.items() if i not in result.written]
            if rest:
                torch.autograd.backward(
                    ctx.weights @ ctx.losses, inputs=rest, retain_graph=ctx.retain_graph
                )
            result.written |= set(ctx.leaves)
        decision.times.setdefault(name, []).append(clock() - t0)
        if name == "gramian" and isinstance(engine, GramianEngine) and not engine.last_looped:
            # its default vmapped every segment: the same run as gramian-vmap
            decision.times.setdefault("gramian-vmap", decision.times[name])
        if decision.next_candidate(order) is None:
            decision.winner = decision.pick()
            self._release_losers()
            result.notes.append(f"auto-chose:{decision.winner}")
        self._discard_others(engine)
        result.engine = engine.name
        result.timings = decision.best()
        return result

    def _variant(self, name: str) -> Engine:
        """The engine of variant ``name``, set to run as that variant."""
        engine, stage = self.variants[name]
        if isinstance(engine, GramianEngine):
            engine.stage = stage
        return engine

    def _discard_others(self, engine: Engine) -> None:
        """Drop what the other candidates' hooks recorded of this probe's forward."""
        for e in self.candidates.values():
            if e is not engine and e.uses_hooks:
                e.discard()

    def _sparse(self, ctx: BackwardContext, note: str = "") -> EngineResult:
        """A graph where a shared parameter gets a sparse gradient (``nn.Embedding(...,
        sparse=True)``, a custom Function's sparse backward: the profiler's graph index finds
        them before the engine runs), or that a compiled model around the shared module makes
        a compiled graph reading its parameters: served by ``loop``, the one candidate that
        takes it, without timing; the Snapshot's notes say why (:data:`SPARSE_NOTE`,
        :data:`COMPILED_NOTE`)."""
        self._seen = {}
        self._served_sparse = True
        engine = self.candidates["loop"]
        result = engine.compute(ctx)
        self._discard_others(engine)
        result.engine = engine.name
        result.notes.append(note or SPARSE_NOTE)
        return result

    def _release_losers(self) -> None:
        """Free the kept buffers of every candidate that no decision chose (the loop engine
        holds ``T x P`` between probes); one timed again for a new shape allocates anew."""
        winners = {self.variants[d.winner][0] for d in self.decisions.values() if d.winner}
        for e in self.candidates.values():
            if e not in winners:
                e.release()

    def summary(self) -> list[dict[str, object]]:
        """The decisions made so far, JSON-ready (the run's ``meta["auto"]``)."""
        return [
            {**_key_json(key), "winner": d.winner, "seconds": d.best()}
            for key, d in self.decisions.items()
            if d.winner is not None
        ]

    def state_dict(self) -> dict[str, object]:
        """The decisions, finished or still timing: only lists, dicts, numbers and strings (so
        ``torch.load(..., weights_only=True)`` reads a saved one back).

        Example:
            >>> import torch, gradlens as gl
            >>> trunk = torch.nn.Linear(3, 2)
            >>> prof = gl.Profiler(trunk, tasks=["a", "b"])
            >>> for _ in range(4):
            ...     out = trunk(torch.randn(5, 3))
            ...     _ = prof.backward({"a": out[:, 0].mean(), "b": out[:, 1].mean()})
            >>> state = prof._engine.state_dict()
            >>> state["format"], sorted(state["decisions"][0])
            (1, ['device', 'dtype', 'graph_nodes', 'shapes', 'tasks', 'times', 'winner'])
            >>> prof.close()
        """
        decisions = [
            {
                **_key_json(key),
                "times": {name: list(ts) for name, ts in d.times.items()},
                "winner": d.winner,
            }
            for key, d in self.decisions.items()
        ]
        return {"format": STATE_FORMAT, "decisions": decisions}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Replace the decisions with those of a :meth:`state_dict`: a graph shape seen there is
        served by its recorded winner (or goes on with its timing rounds) without timing anew.

        A decision naming a candidate this engine does not time (e.g. saved by an ``auto``
        restricted to ``loop`` for a compiled trunk, or the reverse) is left out: that shape is
        timed anew. Raises :class:`~gradlens.GradlensError` for anything that is not a
        :meth:`state_dict`, changing nothing.
        """
        decisions = _parse_state(state)
        for d in decisions.values():
            if "gramian" in d.times and d.times.get("gramian-vmap") == d.times["gramian"]:
                # one run timed for both (its default vmapped every segment): one list again,
                # so the next rounds time it once, as the interrupted run would have
                d.times["gramian-vmap"] = d.times["gramian"]
        self.decisions = {
            key: d
            for key, d in decisions.items()
            if set(d.times) <= set(self.variants) and d.winner in (None, *self.variants)
        }
        # the candidates' recording hooks follow the restored decisions from the next forward
        self.set_recording(self._recording)

    def describe(self) -> str:
        """The winners so far, e.g. ``gramian`` or ``gramian-vmap/batched`` (by graph shape)."""
        winners = [d.winner for d in self.decisions.values() if d.winner is not None]
        if self._served_sparse:
            winners.append("loop")
        if not winners:
            return "timing"
        return "/".join(dict.fromkeys(winners))


def _frontier(root: nn.Module) -> list[nn.Module]:
    """The modules whose calls key ``auto``'s decisions: the root (when it has a ``forward``:
    ``nn.ModuleList`` and ``nn.ModuleDict`` have none), then its children, each replaced by its
    own children while it has no ``forward``.

    >>> body = nn.Sequential(nn.Linear(2, 2))
    >>> [type(m).__name__ for m in _frontier(nn.ModuleList([body, nn.ModuleDict({"a": body})]))]
    ['Sequential']
    >>> [type(m).__name__ for m in _frontier(body)]
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


def _clock_for(device: torch.device) -> Callable[[], float]:
    """CPU time of the process on CPU (robust to other processes taking the cores while a
    candidate runs: one descheduling would otherwise decide the choice); wall time read after
    ``torch.cuda.synchronize()`` on CUDA."""
    if device.type == "cuda":

        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return now
    return time.process_time


def _parse_state(state: object) -> dict[tuple[object, ...], Decision]:
    """The decisions of an :meth:`AutoEngine.state_dict`, keyed as :meth:`AutoEngine.key`."""
    found = type(state).__name__
    if isinstance(state, Mapping):
        found = f"format {state.get('format')!r}"
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise GradlensError(
            f"`state` should be an AutoEngine.state_dict() of format {STATE_FORMAT}; found {found}."
        )
    out: dict[tuple[object, ...], Decision] = {}
    try:
        for d in cast("list[dict[str, Any]]", state["decisions"]):
            dtype = getattr(torch, str(d["dtype"]))
            if not isinstance(dtype, torch.dtype):
                raise TypeError(f"dtype {d['dtype']!r}")
            shapes = tuple(tuple(int(n) for n in s) for s in d["shapes"])
            key = (shapes, int(d["graph_nodes"]), str(d["device"]), dtype, int(d["tasks"]))
            times = {str(k): [float(t) for t in ts] for k, ts in d["times"].items()}
            winner = None if d["winner"] is None else str(d["winner"])
            out[key] = Decision(times=times, winner=winner)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise GradlensError(
            "`state` should be an AutoEngine.state_dict() (per graph shape: shapes, graph_nodes, "
            f"device, dtype, tasks, times, winner); found an entry it cannot read ({exc!r})."
        ) from None
    return out


def _key_json(key: tuple[object, ...]) -> dict[str, object]:
    """A decision's graph-shape key as JSON (its first item is the tuple of output shapes)."""
    shapes, nodes, device, dtype, T = key
    shapes = cast("tuple[tuple[int, ...], ...]", shapes)
    return {
        "shapes": [list(s) for s in shapes],
        "graph_nodes": nodes,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "tasks": T,
    }
