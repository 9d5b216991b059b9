"""Tests of gradlens.stats: every statistic against scipy or a closed form, and calibration."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import scipy.stats as ss
from hypothesis import given, settings
from hypothesis import strategies as st

from gradlens import load_run, stats
from gradlens._errors import GradlensError
from gradlens._types import TOTAL_LAYER
from gradlens.stats import _core as core
from gradlens.stats import _gain as gain
from gradlens.stats import calibration as calib
from tests._sweepgen import make_run

SCIPY = {"pearson": ss.pearsonr, "spearman": ss.spearmanr, "kendall": ss.kendalltau}
METHODS = ["spearman", "pearson", "kendall"]


# --------------------------------------------------------------------------- fake runs


@dataclass
class FakeRun:
    meta: dict
    metrics: pd.DataFrame
    evals: pd.DataFrame = field(default_factory=lambda: _evals([]))


def _evals(rows: list[tuple]) -> pd.DataFrame:
    cols = ["point", "epoch", "step", "split", "task", "metric", "value"]
    df = pd.DataFrame(rows, columns=cols)
    for c in ("epoch", "step"):
        df[c] = df[c].astype("Int64")
    df["value"] = df["value"].astype(np.float64)
    return df


def _metrics(steps: list[int], cos: list[float], layer: str = TOTAL_LAYER) -> pd.DataFrame:
    rows = []
    for s, c in zip(steps, cos):
        rows.append((s, layer, "cosine", "left", "right", c))
        rows.append((s, layer, "conflict", "left", "right", float(c < 0) if c == c else math.nan))
        rows.append((s, layer, "gms", "left", "right", 0.5))
        rows.append((s, layer, "norm", "left", "", 2.0))
        rows.append((s, layer, "norm", "right", "", 1.0))
        rows.append((s, layer, "cos_to_update", "left", "", 0.9))
        rows.append((s, layer, "cos_to_update", "right", "", 0.1 + s / 1000))
        rows.append((s, layer, "norm_ratio", "", "", 2.0))
    df = pd.DataFrame(rows, columns=["step", "layer", "metric", "task_i", "task_j", "value"])
    df["step"] = df["step"].astype(np.int64)
    return df


def _run(p: float, seed: int, n_params: int, cos: float, acc: tuple[float, float]) -> FakeRun:
    meta = {
        "tasks": ["left", "right"],
        "weights": {"left": p, "right": 1 - p},
        "model": {"family": "mlp", "width": 1.0, "depth": 2, "n_params": n_params},
        "seed": seed,
        "config": {"lr": 0.1, "schedule": {"kind": "cos"}},
    }
    ev = _evals(
        [
            ("final", None, 100, "test", "left", "accuracy", acc[0]),
            ("final", None, 100, "test", "right", "accuracy", acc[1]),
        ]
    )
    return FakeRun(meta, _metrics([0, 50, 100], [cos, cos, -cos]), ev)


# --------------------------------------------------------------------------- correlate


def _xy(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(4, 25))
    vals = st.integers(-3, 3)  # many ties
    x = np.array(draw(st.lists(vals, min_size=n, max_size=n)), dtype=np.float64)
    y = np.array(draw(st.lists(vals, min_size=n, max_size=n)), dtype=np.float64)
    return x, y


@st.composite
def _xy_counts(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = _xy(draw)
    counts = np.array(
        draw(st.lists(st.integers(0, 3), min_size=x.size, max_size=x.size)), dtype=np.float64
    )
    return x, y, counts


@settings(max_examples=60)
@given(_xy_counts())
def test_resample_statistic_equals_scipy_on_expanded_sample(data):
    x, y, counts = data
    xe, ye = np.repeat(x, counts.astype(int)), np.repeat(y, counts.astype(int))
    for method in METHODS:
        got = core.correlation_counts(x, y, counts[None, :], method)[0]
        if xe.size < 2 or np.ptp(xe) == 0 or np.ptp(ye) == 0:
            assert np.isnan(got)
        else:
            assert got == pytest.approx(SCIPY[method](xe, ye)[0], abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_estimate_equals_scipy(method):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 6, 40).astype(float)
    y = x + rng.normal(size=40)
    res = stats.correlate(x, y, method=method, n_boot=100, n_perm=100)
    assert res["estimate"] == pytest.approx(SCIPY[method](x, y)[0], abs=1e-12)
    assert res["n"] == 40
    assert res["method"] == method


@pytest.mark.parametrize("method", METHODS)
def test_exact_permutation_pvalue_equals_scipy(method):
    rng = np.random.default_rng(5)
    x = np.array([0.1, 0.1, 0.3, 0.5, 0.7, 0.9])
    y = rng.normal(size=6) + x
    res = stats.correlate(x, y, method=method, n_boot=0, n_perm=1000)
    ref = ss.permutation_test(
        (y,),
        lambda yy: abs(SCIPY[method](x, yy)[0]),
        permutation_type="pairings",
        alternative="greater",
        vectorized=False,
    )
    assert res["p_method"] == "exact permutation"
    assert res["p_value"] == pytest.approx(ref.pvalue, abs=1e-12)


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_random_permutation_pvalue_agrees_with_scipy(method):
    rng = np.random.default_rng(11)
    x = rng.normal(size=25)
    y = 0.35 * x + rng.normal(size=25)
    res = stats.correlate(x, y, method=method, n_boot=0, n_perm=10000, seed=1)
    if method == "spearman":  # Spearman is Pearson of the ranks; permuting ranks is the same
        x, y = ss.rankdata(x), ss.rankdata(y)
    ref = ss.permutation_test(
        (y,),
        lambda yy, axis=-1: np.abs(ss.pearsonr(x, yy, axis=axis)[0]),
        permutation_type="pairings",
        alternative="greater",
        n_resamples=10000,
        vectorized=True,
        rng=2,
    )
    assert res["p_method"] == "permutation"
    # Two Monte Carlo estimates of the same p (about 0.1): standard error about 0.003 each.
    assert res["p_value"] == pytest.approx(ref.pvalue, abs=0.02)


def test_bootstrap_interval_agrees_with_scipy_percentile():
    rng = np.random.default_rng(7)
    x = rng.normal(size=40)
    y = 0.5 * x + rng.normal(size=40)
    res = stats.correlate(x, y, method="pearson", n_boot=20000, n_perm=0, seed=3)
    ref = ss.bootstrap(
        (x, y),
        lambda a, b, axis=-1: ss.pearsonr(a, b, axis=axis)[0],
        paired=True,
        vectorized=True,
        n_resamples=20000,
        method="percentile",
        rng=4,
    )
    assert res["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=0.02)
    assert res["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=0.02)
    assert res["ci_low"] < res["estimate"] < res["ci_high"]


def test_bootstrap_count_schemes():
    rng = np.random.default_rng(0)
    codes = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    C = core.bootstrap_counts(rng, 500, codes.size)
    assert (C.sum(axis=1) == codes.size).all()
    C = core.bootstrap_counts(rng, 500, codes.size, codes, "within")
    for g in range(3):  # each group keeps its size: only seeds within it are resampled
        assert (C[:, codes == g].sum(axis=1) == (codes == g).sum()).all()
    C = core.bootstrap_counts(rng, 500, codes.size, codes, "groups")
    for g in range(3):  # a group is drawn whole: its members share one count
        block = C[:, codes == g]
        assert (block == block[:, :1]).all()
    assert (C[:, [0, 3, 5]].sum(axis=1) == 3).all()  # 3 groups drawn per resample
    C = core.block_bootstrap_counts(rng, 200, 10, 3)
    assert (C.sum(axis=1) == 10).all()


def test_cluster_bootstrap_is_wider_when_seeds_share_a_configuration():
    rng = np.random.default_rng(2)
    config = np.repeat(np.arange(8), 5)
    effect = rng.normal(size=8)[config]  # configuration-level noise shared by its seeds
    x = np.repeat(np.linspace(0, 1, 8), 5)
    y = 0.3 * x + effect + 0.1 * rng.normal(size=40)
    runs = stats.correlate(x, y, method="pearson", n_boot=2000, n_perm=0, seed=1)
    clus = stats.correlate(x, y, method="pearson", n_boot=2000, n_perm=0, seed=1, groups=config)
    assert clus["bootstrap"] == "groups"
    assert clus["n_groups"] == 8
    assert clus["estimate"] == runs["estimate"]
    assert clus["ci_high"] - clus["ci_low"] > 1.3 * (runs["ci_high"] - runs["ci_low"])


def test_correlate_degenerate_and_nan_pairs():
    res = stats.correlate([1, 1, 1, 1], [1, 2, 3, 4], n_boot=10, n_perm=10)
    assert math.isnan(res["estimate"])
    assert res["note"] == "x is constant"
    res = stats.correlate([1, 2, float("nan"), 4, 5], [2, 1, 7, 3, 5], method="pearson", n_boot=0)
    assert res["n"] == 4
    assert res["estimate"] == pytest.approx(ss.pearsonr([1, 2, 4, 5], [2, 1, 3, 5])[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": [1, 2, 3], "y": [1, 2]}, "same length"),
        ({"method": "tau"}, "`method` should be one of"),
        ({"ci": 1.5}, "`ci` should be"),
        ({"n_boot": -1}, "`n_boot` should be"),
        ({"groups": [0, 0, 1, 1], "block": 2}, "`groups` and `block`"),
        ({"groups": [0, 1]}, "`groups` should give one group label"),
        ({"groups": [0, 0, 1, 1], "resample": "seeds"}, "`resample` should be one of"),
        ({"x": [[1, 2], [3, 4]]}, "`x` should be 1-D"),
    ],
)
def test_correlate_errors(kwargs, match):
    args = {"x": [1.0, 2.0, 3.0, 4.0], "y": [2.0, 1.0, 4.0, 3.0], **kwargs}
    with pytest.raises(GradlensError, match=match):
        stats.correlate(args.pop("x"), args.pop("y"), **args)


# --------------------------------------------------------------------------- partial, adjust


def _partial_from_inverse(data: np.ndarray) -> float:
    P = np.linalg.inv(np.corrcoef(data.T))
    return -P[0, 1] / math.sqrt(P[0, 0] * P[1, 1])


def test_partial_correlation_closed_forms():
    rng = np.random.default_rng(4)
    n = 60
    z1, z2 = rng.normal(size=n), rng.normal(size=n)
    x = z1 + 0.5 * z2 + rng.normal(size=n)
    y = z1 - 0.3 * z2 + 0.4 * x + rng.normal(size=n)
    df = pd.DataFrame({"x": x, "y": y, "z1": z1, "z2": z2})
    # One covariate: (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)).
    rxy, rxz, ryz = ss.pearsonr(x, y)[0], ss.pearsonr(x, z1)[0], ss.pearsonr(y, z1)[0]
    closed = (rxy - rxz * ryz) / math.sqrt((1 - rxz**2) * (1 - ryz**2))
    res = stats.partial_correlation(df, "x", "y", ["z1"], method="pearson", n_boot=0, n_perm=0)
    assert res["estimate"] == pytest.approx(closed, abs=1e-12)
    # Two covariates: from the inverse correlation matrix; Spearman: the same on ranks.
    res = stats.partial_correlation(df, "x", "y", ["z1", "z2"], method="pearson", n_boot=0)
    assert res["estimate"] == pytest.approx(_partial_from_inverse(np.c_[x, y, z1, z2]), abs=1e-12)
    ranks = np.column_stack([ss.rankdata(v) for v in (x, y, z1, z2)])
    res = stats.partial_correlation(df, "x", "y", ["z1", "z2"], n_boot=200, n_perm=200)
    assert res["estimate"] == pytest.approx(_partial_from_inverse(ranks), abs=1e-12)
    assert res["ci_low"] < res["estimate"] < res["ci_high"]
    assert res["covariates"] == "z1,z2"


def test_partial_correlation_removes_a_confounder_and_refuses_kendall():
    rng = np.random.default_rng(8)
    z = np.log10(np.repeat([1e5, 1e6, 1e7], 100))  # size drives both x and y
    df = pd.DataFrame({"x": z + rng.normal(size=300), "y": z + rng.normal(size=300), "s": z})
    raw = stats.correlate(df.x, df.y, method="pearson", n_boot=0, n_perm=999)
    part = stats.partial_correlation(df, "x", "y", ["s"], method="pearson", n_boot=500, n_perm=0)
    assert raw["estimate"] > 0.3
    assert raw["p_value"] < 0.01
    # The partial correlation's sampling SD is about 1/sqrt(297) = 0.06 around its truth, 0.
    assert abs(part["estimate"]) < 0.2
    assert part["ci_low"] < 0 < part["ci_high"]
    with pytest.raises(GradlensError, match="`method` should be one of"):
        stats.partial_correlation(df, "x", "y", ["s"], method="kendall")  # type: ignore[arg-type]
    with pytest.raises(GradlensError, match="`covariates` should be columns of the table"):
        stats.partial_correlation(df, "x", "y", ["nope"])


@settings(max_examples=50)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30))
def test_adjust_matches_scipy_bh_and_hand_holm(ps):
    p = np.array(ps)
    bh = stats.adjust(p, method="bh")
    np.testing.assert_allclose(bh, ss.false_discovery_control(p, method="bh"), atol=1e-12)
    holm = stats.adjust(p, method="holm")
    m = p.size
    order = np.argsort(p, kind="stable")
    expected = np.empty(m)
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        expected[idx] = running
    np.testing.assert_allclose(holm, expected, atol=1e-12)
    assert (holm >= p - 1e-15).all()
    assert (bh >= p - 1e-15).all()


def test_adjust_nan_and_errors():
    out = stats.adjust([0.01, float("nan"), 0.04], method="holm")
    assert out[0] == pytest.approx(0.02)
    assert math.isnan(out[1])
    assert out[2] == pytest.approx(0.04)
    with pytest.raises(GradlensError, match=r"`pvalues` should lie in \[0, 1\]"):
        stats.adjust([0.5, 1.5])
    with pytest.raises(GradlensError, match="`method` should be one of"):
        stats.adjust([0.5], method="bonferroni")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("method", METHODS)
def test_false_positive_rate_over_null_sweeps(method):
    # 300 null sweeps of 30 runs (6 weights x 5 seeds, an outcome unrelated to the weight).
    p = calib.null_pvalues(300, method=method, n_perm=499, seed=100)
    assert 0.02 <= np.mean(p < 0.05) <= 0.08


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_false_positive_rate_over_many_null_sweeps(method):
    p = calib.null_pvalues(2000, method=method, n_perm=999, seed=200)
    assert 0.035 <= np.mean(p < 0.05) <= 0.065
    # The p-values of a calibrated test are close to uniform.
    assert ss.kstest(p, "uniform").pvalue > 0.001


@pytest.mark.slow
def test_power_on_planted_associations_is_ordered():
    power = {
        rho: np.mean(calib.planted_pvalues(400, rho=rho, method="pearson")[0] < 0.05)
        for rho in (0.3, 0.5)
    }
    # Normal-theory power of a two-sided test at n = 30: about 0.36 and 0.83.
    assert 0.26 <= power[0.3] <= 0.46
    assert 0.75 <= power[0.5] <= 0.91


# --------------------------------------------------------------------------- per run


def test_run_summary_phases_and_conflict_frequency():
    run = FakeRun(
        {"tasks": ["left", "right"]},
        _metrics([0, 10, 20, 30, 40, 60], [0.5, -0.5, 0.2, -0.1, 0.3, math.nan]),
    )
    s = run_summary = stats.run_summary(run, phases=3)
    assert list(s.columns) == ["phase", "metric", "task_i", "task_j", "value", "n"]
    cos = run_summary[(run_summary.metric == "cosine")].set_index("phase")
    assert cos.loc["all", "value"] == pytest.approx(np.mean([0.5, -0.5, 0.2, -0.1, 0.3]))
    assert cos.loc["all", "n"] == 5  # the NaN is left out
    # Steps 0..60 in thirds: [0, 20), [20, 40), [40, 60]
    assert cos.loc["1/3", "value"] == pytest.approx(0.0)
    assert cos.loc["2/3", "value"] == pytest.approx(0.05)
    assert cos.loc["3/3", "value"] == pytest.approx(0.3)
    cf = s[(s.metric == "conflict_freq") & (s.phase == "all")]["value"].item()
    assert cf == pytest.approx(2 / 5)
    assert "conflict" not in set(s.metric)
    with pytest.raises(GradlensError, match="`layer` should be one of"):
        stats.run_summary(run, layer="trunk.0")
    with pytest.raises(GradlensError, match=r"`run` should have a `\.metrics`"):
        stats.run_summary(object())


def test_runs_table_columns_and_values():
    runs = [_run(0.3, 0, 1000, 0.4, (0.8, 0.6)), _run(0.7, 1, 1000, 0.2, (0.7, 0.9))]
    t = stats.runs_table(runs)
    for col in [
        "run_id", "tasks", "n_tasks", "weights.left", "weights.right", "model.n_params", "seed",
        "config.lr", "config.schedule.kind", "cosine.left|right", "cosine.mean",
        "conflict_freq.left|right", "gms.left|right", "norm_ratio", "cos_to_update.left",
        "cos_to_update.right", "norm.left", "accuracy.left", "accuracy.right", "accuracy.mean",
    ]:  # fmt: skip
        assert col in t.columns, col
    assert t["run_id"].tolist() == ["run0", "run1"]
    assert t["tasks"].tolist() == ["left|right", "left|right"]
    assert t["cosine.left|right"].tolist() == pytest.approx([0.4 / 3, 0.2 / 3])
    assert t["conflict_freq.left|right"].tolist() == pytest.approx([1 / 3, 1 / 3])
    assert t["accuracy.mean"].tolist() == pytest.approx([0.7, 0.8])
    last = stats.runs_table(runs, phase="3/3")
    assert last["cosine.left|right"].tolist() == pytest.approx([-0.4, -0.2])
    with pytest.raises(GradlensError, match="`phase` should be"):
        stats.runs_table(runs, phase="4/3")
    with pytest.raises(GradlensError, match="`runs` should be"):
        stats.runs_table(pd.DataFrame())


def test_runs_table_reads_a_sweep_directory(tmp_path):
    import torch

    from gradlens import Snapshot
    from gradlens.store import RunWriter

    for p, sign in ((0.25, 1.0), (0.75, -1.0)):
        meta = {"tasks": ["a", "b"], "weights": {"a": p, "b": 1 - p}, "seed": 0,
                "model": {"n_params": 10}}  # fmt: skip
        with RunWriter(tmp_path / f"p{p}", meta=meta) as w:
            for step in range(4):
                g = torch.tensor([[1.0, sign * 0.5], [sign * 0.5, 1.0]], dtype=torch.float64)
                w.add_snapshot(Snapshot(step, ("a", "b"), g, {"fc": g}, torch.tensor([p, 1 - p])))
            w.add_eval({"a": {"accuracy": p}, "b": {"accuracy": 0.5}}, split="test", point="final")
    t = stats.runs_table(tmp_path).sort_values("weights.a")
    assert t["cosine.a|b"].tolist() == pytest.approx([0.5, -0.5])
    assert t["conflict_freq.a|b"].tolist() == pytest.approx([0.0, 1.0])
    assert t["accuracy.a"].tolist() == pytest.approx([0.25, 0.75])
    assert t["run_id"].tolist() == ["p0.25", "p0.75"]


# --------------------------------------------------------------------------- associations


def _sweep_table(rng: np.random.Generator, effect: float) -> pd.DataFrame:
    rows = []
    for size in (1e5, 1e6, 1e7):
        for p in np.linspace(0.1, 0.9, 5):
            for seed in range(4):
                cos = effect * p + rng.normal(0, 0.1)
                rows.append({"model.n_params": size, "weights.left": p, "seed": seed,
                             "cosine.left|right": cos, "accuracy.mean": rng.normal()})  # fmt: skip
    return pd.DataFrame(rows)


def test_associations_rows_columns_and_correction():
    table = _sweep_table(np.random.default_rng(0), effect=1.0)
    res = stats.associations(
        table,
        weight_cols=["weights.left"],
        interference_cols=["cosine.left|right"],
        accuracy_cols=["accuracy.mean"],
        n_boot=200,
        group_cols=["model.n_params", "weights.left"],
    )
    assert list(res.columns) == [
        "relation", "x", "y", "method", "scope", "stratum", "covariates", "n", "n_groups",
        "estimate", "ci_low", "ci_high", "ci_level", "p_value", "p_method", "p_floor", "p_adjusted",
        "correction", "n_tests", "bootstrap", "note",
    ]  # fmt: skip
    # 3 relations x (3 pooled + 2 partial + 3 methods x 3 strata) = 42 tests.
    assert len(res) == 42
    assert set(res.relation) == {"weight->interference", "interference->accuracy",
                                 "weight->accuracy"}  # fmt: skip
    assert set(res[res.scope == "partial"].method) == {"spearman", "pearson"}
    assert res[res.scope == "partial"].covariates.unique().tolist() == ["log10(model.n_params)"]
    assert (res.correction == "holm").all()
    assert (res.n_tests == 42).all()
    np.testing.assert_allclose(res.p_adjusted, stats.adjust(res.p_value.to_numpy(), "holm"))
    assert (res.bootstrap == "groups").all()
    assert (res[res.scope == "pooled"].n_groups == 15).all()
    # Whole configurations are permuted (the bootstrap's unit). Pooled and partial: 15
    # configurations, 15! permutations, random ones; the default n_perm leaves room for 42 tests.
    wi = res[res.relation == "weight->interference"]
    whole = wi[wi.scope != "stratum"]
    assert (whole.p_method.str.contains("permutation of groups")).all()
    assert (whole.p_adjusted < 0.05).all()
    assert (wi.estimate > 0.5).all()
    # Within one size only 5 configurations: all 5! = 120 permutations, exact, and the smallest
    # attainable p is 1/120, which a Holm correction over 42 tests can never bring below 0.05.
    strata = wi[wi.scope == "stratum"]
    assert (strata.p_method == "exact permutation of groups").all()
    np.testing.assert_allclose(strata.p_floor, 1 / 120)
    # The planted order is the most extreme; its reversal has the same |rho|: p = 2/120.
    np.testing.assert_allclose(strata.p_value, 2 / 120)
    assert (strata.p_adjusted > 0.05).all()
    # The pooled estimate equals scipy's.
    row = res[(res.relation == "weight->interference") & (res.scope == "pooled")
              & (res.method == "kendall")].iloc[0]  # fmt: skip
    ref = ss.kendalltau(table["weights.left"], table["cosine.left|right"])[0]
    assert row.estimate == pytest.approx(ref, abs=1e-12)
    assert json.loads(stats.to_json(res))[0]["correction"] == "holm"


def test_associations_single_size_and_errors():
    table = _sweep_table(np.random.default_rng(1), effect=0.0)
    table = table[table["model.n_params"] == 1e5]
    res = stats.associations(
        table,
        weight_cols=["weights.left"],
        interference_cols=["cosine.left|right"],
        accuracy_cols=["accuracy.mean"],
        methods=["pearson"],
        correction="bh",
        n_boot=50,
        n_perm=50,
    )
    assert res.scope.tolist() == ["pooled"] * 3
    assert (res.correction == "bh").all()
    with pytest.raises(GradlensError, match="`weight_cols` should be columns"):
        stats.associations(table, weight_cols=["w"], interference_cols=[], accuracy_cols=[])
    with pytest.raises(GradlensError, match="`correction` should be one of"):
        stats.associations(table, weight_cols=[], interference_cols=[], accuracy_cols=[],
                           correction="bonferroni")  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.slow
def test_associations_family_wise_error_under_the_null():
    rates = calib.associations_fwer(60, seed=5)
    assert rates["holm"] <= 0.1  # Holm keeps the family-wise error at or under alpha
    assert rates["holm"] <= rates["bh"] <= rates["none"]
    assert rates["none"] > 0.3  # without correction, some of the 40 tests fire by chance


# --------------------------------------------------------------------------- within a run


def _epoch_run() -> FakeRun:
    steps = [5, 10, 12, 20, 25, 30, 40]
    conflict = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]  # the last probe is after the last eval
    m = pd.DataFrame({"step": steps, "layer": TOTAL_LAYER, "metric": "conflict", "task_i": "a",
                      "task_j": "b", "value": conflict})  # fmt: skip
    ev = _evals(
        [(f"epoch:{k}", k, 10 * k, "val", t, "accuracy", v)
         for k, vals in ((1, (0.5, 0.7)), (2, (0.6, 0.8)), (3, (0.7, 0.7)))
         for t, v in zip(("a", "b"), vals)]
        + [("final", None, 30, "val", "a", "accuracy", 0.0)]
    )  # fmt: skip
    return FakeRun({"tasks": ["a", "b"]}, m, ev)


def test_epoch_table_maps_probes_to_epochs():
    t = stats.epoch_table(_epoch_run())
    assert t.columns.tolist() == ["epoch", "step", "interference", "score", "n_probes"]
    assert t.epoch.tolist() == [1, 2, 3]
    # epoch 1: steps 5, 10; epoch 2: 12, 20; epoch 3: 25, 30.
    assert t.interference.tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert t.score.tolist() == pytest.approx([0.6, 0.7, 0.7])
    assert t.n_probes.tolist() == [2, 2, 2]
    assert stats.epoch_table(_epoch_run(), task="b").score.tolist() == pytest.approx(
        [0.7, 0.8, 0.7]
    )
    with pytest.raises(GradlensError, match="per-epoch evals"):
        stats.epoch_table(_epoch_run(), split="test")


def test_within_run_against_scipy_and_effective_n():
    rng = np.random.default_rng(0)
    x = calib._ar1(rng, 40, 0.6)
    y = 0.5 * x + calib._ar1(rng, 40, 0.6)
    res = stats.within_run(calib._series_run(x, y), metric="cosine", n_boot=500)
    assert res["estimate"] == pytest.approx(ss.pearsonr(x, y)[0], abs=1e-12)
    a = core.lag1_autocorrelation(x) * core.lag1_autocorrelation(y)
    n_eff = 40 * (1 - a) / (1 + a)
    assert res["n_eff"] == pytest.approx(n_eff)
    r = res["estimate"]
    t = r * math.sqrt((n_eff - 2) / (1 - r * r))
    assert res["p_value"] == pytest.approx(2 * ss.t.sf(abs(t), n_eff - 2))
    assert res["ci_low_neff"] < r < res["ci_high_neff"]
    assert res["bootstrap"].startswith("circular block")
    assert res["p_method"] == "AR(1) effective-n t-test"


def test_block_bootstrap_covers_better_than_iid_on_ar1():
    covered = {"auto": 0, 1: 0}
    for i in range(200):  # independent AR(1) pairs: the true correlation is 0
        rng = np.random.default_rng([9, i])
        x, y = calib._ar1(rng, 50, 0.8), calib._ar1(rng, 50, 0.8)
        for block in covered:
            res = stats.correlate(x, y, method="pearson", n_boot=499, block=block, seed=i)
            covered[block] += res["ci_low"] <= 0.0 <= res["ci_high"]
    assert abs(covered["auto"] / 200 - 0.95) < abs(covered[1] / 200 - 0.95)


@pytest.mark.slow
def test_effective_n_test_holds_its_level_on_ar1():
    res = calib.within_run_calibration(300, n=50, phi=0.8, block="auto", n_boot=199, seed=9)
    assert 0.01 <= res["fpr_neff"] <= 0.08
    assert res["coverage_neff"] > res["coverage_block"]


def test_auto_block_length_grows_with_autocorrelation():
    rng = np.random.default_rng(1)
    white = core.auto_block_length(rng.normal(size=100), rng.normal(size=100))
    red = core.auto_block_length(calib._ar1(rng, 100, 0.9), calib._ar1(rng, 100, 0.9))
    assert white == math.ceil(100 ** (1 / 3)) < red <= 50


# --------------------------------------------------------------------------- weight sweeps


def _peaked(best: dict[float, float], seeds: int = 3, noise: float = 0.002) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for size, b in best.items():
        for s in range(seeds):
            for w in np.linspace(0.1, 0.9, 9):
                acc = 0.7 - (w - b) ** 2 + rng.normal(0, noise)
                rows.append({"model.n_params": size, "seed": s, "weights.a": w,
                             "accuracy.mean": acc})  # fmt: skip
    return pd.DataFrame(rows)


def test_optimal_weight_grid_and_quadratic():
    table = _peaked({1e5: 0.3, 1e6: 0.5})
    res = stats.optimal_weight(table, weight_col="weights.a", n_boot=300)
    assert res.columns.tolist() == ["model.n_params", "p_star", "ci_low", "ci_high", "ci_level",
                                    "score_at_p_star", "n_weights", "n_runs", "min_seeds",
                                    "estimator"]  # fmt: skip
    assert res.p_star.tolist() == pytest.approx([0.3, 0.5])
    assert (res.ci_low <= res.p_star).all()
    assert (res.p_star <= res.ci_high).all()
    means = table.groupby(["model.n_params", "weights.a"])["accuracy.mean"].mean()
    assert res.score_at_p_star.tolist() == pytest.approx(means.groupby(level=0).max().tolist())
    # A peak between grid points: the quadratic vertex finds it, the grid cannot.
    off = _peaked({1e5: 0.35}, noise=0.0)
    grid = stats.optimal_weight(off, weight_col="weights.a", n_boot=0)
    quad = stats.optimal_weight(off, weight_col="weights.a", estimator="quadratic", n_boot=0)
    assert grid.p_star.item() == pytest.approx(0.35)  # 0.3 and 0.4 tie: their mean
    assert quad.p_star.item() == pytest.approx(0.35, abs=1e-9)
    with pytest.raises(GradlensError, match="`estimator` should be one of"):
        stats.optimal_weight(off, weight_col="weights.a", estimator="spline")  # type: ignore[arg-type]


def test_optimal_weight_trend_detects_a_moving_optimum_and_not_a_fixed_one():
    moving = _peaked({1e5: 0.3, 1e6: 0.5, 1e7: 0.7}, noise=0.002)
    res = stats.optimal_weight_trend(moving, weight_col="weights.a", n_boot=500)
    assert res["slope"] == pytest.approx(0.2)
    assert res["p_value"] < 0.05
    assert res["ci_low"] > 0
    assert res["spearman"] == pytest.approx(1.0)
    assert res["x"] == "log10(model.n_params)"
    fixed = _peaked({1e5: 0.5, 1e6: 0.5, 1e7: 0.5}, noise=0.01)
    res = stats.optimal_weight_trend(fixed, weight_col="weights.a", n_boot=500)
    assert res["p_value"] > 0.05
    assert res["ci_low"] <= 0 <= res["ci_high"]
    with pytest.raises(GradlensError, match="at least 2 distinct sizes"):
        stats.optimal_weight_trend(_peaked({1e5: 0.5}), weight_col="weights.a")


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grid", "quadratic"])
def test_optimal_weight_trend_null_rejection_rate(estimator):
    # p* is 0.5 at every size; noise of 0.03 on a curvature of 0.5: p* is far from certain.
    p = calib.trend_pvalues(100, shift=0.0, noise=0.03, estimator=estimator, n_boot=299, seed=3)
    assert np.mean(p[:, 0] < 0.05) <= 0.1


def test_joint_gain_paired_unpaired_and_missing_baseline():
    t = pd.DataFrame(
        {
            "tasks": ["a|b"] * 3 + ["a"] * 3 + ["b"] * 2,
            "seed": [0, 1, 2, 0, 1, 2, 5, 6],
            "model.n_params": 10,
            "weights.a": [0.5] * 3 + [1.0] * 3 + [np.nan] * 2,
            "weights.b": [0.5] * 3 + [np.nan] * 3 + [1.0] * 2,
            "accuracy.a": [0.9, 0.8, 0.85, 0.8, 0.8, 0.7, np.nan, np.nan],
            "accuracy.b": [0.6, 0.7, 0.8, np.nan, np.nan, np.nan, 0.5, 0.7],
        }
    )
    g = stats.joint_gain(t, n_boot=500).set_index("task")
    assert g.loc["a", "paired"]
    assert not g.loc["b", "paired"]
    assert g.loc["a", "gain"] == pytest.approx(np.mean([0.1, 0.0, 0.15]))
    assert g.loc["b", "gain"] == pytest.approx(0.7 - 0.6)
    assert g.loc["a", "weight"] == 0.5
    assert g.loc["a", "n_single"] == 3
    assert g.loc["a", "ci_low"] <= g.loc["a", "gain"] <= g.loc["a", "ci_high"]
    g2 = stats.joint_gain(t[t.tasks != "b"], n_boot=10).set_index("task")
    assert math.isnan(g2.loc["b", "gain"])
    assert "no single-task run" in g2.loc["b", "note"]


# --------------------------------------------------------------------------- JSON


def test_to_json_is_strict_and_round_trips(tmp_path):
    res = stats.correlate([1, 1, 1], [1, 2, 3], n_boot=5, n_perm=5)
    table = pd.DataFrame({"a": [1.0, np.nan], "b": pd.array([1, None], "Int64"), "c": ["x", "y"]})
    text = stats.to_json({"corr": res, "table": table, "arr": np.array([np.inf, 2])},
                         tmp_path / "out.json")  # fmt: skip
    back = json.loads((tmp_path / "out.json").read_text())
    assert back == json.loads(text)
    assert back["corr"]["estimate"] is None
    assert back["table"] == [{"a": 1.0, "b": 1, "c": "x"}, {"a": None, "b": None, "c": "y"}]
    assert back["arr"] == [None, 2.0]
    with pytest.raises(GradlensError, match="`obj` should hold"):
        stats.to_json({"x": object()})


# --------------------------------------------------------------------------- issue 16: small n


def test_joint_gain_t_interval_equals_scipy():
    t = pd.DataFrame(
        {
            "tasks": ["a|b"] * 3 + ["a"] * 3 + ["b"] * 2,
            "seed": [0, 1, 2, 0, 1, 2, 5, 6],
            "model.n_params": 10,
            "weights.a": [0.5] * 3 + [1.0] * 3 + [np.nan] * 2,
            "weights.b": [0.5] * 3 + [np.nan] * 3 + [1.0] * 2,
            "accuracy.a": [0.9, 0.8, 0.85, 0.8, 0.8, 0.7, np.nan, np.nan],
            "accuracy.b": [0.6, 0.7, 0.8, np.nan, np.nan, np.nan, 0.5, 0.7],
        }
    )
    g = stats.joint_gain(t).set_index("task")
    d = np.array([0.1, 0.0, 0.15])
    ref = ss.ttest_rel([0.9, 0.8, 0.85], [0.8, 0.8, 0.7])
    lo, hi = ref.confidence_interval(0.95)
    assert g.loc["a", "interval"] == "paired t"
    assert g.loc["a", "p_value"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert (g.loc["a", "ci_low"], g.loc["a", "ci_high"]) == pytest.approx((lo, hi), rel=1e-12)
    assert g.loc["a", "se"] == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    welch = ss.ttest_ind([0.6, 0.7, 0.8], [0.5, 0.7], equal_var=False)
    assert g.loc["b", "interval"] == "Welch t"
    assert g.loc["b", "p_value"] == pytest.approx(welch.pvalue, rel=1e-12)
    assert g.loc["b", "df"] == pytest.approx(welch.df, rel=1e-12)
    wl, wh = welch.confidence_interval(0.95)
    assert (g.loc["b", "ci_low"], g.loc["b", "ci_high"]) == pytest.approx((wl, wh), rel=1e-12)
    boot = stats.joint_gain(t, interval="bootstrap", n_boot=300).set_index("task")
    assert boot.loc["a", "interval"] == "percentile bootstrap"
    assert boot.loc["a", "p_value"] == pytest.approx(ref.pvalue, rel=1e-12)  # the test stays t
    with pytest.raises(GradlensError, match="`interval` should be one of"):
        stats.joint_gain(t, interval="wald")  # type: ignore[arg-type]


@pytest.mark.parametrize("seeds", [3, 5, 10])
def test_paired_t_interval_covers_where_the_bootstrap_does_not(seeds):
    rng = np.random.default_rng(seeds)
    d = 0.01 + rng.normal(0, 0.004, size=(4000, seeds))
    covered = np.mean([(lambda r: r["ci_low"] <= 0.01 <= r["ci_high"])(gain.paired_t(row))
                       for row in d])  # fmt: skip
    assert 0.93 <= covered <= 0.97
    if seeds == 3:  # the percentile bootstrap of 3 seeds (as joint_gain did) covers ~0.8
        res = calib.gain_coverage(80, seeds=3, interval="bootstrap", n_boot=499)
        assert res["coverage"] < 0.9


def test_equivalence_p_is_two_one_sided_t_tests():
    gain_, se, df, margin = 0.002, 0.003, 4.0, 0.01
    p = gain.equivalence_p(gain_, se, df, margin)
    lower = ss.t.sf((gain_ + margin) / se, df)
    upper = ss.t.cdf((gain_ - margin) / se, df)
    assert p == pytest.approx(max(lower, upper))
    # TOST at alpha rejects exactly when the 1 - 2 alpha interval lies inside the margins.
    for margin_ in (0.005, 0.008, 0.0095, 0.02):
        q = ss.t.ppf(0.95, df)
        inside = -margin_ < gain_ - q * se and gain_ + q * se < margin_
        assert (gain.equivalence_p(gain_, se, df, margin_) < 0.05) == inside
    assert math.isnan(gain.equivalence_p(0.0, float("nan"), 3.0, 0.01))


def _select_table(val_bump: float) -> pd.DataFrame:
    rows = []
    for w in (0.2, 0.5, 0.8):
        for s in range(3):
            val = 0.5 + (val_bump if (w == 0.8 and s == 0) else 0.0) + 0.01 * (w == 0.5)
            rows.append({"tasks": "a|b", "model.n_params": 1, "seed": s, "weights.a": w,
                         "weights.b": round(1 - w, 3), "sel": val,
                         "accuracy.a": 0.8 + 0.1 * w + 0.01 * s, "accuracy.b": 0.6})  # fmt: skip
    for s in range(3):
        rows.append({"tasks": "a", "model.n_params": 1, "seed": s, "accuracy.a": 0.8 + 0.01 * s})
        rows.append({"tasks": "b", "model.n_params": 1, "seed": s, "accuracy.b": 0.55})
    return pd.DataFrame(rows)


def test_selected_gain_never_lets_the_evaluated_seed_choose():
    # Seed 0 has a huge validation score at w = 0.8; every other seed prefers w = 0.5.
    g = stats.selected_gain(_select_table(1.0), select_col="sel").set_index("task")
    picked = [p["weights.a"] for p in json.loads(g.loc["a", "picked"])]
    # Seed 0's gain is measured at the choice of seeds 1 and 2 (0.5); seeds 1 and 2 each see
    # seed 0's bump among the other seeds and choose 0.8.
    assert picked == [0.5, 0.8, 0.8]
    d = np.array([0.8 + 0.05 - 0.8, 0.8 + 0.08 + 0.01 - 0.81, 0.8 + 0.08 + 0.02 - 0.82])
    ref = ss.ttest_1samp(d, 0.0)
    assert g.loc["a", "gain"] == pytest.approx(d.mean())
    assert g.loc["a", "p_value"] == pytest.approx(ref.pvalue)
    assert g.loc["a", "n_seeds"] == 3
    assert g.loc["b", "gain"] == pytest.approx(0.05)
    # Shown configuration: the choice on all seeds (seed 0's bump wins there).
    assert g.loc["a", "weights.a"] == 0.8
    no_base = stats.selected_gain(_select_table(0.0)[lambda t: t.tasks != "b"], select_col="sel")
    assert "no single-task run on b" in no_base.set_index("task").loc["b", "note"]
    with pytest.raises(GradlensError, match="select_col"):
        stats.selected_gain(_select_table(0.0), select_col="nope")


def test_group_permutations_move_whole_groups_and_enumerate_exactly():
    codes = np.array([0, 0, 1, 1, 2, 2, 3, 4, 4, 3])  # groups 0-2 and 4 have 2 members, 3 too
    rows, exact, n_distinct = core.group_permutations(np.random.default_rng(0), codes, 10**6)
    assert exact
    assert n_distinct == math.factorial(5)  # five groups of two members
    assert rows.shape == (120, 10)
    assert len({tuple(r) for r in rows}) == 120
    for r in rows:
        for g in range(5):
            members = np.flatnonzero(codes == g)
            # the members of a group land together in one group, in the same order
            assert len(set(codes[r[members]])) == 1
    random_rows, exact2, _ = core.group_permutations(np.random.default_rng(0), codes, 50)
    assert not exact2
    assert random_rows.shape == (50, 10)
    assert core.pvalue_floor(True, 120) == 1 / 120
    assert core.pvalue_floor(False, 50) == 1 / 51


def test_group_permutation_pvalue_equals_brute_force():
    rng = np.random.default_rng(3)
    codes = np.repeat(np.arange(5), 3)
    x = np.linspace(0, 1, 5)[codes]
    y = rng.normal(size=5)[codes] + rng.normal(size=15)
    res = stats.correlate(x, y, method="pearson", n_boot=0, n_perm=10**4, groups=codes)
    assert res["p_method"] == "exact permutation of groups"
    r0 = abs(ss.pearsonr(x, y)[0])
    hits = 0
    blocks = y.reshape(5, 3)
    for perm in itertools.permutations(range(5)):
        hits += abs(ss.pearsonr(x, blocks[list(perm)].ravel())[0]) >= r0 * (1 - 1e-12)
    assert res["p_value"] == pytest.approx(hits / 120)
    assert res["p_floor"] == pytest.approx(1 / 120)


def test_permuting_configurations_holds_the_level_where_permuting_runs_does_not():
    res = calib.clustered_fpr(400, configs=10, seeds=3, icc=0.5, n_perm=199, seed=5)
    assert 0.02 <= res["groups_fpr"] <= 0.08
    assert res["runs_fpr"] > 0.12


def _dl_by_hand(r: list[float], n: list[float]) -> tuple[float, float, float, float]:
    z = [math.atanh(v) for v in r]
    w = [n_i - 3 for n_i in n]
    fe = sum(wi * zi for wi, zi in zip(w, z)) / sum(w)
    q = sum(wi * (zi - fe) ** 2 for wi, zi in zip(w, z))
    c = sum(w) - sum(wi * wi for wi in w) / sum(w)
    tau2 = max(0.0, (q - (len(z) - 1)) / c)
    ws = [1 / (1 / wi + tau2) for wi in w]
    mu = sum(wi * zi for wi, zi in zip(ws, z)) / sum(ws)
    hk = sum(wi * (zi - mu) ** 2 for wi, zi in zip(ws, z)) / ((len(z) - 1) * sum(ws))
    return mu, tau2, 1 / sum(ws), hk


def test_pool_correlations_equals_dersimonian_laird_by_hand():
    r, n = [0.1, 0.6, 0.35, -0.05], [20.0, 45.0, 30.0, 12.0]
    res = stats.pool_correlations(r, n)
    mu, tau2, var_dl, var_hk = _dl_by_hand(r, n)
    assert res["tau2"] == pytest.approx(tau2) and tau2 > 0  # noqa: PT018
    assert res["estimate"] == pytest.approx(math.tanh(mu))
    q = ss.t.ppf(0.975, 3)
    assert res["ci_low"] == pytest.approx(math.tanh(mu - q * math.sqrt(var_hk)))
    assert res["ci_high_dl"] == pytest.approx(math.tanh(mu + 1.959963984540054 * math.sqrt(var_dl)))
    assert res["p_value"] == pytest.approx(2 * ss.t.sf(abs(mu) / math.sqrt(var_hk), 3))
    # Homogeneous runs: tau^2 = 0 and the estimate is the fixed-effect mean of z.
    same = stats.pool_correlations([0.3, 0.3, 0.3], [30, 40, 50])
    assert same["tau2"] == 0.0
    assert same["estimate"] == pytest.approx(0.3)
    # Runs with n <= 3 carry no information.
    few = stats.pool_correlations([0.3, 0.9], [30, 3])
    assert few["k"] == 1 and few["n_dropped"] == 1 and math.isnan(few["estimate"])  # noqa: PT018
    with pytest.raises(GradlensError, match="same length"):
        stats.pool_correlations([0.1, 0.2], [10])
    with pytest.raises(GradlensError, match=r"`r` should lie in \[-1, 1\]"):
        stats.pool_correlations([1.5, 0.2], [10, 10])


@pytest.mark.parametrize("k", [3, 5, 10])
def test_pooled_interval_covers_at_few_runs(k):
    res = calib.pooled_coverage(600, k=k, tau=0.2, seed=k)
    assert 0.92 <= res["hk"] <= 0.98
    assert res["dl"] < res["hk"]  # the plain normal interval is short with heterogeneous runs


def test_power_gain_equals_the_noncentral_t():
    n, d = 5, 1.5
    tc = ss.t.ppf(0.975, n - 1)
    exact = ss.nct.sf(tc, n - 1, d * math.sqrt(n)) + ss.nct.cdf(-tc, n - 1, d * math.sqrt(n))
    res = stats.power("gain", effect=d, seeds=n, n_sim=8000, seed=1)
    assert abs(res["power"] - exact) < 4 * res["se"]
    mde = stats.min_detectable_effect("gain", seeds=n, n_sim=4000, seed=1)
    tc = ss.t.ppf(0.975, n - 1)
    at_mde = ss.nct.sf(tc, n - 1, mde["effect"] * math.sqrt(n))
    assert 0.77 <= at_mde <= 0.83
    more = stats.min_detectable_effect("gain", seeds=10, n_sim=4000, seed=1)
    assert more["effect"] < mde["effect"]


def test_power_association_holds_level_at_zero_and_grows():
    null = stats.power("association", effect=0.0, sizes=2, weights=5, seeds=3, icc=0.5,
                       n_sim=800, seed=2)  # fmt: skip
    assert 0.02 <= null["power"] <= 0.08
    strong = stats.power("association", effect=0.6, sizes=2, weights=5, seeds=3, n_sim=300)
    assert strong["power"] > 0.8
    # Five configurations give 5! = 120 permutations: nothing passes 0.05 / 10 = 0.005.
    stuck = stats.min_detectable_effect("association", weights=5, seeds=3, n_tests=10, n_sim=50)
    assert not stuck["reachable"]
    assert math.isnan(stuck["effect"])
    with pytest.raises(GradlensError, match="`design` should be one of"):
        stats.power("slope", effect=0.1)  # type: ignore[arg-type]
    with pytest.raises(GradlensError, match="`effect` should be a correlation"):
        stats.power("association", effect=1.5)
    with pytest.raises(GradlensError, match="`seeds` should be an int >= 2"):
        stats.power("gain", effect=1.0, seeds=1)


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [3, 5, 10])
def test_joint_gain_interval_coverage_through_joint_gain(seeds):
    res = calib.gain_coverage(1000, seeds=seeds, seed=seeds)
    assert 0.92 <= res["coverage"] <= 0.98
    assert 0.02 <= res["null_excludes_0"] <= 0.08
    heavy = calib.gain_coverage(1000, seeds=seeds, noise="t3", seed=seeds)
    assert 0.92 <= heavy["coverage"] <= 0.99  # heavy tails make the t interval conservative


@pytest.mark.slow
def test_held_out_selection_removes_the_optimism():
    res = calib.selection_optimism(600, seeds=3, seed=4)
    assert res["naive_mean_gain"] > 0.001  # choosing on val and reporting test is optimistic
    assert abs(res["held_out_mean_gain"]) < 0.0005
    assert 0.02 <= res["held_out_beats"] <= 0.08


def test_runs_on_the_same_tasks_in_another_order_form_one_task_set(tmp_path):
    # issue 15, item 9: runs with tasks [b, a] and [a, b] are one task set with aligned pairs
    runs = []
    for k, order in enumerate((["a", "b", "c"], ["c", "b", "a"])):
        runs.append(make_run(tmp_path / f"r{k}", tasks=order, n_steps=10, epochs=2, seed=k))
    t = stats.runs_table([load_run(p) for p in runs])
    assert t["tasks"].tolist() == ["a|b|c", "a|b|c"]
    pair_cols = sorted(c for c in t.columns if c.startswith("cosine.") and "|" in c)
    assert pair_cols == ["cosine.a|b", "cosine.a|c", "cosine.b|c"]
    assert t[pair_cols].notna().all().all()  # both runs fill the same three columns
