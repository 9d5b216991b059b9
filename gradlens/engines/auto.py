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

A graph that a batched (vmap) backward cannot run though a backward per task can (dropout
inside a non-reentrant activation checkpoint, recomputed under vmap; ``.item()`` or a branch on
a value in a custom Function's backward; anomaly mode: see :mod:`gradlens.engines._unbatchable`)
makes ``batched`` or ``gramian`` raise an
:class:`~gradlens.engines._unbatchable.UnbatchableGraphError`: the candidate is dropped for that
graph shape (:meth:`Decision.drop`; the Snapshot's notes say
``auto-dropped:<candidate>:<reason>``, the decision keeps it, ``repr(prof)`` shows it), its
``.grad`` writes are undone, and the same probe is served by the next candidate, ``loop`` last.
Any other error propagates as raised.

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
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch

from gradlens._errors import GradlensError
from gradlens.engines._base import (
    BackwardContext,
    Engine,
    EngineResult,
    SharedParams,
    grads_atomic,
)
from gradlens.engines._shapekey import ShapeKey
from gradlens.engines._unbatchable import UnbatchableGraphError
from gradlens.engines.batched import BatchedEngine
from gradlens.engines.gramian import GramianEngine
from gradlens.engines.loop import LoopEngine

__all__ = [
    "CANDIDATES",
    "CLOSE",
    "COMPILED_NOTE",
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
    #: candidate -> why it cannot run this graph (:attr:`UnbatchableGraphError.reason`): it is
    #: neither timed nor chosen for this graph shape any more (see :meth:`drop`)
    dropped: dict[str, str] = field(default_factory=dict)

    def best(self) -> dict[str, float]:
        """Each timed candidate's fastest probe after its first (which pays one-time costs),
        in seconds; its first while it has only one. Dropped candidates are left out.

        Example:
            >>> Decision({"loop": [3.0, 1.2, 1.1], "batched": [2.0]}).best()
            {'loop': 1.1, 'batched': 2.0}
        """
        return {
            name: min(ts[1:] or ts) for name, ts in self.times.items() if name not in self.dropped
        }

    def live(self, order: Sequence[str]) -> list[str]:
        """The candidates of ``order`` that are not dropped."""
        return [n for n in order if n not in self.dropped] if self.dropped else list(order)

    def drop(self, name: str, reason: str) -> list[str]:
        """Drop candidate ``name``, which cannot run this graph (``reason``), for this graph
        shape: ``gramian`` takes ``gramian-vmap`` with it (a vmapped segment failed; vmapping
        every segment fails too); a dropped winner is chosen anew among the others. Returns
        the Snapshot's notes, ``auto-dropped:<candidate>:<reason>``.

        Example:
            >>> d = Decision({"loop": [1.0, 1.0]}, winner=None)
            >>> d.drop("gramian", "random-op")
            ['auto-dropped:gramian:random-op', 'auto-dropped:gramian-vmap:random-op']
            >>> d.live(["loop", "batched", "gramian", "gramian-vmap"])
            ['loop', 'batched']
        """
        names = [name, "gramian-vmap"] if name == "gramian" else [name]
        new = [n for n in names if n not in self.dropped]
        self.dropped.update(dict.fromkeys(new, reason))
        if self.winner in self.dropped:
            self.winner = None
        return [f"auto-dropped:{n}:{reason}" for n in new]

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
        self._recording = True
        #: the call shapes of the shared part since the last probe (see :meth:`key`)
        self._keys = ShapeKey()
        #: whether the hooked candidates' hooks are installed (see :meth:`_attach_hooked`)
        self._hooked_on = False
        #: whether a probe was served by ``loop`` untimed (see :meth:`_loop_only`)
        self._served_loop = False

    def attach(self) -> None:
        for e in self.candidates.values():
            if not e.uses_hooks:
                e.attach()
        self._attach_hooked(self._hooks_needed())
        self._keys.hook(self.shared.module)

    def shared_changed(self) -> None:
        for e in self.candidates.values():
            e.shared_changed()
        if self._keys.hooked:  # the modules below the root may have been replaced too
            self._keys.hook(self.shared.module)

    def detach(self) -> None:
        for e in self.candidates.values():
            e.detach()
        self._hooked_on = False
        self._keys.unhook()

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
        self._recording = self._keys.recording = on
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
            name = d.winner or d.next_candidate(d.live(self._order(str(key[2]))))
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

    def key(self, ctx: BackwardContext) -> tuple[object, ...]:
        """The graph shape a decision is kept for (see the module docstring): the shapes of the
        shared root's last call; where the root is never called (a ``ModuleList`` of the trunk's
        pieces, a model whose parts are called one by one), those of the modules called below
        it, the first :data:`~gradlens.engines._shapekey.KEY_MODULES` of them, in module order
        (see :class:`~gradlens.engines._shapekey.ShapeKey`)."""
        L = ctx.losses
        return (self._keys.shapes(), len(ctx.nodes), L.device.type, L.dtype, L.shape[0])

    def compute(self, ctx: BackwardContext) -> EngineResult:
        if ctx.sparse and any(id(p) in ctx.sparse for p in ctx.reached):
            return self._loop_only(ctx, SPARSE_NOTE)
        if ctx.graph is not None and ctx.graph.compiled_reads(self.shared.ids):
            return self._loop_only(ctx, COMPILED_NOTE)
        key = self.key(ctx)
        self._keys.reset()
        decision = self.decisions.get(key)
        if decision is None:
            decision = self.decisions[key] = Decision()
        order = self._order(ctx.losses.device.type)
        notes: list[str] = []
        while True:
            name = decision.winner or decision.next_candidate(decision.live(order))
            if name is None:  # a candidate was dropped: the rounds are done with those left
                name = decision.winner = decision.pick()
                self._release_losers()
                notes.append(f"auto-chose:{name}")
            try:
                result = self._run(ctx, decision, name, order)
            except _Unbatchable as exc:
                # this graph cannot run under vmap: the probe goes to the next candidate,
                # ``.grad`` as it was before this one ran (``loop``, last, raises no such error)
                notes += decision.drop(name, exc.reason)
                continue
            result.notes[:0] = notes
            return result

    def _run(
        self, ctx: BackwardContext, decision: Decision, name: str, order: Sequence[str]
    ) -> EngineResult:
        """One probe served by candidate ``name``: the winner's as if called directly, or a
        candidate's timed (with the backward to the leaves it left: part of its cost).

        A candidate other than ``loop`` may raise :class:`UnbatchableGraphError`. On its first
        run on this graph shape (or under anomaly mode, which can be switched on at any time)
        it runs guarded: its ``.grad`` writes are undone on such an error (the copies of the
        ``.grad`` already there cost one read of each) and it keeps the graph
        (``retain_graph``), which a backward failing part way would otherwise have freed in part;
        the error then comes out as :class:`_Unbatchable`, for the next candidate to serve the
        probe. A candidate that ran on this graph shape before runs as if called directly (no
        copy, no graph kept): if it fails there after all (a backward whose behaviour changed),
        it is dropped and the probe fails with a :class:`~gradlens.GradlensError` saying so
        (the profiler puts every ``.grad`` back).
        """
        engine = self._variant(name)
        timed = decision.winner is None
        guarded = name != "loop" and (name not in decision.times or torch.is_anomaly_enabled())
        guard: AbstractContextManager[None] = nullcontext()
        run = ctx
        if guarded:
            guard = grads_atomic(ctx.leaves.values() if ctx.write else ctx.reached)
            run = ctx if ctx.retain_graph else replace(ctx, retain_graph=True)
        clock = _clock_for(ctx.losses.device)
        t0 = clock() if timed else 0.0
        try:
            with guard:
                result = engine.compute(run)
                if timed and ctx.write:
                    # the backward to every other leaf (the task heads): part of the probe's cost
                    rest = [v for i, v in ctx.leaves.items() if i not in result.written]
                    if rest:
                        torch.autograd.backward(
                            ctx.weights @ ctx.losses, inputs=rest, retain_graph=ctx.retain_graph
                        )
                    result.written |= set(ctx.leaves)
        except UnbatchableGraphError as exc:
            if guarded:
                raise _Unbatchable(exc.reason) from exc
            decision.drop(name, exc.reason)
            raise _failed_late(exc) from exc
        if timed:
            decision.times.setdefault(name, []).append(clock() - t0)
            if name == "gramian" and isinstance(engine, GramianEngine) and not engine.last_looped:
                # its default vmapped every segment: the same run as gramian-vmap
                decision.times.setdefault("gramian-vmap", decision.times[name])
            if decision.next_candidate(decision.live(order)) is None:
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

    def _loop_only(self, ctx: BackwardContext, note: str) -> EngineResult:
        """A graph where a shared parameter gets a sparse gradient (``nn.Embedding(...,
        sparse=True)``, a custom Function's sparse backward: the profiler's graph index finds
        them before the engine runs), or that a compiled model around the shared module makes
        a compiled graph reading its parameters: served by ``loop``, the one candidate that
        takes it, without timing; the Snapshot's notes say why (:data:`SPARSE_NOTE`,
        :data:`COMPILED_NOTE`)."""
        self._keys.reset()
        self._served_loop = True
        engine = self.candidates["loop"]
        result = engine.compute(ctx)
        self._discard_others(engine)
        result.engine = engine.name
        result.notes.append(note)
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
            {
                **_key_json(key),
                "winner": d.winner,
                "seconds": d.best(),
                **({"dropped": dict(d.dropped)} if d.dropped else {}),
            }
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
            (1, ['device', 'dropped', 'dtype', 'graph_nodes', 'shapes', 'tasks', 'times', 'winner'])
            >>> prof.close()
        """
        decisions = [
            {
                **_key_json(key),
                "times": {name: list(ts) for name, ts in d.times.items()},
                "winner": d.winner,
                "dropped": dict(d.dropped),
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
            if set(d.times) | set(d.dropped) <= set(self.variants)
            and d.winner in (None, *self.variants)
        }
        # the candidates' recording hooks follow the restored decisions from the next forward
        self.set_recording(self._recording)

    def describe(self) -> str:
        """The winners so far, e.g. ``gramian`` or ``gramian-vmap/batched`` (by graph shape),
        then the candidates dropped for a graph they cannot run, e.g. ``loop (dropped
        batched: random-op)``."""
        winners = [d.winner for d in self.decisions.values() if d.winner is not None]
        if self._served_loop:
            winners.append("loop")
        dropped = {f"{n}: {r}": None for d in self.decisions.values() for n, r in d.dropped.items()}
        if not winners:
            return "timing"
        chose = "/".join(dict.fromkeys(winners))
        return chose if not dropped else f"{chose} (dropped {', '.join(dropped)})"


class _Unbatchable(Exception):  # noqa: N818  # internal signal, never raised to the caller
    """A guarded candidate cannot run this graph (``reason``): the next one serves the probe."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _failed_late(failed: UnbatchableGraphError) -> GradlensError:
    """The error of a probe that a candidate already run on this graph shape (so run as if
    called directly: its writes not undone, the graph not kept) could not run after all."""
    return GradlensError(
        f"engine='auto': its candidate {failed.engine!r}, which ran on this graph shape "
        f"before, cannot run this probe's graph ({failed.cause}), and it ran without the "
        "copies a fallback needs, so no other candidate can serve this probe. Nothing was "
        f"written: .grad and the profiler's step are unchanged. {failed.engine!r} is dropped "
        "for this graph shape: run the step's forward again and call backward."
    )


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
            # (a state saved before candidates could be dropped has no "dropped")
            dropped = {str(k): str(v) for k, v in d.get("dropped", {}).items()}
            out[key] = Decision(times=times, winner=winner, dropped=dropped)
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
