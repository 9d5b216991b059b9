"""The analyses' shared logic (fast) and every script end to end in ``--quick`` mode.

The end-to-end tests train tiny models (5-45 s each on a loaded 2-core machine) and are marked
``slow``: ``pytest tests/analyses/test_analyses.py -m slow``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest

from analyses import (
    _common,
    _design,
    _figures,
    capacity,
    conflict,
    layers,
    optimal_weight,
    pbt,
    power,
    reanalyse,
    timing,
    verdicts,
)
from gradlens import stats

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("analyses")
    return root / "runs", root / "figures"


def _argv(dirs: tuple[Path, Path]) -> list[str]:
    return ["--quick", "--runs", str(dirs[0]), "--figures", str(dirs[1])]


def _png_ok(path: Path) -> None:
    from matplotlib.image import imread

    img = imread(path)
    assert img.shape[0] > 100
    assert img.shape[1] > 100
    assert float(np.std(img[..., :3])) > 0.01  # not blank


def test_presets_and_flags() -> None:
    small = _common.preset("small")
    assert len(small.widths) >= 3
    assert len(small.depths) >= 3
    assert len(small.p) >= 7
    assert len(small.seeds) == 3
    args = _common.parse_args("x", ["--quick"])
    assert args.preset.name == "quick"
    assert args.workers == 1
    assert args.figures != _common.FIGURES  # quick never overwrites the committed figures
    assert _common.parse_args("x", []).figures == _common.FIGURES
    with pytest.raises(SystemExit):
        _common.parse_args("x", ["--quick", "--full"])


def test_select_weights_picks_best_mean_over_seeds() -> None:
    t = pd.DataFrame(
        {
            "model.width": [1, 1, 1, 1, 2, 2],
            "model.depth": 1,
            "n_tasks": 2,
            "weights.a": [0.2, 0.2, 0.8, 0.8, 0.2, 0.8],
            "accuracy.mean": [0.9, 0.5, 0.6, 0.7, 0.1, 0.2],
        }
    )
    got = capacity.select_weights(t, ["a", "b"])
    # width 1: means 0.70 (w 0.2) and 0.65 (w 0.8); width 2: 0.1 and 0.2
    assert got["weights.a"].tolist() == [0.2, 0.8]
    assert got["val_accuracy"].tolist() == pytest.approx([0.7, 0.2])


def _synthetic_sweep() -> dict[str, pd.DataFrame]:
    """Two sizes x weights {0.2, 0.5, 0.8} x 2 seeds, plus single-task runs; accuracies planted."""
    rows = []
    for width in (1.0, 2.0):
        for seed in (0, 1):
            for w in (0.2, 0.5, 0.8):
                acc_a = 0.7 + 0.1 * w + 0.01 * seed + 0.05 * width
                rows.append(
                    {
                        "model.width": width,
                        "model.depth": 1,
                        "model.n_params": 100 * width,
                        "seed": seed,
                        "tasks": "a|b",
                        "n_tasks": 2,
                        "weights.a": w,
                        "weights.b": 1 - w,
                        "accuracy.a": acc_a,
                        "accuracy.b": 0.6,
                        "accuracy.mean": (acc_a + 0.6) / 2 - abs(w - 0.5) * width / 10,
                    }
                )
            for t in ("a", "b"):
                rows.append(
                    {
                        "model.width": width,
                        "model.depth": 1,
                        "model.n_params": 100 * width,
                        "seed": seed,
                        "tasks": t,
                        "n_tasks": 1,
                        "weights.a": float(t == "a"),
                        "weights.b": float(t == "b"),
                        "accuracy.a": 0.75,
                        "accuracy.b": 0.65,
                        "accuracy.mean": 0.7,
                    }
                )
    t = pd.DataFrame(rows)
    return {"val": t, "test": t}


def test_gains_at_selected_and_uniform_weight() -> None:
    g = capacity.gains(_synthetic_sweep(), ["a", "b"], n_boot=50)
    sel = g[g["setting"] == "p selected on val"].sort_values(["model.width", "task"])
    # accuracy.mean peaks at w = 0.5 for both sizes, so the selected weight is 0.5
    assert sel["weights.a"].tolist() == [0.5] * 4
    uni = g[g["setting"] == "p = 0.5"].sort_values(["model.width", "task"])
    assert np.allclose(sel["gain"], uni["gain"])
    # gain on a: 0.7 + 0.05 + 0.005 (mean seed) + 0.05 width - 0.75; on b: 0.6 - 0.65
    want = [
        0.7 + 0.05 + 0.005 + 0.05 * wd - 0.75 if t == "a" else -0.05
        for wd, t in zip(sel["model.width"], sel["task"])
    ]
    assert np.allclose(sel["gain"], want)
    assert (sel["paired"]).all()


def test_gains_carry_test_noise_and_size_gains_cluster_by_seed() -> None:
    tables = _synthetic_sweep()
    for t in tables.values():
        t["dataset.n.test"] = 400
    g = capacity.gains(tables, ["a", "b"], n_boot=50)
    sel = g[g["setting"] == "p selected on val"].sort_values(["model.width", "task"])
    assert (sel["n_test"] == 400).all()
    p = sel["joint_mean"].to_numpy(float)
    assert np.allclose(sel["joint_sd_test"], np.sqrt(p * (1 - p) / 400))
    q = sel["single_mean"].to_numpy(float)
    assert np.allclose(sel["se_test"] ** 2, (p * (1 - p) + q * (1 - q)) / 400)
    assert np.allclose(sel["se"] ** 2, sel["se_seed"] ** 2 + sel["se_test"] ** 2)
    # never narrower than the seed-only interval (2 seeds: its t quantile is 12.7, and on
    # task a it stays the wider); wider where the seeds agree (task b: no seed spread)
    assert (sel["ci_low"] <= sel["ci_low_seed"]).all()
    assert (sel["ci_high"] >= sel["ci_high_seed"]).all()
    b = sel[sel["task"] == "b"]
    assert (b["ci_high"] - b["ci_low"] > 0).all()
    assert np.allclose(b["ci_high_seed"] - b["ci_low_seed"], 0)
    sg = capacity.size_gains(tables, ["a", "b"]).sort_values("model.width")
    # the per-size gain is the mean over tasks of the per-task gains (same seeds)
    per_size = sel.groupby("model.width")["gain"].mean().to_numpy()
    assert np.allclose(sg["gain"], per_size)
    assert (sg["n_seeds"] == 2).all()
    # one test set shared by the tasks: the bound of perfectly correlated task errors
    shared = sel.groupby("model.width")["se_test"].mean().to_numpy()
    assert np.allclose(sg["se_test"], shared)
    assert (sg["test_items"] == "shared by the tasks").all()
    # each task (domain) on its own items: independent
    for t in tables.values():
        t["dataset.domain_counts.test.a"] = 400
        t["dataset.domain_counts.test.b"] = 400
    own = capacity.size_gains(tables, ["a", "b"]).sort_values("model.width")
    indep = sel.groupby("model.width")["se_test"].apply(lambda v: np.sqrt((v**2).sum()) / 2)
    assert np.allclose(own["se_test"], indep.to_numpy())
    # without the test-set size: the seed-only interval, said so
    bare = capacity.gains(_synthetic_sweep(), ["a", "b"], n_boot=50)
    assert np.allclose(bare["ci_low"], bare["ci_low_seed"], equal_nan=True)
    assert bare["interval"].str.contains("unknown").all()


def test_schedule_table_and_json_tidy(tmp_path: Path) -> None:
    state = {
        "members": [
            {
                "schedule": [
                    {"epoch": 0, "weights": {"a": 0.5, "b": 0.5}},
                    {"epoch": 2, "weights": {"a": 0.8, "b": 0.2}},
                ]
            },
            {"schedule": [{"epoch": 0, "weights": {"a": 0.1, "b": 0.9}}]},
        ]
    }
    s = pbt.schedule_table(state)
    assert len(s) == 6
    assert s.groupby(["member", "epoch"])["weight"].sum().tolist() == pytest.approx([1, 1, 1])
    path = _common.write_json(
        {"x": np.float64("nan"), "t": s, "n": np.int64(3)}, tmp_path / "a.json"
    )
    back = json.loads(path.read_text())
    assert back["x"] is None
    assert back["n"] == 3
    assert back["t"][3] == {"member": 0, "epoch": 2, "task": "b", "weight": 0.2}


@pytest.mark.slow
def test_load_tables_marks_baselines_single_task(quick_dirs: tuple[Path, Path]) -> None:
    pre = _common.preset("quick")
    d = _common.pair_sweep(_common.PAIRS[0], pre, quick_dirs[0], 1)
    t = _common.load_tables(d)["test"]
    single = t[t["n_tasks"] == 1]
    assert sorted(single["tasks"]) == ["left", "right"]
    assert (t["n_tasks"] == 2).sum() == len(pre.p) * len(pre.seeds)


@pytest.mark.slow
def test_capacity_quick(quick_dirs: tuple[Path, Path]) -> None:
    s = capacity.main(_argv(quick_dirs))
    for name in ("multidigits", "domain_digits"):
        g = pd.DataFrame(s["pairs"][name]["gains"])
        assert set(g["setting"]) == {"p selected on val", "p = 0.5"}
        assert np.allclose(g["gain"], g["joint_mean"] - g["single_mean"])
        _png_ok(quick_dirs[1] / f"capacity_{name}.png")
        _png_ok(quick_dirs[1] / f"capacity_{name}_uniform.png")
    data = json.loads((quick_dirs[1] / "capacity.json").read_text())
    assert data["preset"]["name"] == "quick"
    assert data["pairs"]["multidigits"]["ols (p selected on val)"] is None  # one size in quick
    lo, hi = data["figure_ylim_points"]
    assert lo < 0 < hi


@pytest.mark.slow
def test_optimal_weight_quick(quick_dirs: tuple[Path, Path]) -> None:
    s = optimal_weight.main(_argv(quick_dirs))
    pre = _common.preset("quick")
    for name in ("multidigits", "domain_digits"):
        row = s["pairs"][name]["val"]["grid"]["per_size"].iloc[0]
        # the grid estimate is a grid weight, or the mean of weights tied at the top
        assert min(pre.p) <= row["p_star"] <= max(pre.p)
        assert row["n_runs"] == len(pre.p) * len(pre.seeds)
        _png_ok(quick_dirs[1] / f"optimal_weight_{name}.png")
        cost = s["pairs"][name]["transfer_cost"]
        assert cost["cost"].tolist() == [0.0]  # one size: its own weight is the smallest's
    assert (quick_dirs[1] / "optimal_weight.json").exists()


@pytest.mark.slow
def test_conflict_quick(quick_dirs: tuple[Path, Path]) -> None:
    s = conflict.main(_argv(quick_dirs))
    for name in ("multidigits", "domain_digits"):
        w = s["pairs"][name]["within"]
        assert len(w["per_run"]) == 2
        r = w["pooled"]["estimate"]
        assert math.isnan(r) or -1 <= r <= 1
        assoc = s["pairs"][name]["across"]
        assert {"p_value", "p_adjusted", "estimate"} <= set(assoc.columns)
        assert {"estimate", "p_value"} <= set(w["per_run"][0]["cosine"])
        assert len(s["pairs"][name]["weight_controlled"]) == 2
        _png_ok(quick_dirs[1] / f"conflict_timeline_{name}.png")
        for stem in ("conflict", "cosine", "test_accuracy"):
            _png_ok(quick_dirs[1] / f"weight_vs_{stem}_{name}.png")
    _png_ok(quick_dirs[1] / "conflict_vs_accuracy_epochs.png")


@pytest.mark.slow
def test_pbt_quick(quick_dirs: tuple[Path, Path]) -> None:
    s = pbt.main(_argv(quick_dirs))
    assert len(s["tasks"]) >= 6
    rep = s["pbt"]["per_replicate"][0]
    assert len(rep["members"]) == s["population"]
    assert len(s["random_static"]["per_replicate"][0]["runs"]) == s["population"]
    assert rep["test"] == s["pbt"]["test_mean"]  # one replicate in quick mode
    for arm in ("uniform", "pbt", "random_static"):
        assert 0 <= s[arm]["test_mean"] <= 1
    d = s["differences"]["pbt - uniform"]
    assert d["difference"] == pytest.approx(s["pbt"]["test_mean"] - s["uniform"]["test_mean"])
    best = s["uniform_best_of_n"]["per_replicate"][0]
    assert len(best["runs"]) == s["population"]  # N uniform seeds: PBT's compute
    assert best["val"] == pytest.approx(best["runs"]["val"].max())
    paired = s["differences"]["pbt - uniform_best_of_n"]
    assert paired["test"] == "paired t"
    # the MTO arms: one training a replicate, with the replicate's seed, paired with uniform
    assert set(s["mto"]) == set(_design.MTO_ARMS)
    seed = s["uniform"]["per_replicate"][0]["seed"]
    for m in _design.MTO_ARMS:
        row = s["mto"][m]["per_replicate"][0]
        assert row["seed"] == seed
        assert 0 <= row["test"] <= 1
        d = s["differences"][f"{m} - uniform"]
        assert d["test"] == "paired t"
        assert d["difference"] == pytest.approx(row["test"] - s["uniform"]["test_mean"])
    # resumable: a rerun reads every finished training back instead of training it again
    again = pbt.main(_argv(quick_dirs))
    assert again["mto"]["upgrad"]["test_mean"] == s["mto"]["upgrad"]["test_mean"]
    assert again["cpu_seconds"] == s["cpu_seconds"]
    _png_ok(quick_dirs[1] / "pbt_schedules.png")
    _png_ok(quick_dirs[1] / "pbt_result.png")


# --------------------------------------------------------------------------------------------
# The study design, the power simulation and the figures (fast)
# --------------------------------------------------------------------------------------------


def test_design_grid_spans_decades_and_budget_adds_up() -> None:
    from gradlens.models import build_model

    for family, sizes in _design.FAMILY_SIZES.items():
        n = [
            build_model(family, {"a": 10, "b": 10}, (1, 16, 16), width=w, depth=d).n_params()[
                "total"
            ]
            for w, d in sizes
        ]
        assert n == sorted(n)
        assert math.log10(n[-1] / n[0]) > 1.7  # the small run spanned 1.7 decades
    study = _design.Study(seeds=(0, 1), p=(0.2, 0.5, 0.8))
    b = _design.budget({("mlp", 1.0, 2): 0.5}, {("mlp", 1.0, 2): 1.0}, study, pairs=3)
    runs = (3 + 2) * 2 * 3
    assert b["runs_per_family"] == {"mlp": runs}
    assert b["total"] == pytest.approx(runs * (1.0 + study.expected_epochs * 0.5))
    assert {p.priority for p in _design.STUDY_PAIRS} == {1, 2, 3}


def test_power_paired_matches_noncentral_t() -> None:
    from scipy import stats as st

    n, sd, eff = 8, 0.6, 0.5
    sim = power.power_paired(effect=eff, replicates=n, sd_diff=sd, margin=0.5, n_sim=20000)
    crit = st.t.ppf(0.975, n - 1)
    nc = eff / (sd / math.sqrt(n))
    exact = st.nct.sf(crit, n - 1, nc) + st.nct.cdf(-crit, n - 1, nc)
    assert sim["superiority"] == pytest.approx(exact, abs=0.015)


def test_power_tests_hold_their_size() -> None:
    """At the null (or at the margin, for equivalence) each test rejects about 5 % of the time."""
    tr = power.power_trend(
        slope=0.0, decades=2.6, sizes=6, families=3, seeds=5, sd_seed=1.5, sd_size=2.0, n_sim=4000
    )
    assert 0.03 < tr["ols"] < 0.07
    assert 0.03 < tr["spearman"] < 0.08
    w = power.power_within(true_r=0.0, runs=12, epochs=20, phi=0.6, margin=0.2, tau=0.1, n_sim=2000)
    assert 0.03 < w["reject_zero"] < 0.08
    at_margin = power.power_pstar_slope(
        slope=0.05, decades=2.6, sizes=6, families=3, sd_pstar=0.03, margin=0.05, n_sim=4000
    )
    assert at_margin["equivalent"] < 0.07
    eq = power.power_paired(effect=0.5, replicates=10, sd_diff=0.5, margin=0.5, n_sim=4000)
    assert eq["equivalence"] > 0.5  # a true 0 is declared equivalent most of the time
    # more replicates, more power
    small = power.power_trend(
        slope=3.0, decades=1.7, sizes=9, families=1, seeds=3, sd_seed=1.5, sd_size=2.3, n_sim=2000
    )
    big = power.power_trend(
        slope=3.0, decades=2.6, sizes=6, families=3, seeds=5, sd_seed=1.5, sd_size=2.3, n_sim=2000
    )
    assert big["ols"] > small["ols"] + 0.3


def test_noise_levels_read_the_committed_results() -> None:
    noise = power.noise_levels(_common.FIGURES)
    assert set(noise["per_pair"]) == {"multidigits", "domain_digits"}
    for key in ("sd_seed_gain", "sd_size_gain", "sd_replicate"):
        assert 0.05 < noise[key] < 10  # accuracy points
    assert 0 < noise["sd_pstar"] < 0.2


def test_ols_fit_and_paired_test_against_scipy() -> None:
    from scipy import stats as st

    g = pd.DataFrame(
        {
            "model.n_params": [1e3, 1e4, 1e5, 1e6] * 2,
            "gain": [0.01, 0.015, 0.03, 0.02, 0.0, 0.02, 0.02, 0.04],
        }
    )
    fit = capacity.ols_fit(g)
    ref = st.linregress([3, 4, 5, 6], 100 * np.array([0.005, 0.0175, 0.025, 0.03]))
    assert fit["slope"] == pytest.approx(ref.slope)
    assert fit["p_value"] == pytest.approx(ref.pvalue)
    half = st.t.ppf(0.975, 2) * ref.stderr
    assert fit["ci_high"] - fit["ci_low"] == pytest.approx(2 * half)
    assert capacity.ols_fit(g.iloc[:2]) is None
    a, b = np.array([0.90, 0.92, 0.91, 0.95]), np.array([0.89, 0.90, 0.92, 0.93])
    d = pbt._paired(a, b)
    assert d["p_value"] == pytest.approx(st.ttest_rel(a, b).pvalue)
    assert d["ci90_low"] > d["ci_low"]
    assert d["equivalent_within_margin"] == (
        d["ci90_low"] > -pbt.EQUIVALENCE_MARGIN and d["ci90_high"] < pbt.EQUIVALENCE_MARGIN
    )


def test_weight_controlled_removes_a_confound_through_the_weight() -> None:
    """Cosine and accuracy both follow a hump in p and nothing else: partialled on p and p^2,
    their correlation vanishes, while the raw correlation is strong."""
    rng = np.random.default_rng(0)
    rows = []
    for n in (1e3, 1e4, 1e5):
        for p in (0.1, 0.3, 0.5, 0.7, 0.9):
            for seed in range(4):
                hump = -((p - 0.5) ** 2)
                rows.append(
                    {"model.n_params": n, "weights.a": p, "seed": seed,
                     "cosine.mean": hump + 0.01 * rng.normal(),
                     "conflict_freq.mean": 0.5 + 0.05 * rng.normal(),
                     "accuracy.mean": 0.9 + hump + 0.01 * rng.normal()}
                )  # fmt: skip
    joint = pd.DataFrame(rows)
    raw = np.corrcoef(joint["cosine.mean"], joint["accuracy.mean"])[0, 1]
    assert raw > 0.8
    res = {r["x"]: r for r in conflict.weight_controlled(joint, "weights.a", n_boot=200)}
    cos = res["cosine.mean"]
    assert abs(cos["estimate"]) < 0.3
    assert cos["ci_low"] < 0 < cos["ci_high"]
    assert res["cosine.mean"]["controls"] == ["log10_params", "p", "p2"]
    few = conflict.weight_controlled(joint.iloc[:5], "weights.a", n_boot=50)
    assert few[0]["estimate"] is None


def _size_cells() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Gains, accuracy-vs-weight cells and optima of a planted 2 x 2 grid, for the figures."""
    gains, cells, opt = [], [], []
    for d in (1, 2):
        for w in (0.5, 1.0):
            n = int(1e4 * w * d)
            for task in ("a", "b"):
                g = 0.01 * math.log10(n) - 0.05 + (0.01 if task == "a" else 0.0)
                gains.append(
                    {"model.n_params": n, "model.depth": d, "model.width": w, "task": task,
                     "gain": g, "ci_low": g - 0.01, "ci_high": g + 0.01, "weights.a": 0.5}
                )  # fmt: skip
            for p in (0.2, 0.5, 0.8):
                cells.append(
                    {"model.depth": d, "model.width": w, "model.n_params": n, "weights.a": p,
                     "mean": 0.9 - (p - 0.45) ** 2, "se": 0.005, "n": 3}
                )  # fmt: skip
            opt.append(
                {"model.n_params": n, "p_star": 0.45, "ci_low": 0.4, "ci_high": 0.5, "best_p": 0.5}
            )
    return pd.DataFrame(gains), pd.DataFrame(cells), pd.DataFrame(opt)


