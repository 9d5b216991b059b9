"""Every script in ``benchmarks/`` runs end to end (tiny sizes), so that the commands the README
quotes keep working when the package's modules move.

Two broke silently that way before this test (``host_time.py`` wrapped ``plan_segments`` where it
no longer lived; ``layer_weighting_time.py`` imported a name the package stopped exporting). The
numbers are not checked (speed is never asserted in a test); each script must exit 0 and print
the line that carries its result. ``held_weights.py`` is left out: it trains six runs for
minutes, a path the training tests cover.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"

# script -> (tiny arguments, a fragment of its output)
RUNS: dict[str, tuple[list[str], str]] = {
    "auto_decision.py": (
        ["--models", "mlp-tiny", "--tasks", "2", "--repeats", "2", "--warm-probes", "1"],
        "misses",
    ),
    "auto_overhead.py": (
        ["--models", "mlp-tiny", "--pairs", "3"],
        "auto / direct",
    ),
    "auto_position.py": (
        ["--model", "mlp-tiny", "--tasks", "2", "--repeats", "2", "--warmup", "0"],
        "after its choice",
    ),
    "bench_sinks.py": (["--steps", "4", "--rounds", "1", "--image-every", "2"], "tensorboard"),
    "bench_store.py": (["--steps", "40", "--flush-every", "10"], "load average"),
    "conv_kernel_path.py": (["--tasks", "2", "--repeats", "1", "--shapes", "3"], "rule takes"),
    "host_time.py": (["--repeats", "2", "--tasks", "3"], "gramian probe"),
    "layer_weighting_time.py": (["--models", "mlp-tiny", "--tasks", "3"], "upgrad"),
    "legacy_batching.py": (
        ["--tasks", "3", "--repeats", "2", "--models", "mlp-tiny"], "before func.vmap + attention"
    ),
    "mha_rule.py": (["--probes", "3", "--reps", "1"], "rule/plain"),
    "page_faults.py": ([], "reused buffer"),
    "probe_phases.py": (
        ["--models", "mlp-tiny", "--repeats", "2", "--warmup", "2", "--methods",
         "loop-libmtl,loop,batched,gramian,auto"],
        "task backwards",
    ),
    "profile_step.py": (
        ["--model", "mlp-tiny", "--steps", "1", "--batch", "8", "--tasks", "3"],
        "aten::",
    ),
    "second_stage.py": (["bert", "3", "1"], "gramian"),
    "shared_follow.py": (["--tasks", "2", "--repeats", "1", "--calls", "3"], "fingerprint"),
    "unprobed_step.py": (["--models", "mlp-tiny", "--steps", "2"], "unprobed step"),
    "zoo_table.py": ([str(BENCH / "results" / "cpu_zoo_exact_engines.json")], "MobileNetV2"),
}
SKIPPED = {"held_weights.py"}


def test_every_script_is_covered():
    assert {p.name for p in BENCH.glob("*.py")} == set(RUNS) | SKIPPED


@pytest.mark.parametrize("script", sorted(RUNS))
def test_the_script_runs(script, tmp_path):
    if script == "second_stage.py":
        pytest.importorskip("transformers")
    args, expect = RUNS[script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=tmp_path,  # nothing a script writes lands in the repository
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout + out.stderr, out.stdout[-2000:]
    assert not list(BENCH.glob("*.json"))  # results go under benchmarks/results only
