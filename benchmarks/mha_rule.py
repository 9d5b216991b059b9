"""The opt-in MultiheadAttention in_proj rule against the generic path it replaces.

gramian probe CPU time (``prof.backward``; 1 thread) on an ``nn.TransformerEncoder`` of 2 layers,
batch 8, with the rule enabled and disabled, in interleaved blocks of probes (the first few of a
block dropped), then a plain weighted backward; medians and their ratios.

    python benchmarks/mha_rule.py                       # d = 64, seq 16, T = 3
    python benchmarks/mha_rule.py --d 256 --seq 64 --tasks 8 --probes 12 --reps 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import gradlens as gl
from gradlens.engines.rules import attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--probes", type=int, default=25)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d, T = args.d, args.tasks
    layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
    trunk = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    heads = nn.ModuleList([nn.Linear(d, 1) for _ in range(T)])
    params = [*trunk.parameters(), *heads.parameters()]
    x = torch.randn(8, args.seq, d)
    warm = max(1, args.probes // 5)

    def losses() -> dict[str, torch.Tensor]:
        z = trunk(x).mean(1)
        return {f"t{t}": h(z).pow(2).mean() for t, h in enumerate(heads)}

    times: dict[str, list[float]] = {"rule": [], "generic": [], "plain": []}
    for _ in range(args.reps):
        for mode in ("rule", "generic"):
            (attention.enable if mode == "rule" else attention.disable)()
            with gl.Profiler(trunk, list(losses()), engine="gramian") as prof:
                for i in range(args.probes):
                    ls = losses()
                    t0 = time.process_time()
                    snap = prof.backward(ls)
                    if i >= warm:
                        times[mode].append(time.process_time() - t0)
                    for p in params:
                        p.grad = None
            want = "mha_in_proj" if mode == "rule" else "generic"
            assert snap.rules["layers.0.self_attn"] == want
        attention.disable()
        for _ in range(args.probes):
            loss = sum(losses().values())
            t0 = time.process_time()
            loss.backward()
            times["plain"].append(time.process_time() - t0)
            for p in params:
                p.grad = None
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print({k: f"{v:.2f} ms" for k, v in med.items()})
    print(
        f"rule/generic = {med['rule'] / med['generic']:.3f}; "
        f"rule/plain = {med['rule'] / med['plain']:.2f}; "
        f"generic/plain = {med['generic'] / med['plain']:.2f}"
    )


if __name__ == "__main__":
    main()