def test_figures_render(tmp_path: Path) -> None:
    gains, cells, opt = _size_cells()
    fit = capacity.ols_fit(gains)
    figs = {
        "gain": _figures.gain_vs_params(
            gains, weight_col="weights.a", fit=fit, ylim=(-6, 3), title="planted"
        ),
        "weight": _figures.accuracy_vs_weight(
            cells, opt, weight_col="weights.a", xlabel="loss weight of 'a' (p)", title="planted"
        ),
        "metric": _figures.weight_vs_metric(
            cells, weight_col="weights.a", xlabel="p", ylabel="acc", scale=100, title="planted"
        ),
        "pbt_result": _figures.pbt_result(
            {"uniform": [0.9, 0.91, 0.92], "pbt": [0.91, 0.92, 0.93]},
            {"pbt - uniform": {"difference": 0.01, "ci_low": -0.005, "ci_high": 0.025}},
            margin=0.005,
            title="planted",
        ),
    }
    state = {
        "best": 1,
        "members": [
            {"schedule": [{"epoch": 0, "weights": {"a": 0.5, "b": 0.5}}], "lineage": []},
            {
                "schedule": [
                    {"epoch": 0, "weights": {"a": 0.2, "b": 0.8}},
                    {"epoch": 2, "weights": {"a": 0.6, "b": 0.4}},
                ],
                "lineage": [{"epoch": 2, "from": 0}],
            },
        ],
    }
    figs["schedules"] = _figures.pbt_schedules([state, {**state, "best": 0}], end=4, title="x")
    layers = pd.DataFrame(
        {"layer": ["layer 0", "layer 2", "all shared"] * 4, "order": [0, 1, 2] * 4,
         "epoch": np.repeat([1, 2, 3, 4], 3), "cosine": np.linspace(-0.2, 0.3, 12),
         "run": "r0"}
    )  # fmt: skip
    figs["layers"] = _figures.layer_conflict(layers, title="planted")
    by_depth = pd.DataFrame(
        {"model.depth": [1, 2, 2], "position": [0, 0, 1], "mean": [0.1, 0.05, -0.1],
         "std": [0.02, 0.03, 0.04], "count": [3, 3, 3]}
    )  # fmt: skip
    figs["layer_depth"] = _figures.layer_depth(by_depth, title="planted")
    for name, fig in figs.items():
        _png_ok(_common.save_figure(fig, tmp_path / f"{name}.png"))
    assert _figures.params_label(1_234_567) == "1.23M"
    assert _figures.weight_label("weights.rotated", "two domains (resampling)") == (
        "sampling probability of 'rotated' (p)"
    )


