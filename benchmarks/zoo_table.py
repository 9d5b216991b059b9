"""The README's real-model tables, rendered from a ``gradlens bench --zoo --json`` file.

Usage: ``python benchmarks/zoo_table.py benchmarks/results/cpu_zoo_exact_engines.json``, or
several files of one size (their rows together, e.g. a T = 8 run and a T = 3 run):
``python benchmarks/zoo_table.py benchmarks/results/cpu_zoo_base.json
benchmarks/results/cpu_zoo_base_t3.json``

Prints the time table (ratios of medians to the plain step, as the bench computes them; `auto`
with the engines it chose over the repeats, its paired ratio to the fastest exact engine and to
the LibMTL loop when the file holds them) and the peak-memory table. ``tests/test_readme.py``
checks that the README holds exactly these tables for the committed file, so its numbers are the
measurement's and nothing else.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: README labels of the zoo trunks at ``--size small`` (the default), in table order.
LABELS = {
    "bert": "BERT (2 layers, 64)",
    "gpt2": "GPT-2 (2 layers, 64)",
    "t5-encoder": "T5 encoder (2 layers, 64)",
    "vit": "ViT (2 layers, 64, 32x32)",
    "resnet": "ResNet (basic, 4 stages)",
    "convnext": "ConvNeXt (4 stages)",
    "mobilenetv2": "MobileNetV2 (0.35)",
    "mlp-1m": "MLP (ours)",
    "cnn-1m": "CNN with BatchNorm (ours)",
}
#: at ``--size base`` (rows that record it; ours are sized by their names)
BASE_LABELS = {
    "bert": "BERT (2 layers, 256)",
    "gpt2": "GPT-2 (2 layers, 256)",
    "t5-encoder": "T5 encoder (2 layers, 256)",
    "vit": "ViT (2 layers, 256, 64x64)",
    "resnet": "ResNet (basic, 4 stages 32-256, 64x64)",
    "convnext": "ConvNeXt (4 stages 32-256, 64x64)",
    "mobilenetv2": "MobileNetV2 (0.5, 64x64)",
    "mlp-1m": "MLP (ours)",
    "cnn-1m": "CNN with BatchNorm (ours)",
}


def _labels(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The labels for the size the rows were measured at (rows before ``--size``: small)."""
    return BASE_LABELS if any(r.get("size") == "base" for r in rows) else LABELS
EXACT = ("loop", "batched", "gramian")
COLUMNS = ("loop-libmtl", "torchjd", "loop", "batched", "gramian")


def _ratio(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def time_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The time table, one row per trunk and T."""
    by = {(r["model"], r["tasks"], r["method"]): r for r in rows}
    labels = _labels(rows)
    paired = any("paired_vs_best_engine" in r for r in rows)
    head = [
        "trunk (shared params)",
        "T",
        "plain ms",
        "LibMTL loop",
        "TorchJD",
        "`loop`",
        "`batched`",
        "`gramian`",
        "**`auto`** (chose)",
        "best exact",
        "`features`",
    ]
    if paired:
        head += ["`auto` / best, paired", "`auto` / LibMTL, paired"]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for model in [m for m in labels if any(k[0] == m for k in by)]:
        for i, T in enumerate(sorted({k[1] for k in by if k[0] == model})):
            plain = by[model, T, "plain"]
            name = f"{labels[model]} {plain['params'] / 1e6:.2f}M" if i == 0 else ""

            def cell(method: str, model: str = model, T: int = T) -> float | None:
                r = by.get((model, T, method))
                return None if r is None else float(r["vs_plain"])

            auto = by.get((model, T, "auto"), {})
            chose = ", ".join(f"{k} {v}" for k, v in sorted(auto.get("chose", {}).items()))
            best = min((c for c in map(cell, EXACT) if c is not None), default=None)
            line = [
                name,
                str(T),
                f"{plain['seconds'] * 1e3:.1f}",
                *(_ratio(cell(m)) for m in COLUMNS),
                f"**{_ratio(cell('auto'))}** ({chose})",
                _ratio(best),
                _ratio(cell("features")),
            ]
            if paired:
                vs = auto.get("paired_vs_engines", {})
                line += [_ratio(auto.get("paired_vs_best_engine")), _ratio(vs.get("loop-libmtl"))]
            out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def memory_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Peak live tensor bytes of a step (MiB), one row per trunk and T."""
    by = {(r["model"], r["tasks"], r["method"]): r for r in rows if "peak_mib" in r}
    labels = _labels(rows)
    methods = ("plain", *COLUMNS, "auto", "features")
    head = [
        "trunk",
        "T",
        "plain",
        "LibMTL loop",
        "TorchJD",
        "`loop`",
        "`batched`",
        "`gramian`",
        "`auto`",
        "`features`",
    ]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for model in [m for m in labels if any(k[0] == m for k in by)]:
        for T in sorted({k[1] for k in by if k[0] == model}):
            cells = [by.get((model, T, m)) for m in methods]
            vals = ["-" if c is None else f"{c['peak_mib']:.1f}" for c in cells]
            out.append("| " + " | ".join([labels[model], str(T), *vals]) + " |")
    return "\n".join(out)


def main() -> None:
    paths = [Path(a) for a in sys.argv[1:]] or [
        Path("benchmarks/results/cpu_zoo_exact_engines.json")
    ]
    rows = [r for p in paths for r in json.loads(p.read_text())["time"]]  # e.g. T = 8 and T = 3
    print(time_table(rows))
    print()
    print(memory_table(rows))


if __name__ == "__main__":
    main()
