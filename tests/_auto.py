"""The ``auto`` engine in tests that compare two runs.

Two separate runs of one config time ``auto``'s candidates separately and may pick different
exact engines, whose numbers agree to float rounding, not bit for bit (see
``TrainConfig.engine``). A test comparing runs in one process forces the decision with a fake
clock that each candidate advances by a set cost (:func:`force_auto`; it can also make two runs
of a test decide differently); one comparing runs in other processes (a process pool, Ray, a
killed CLI) names the engine (:data:`PINNED`, :func:`pinned_toml`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

import gradlens.engines.auto as auto_module
from gradlens.engines.batched import BatchedEngine
from gradlens.engines.gramian import GramianEngine
from gradlens.engines.loop import LoopEngine

#: Every candidate ``auto`` times on CPU.
NAMES = ("loop", "batched", "gramian", "gramian-vmap")
#: The TrainConfig field of a run compared with one in another process.
PINNED = {"engine": "gramian"}


def pinned_toml(text: str) -> str:
    """A search config's TOML text with its ``[train]`` table naming the engine."""
    assert "[train]" in text
    return text.replace("[train]", '[train]\nengine = "gramian"', 1)


def force_auto(monkeypatch: pytest.MonkeyPatch, winner: str) -> dict[str, int]:
    """Make ``winner`` the fastest candidate by far (1 fake second against 5 for the others,
    so no candidate is timed twice). Returns the count of probes each candidate computed."""
    return fake_costs(monkeypatch, {n: 1.0 if n == winner else 5.0 for n in NAMES})


def fake_costs(monkeypatch: pytest.MonkeyPatch, costs: Mapping[str, float]) -> dict[str, int]:
    """``auto`` reads a fake clock that a candidate's probe advances by ``costs[name]``."""
    now = [0.0]
    calls = dict.fromkeys(NAMES, 0)
    monkeypatch.setattr(auto_module, "_clock_for", lambda device: lambda: now[0])
    for cls in (LoopEngine, BatchedEngine, GramianEngine):
        real = getattr(cls.compute, "real", cls.compute)  # forced twice in one test

        def compute(self: Any, ctx: Any, real: Any = real) -> Any:
            name = self.name
            if isinstance(self, GramianEngine) and self.stage == "vmap":
                name = "gramian-vmap"
            now[0] += costs[name]
            calls[name] += 1
            return real(self, ctx)

        compute.real = real  # type: ignore[attr-defined]  # a function attribute, read above
        monkeypatch.setattr(cls, "compute", compute)
    return calls