def test_reanalysis_pools_with_the_library(tmp_path: Path) -> None:
    s = reanalyse.main(["--out", str(tmp_path)])
    dd = s["finding2_within_pooled"]["domain_digits"]
    pooled = dd["pooled_fisher_z_n_eff"]
    assert -1 < pooled["ci_low"] < pooled["estimate"] < pooled["ci_high"] < 1
    # the library's Fisher-z pooling (no second implementation here), on the committed runs
    assert pooled == stats.pool_correlations(dd["per_run_r"], dd["per_run_n_eff"])
    assert pooled["k"] == len(dd["per_run_r"]) == 3
    d = s["pbt_differences"]["pbt - uniform (Welch)"]
    lo90, hi90 = d["ci90_points"]
    assert d["ci95_points"][0] < lo90 < d["difference_points"] < hi90 < d["ci95_points"][1]
    assert d["equivalence_margin_supported_points"] == pytest.approx(max(-lo90, hi90))
    assert json.loads((tmp_path / "reanalysis.json").read_text()) == json.loads(
        json.dumps(_common._tidy(s), default=float)  # NaN as null, as written
    )


@pytest.mark.slow
def test_power_quick(tmp_path: Path) -> None:
    res = power.main(["--quick", "--figures", str(tmp_path)])
    data = json.loads((tmp_path / "power.json").read_text())
    assert data["quick"] is True
    assert data["effects"] == power.EFFECTS
    assert set(res["finding1"]) == set(data["finding1"])
    for v in data["finding1"].values():
        assert 0 <= v["power"]["ols"] <= 1
    _png_ok(tmp_path / "power.png")


