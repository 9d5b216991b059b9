"""The benchmark runs end to end and reports ratios (no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gradlens import GradlensError
from gradlens.bench import _timing as timing
from gradlens.bench import format_table, hardware_info, measure_peak_memory, run_benchmark
from gradlens.bench._timing import EXACT
from gradlens.cli import main

no_cuda = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal of CUDA on a machine without it"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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
        "gramian-after-probe",
        "gramian-unprobed",
        "gramian@every=10",
        "gramian@every=100",
        "features-after-probe",
        "features-unprobed",
        "features@every=10",
        "features@every=100",
    ]
    plain = rows[0]
    assert plain["vs_plain"] == 1.0
    for r in rows:
        assert r["seconds"] > 0
        assert r["device"] == "cpu"
        assert math.isclose(r["vs_plain"], r["seconds"] / plain["seconds"])
    # amortised rows are what they say: (probe + after-probe + (k-2) steady unprobed) / k
    t = {r["method"]: r["seconds"] for r in rows}
    for m in ("gramian", "features"):
        probe, after, steady = t[m], t[f"{m}-after-probe"], t[f"{m}-unprobed"]
        assert math.isclose(t[f"{m}@every=10"], (probe + after + 8 * steady) / 10)
        assert math.isclose(t[f"{m}@every=100"], (probe + after + 98 * steady) / 100)
    table = format_table(rows)
    assert "mlp-tiny" in table
    assert "gramian@every=10" in table
    assert "features@every=100" in table


def test_amortised_rows_only_for_the_methods_asked():
    rows = run_benchmark(
        ["mlp-tiny"], [2], ["plain", "features"], repeats=1, batch=8, warmup=0, amortise=(2,)
    )
    t = {r["method"]: r["seconds"] for r in rows}
    assert set(t) == {
        "plain",
        "features",
        "features-after-probe",
        "features-unprobed",
        "features@every=2",
    }
    # k = 2: a probe and the step right after it, no steady step
    assert math.isclose(t["features@every=2"], (t["features"] + t["features-after-probe"]) / 2)
    with pytest.raises(GradlensError, match="`amortise` should hold integers k >= 2"):
        run_benchmark(["mlp-tiny"], [2], ["plain", "gramian"], repeats=1, batch=8, amortise=(1,))


def test_unprobed_timings_come_after_one_or_two_untimed_steps(monkeypatch):
    # the after-probe step follows the probe of a fresh every=10**9 profiler, the steady one
    # follows the probe and one unprobed step: record which profiler step each timing sees
    from gradlens.bench import _setup as bench

    seen: list[tuple[int, bool]] = []
    step = bench._Setup.step

    def spy(self, method, every=1):
        prof = self._profilers.get((method, every))
        if prof is not None and every == bench._ONCE:
            seen.append((prof.step, bool(prof._schedule(prof.step))))
        step(self, method, every)

    monkeypatch.setattr(bench._Setup, "step", spy)
    run_benchmark(["mlp-tiny"], [2], ["gramian"], repeats=1, batch=8, warmup=0, amortise=(10,))
    # after-probe: steps 0 (probe), 1 (timed); steady: steps 0, 1, 2 (timed), in either order
    assert sorted(seen) == sorted([(0, True), (1, False), (0, True), (1, False), (2, False)])


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
    assert row["memory"] == "rss"
    assert row["device"] == "cpu"
    assert row["peak_mib"] >= 0


def test_bad_device_is_refused():
    with pytest.raises(GradlensError, match=r"`device` should be 'cpu', 'cuda' or 'cuda:N'.*'gpu'"):
        run_benchmark(["mlp-tiny"], [2], ["plain"], repeats=1, batch=8, device="gpu")
    with pytest.raises(GradlensError, match=r"`device` should be .*found 'meta'"):
        run_benchmark(["mlp-tiny"], [2], ["plain"], repeats=1, batch=8, device="meta")
    with pytest.raises(GradlensError, match="`device` should be"):
        measure_peak_memory("mlp-tiny", 2, "plain", batch=8, device="cuda:x")


@no_cuda
def test_cuda_without_cuda_is_refused():
    with pytest.raises(GradlensError, match=r"`device` should be 'cpu'.*is False.*found 'cuda'"):
        run_benchmark(["mlp-tiny"], [2], ["plain"], repeats=1, batch=8, device="cuda")
    with pytest.raises(GradlensError, match=r"`device` should be 'cpu'.*found 'cuda:0'"):
        measure_peak_memory("mlp-tiny", 2, "plain", batch=8, device="cuda:0")
    assert main(["bench", "--models", "mlp-tiny", "--tasks", "2", "--device", "cuda"]) == 2


def test_cuda_index_is_checked_against_the_devices(monkeypatch):
    # the checks of a CUDA request, run here by pretending one device is present
    from gradlens.bench._hardware import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _device("cuda") == torch.device("cuda", 0)
    assert _device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(
        GradlensError, match=r"one of cuda:0..cuda:0 on this machine; found 'cuda:1'"
    ):
        _device("cuda:1")


def test_cpu_clock_with_a_cuda_device_is_refused():
    # refused before the device is looked for, so the message is the same with or without CUDA
    with pytest.raises(GradlensError, match=r"`clock` should be 'wall' when `device` is a CUDA"):
        run_benchmark(["mlp-tiny"], [2], ["plain"], repeats=1, batch=8, device="cuda", clock="cpu")


def test_cuda_clock_synchronizes_at_each_read(monkeypatch):
    from gradlens.bench._hardware import _clock

    calls: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    now = _clock("wall", torch.device("cuda", 0))
    t0 = now()
    t1 = now()
    assert t1 >= t0
    assert calls == [torch.device("cuda", 0)] * 2
    calls.clear()
    _clock("wall", torch.device("cpu"))()
    assert calls == []


def test_bench_cli_json_has_hardware(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--models", "mlp-tiny", "--tasks", "2", "--methods", "plain,gramian"]
    assert (
        main([*args, "--repeats", "1", "--batch", "8", "--device", "cpu", "--json", str(out)]) == 0
    )
    data = json.loads(out.read_text())
    hw = data["hardware"]
    assert hw["device"] == "cpu"
    assert hw["name"]
    assert hw["torch_threads"] == torch.get_num_threads()
    assert hw["torch"] == torch.__version__
    assert {r["device"] for r in data["time"]} == {"cpu"}
    assert hardware_info("cpu", clock="cpu")["torch_threads"] == 1


@needs_cuda
def test_benchmark_and_memory_on_cuda():
    rows = run_benchmark(
        ["mlp-tiny"],
        [2],
        ["plain", "gramian", "features"],
        repeats=2,
        batch=8,
        warmup=1,
        device="cuda",
        amortise=(10,),
    )
    dev = f"cuda:{torch.cuda.current_device()}"
    t = {r["method"]: r["seconds"] for r in rows}
    assert {r["device"] for r in rows} == {dev}
    assert all(v > 0 for v in t.values())
    assert math.isclose(
        t["gramian@every=10"],
        (t["gramian"] + t["gramian-after-probe"] + 8 * t["gramian-unprobed"]) / 10,
    )
    assert hardware_info("cuda")["name"] == torch.cuda.get_device_name()
    # one fresh process (CUDA start-up is most of this test's time)
    row = measure_peak_memory("mlp-tiny", 2, "gramian", batch=8, device="cuda")
    assert row["memory"] == "cuda_allocated"
    assert row["device"] == dev
    # three steps allocate at least the trunk's gradients (~6.3k float32, 25 KiB)
    assert row["peak_mib"] > 0


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
    from gradlens.bench._setup import _Setup

    setup = _Setup("mlp-tiny", 2, 8)
    setup.prepare("gramian")
    losses, _ = setup.losses()
    snap = next(iter(setup._profilers.values())).backward(losses, setup.w)
    assert set(snap.rules.values()) == {"linear"}
    setup.close()


@pytest.mark.parametrize("warm", [1, 4])
def test_profiled_methods_are_timed_after_their_warm_probes(monkeypatch, warm):
    from gradlens.bench import _setup as bench

    events: list[object] = []  # a gramian step's profiler, "plain", or None for a clock read
    inner = bench._Setup.step

    def spy(self, method, every=1):
        events.append(self._profilers[(method, every)] if method == "gramian" else method)
        return inner(self, method, every)

    def now():
        events.append(None)
        return float(len(events))

    monkeypatch.setattr(bench._Setup, "step", spy)
    monkeypatch.setattr(timing, "_clock", lambda kind, dev: now)
    run_benchmark(
        ["mlp-tiny"], [2], ["plain", "gramian"], repeats=3, warmup=0, batch=8, amortise=(),
        warm_probes=warm,
    )  # fmt: skip
    # the clock is read in pairs around each timed step; before a timed one, its profiler
    # probed at least `warm` times (exactly `warm` for a fresh one; the rotation may run
    # gramian twice in a row)
    reads = [i for i, e in enumerate(events) if e is None]
    timed = [i + 1 for i in reads[0::2]]
    before = [sum(q is events[i] for q in events[:i]) for i in timed if events[i] != "plain"]
    assert len(before) == 3
    assert min(before) == warm


def test_auto_row_is_compared_with_each_exact_engine(monkeypatch):
    from tests._auto import force_auto

    force_auto(monkeypatch, "batched")
    rows = run_benchmark(
        ["mlp-tiny"], [2], ["plain", "loop", "batched", "gramian", "auto"], repeats=2,
        warmup=1, batch=8, amortise=(),
    )  # fmt: skip
    sec = {r["method"]: r["seconds"] for r in rows}
    (auto,) = [r for r in rows if r["method"] == "auto"]
    assert auto["chose"] == {"batched": 2}  # the measured repeats only
    assert auto["vs_engines"] == pytest.approx({e: sec["auto"] / sec[e] for e in EXACT})
    assert auto["vs_best_engine"] == pytest.approx(max(auto["vs_engines"].values()))
    fastest = min(EXACT, key=sec.__getitem__)
    assert auto["paired_vs_best_engine"] == auto["paired_vs_engines"][fastest]
    assert set(auto["paired_vs_engines"]) == set(EXACT)


def test_warm_probes_is_checked():
    with pytest.raises(GradlensError, match="warm_probes"):
        run_benchmark(["mlp-tiny"], [2], ["plain"], repeats=1, warm_probes=0)


def test_bench_cli_memory_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--models", "mlp-tiny", "--tasks", "2", "--methods", "plain", "--repeats"]
    assert main([*args, "1", "--batch", "8", "--memory", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["method"], r["memory"]) for r in data["memory"]] == [("plain", "rss")]
    printed = capsys.readouterr().out
    assert "peak resident memory above the model and batch" in printed
    assert "MiB" in printed.splitlines()[-1]


def test_tensor_memory_of_each_method_in_its_row(tmp_path, capsys):
    from gradlens.bench._models import MODELS
    from gradlens.bench._setup import _Setup

    rows = run_benchmark(
        ["mlp-tiny"],
        [3],
        ["plain", "loop", "auto"],
        repeats=1,
        warmup=0,
        batch=8,
        amortise=(),
        memory=True,
    )
    peak = {r["method"]: r["peak_mib"] for r in rows}
    assert {r["memory"] for r in rows} == {"cpu_tensors"}
    P = sum(p.numel() for p in MODELS["mlp-tiny"][0]().parameters())
    # plain: at least its .grad; loop: its T x P buffer is alive through the step, .grad too
    assert peak["plain"] >= P * 4 / 2**20
    assert peak["loop"] >= 4 * P * 4 / 2**20
    assert peak["auto"] > 0
    assert (
        "peak_mib"
        not in run_benchmark(
            ["mlp-tiny"], [2], ["plain"], repeats=1, warmup=0, batch=8, amortise=()
        )[0]
    )
    # the same number measured again (it counts allocator events, not a sampled resident set)
    from gradlens.bench._memory import step_tensor_peak

    setup = _Setup("mlp-tiny", 3, 8)
    again = step_tensor_peak(setup, "loop")
    setup.close()
    assert again == {"memory": "cpu_tensors", "peak_mib": pytest.approx(peak["loop"])}
    out = tmp_path / "bench.json"
    args = ["bench", "--models", "mlp-tiny", "--tasks", "2", "--methods", "plain,loop"]
    assert (
        main([*args, "--repeats", "1", "--batch", "8", "--tensor-memory", "--json", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "peak of live tensor bytes in a steady-state step" in printed
    assert printed.rstrip().splitlines()[-1].endswith("MiB")
    data = json.loads(out.read_text())
    assert all(r["memory"] == "cpu_tensors" for r in data["time"])


def test_auto_against_the_engines_paired_within_each_repeat():
    # the second repeat ran in a slow spell of the machine: every method took 3x as long
    times = {
        "auto": [1.0, 3.3, 1.1],
        "loop": [1.0, 3.0, 1.0],
        "batched": [2.0, 6.0, 2.0],
    }
    med = {m: sorted(v)[1] for m, v in times.items()}
    got = timing._against_engines(times, med)
    assert got["vs_engines"] == pytest.approx({"loop": 1.1 / 1.0, "batched": 1.1 / 2.0})
    assert got["paired_vs_engines"] == pytest.approx({"loop": 1.1, "batched": 0.55})
    assert got["vs_best_engine"] == pytest.approx(1.1)
    assert got["paired_vs_best_engine"] == pytest.approx(1.1)
    assert timing._against_engines({"loop": [1.0]}, {"loop": 1.0}) == {}


@pytest.mark.parametrize("warm", [1, 3])
def test_auto_is_timed_after_warm_probes_past_its_choice(monkeypatch, warm):
    """``auto``'s timed probe follows the engines' rule: ``warm`` untimed probes after its choice
    (its deciding probes before them), not its first or second probe after the choice."""
    from gradlens.profiler import Profiler
    from tests._auto import force_auto

    force_auto(monkeypatch, "gramian")  # a decision in a fixed number of probes
    events: list[tuple[object, bool] | None] = []  # (profiler, decided before it) or a clock read
    inner = Profiler.backward

    def spy(self, *args, **kwargs):
        decided = any(d.winner for d in self._engine.decisions.values())
        events.append((self, decided))
        return inner(self, *args, **kwargs)

    def now():
        events.append(None)
        return float(len(events))

    monkeypatch.setattr(Profiler, "backward", spy)
    monkeypatch.setattr(timing, "_clock", lambda kind, dev: now)
    rows = run_benchmark(
        ["mlp-tiny"], [2], ["plain", "auto"], repeats=1, warmup=0, batch=8, amortise=(),
        warm_probes=warm,
    )  # fmt: skip
    assert [r["chose"] for r in rows if r["method"] == "auto"] == [{"gramian": 1}]
    reads = [i for i, e in enumerate(events) if e is None]
    timed = [i + 1 for i in reads[0::2] if events[i + 1] is not None]
    assert len(timed) == 1  # plain has no profiler: auto's is the only profiled timed step
    prof, decided = events[timed[0]]  # type: ignore[misc]  # a probe, not a clock read
    assert decided
    before = [e for e in events[: timed[0]] if e is not None and e[0] is prof]
    deciding = [e for e in before if not e[1]]
    assert len(deciding) >= 2  # it timed its candidates first
    assert len(before) - len(deciding) == warm  # then exactly `warm` probes of its choice


def test_zoo_size_is_checked(capsys):
    with pytest.raises(GradlensError, match=r"`size` should be one of \['small', 'base'\].*'huge'"):
        run_benchmark(["mlp-tiny"], [2], ["plain"], repeats=1, size="huge")
    with pytest.raises(GradlensError, match="`size` should be one of"):
        measure_peak_memory("mlp-tiny", 2, "plain", batch=8, size="Base")
    # the CLI: exit status 2 and one line naming the argument, before any work
    assert main(["bench", "--zoo", "--size", "medium", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "`size` should be one of ['small', 'base']" in err
    assert "'medium'" in err


def test_zoo_sizes_build_their_dimensions():
    pytest.importorskip("transformers")
    from gradlens.bench._zoo import build_zoo

    small, x_small = build_zoo("bert")
    base, x_base = build_zoo("bert", "base")
    assert tuple(x_small(2).shape) == (2, 32)
    assert tuple(x_base(2).shape) == (2, 64)
    assert tuple(small(x_small(2)).shape) == (2, 64)
    assert tuple(base(x_base(2)).shape) == (2, 256)
    _, img = build_zoo("convnext", "base")
    assert tuple(img(2).shape) == (2, 3, 64, 64)


def test_zoo_cli_at_base_size_records_it(tmp_path, capsys):
    """``gradlens bench --zoo --size base`` end to end on its cheapest trunk (``zoo`` extra)."""
    pytest.importorskip("transformers")
    from gradlens.bench._zoo import build_zoo

    out = tmp_path / "base.json"
    args = ["bench", "--zoo", "--size", "base", "--models", "convnext", "--tasks", "2",
            "--methods", "plain,gramian", "--repeats", "1", "--warm-probes", "1", "--clock",
            "cpu", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["size"] == "base"
    rows = data["time"]
    assert {(r["model"], r["tasks"], r["batch"], r["size"]) for r in rows} == {
        ("convnext", 2, 8, "base")
    }
    base = sum(p.numel() for p in build_zoo("convnext", "base")[0].parameters())
    small = sum(p.numel() for p in build_zoo("convnext")[0].parameters())
    assert {r["params"] for r in rows} == {base}
    assert base > 3 * small
    assert "convnext" in capsys.readouterr().out
