"""The command line of :mod:`gradlens.stats.calibration`: ``python -m gradlens.stats.calibration
[--quick] [--only SECTION]`` prints the tables quoted in ``docs/stats.md``, one section per
simulation family (the simulations themselves are in ``calibration``).

Example:
    >>> from gradlens.stats._calibration_cli import SECTIONS
    >>> "trend" in SECTIONS and "null" in SECTIONS
    True
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from gradlens import stats
from gradlens.stats.calibration import (
    _METHODS,
    associations_fwer,
    cluster_coverage,
    clustered_fpr,
    gain_coverage,
    gain_test_coverage,
    null_pvalues,
    planted_pvalues,
    pooled_coverage,
    pooled_fpr,
    selection_optimism,
    trend_pvalues,
    within_run_calibration,
)
from gradlens.stats.weights import Estimator

_DESCRIPTION = "Simulations that calibrate gradlens.stats: false-positive rates, power, coverage."


def _print_null(k: float) -> None:
    n_null = int(2000 * k)
    print(f"## False-positive rate at alpha = 0.05, {n_null} null sweeps of 30 runs")
    for method in _METHODS:
        p = null_pvalues(n_null, method=method)
        print(f"{method:9s} FPR = {np.mean(p < 0.05):.4f}")


def _print_power(k: float) -> None:
    n_pow = int(1000 * k)
    print(f"\n## Power at alpha = 0.05 (permutation test), {n_pow} sweeps each")
    print("| n | rho | spearman | pearson | kendall |")
    for n_runs in (30, 60):
        for rho in (0.3, 0.5):
            cells = []
            for method in _METHODS:
                p, _ = planted_pvalues(n_pow, rho=rho, method=method, n_runs=n_runs)
                cells.append(f"{np.mean(p < 0.05):.3f}")
            print(f"| {n_runs} | {rho} | " + " | ".join(cells) + " |")


def _print_coverage(k: float) -> None:
    n_cov = int(400 * k)
    print(f"\n## Bootstrap 95 % interval coverage, n = 30, rho = 0.5, {n_cov} sweeps")
    for method in _METHODS:
        _, covered = planted_pvalues(n_cov, rho=0.5, method=method, n_boot=999, n_perm=0)
        print(f"{method:9s} coverage = {np.nanmean(covered):.3f}")


def _print_within(k: float) -> None:
    n_ser = int(400 * k)
    print(f"\n## Within a run: independent AR(1) pairs (true r = 0), {n_ser} pairs")
    print("| n | phi | block | cover, block CI | cover, n_eff CI | FPR n_eff t | FPR block p |")
    for n, phi in ((30, 0.5), (50, 0.8), (100, 0.8), (50, 0.95)):
        for block in ("auto", 1):
            r = within_run_calibration(n_ser, n=n, phi=phi, block=block)
            print(
                f"| {n} | {phi} | {block} | {r['coverage_block']:.3f} "
                f"| {r['coverage_neff']:.3f} | {r['fpr_neff']:.3f} | {r['fpr_block']:.3f} |"
            )


def _print_trend(k: float) -> None:
    n_tr = int(400 * k)
    print(f"\n## Optimal-weight trend test, {n_tr} sweeps each")
    print("| design | estimator | noise | shift | p (permutation) | p_value_boot (before) |")
    cells: list[tuple[Literal["4x9", "report"], Estimator, float, float]] = [
        ("report", "quadratic", 0.002, 0.0),
        ("report", "grid", 0.002, 0.0),
        ("report", "quadratic", 0.002, 0.3),
        ("4x9", "quadratic", 0.01, 0.0),
        ("4x9", "quadratic", 0.03, 0.0),
        ("4x9", "grid", 0.03, 0.0),
        ("4x9", "quadratic", 0.03, 0.05),
    ]
    for design, estimator, noise, shift in cells:
        p = trend_pvalues(
            n_tr, shift=shift, noise=noise, estimator=estimator, design=design,
            n_boot=199, n_perm=199, seed=7,
        )  # fmt: skip
        rate = np.mean(p < 0.05, axis=0)
        print(f"| {design} | {estimator} | {noise} | {shift} | {rate[0]:.3f} | {rate[1]:.3f} |")


def _print_pooled_fpr(k: float) -> None:
    n_p = int(1200 * k)
    print(f"\n## Pooled within-run test under the null, 24 runs, {n_p} sets each")
    print("| epochs | weights | FPR reported p | FPR Hartung-Knapp t | coverage of 0, HK |")
    cases: tuple[tuple[int, Literal["n_eff", "noise"]], ...] = (
        (6, "n_eff"),
        (30, "n_eff"),
        (6, "noise"),
        (30, "noise"),
    )
    for epochs, weights in cases:
        r = pooled_fpr(n_p, k=24, epochs=epochs, weights=weights, seed=1)
        print(f"| {epochs} | {weights} | {r['p']:.3f} | {r['hk']:.3f} | {r['cover_hk']:.3f} |")


def _print_cluster_coverage(k: float) -> None:
    n_c = int(2000 * k)
    print(f"\n## Cluster-bootstrap interval (Pearson), 10 configurations x 3 seeds, {n_c} sweeps")
    print("| ICC | rho | coverage | interval below rho | above rho |")
    for icc in (0.0, 0.5):
        for rho in (0.3, 0.6):
            r = cluster_coverage(n_c, rho=rho, icc=icc, n_boot=499, seed=11)
            print(f"| {icc} | {rho} | {r['coverage']:.3f} | {r['below']:.3f} | {r['above']:.3f} |")


def _print_fwer(k: float) -> None:
    n_fw = int(400 * k)
    print(f"\n## associations(): family-wise error on null tables, {n_fw} tables")
    rates = associations_fwer(n_fw)
    print(
        f"P(any p < 0.05): Holm {rates['holm']:.3f}, BH {rates['bh']:.3f}, "
        f"uncorrected {rates['none']:.3f}"
    )


def _print_gain(k: float) -> None:
    n_g = int(2000 * k)
    print(f"\n## Gain interval (joint_gain), 95 %, {n_g} cells each")
    print("| seeds | noise | interval | coverage | null cells excluding 0 |")
    for seeds in (3, 5, 10):
        for kind in ("normal", "t3"):
            for interval in ("t", "bootstrap"):
                r = gain_coverage(n_g, seeds=seeds, interval=interval, noise=kind)
                print(f"| {seeds} | {kind} | {interval} | {r['coverage']:.3f} "
                      f"| {r['null_excludes_0']:.3f} |")  # fmt: skip


def _print_gain_test(k: float) -> None:
    n_g = int(2000 * k)
    print(f"\n## Gain on one finite test set (paired_gain), 95 %, 5 seeds, {n_g} sets each")
    print("| test items | SD of item x model effect | coverage, seed-only | coverage, seed + "
          "test bound | SE ratio |")  # fmt: skip
    for sd_im in (0.5, 1.5):
        for n_test in (250, 2000):
            r = gain_test_coverage(n_g, n_test=n_test, sd_item_model=sd_im)
            print(f"| {n_test} | {sd_im} | {r['seed_only']:.3f} | {r['seed_and_test']:.3f} "
                  f"| {r['se_ratio']:.2f} |")  # fmt: skip


def _print_selection(k: float) -> None:
    n_s = int(1000 * k)
    print(f"\n## Selection optimism, null sweep of 5 weights, {n_s} sweeps")
    print("| seeds | naive mean gain | naive 'beats' | held-out mean gain | held-out 'beats' |")
    for seeds in (3, 5, 10):
        r = selection_optimism(n_s, seeds=seeds)
        print(f"| {seeds} | {r['naive_mean_gain']:+.4f} | {r['naive_beats']:.3f} "
              f"| {r['held_out_mean_gain']:+.4f} | {r['held_out_beats']:.3f} |")  # fmt: skip


def _print_clustered(k: float) -> None:
    n_c = int(2000 * k)
    print(f"\n## Clustered null: 10 configurations x 3 seeds, {n_c} sweeps")
    print("| ICC | FPR, configurations permuted | FPR, runs permuted | cluster CI excl. 0 |")
    for icc in (0.0, 0.5, 0.8):
        r = clustered_fpr(n_c, icc=icc, n_boot=499)
        print(f"| {icc} | {r['groups_fpr']:.3f} | {r['runs_fpr']:.3f} "
              f"| {r['groups_ci_excludes_0']:.3f} |")  # fmt: skip


def _print_pooled(k: float) -> None:
    n_p = int(2000 * k)
    print(f"\n## Pooled within-run correlation (Fisher z, DL), n = 30 per run, {n_p} sets")
    print("| runs | tau | coverage HK | coverage DL | range of runs covers |")
    for kk in (3, 5, 10):
        for tau in (0.0, 0.2):
            r = pooled_coverage(n_p, k=kk, tau=tau)
            print(f"| {kk} | {tau} | {r['hk']:.3f} | {r['dl']:.3f} | {r['min_max']:.3f} |")


def _print_design_power(k: float) -> None:
    n_d = int(1000 * k)
    print(f"\n## stats.power, {n_d} simulated studies each")
    print("| design | sizes x weights x seeds | ICC | tests | effect | power |")
    for icc in (0.0, 0.5):
        for effect in (0.0, 0.3, 0.5):
            r = stats.power("association", effect=effect, sizes=2, weights=5, seeds=3,
                            icc=icc, n_sim=n_d)  # fmt: skip
            print(f"| association | 2 x 5 x 3 | {icc} | 1 | {effect} | {r['power']:.3f} |")
    for seeds in (3, 5, 10):
        for effect in (1.0, 2.0):
            r = stats.power("gain", effect=effect, seeds=seeds, n_sim=n_d * 4)
            print(f"| gain | {seeds} seeds | - | 1 | {effect} SD | {r['power']:.3f} |")


SECTIONS: dict[str, Callable[[float], None]] = {
    "null": _print_null,
    "power": _print_power,
    "coverage": _print_coverage,
    "within": _print_within,
    "trend": _print_trend,
    "fwer": _print_fwer,
    "gain": _print_gain,
    "gain_test": _print_gain_test,
    "selection": _print_selection,
    "clustered": _print_clustered,
    "pooled": _print_pooled,
    "pooled_fpr": _print_pooled_fpr,
    "cluster_coverage": _print_cluster_coverage,
    "design_power": _print_design_power,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=_DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="a quarter of the simulations")
    parser.add_argument("--only", choices=list(SECTIONS), default=None)
    args = parser.parse_args(argv)
    k = 0.25 if args.quick else 1.0
    start = time.perf_counter()
    for name, section in SECTIONS.items():
        if args.only in (None, name):
            section(k)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    return 0