@pytest.mark.slow
def test_timing_quick(tmp_path: Path) -> None:
    s = timing.main(["--quick", "--out", str(tmp_path)])
    assert [r["family"] for r in s["sizes"]] == ["mlp", "resnet"]
    for r in s["sizes"]:
        assert r["cpu_per_epoch"] >= 0
        assert r["cpu_fixed"] >= 0
    assert set(s["budget_one_pair"]["per_family"]) == {"mlp", "resnet"}
    assert json.loads((tmp_path / "timing.json").read_text())["quick"] is True
    # replanning reads the measurements back and recomputes the same budget
    one = str(tmp_path / "timing.json")
    again = timing.main(["--replan", one, one, "--out", str(tmp_path / "b")])
    assert again["budget_one_pair"]["total"] == pytest.approx(s["budget_one_pair"]["total"])
    assert len(again["sizes"]) == len(s["sizes"])  # a size measured twice counts once
    assert len(again["repeats"]) == len(s["sizes"])
    assert len(again["sources"]) == 2
    # a temporary folder is not a source a reader can open: what it measured is recorded instead
    assert again["sources"][0] == {
        "file": None,
        "families": ["mlp", "resnet"],
        "n_sizes": len(s["sizes"]),
        "load_average": list(s["load_average"]),
    }


