"""The one-way data flow, as imports: the measuring core loads nothing of the harness or extras.

engines -> snapshots -> store -> stats/plots -> report: the core (profiler, engines, metrics,
store, snapshot) must import neither the study harness (train, data, models, search), nor the
across-run layers (stats, plots, report), nor the CLI, nor any optional extra; those load only
inside the functions that need them.
"""

from __future__ import annotations

import json
import subprocess
import sys

CORE = [
    "gradlens",
    "gradlens.profiler",
    "gradlens.engines",
    "gradlens.metrics",
    "gradlens.store",
    "gradlens.testing",
    "gradlens.schedules",
    "gradlens.distributed",
]
HARNESS = ["train", "data", "models", "search", "stats", "plots", "report", "cli", "_commands"]
EXTRAS = [
    "matplotlib", "seaborn", "scipy", "sklearn", "ray", "lightning", "tensorboard", "torchjd",
    "wandb", "mlflow", "transformers",
]  # fmt: skip


def _loaded_after_importing(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def _is_harness(module: str) -> bool:
    """``gradlens.train``, ``gradlens.train._data``, ``gradlens.stats._core``, ... (any depth)."""
    parts = module.split(".")
    if parts[0] != "gradlens" or len(parts) < 2:
        return False
    top = parts[1].lstrip("_")
    return any(top == h.lstrip("_") or top.startswith(h.lstrip("_") + "_") for h in HARNESS)


def test_harness_names_are_recognised():
    assert _is_harness("gradlens.stats._core")
    assert _is_harness("gradlens.search.sweep")
    assert not _is_harness("gradlens.store._io")
    assert not _is_harness("gradlens.distributed")


def test_the_measuring_core_imports_no_harness_and_no_extra():
    loaded = _loaded_after_importing(CORE)
    assert "gradlens.profiler" in loaded  # the check ran
    harness = sorted(m for m in loaded if _is_harness(m))
    assert harness == [], f"the measuring core loaded {harness}"
    extras = sorted(m for m in EXTRAS if m in loaded)
    assert extras == [], f"the measuring core loaded optional extras {extras}"
