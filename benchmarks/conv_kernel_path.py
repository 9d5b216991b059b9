"""The convolution rule's two routes to a layer's Gram, layer shape by layer shape (CPU).

For each convolution shape of the zoo's CNNs at both sizes (ResNet, MobileNetV2's pointwise
layers, late stages with a few output positions), the rule's weight-gradient route (every
task's weight gradient from one call of torch's weight-gradient kernel, then their Gram) and its
kernel route (the input patches as a Linear layer's input: ``G[s,t] = <D_s, A A^T D_t>``, see
``gradlens.engines.rules.conv``) are timed on the same tensors: thread CPU time, one torch
thread, interleaved, median of ``--repeats``. Printed per shape: the flop ratio of the two routes
(kernel / weight gradients), each route's time, their ratio, and the route the rule takes
(``KERNEL_SHARE``: the kernel route where its flops are at most that share).

With ``--models``, whole probes instead: the ``gramian`` engine's probe on each zoo trunk with
the rule's choice against the weight route everywhere (``KERNEL_SHARE = 0``, the rule before the
kernel route), two set-ups of the same seed stepped alternately, paired ratios (median).

    python benchmarks/conv_kernel_path.py               # T = 3 and 8
    python benchmarks/conv_kernel_path.py --tasks 8 --repeats 11
    python benchmarks/conv_kernel_path.py --models resnet,mobilenetv2,convnext --size base
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from gradlens.engines.rules import conv as conv_rules
from gradlens.engines.rules.linear import kernel_grads

#: (in channels, out channels, kernel, map side, batch): layers of the zoo's CNNs
SHAPES = [
    (32, 32, 3, 16, 8), (32, 64, 3, 8, 8), (64, 64, 3, 8, 8), (64, 128, 3, 4, 8),
    (128, 128, 3, 4, 8), (128, 256, 3, 2, 8), (256, 256, 3, 2, 8), (32, 64, 1, 8, 8),
    (64, 128, 1, 4, 8), (128, 256, 1, 2, 8), (16, 32, 3, 8, 4), (32, 64, 3, 4, 4),
    (64, 64, 3, 4, 4), (64, 64, 3, 2, 4), (48, 16, 1, 8, 4), (96, 24, 1, 4, 4),
    (144, 24, 1, 4, 4), (192, 32, 1, 2, 4), (32, 192, 1, 2, 4), (576, 96, 1, 1, 4),
    (96, 576, 1, 1, 4), (128, 128, 3, 8, 8),
]  # fmt: skip
BUDGET = 1 << 30


def _median_pair(a: Callable[[], object], b: Callable[[], object], n: int) -> tuple[float, float]:
    a(), b()
    ta, tb = [], []
    for _ in range(n):
        for f, acc in ((a, ta), (b, tb)):
            t0 = time.thread_time()
            f()
            acc.append(time.thread_time() - t0)
    return statistics.median(ta), statistics.median(tb)


def _routes(
    conv: nn.Conv2d, x: torch.Tensor, d: torch.Tensor, w: torch.Tensor
) -> tuple[Callable[[], object], Callable[[], object]]:
    """The rule's two routes on one layer call, as the rule runs them."""
    T, cout = d.shape[0], d.shape[2]

    def weight_route() -> object:
        gw = conv_rules.conv_weight_grads(conv, x, d, 0, cout)
        g2 = gw.reshape(T, -1)
        return (g2 @ g2.T).double(), torch.tensordot(w, gw, dims=1)

    def kernel_route() -> object:
        A = conv_rules._patch_rows(conv, x)
        return kernel_grads(A, d.movedim(2, -1).reshape(T, -1, cout), w, True, True, BUDGET)

    return weight_route, kernel_route


def _probes(model: str, T: int, size: str, batch: int | None, repeats: int) -> None:
    """Whole gramian probes on a zoo trunk: the rule's choice against the weight route only."""
    from gradlens.bench import ZOO_BATCH
    from gradlens.bench._setup import _Setup

    setups = {share: _Setup(model, T, batch or ZOO_BATCH[size], size=size) for share in (0.0, 0.5)}
    times: dict[float, list[float]] = {0.0: [], 0.5: []}
    default = conv_rules.KERNEL_SHARE
    try:
        for r in range(repeats + 3):  # three probes of each first: buffers, graph memos
            for share, setup in setups.items():
                conv_rules.KERNEL_SHARE = share
                setup.prepare("gramian")
                t0 = time.thread_time()
                setup.step("gramian")
                if r >= 3:
                    times[share].append(time.thread_time() - t0)
    finally:
        conv_rules.KERNEL_SHARE = default
        for setup in setups.values():
            setup.close()
    paired = statistics.median(b / a for a, b in zip(times[0.0], times[0.5]))
    print(
        f"{model} ({size}) T = {T}: gramian probe, weight route only "
        f"{statistics.median(times[0.0]) * 1e3:.1f} ms, with the kernel route "
        f"{statistics.median(times[0.5]) * 1e3:.1f} ms, paired ratio {paired:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[3, 8])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="the first n shapes only")
    ap.add_argument("--models", default="", help="zoo trunks: whole gramian probes instead")
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=None, help="default: the zoo's batch")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.models:
        for model in args.models.split(","):
            for T in args.tasks:
                _probes(model, T, args.size, args.batch, args.repeats)
        return
    print(f"conv rule routes, CPU time, 1 thread, median of {args.repeats}; "
          f"kernel route where flops <= {conv_rules.KERNEL_SHARE} x the weight gradients'")
    for T in args.tasks:
        print(f"T = {T}")
        for cin, cout, k, side, batch in SHAPES[: args.shapes]:
            conv = nn.Conv2d(cin, cout, k, padding=k // 2)
            x = torch.randn(batch, cin, side, side)
            d = torch.randn(T, batch, cout, side, side)
            w = torch.full((T,), 1.0 / T)
            n, ink = batch * side * side, cin * k * k
            kern = n * n * ink + T * n * n * cout + T * T * n * cout
            grad = T * n * cout * ink + T * T * cout * ink

            weight_route, kernel_route = _routes(conv, x, d, w)
            route = conv_rules._kernel_route(conv, [x], [d], BUDGET)
            t_w, t_k = _median_pair(weight_route, kernel_route, args.repeats)
            print(
                f"  in {cin:4} out {cout:4} k {k} map {side:2}x{side:<2} batch {batch} "
                f"(N = {n:5}): flops kernel/weight {kern / grad:6.2f}, "
                f"weight route {t_w * 1e3:7.2f} ms, kernel route {t_k * 1e3:7.2f} ms, "
                f"kernel/weight {t_k / t_w:5.2f}, rule takes {'kernel' if route else 'weight'}"
            )


if __name__ == "__main__":
    main()