def test_committed_results_name_no_temporary_paths() -> None:
    for path in _common.FIGURES.rglob("*.json"):
        text = path.read_text()
        assert "/tmp/" not in text, path
        assert str(_common.ROOT) not in text, path


@pytest.mark.slow
def test_layers_quick(quick_dirs: tuple[Path, Path]) -> None:
    s = layers.main(_argv(quick_dirs))
    for name in ("multidigits", "domain_digits"):
        ep = s["pairs"][name]["epochs"]
        assert set(ep["layer"]) >= {"all shared"}
        c = ep["cosine"].dropna()
        assert ((c >= -1) & (c <= 1)).all()
        _png_ok(quick_dirs[1] / f"layer_conflict_{name}.png")
        _png_ok(quick_dirs[1] / f"layer_depth_{name}.png")
        per = s["pairs"][name]["within_per_layer"]
        assert "all shared" in set(per["layer"])
        assert {"p_tost", "p_tost_holm", "p_holm", "verdict"} <= set(per.columns)
    _png_ok(quick_dirs[1] / "layer_within_pooled.png")
    data = json.loads((quick_dirs[1] / "layers.json").read_text())
    assert data["pairs"]["multidigits"]["within_per_layer"]


def test_pooled_tost_matches_the_90_interval_and_holm_over_layers() -> None:
    rng = np.random.default_rng(4)
    seen = set()
    for k in range(40):
        r = np.tanh(rng.normal(rng.uniform(-0.3, 0.3), 0.15, size=int(rng.integers(3, 21))))
        pool = conflict.pool_within([{"estimate": x, "n_eff": 25.0} for x in r])
        inside = pool["ci90_low"] > -0.2 and pool["ci90_high"] < 0.2
        p = layers.pooled_tost_p(pool)
        assert (p < 0.05) == inside, (k, p, pool["ci90_low"], pool["ci90_high"])
        seen.add(inside)
    assert seen == {True, False}
    t = pd.DataFrame(
        {"layer": ["layer 1", "layer 2", "all shared"], "p_tost": [0.03, 0.02, 0.03],
         "p_tost_holm": [0.04, 0.06, np.nan], "p_value": [0.01, 0.5, 0.01],
         "p_holm": [0.02, 0.5, np.nan], "ci_low": [0.05, -0.1, 0.01], "ci_high": [0.15, 0.1, 0.1]}
    )  # fmt: skip
    got = [layers._layer_verdict(r) for r in t.itertuples(index=False)]
    assert got == [
        "equivalent within |r| < 0.2; correlated (r > 0)",
        "inconclusive",  # TOST p 0.02 alone, 0.06 after Holm over the layers
        "equivalent within |r| < 0.2; correlated (r > 0)",  # the total: outside the family
    ]


