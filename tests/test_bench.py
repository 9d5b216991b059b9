"""The benchmark runs end to end and reports ratios (no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest

from gradlens.bench import format_table, measure_peak_memory, run_benchmark
from gradlens.cli import main


def test_run_benchmark_rows():
    rows = run_benchmark(
        ["mlp-tiny"],
        [2],
        ["plain", "loop-libmtl", "gramian", "features"],
        repeats=2,
        batch=8,
        warmup=1,
    )
    methods = [r["method"] for r in rows]
    assert methods == [
        "plain",
        "loop-libmtl",
        "gramian",
        "features",
        "gramian-unprobed",
        "gramian@every=10",
        "gramian@every=100",
    ]
    plain = rows[0]
    assert plain["vs_plain"] == 1.0
    for r in rows:
        assert r["seconds"] > 0
        assert math.isclose(r["vs_plain"], r["seconds"] / plain["seconds"])
    # amortised rows are what they say: (probe + (k-1) unprobed) / k
    t = {r["method"]: r["seconds"] for r in rows}
    assert math.isclose(t["gramian@every=10"], (t["gramian"] + 9 * t["gramian-unprobed"]) / 10)
    table = format_table(rows)
    assert "mlp-tiny" in table
    assert "gramian@every=10" in table


def test_bench_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--models",
            "mlp-tiny",
            "--tasks",
            "2",
            "--methods",
            "plain,batched",
            "--repeats",
            "1",
            "--batch",
            "8",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert {r["method"] for r in data["time"]} == {"plain", "batched"}
    assert "plain ms" in capsys.readouterr().out


def test_cpu_clock_restores_torch_threads():
    import torch

    before = torch.get_num_threads()
    rows = run_benchmark(["mlp-tiny"], [2], ["plain", "batched"], repeats=1, batch=8, clock="cpu")
    assert torch.get_num_threads() == before
    assert all(r["seconds"] > 0 for r in rows)


def test_memory_measurement_in_a_fresh_process():
    row = measure_peak_memory("mlp-tiny", 2, "gramian", batch=8)
    assert row["method"] == "gramian"
    assert row["peak_mib"] >= 0


def test_unknown_model_or_method_is_refused():
    from gradlens import GradlensError

    with pytest.raises(GradlensError, match="`model` should be one of"):
        run_benchmark(["resnet-9000"], [2], ["plain"], repeats=1)
    with pytest.raises(GradlensError, match="`clock` should be 'wall' or 'cpu'"):
        run_benchmark(["mlp-tiny"], [2], ["plain"], repeats=1, clock="sundial")
    with pytest.raises(GradlensError, match="`methods` should be among"):
        run_benchmark(["mlp-tiny"], [2], ["warp"], repeats=1)


def test_gramian_in_the_benchmark_is_served_by_its_rules():
    # the profiler must be attached before the forward, or the gramian engine sees no layer
    from gradlens.bench import _Setup

    setup = _Setup("mlp-tiny", 2, 8)
    setup.prepare("gramian")
    losses, _ = setup.losses()
    snap = next(iter(setup._profilers.values())).backward(losses, setup.w)
    assert set(snap.rules.values()) == {"linear"}
    setup.close()
