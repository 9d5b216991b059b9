"""``gradlens bench``: engine step times as ratios to a plain step, in one process."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradlens._commands._args import positive_int, positive_ints

NAME = "bench"
HELP = "Time each engine against a plain scalarized step and the per-task loop (one process)."


def _strs(s: str) -> list[str]:
    return [v for v in s.split(",") if v]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gradlens.bench import METHODS, WEIGHTED_METHODS

    p.add_argument(
        "--models",
        type=_strs,
        default=None,
        help="comma-separated: mlp-tiny, mlp-1m, mlp-10m, cnn-1m, cnn-10m, transformer, or the "
        "Hugging Face trunks bert, gpt2, t5-encoder, vit, resnet, convnext, mobilenetv2 (the "
        "zoo extra); default mlp-1m,cnn-1m",
    )
    p.add_argument(
        "--tasks", type=positive_ints, default=None, help="comma-separated T values; default 2,8,40"
    )
    p.add_argument(
        "--zoo",
        action="store_true",
        help="real-model benchmark: the Hugging Face trunks (random init; needs the zoo extra) "
        "plus mlp-1m and cnn-1m, T = 3,8, batch 4 (--size small) or 8 (--size base), each "
        "unless given",
    )
    p.add_argument(
        "--size",
        default="small",
        help="the Hugging Face trunks' dimensions: small (default; hidden 64, 2 layers, length "
        "32, 32x32 images) or base (hidden 256, 4 heads, 2 layers, length 64, 64x64 images, "
        "CNN stages 32-256 wide); mlp-1m and cnn-1m are sized by their names",
    )
    p.add_argument(
        "--methods",
        type=_strs,
        default=list(METHODS),
        help=f"comma-separated among {', '.join(METHODS)}; multi-task optimization methods "
        f"(not run by default): {', '.join(WEIGHTED_METHODS)}",
    )
    p.add_argument(
        "--batch",
        type=positive_int,
        default=None,
        help="default 128 (with --zoo: 4, or 8 with --size base)",
    )
    p.add_argument("--repeats", type=positive_int, default=7)
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: CPU time of one torch thread (for a shared machine; "
        "not with a CUDA device)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the models and batches live: cpu (default), cuda or cuda:N; on CUDA each "
        "timed step is synchronized and --memory reports allocated CUDA memory",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="also measure peak memory growth per method, one fresh process each",
    )
    p.add_argument(
        "--tensor-memory",
        action="store_true",
        help="also report each method's peak of live tensor bytes in a steady-state step, "
        "measured in this process after the timing (on with --zoo)",
    )
    p.add_argument(
        "--warm-probes",
        type=positive_int,
        default=4,
        help="untimed probes of a profiled method before its timed one (default 4: the engines "
        "reach their steady state over their first probes)",
    )
    p.add_argument("--json", type=Path, default=None, help="write all rows as JSON to this file")


def run(args: argparse.Namespace) -> int:
    from gradlens.bench import (
        ZOO_BATCH,
        ZOO_MODELS,
        check_size,
        format_table,
        hardware_info,
        run_benchmark,
    )

    def say(msg: str) -> None:
        sys.stderr.write(msg + "\n")

    if args.models is None:
        args.models = list(ZOO_MODELS) if args.zoo else ["mlp-1m", "cnn-1m"]
    if args.tasks is None:
        args.tasks = [3, 8] if args.zoo else [2, 8, 40]
    size = check_size(args.size)  # before any default is read from it
    if args.batch is None:
        args.batch = ZOO_BATCH[size] if args.zoo else 128

    rows = run_benchmark(
        args.models,
        args.tasks,
        args.methods,
        batch=args.batch,
        repeats=args.repeats,
        clock=args.clock,
        device=args.device,
        progress=say,
        # the zoo table is the probed step of each method; its amortised rows would double the run
        amortise=() if args.zoo else (10, 100),
        memory=args.zoo or args.tensor_memory,
        warm_probes=args.warm_probes,
        size=size,
    )
    print(format_table(rows))
    if any("peak_mib" in r for r in rows):
        print("\npeak of live tensor bytes in a steady-state step, above the model and batch")
        print(format_table(rows, key="peak_mib"))
    _print_picks(rows)
    out: dict[str, object] = {
        "hardware": hardware_info(args.device, args.clock),
        "size": size,
        "time": rows,
    }
    if args.memory:
        out["memory"] = _memory(args, size, say)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


def _print_picks(rows: list[dict[str, Any]]) -> None:
    """What ``auto`` chose per (model, T), and its time over each engine's."""
    picks = [r for r in rows if r["method"] == "auto" and r.get("chose")]
    if not picks:
        return
    print("\nauto chose (one fresh choice per repeat), and its time over each engine's:")
    for r in picks:
        paired = r.get("paired_vs_engines", {})
        against = ", ".join(
            f"{e} {q:.3f}x (paired {paired[e]:.3f}x)" for e, q in r.get("vs_engines", {}).items()
        )
        best = ""
        if "vs_best_engine" in r:
            best = f"; fastest {r['vs_best_engine']:.3f}x ({r['paired_vs_best_engine']:.3f}x)"
        print(f"  {r['model']:<12} T={r['tasks']:<3} {r['chose']}  {against}{best}")


def _memory(
    args: argparse.Namespace, size: str, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """``--memory``: each method's peak in a fresh process, printed as a table; the rows."""
    from gradlens.bench import measure_peak_memory

    mem = []
    for model in args.models:
        for T in args.tasks:
            have = _has_torchjd()
            for m in [m for m in args.methods if (m != "torchjd" and "+" not in m) or have]:
                mem.append(
                    measure_peak_memory(model, T, m, args.batch, device=args.device, size=size)
                )
                say(f"memory {model} T={T} {m}: {mem[-1]['peak_mib']:.0f} MiB")
    print()
    what = {"rss": "resident memory", "cuda_allocated": "allocated CUDA memory"}
    kinds = sorted({what.get(r.get("memory", ""), str(r.get("memory"))) for r in mem})
    print(f"peak {', '.join(kinds)} above the model and batch, one fresh process per method")
    print(f"{'model':<12}{'T':>4}  " + "  ".join(f"{m:>12}" for m in args.methods))
    for model in args.models:
        for T in args.tasks:
            cells = {
                r["method"]: r["peak_mib"]
                for r in mem
                if r["model"] == model and r["tasks"] == T
            }
            print(
                f"{model:<12}{T:>4}  "
                + "  ".join(
                    f"{cells[m]:>9.0f}MiB" if m in cells else f"{'-':>12}" for m in args.methods
                )
            )
    return mem


def _has_torchjd() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchjd") is not None