@pytest.mark.parametrize(
    "module",
    [
        _common,
        _design,
        _figures,
        capacity,
        conflict,
        optimal_weight,
        pbt,
        power,
        reanalyse,
        verdicts,
    ],
)
def test_doc_examples(module: ModuleType) -> None:
    import doctest

    res = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0


def test_study_presets_and_flags(tmp_path: Path) -> None:
    args = _common.parse_args("x", ["--study", "--priority", "2"])
    assert args.preset.study
    assert args.preset.max_priority == 2
    assert args.figures == _common.FIGURES / "study"  # beside, not over, the small run
    assert [p.name for p in _common.study_pairs(args.preset)] == [
        "multimnist",
        "multimnist_agree",
        "multimnist_apart",
        "digit_sources",
    ]
    assert args.preset.seeds == _design.STUDY.seeds
    assert args.preset.early_stopping == _design.STUDY.patience
    q = _common.parse_args("x", ["--study-quick", "--runs", str(tmp_path)])
    assert q.preset.name == "study-quick"
    assert q.figures == tmp_path / "figures"
    assert q.workers == 1
    mm = _common.study_pairs(q.preset)[0]
    assert mm.options(q.preset) == {"n": 64, "image_size": 16}
    assert _common.study_pairs(args.preset)[0].options(args.preset)["n"] == 2000
    with pytest.raises(SystemExit):
        _common.parse_args("x", ["--study", "--quick"])
    # the budget's sizes on the CPU; every size, labelled by device, on a GPU
    cpu = _common.sweep_config(mm, args.preset, "vit")
    assert len(cpu["sweep"]["sizes"]) == _design.CPU_SIZES["vit"]
    assert "device" not in cpu["train"]
    gpu = _common.parse_args("x", ["--study", "--device", "cuda"])
    assert gpu.figures == _common.FIGURES / "study-cuda"
    assert gpu.runs.name == "analyses-study-cuda"
    cfg = _common.sweep_config(mm, gpu.preset, "vit")
    assert cfg["train"]["device"] == "cuda"
    assert len(cfg["sweep"]["sizes"]) == len(_design.FAMILY_SIZES["vit"])
    with pytest.raises(SystemExit):
        _common.parse_args("x", ["--device", "cuda"])
    # --families: the MLP sweeps of every pair before the slower ResNet/ViT sizes
    mlp = _common.parse_args("x", ["--study", "--families", "mlp"])
    assert [u[0] for u in _common.sweep_units(mlp.preset)] == ["multimnist", "digit_sources"]
    assert mlp.runs == args.runs  # the same run folders: the later full pass resumes them
    with pytest.raises(SystemExit):
        _common.parse_args("x", ["--study", "--families", "mlp,cnn"])
    cut = _common.parse_args("x", ["--study", "--sizes", "mlp=5,vit=2"])
    assert len(_common.sizes(cut.preset, "mlp")) == 5
    assert len(_common.sizes(cut.preset, "vit")) == 2
    assert len(_common.sizes(cut.preset, "resnet")) == _design.CPU_SIZES["resnet"]
    assert (
        len(_common.sizes(_common.parse_args("x", ["--study", "--sizes", "1"]).preset, "mlp")) == 1
    )
    for bad in ("0", "cnn=2", "mlp=x"):
        with pytest.raises(SystemExit):
            _common.parse_args("x", ["--study", "--sizes", bad])
    one = _common.parse_args("x", ["--study", "--pairs", "digit_sources"])
    assert [p.name for p in _common.study_pairs(one.preset)] == ["digit_sources"]
    with pytest.raises(SystemExit):
        _common.parse_args("x", ["--study", "--pairs", "multidigits"])
    reps = _common.parse_args("x", ["--study", "--replicates", "10"])
    assert reps.preset.pbt_replicates == 10
    with pytest.raises(SystemExit):
        _common.parse_args("x", ["--study", "--replicates", "0"])


def test_cpu_sizes_follow_the_committed_budget_plan() -> None:
    plan = json.loads((_common.FIGURES / "timing.json").read_text())["plan"]
    kept = {k["part"] for k in plan["kept"]}
    assert "MLP sweeps, priority-1 pairs" in kept
    for family, k in _design.CPU_SIZES.items():
        if family == "mlp":
            continue
        names = [f"{family} width {w:g} depth {d}" for w, d in _design.FAMILY_SIZES[family]]
        assert [n in kept for n in names] == [True] * k + [False] * (len(names) - k)


@pytest.mark.slow
def test_study_quick_capacity_and_optimal_weight(tmp_path: Path) -> None:
    """The study's path: MultiMNIST and DigitSources, MLP and ResNet, early stopping."""
    argv = ["--study-quick", "--runs", str(tmp_path / "runs")]
    s = capacity.main(argv)
    assert set(s["pairs"]) == {
        "multimnist",
        "multimnist-resnet",
        "digit_sources",
        "digit_sources-resnet",
    }
    assert s["pairs"]["multimnist-resnet"]["family"] == "resnet"
    for name in s["pairs"]:
        _png_ok(tmp_path / "runs" / "figures" / f"capacity_{name}.png")
    o = optimal_weight.main(argv)
    assert set(o["pairs"]) == set(s["pairs"])
    t = _common.load_tables(tmp_path / "runs" / "sweep-multimnist-resnet")["test"]
    assert set(t["model.family"]) == {"resnet"}
    # the verdicts' code path on the quick results: one size a family, so nothing is estimable
    v = verdicts.main(["--figures", str(tmp_path / "runs" / "figures"), "--n-sim", "100"])
    assert set(v["finding1"]["tests"]) == {"pair multimnist", "pair digit_sources",
                                           "pooled over pairs"}  # fmt: skip
    assert all(t["verdict"] == "not estimable" for t in v["finding1"]["tests"].values())
    assert (tmp_path / "runs" / "figures" / "verdicts.json").exists()


# --------------------------------------------------------------------------------------------
# The README's study numbers come from the committed study JSON (fast)
# --------------------------------------------------------------------------------------------

_STUDY_SECTION = "## Results of the study run"


#: Per-run and per-epoch tables: thousands of numbers that would match almost any quote.
_BULK_KEYS = {"epochs", "per_run", "members", "runs", "figure_cells", "schedule", "lineage"}


def _json_numbers(obj: object) -> list[float]:
    """The numbers of a JSON document a README may quote: numeric leaves and numbers written in
    strings, outside the per-run and per-epoch tables (:data:`_BULK_KEYS`)."""
    import re

    if isinstance(obj, bool) or obj is None:
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, str):
        return [float(m) for m in re.findall(r"[-+]?\d+(?:\.\d+)?", obj)]
    if isinstance(obj, dict):
        return [x for k, v in obj.items() if k not in _BULK_KEYS for x in _json_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _json_numbers(v)]
    return []


def _quoted(text: str) -> list[str]:
    """Decimal numbers of a README section (integers are counts, not measurements)."""
    import re

    text = re.sub(r"`[^`]*`", "", text)  # code: commands, file names, option values
    return re.findall(r"(?<![\w.])[-+]?\d+\.\d+(?![\w.])", text)


def _matches(token: str, values: np.ndarray) -> bool:
    """A signed quote matches a value of its sign; an unsigned one (a size, "a loss of 0.6")
    either sign. Fractions in the JSON may be quoted as points (x 100)."""
    d = len(token.split(".")[1])
    x = float(token)
    tol = 0.5 * 10**-d + 1e-9
    signed = token[0] in "+-"
    for scale in (1.0, 100.0):
        v = values * scale
        if np.any(np.abs(v - x) <= tol):
            return True
        if not signed and np.any(np.abs(np.abs(v) - x) <= tol):
            return True
    return False


def test_quoted_matches_rounding() -> None:
    vals = np.array(_json_numbers({"a": 0.01234, "b": "r = 0.06", "c": [-2.345]}))
    assert _quoted("gain -1.23 points [`x 9.99`], r 0.06, 5 seeds") == ["-1.23", "0.06"]
    assert _matches("1.23", vals)  # 0.01234 in points
    assert _matches("-2.35", vals)
    assert _matches("2.35", vals)  # unsigned: either sign
    assert not _matches("+2.35", vals)  # signed: its own sign only
    assert _matches("0.06", vals)
    assert not _matches("0.07", vals)
    assert _json_numbers({"per_run": [0.5], "estimate": 0.25}) == [0.25]


def test_readme_study_numbers_are_in_the_study_json() -> None:
    readme = (_common.ROOT / "analyses" / "README.md").read_text()
    study = _common.FIGURES / "study"
    if _STUDY_SECTION not in readme:
        assert not (study / "verdicts.json").exists(), "study results without a README section"
        return
    section = readme.split(_STUDY_SECTION, 1)[1].split("\n## ", 1)[0]
    values = np.array(
        [x for p in sorted(study.glob("*.json")) for x in _json_numbers(json.loads(p.read_text()))]
        # the design's numbers it quotes beside the study's (budget, planned power)
        + _json_numbers(json.loads((_common.FIGURES / "timing.json").read_text()))
        + _json_numbers(json.loads((_common.FIGURES / "power.json").read_text()))
    )
    missing = [t for t in _quoted(section) if not _matches(t, values)]
    assert not missing, f"README numbers not in figures/study/*.json: {missing}"


def test_group_ols_matches_least_squares_with_dummies() -> None:
    from analyses import verdicts

    rng = np.random.default_rng(0)
    x = rng.uniform(3, 6, 12)
    g = np.repeat(["a", "b", "c"], 4)
    y = 2.0 * x + np.repeat([0.0, 5.0, -3.0], 4) + rng.normal(0, 0.5, 12)
    fit = verdicts.group_ols(x, y, g)
    design = np.column_stack([x, *(g == k for k in "abc")]).astype(float)
    coef, res, *_ = np.linalg.lstsq(design, y, rcond=None)
    assert fit["slope"] == pytest.approx(coef[0])
    assert fit["df"] == 12 - 3 - 1
    assert fit["residual_sd"] == pytest.approx(math.sqrt(res[0] / fit["df"]))
    assert fit["ci_low"] < fit["ci90_low"] < fit["slope"] < fit["ci90_high"] < fit["ci_high"]


def test_verdicts_from_planted_results(tmp_path: Path) -> None:
    """Finding 1 on planted gains: a steep slope is supported, a flat one is not called either
    way unless the test has the power; MLP sizes alone under 0.8 power get no verdict."""
    from analyses import verdicts

    rng = np.random.default_rng(1)

    def cap(slope: float) -> dict[str, object]:
        pairs = {}
        for unit, fam in (("a", "mlp"), ("a-vit", "vit"), ("b", "mlp"), ("b-vit", "vit")):
            rows = []
            for n in np.logspace(3.5, 6, 6):
                gain = (slope * (np.log10(n) - 3.5) + rng.normal(0, 0.2)) / 100
                for task in ("x", "y"):
                    rows.append({"setting": "p selected on val", "model.n_params": n,
                                 "gain": gain, "task": task})  # fmt: skip
            pairs[unit] = {"pair": unit.split("-")[0], "family": fam, "gains": rows}
        return {"preset": {"seeds": [0, 1, 2, 3, 4]}, "pairs": pairs}

    noise = {"sd_seed_gain": 0.5, "sd_size_gain": 0.3, "sd_pstar": 0.02}
    steep = verdicts.finding1(cap(3.0), noise, n_sim=400)["tests"]
    assert steep["pooled over pairs"]["slope"] == pytest.approx(3.0, abs=0.3)
    assert steep["pooled over pairs"]["verdict"] == "supported"
    flat = verdicts.finding1(cap(0.0), noise, n_sim=400)["tests"]["pooled over pairs"]
    assert flat["verdict"] == "equivalent within +-1"
    weak = verdicts.finding1(cap(0.0), {**noise, "sd_size_gain": 8.0}, n_sim=400)["tests"]
    # two families: tested by the rule whatever the power (an equivalence shown stands)
    assert weak["pair a"]["verdict"] == "equivalent within +-1"
    assert weak["pair a"]["power_at_stated_effect"] < 0.8
    # MLP sizes alone: the design's rule, "underpowered" (no verdict) under 0.8
    mlp_only = cap(0.0)
    mlp_only["pairs"] = {u: p for u, p in mlp_only["pairs"].items() if p["family"] == "mlp"}
    alone = verdicts.finding1(mlp_only, {**noise, "sd_size_gain": 8.0}, n_sim=400)["tests"]
    assert alone["pair a"]["verdict"].startswith("underpowered")
    # many tasks: a paired difference well inside the margin with enough replicates
    base = rng.normal(0.9, 0.01, 12)
    arm = {"test_mean": float(base.mean()), "ci_low": 0.0, "ci_high": 1.0}
    pbt_json = {
        "replicates": 12,
        **{
            k: {**arm, "test": base.tolist()}
            for k in ("uniform", "random_static", "uniform_best_of_n")
        },
        "pbt": {**arm, "test": (base + rng.normal(0, 0.0005, 12)).tolist()},
        "mto": {},
    }
    d = np.array(pbt_json["pbt"]["test"]) - base
    from scipy import stats as st

    res = st.ttest_rel(pbt_json["pbt"]["test"], base)
    ci, ci90 = res.confidence_interval(0.95), res.confidence_interval(0.90)
    pbt_json["differences"] = {
        "pbt - uniform": {"difference": float(d.mean()), "ci_low": ci.low, "ci_high": ci.high,
                          "ci90_low": ci90.low, "ci90_high": ci90.high,
                          "p_value": float(res.pvalue)}
    }  # fmt: skip
    out = verdicts.many_tasks(pbt_json, n_sim=400)["differences"]["pbt - uniform"]
    assert out["verdict"] == "equivalent within +-0.5"
    assert out["difference_points"] == pytest.approx(100 * d.mean())


def test_transfer_cost_names_sizes_by_the_joint_model() -> None:
    joint = pd.DataFrame(
        {"model.width": [1, 1, 2, 2], "model.depth": 1, "model.n_params": [110, 110, 220, 220],
         "n_tasks": 2, "seed": 0, "weights.a": [0.2, 0.8, 0.2, 0.8],
         "accuracy.mean": [0.9, 0.5, 0.6, 0.8]}
    )  # fmt: skip
    single = joint.assign(n_tasks=1, **{"model.n_params": [100, 100, 200, 200]})
    t = pd.concat([single, joint], ignore_index=True)  # a baseline row first
    cost = optimal_weight.transfer_cost({"val": t, "test": t}, ["a", "b"])
    assert cost["model.n_params"].tolist() == [110, 220]
    assert cost["cost"].round(6).tolist() == [0.0, -0.2]
