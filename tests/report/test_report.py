"""Tests of gradlens.report and the report/heatmap commands: files, escaping, self-containment,
numbers equal to gradlens.stats, a summary that follows the data, and a headless Chromium render."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import scipy.stats as ss

from gradlens import stats
from gradlens._errors import GradlensError, StoreError
from gradlens.cli import main
from gradlens.report import ReportPaths, build_report
from tests._browser import needs_chromium, screenshot
from tests._sweepgen import make_run, make_sweep

EVIL = "<script>alert(1)</script>"
SIZES = ((2, 32), (4, 128))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, ReportPaths]:
    """A sweep where conflict rises with the weight of the first task, named to attack HTML."""
    root = make_sweep(
        tmp_path_factory.mktemp("planted"), tasks=(EVIL, "right"), sizes=SIZES, epochs=4
    )
    paths = build_report(
        root, n_boot=100, n_perm=999, methods=["spearman", "pearson"], progress=False
    )
    return root, paths


def _json(path: Path) -> dict:
    def no_constants(name: str) -> float:
        raise AssertionError(f"non-strict JSON constant {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)


def test_files_written_and_figures_embedded(planted):
    _, paths = planted
    for p in (paths.markdown, paths.html, paths.json):
        assert p.is_file()
        assert p.stat().st_size > 1000
    html = paths.html.read_text(encoding="utf-8")
    images = re.findall(r'<img alt="[^"]*" src="([^"]*)"', html)
    assert len(images) == len(paths.figures) == 6
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # no external resource of any kind
    assert not re.search(r"(?:src|href)=\"(?!data:)", html)
    assert "http://" not in html
    assert "https://" not in html
    md = paths.markdown.read_text(encoding="utf-8")
    for fig in paths.figures:
        assert f"(figures/{fig.name})" in md
        img = mpimg.imread(fig)[..., :3]
        assert img.std() > 0.05


def test_user_strings_are_escaped(planted):
    _, paths = planted
    html = paths.html.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    md = paths.markdown.read_text(encoding="utf-8")
    assert "&lt;script&gt;" in md
    assert "<script" not in md.lower()
    assert EVIL in json.dumps(_json(paths.json))  # the JSON keeps the name as data


def test_stats_json_numbers_are_the_stats_numbers(planted):
    root, paths = planted
    data = _json(paths.json)
    (ts,) = data["task_sets"]
    assert ts["tasks"] == [EVIL, "right"]
    assert ts["weight_cols"] == [f"weights.{EVIL}"]
    rows = ts["associations"]
    assert {r["correction"] for r in rows} == {"holm"}
    assert {r["n_tests"] for r in rows} == {len(rows)}
    table = stats.runs_table(root)
    joint = table[table.n_tasks == 2]
    pooled = next(
        r
        for r in rows
        if r["scope"] == "pooled" and r["x"] == f"weights.{EVIL}" and r["y"] == "conflict_freq.mean"
    )
    rho = ss.spearmanr(joint[f"weights.{EVIL}"], joint["conflict_freq.mean"]).statistic
    assert pooled["estimate"] == pytest.approx(rho, abs=1e-12)
    assert pooled["ci_low"] < pooled["estimate"] < pooled["ci_high"]
    p = np.array([r["p_value"] for r in rows], dtype=float)
    np.testing.assert_allclose([r["p_adjusted"] for r in rows], stats.adjust(p, "holm"))
    opt = ts["optimal_weight"]
    assert [o["p_star"] for o in opt] == [0.3, 0.3]  # the planted optimum at both sizes
    assert ts["joint_gain_selected_on"] == "val"
    assert all(g[f"weights.{EVIL}"] == 0.3 for g in ts["joint_gain_selected"])
    within = [w for w in ts["within_run"] if w.get("p_value") is not None]
    assert within
    assert all(w["p_method"] == "AR(1) effective-n t-test" for w in within)
    assert len(data["runs"]) == len(table)
    # The gains are the held-out ones of stats.selected_gain, on the validation scores.
    val = stats.runs_table(root, split="val").set_index("run_id")["accuracy.mean"]
    both = table.assign(_sel=table["run_id"].map(val))
    ref = stats.selected_gain(
        both, select_col="_sel", size_cols=["model.depth", "model.width"]
    ).sort_values(["model.depth", "model.width", "task"])
    got = sorted(ts["joint_gain_selected"], key=lambda g: (g["model.depth"], g["model.width"],
                                                           g["task"]))  # fmt: skip
    np.testing.assert_allclose([g["gain"] for g in got], ref["gain"], rtol=1e-12)
    np.testing.assert_allclose([g["p_value"] for g in got], ref["p_value"], rtol=1e-12)
    np.testing.assert_allclose(
        [g["p_adjusted"] for g in got], stats.adjust(ref["p_value"].to_numpy(), "holm")
    )
    # Within-run correlations pooled by Fisher z with random effects.
    pooled_within = stats.pool_correlations(
        [w["estimate"] for w in within], [w["n_eff"] for w in within]
    )
    assert ts["within_run_pooled"]["estimate"] == pytest.approx(pooled_within["estimate"])
    # Its minimal detectable |r| is the simulated one at this number of runs and median n_eff.
    mde = stats.min_detectable_effect(
        "pooled", sizes=1, weights=1, seeds=pooled_within["k"],
        n_eff=float(np.nanmedian([w["n_eff"] for w in within])),
        alpha=data["options"]["alpha"], n_sim=data["options"]["power_sims"],
        seed=data["options"]["seed"],
    )  # fmt: skip
    got = ts["within_run_pooled"]["min_detectable_r"]
    assert got == pytest.approx(mde["effect"]) if mde["reachable"] else np.isnan(got)
    # The trend's minimal detectable slope: (z_(1-a/2) + z_0.8) standard errors of the slope.
    tr = ts["optimal_weight_trend"]
    se = (tr["ci_high"] - tr["ci_low"]) / (2 * ss.norm.ppf(0.5 + tr["ci_level"] / 2))
    alpha = data["options"]["alpha"]
    want = (ss.norm.ppf(1 - alpha / 2) + ss.norm.ppf(0.8)) * se
    assert tr["min_detectable_slope_approx"] == pytest.approx(want, rel=1e-9)
    # Every family got enough permutations for its correction to be able to reject.
    assert ts["n_perm"]["secondary"] >= 2 * len(ts["associations_secondary"]) / 0.05
    assert all(r["p_floor"] * len(rows) < 0.05 / 5 for r in rows)


def test_header_counts_the_model_sizes_of_the_joint_runs(planted):
    # Single-task baselines have their own parameter count (one head): 2 sizes, not 4.
    _, paths = planted
    md = paths.markdown.read_text(encoding="utf-8")
    assert "2 model sizes among the joint runs" in md
    assert "4 model sizes" not in md


def test_summary_sections_separate_tests_from_descriptions(planted):
    _, paths = planted
    data = _json(paths.json)
    summary = data["summary"]
    # The best weight is an estimate, not a test: it is described, never "supported".
    assert any("The best weight of" in s for s in summary["descriptive"])
    assert not any("The best weight of" in s for s in summary["supported"])
    # Every supported line names the family and the level it passed.
    families = summary["decision"]["families"]
    level = summary["decision"]["level_per_family"]
    assert level == pytest.approx(0.05 / len(families))
    assert summary["supported"]
    for line in summary["supported"]:
        assert f"significant at alpha / {len(families)}" in line
    # Non-significance is never written as absence.
    for line in summary["not_supported"]:
        assert not line.startswith("No evidence")
        assert "no association" not in line.lower()
    md = paths.markdown.read_text(encoding="utf-8")
    assert "### Descriptive (estimates, not tested claims)" in md
    # The within-run table labels the interval it shows as the effective-n one.
    assert "95% interval (effective n)" in md
    assert "block bootstrap interval (undercovers)" in md
    # Power: inconclusive associations say what correlation the design could have detected.
    ts = data["task_sets"][0]
    inconclusive = [s for s in summary["not_supported"] if s.startswith("Inconclusive: no ev")]
    if any("association" in s for s in inconclusive):
        assert "detected with 80 % power from |r| =" in " ".join(inconclusive)
        assert ts["association_mde"]["reachable"]


def test_summary_follows_the_planted_effect(planted):
    _, paths = planted
    data = _json(paths.json)
    supported = " ".join(data["summary"]["supported"])
    row = next(
        r
        for r in data["task_sets"][0]["associations"]
        if r["scope"] == "partial"
        and r["x"] == f"weights.{EVIL}"
        and r["y"] == "conflict_freq.mean"
    )
    assert row["p_adjusted"] < 0.05
    assert f"The weight of {EVIL} and conflict frequency have a monotone association" in supported
    assert f"rho = {row['estimate']:+.2g}" in supported
    assert "higher weight of" in supported
    html = paths.html.read_text(encoding="utf-8")
    assert "Supported by the data" in html
    assert "Holm (family-wise error rate)" in html


def test_null_sweep_via_the_cli_reports_no_evidence_and_the_permutation_floor(tmp_path, capsys):
    root = make_sweep(
        tmp_path / "null",
        sizes=((2, 32),),
        weights=(0.1, 0.5, 0.9),
        seeds=(0, 1, 2),
        epochs=3,
        effect=0.0,
        baselines=False,
    )
    out = tmp_path / "out"
    rc = main(
        [
            "report",
            str(root),
            "--out",
            str(out),
            "--n-boot",
            "50",
            "--n-perm",
            "99",
            "--no-progress",
            "--margin-r",
            "0.2",
            "--margin-gain",
            "0.02",
            "--power-sims",
            "0",
            "--no-figures",
        ]
    )
    assert rc == 0
    assert "report.html" in capsys.readouterr().out
    data = _json(out / "stats.json")
    assert data["options"]["margin_r"] == 0.2
    assert data["options"]["margin_gain"] == 0.02
    assert data["options"]["power_sims"] == 0
    assert list((out / "figures").iterdir()) == []
    assert "equivalence margin |rho| < 0.2" in " ".join(data["summary"]["not_supported"])
    text = " ".join(data["summary"]["not_supported"])
    assert (
        "Inconclusive: no evidence of a monotone association between the weight of left and "
        "conflict frequency" in text
    )
    # 3 configurations are permuted whole: 3! = 6 permutations, a floor of 1/6 whatever n_perm.
    assert "cannot reject anything whatever the data" in text
    assert data["summary"]["supported"] == []
    assert "no single-task runs" in text  # the gain is not testable without baselines
    row = next(
        r
        for r in data["task_sets"][0]["associations"]
        if r["x"] == "weights.left" and r["y"] == "conflict_freq.mean"
    )
    assert not row["p_adjusted"] < 0.05


def test_sweep_without_joint_runs_says_nothing_is_testable(tmp_path):
    root = make_sweep(tmp_path / "s", sizes=((2, 32),), weights=(), seeds=(0,), epochs=2)
    paths = build_report(root, tmp_path / "r", n_boot=10, n_perm=10, progress=False)
    data = _json(paths.json)
    assert data["summary"]["supported"] == []
    assert "no run with two or more tasks" in data["summary"]["not_supported"][0]
    assert paths.figures == ()


def test_pbt_members_get_their_weight_schedules_drawn(tmp_path):
    tasks = ["a", "b", "c"]
    rng = np.random.default_rng(0)
    for k in range(3):
        schedule = [
            {"epoch": e, "weights": dict(zip(tasks, rng.dirichlet(np.ones(3)).tolist()))}
            for e in (0, 2, 4)
        ]
        make_run(
            tmp_path / "pbt" / f"member-{k:03d}",
            tasks=tasks,
            n_layers=2,
            n_steps=12,
            epochs=6,
            seed=k,
            extra_meta={"pbt": {"member": k, "schedule": schedule}},
        )
    paths = build_report(tmp_path / "pbt", n_boot=20, n_perm=20, progress=False)
    assert "set1-pbt.png" in [p.name for p in paths.figures]
    sched = _json(paths.json)["task_sets"][0]["pbt_schedule"]
    assert len(sched) == 3 * 3 * 3  # members x change points x tasks
    assert {r["member"] for r in sched} == {0, 1, 2}
    assert "PBT members" in paths.html.read_text(encoding="utf-8")


def test_bad_arguments(tmp_path):
    with pytest.raises(GradlensError, match="`correction` should be one of"):
        build_report(tmp_path, correction="bonferroni")
    with pytest.raises(GradlensError, match="`methods` should be"):
        build_report(tmp_path, methods=["spearman", "distance"])
    with pytest.raises(GradlensError, match="`alpha` should be a finite number > 0 and < 1"):
        build_report(tmp_path, alpha=1.5)
    with pytest.raises(GradlensError, match="`dpi` should be an int >= 1; found 0"):
        build_report(tmp_path, dpi=0)
    with pytest.raises(GradlensError, match="`n_boot` should be an int >= 0; found -1"):
        build_report(tmp_path, n_boot=-1)
    with pytest.raises(GradlensError, match="`power_sims` should be an int"):
        build_report(tmp_path, power_sims=-1)
    with pytest.raises(GradlensError, match="`margin_r` should be a correlation below 1"):
        build_report(tmp_path, margin_r=1.0)
    with pytest.raises(GradlensError, match="`margin_gain` should be a finite number >= 0"):
        build_report(tmp_path, margin_gain=-0.1)
    with pytest.raises(GradlensError, match="`sweep_dir` should be a directory"):
        build_report(tmp_path / "missing")
    with pytest.raises(StoreError, match="at least one run"):
        build_report(tmp_path)


def test_heatmap_command(planted, tmp_path, capsys):
    root, _ = planted
    run = root / "d2-w32" / "p0.50-s0"
    out = tmp_path / "h.png"
    assert main(["heatmap", str(run), "--out", str(out), "--layer", "trunk.1"]) == 0
    assert str(out) in capsys.readouterr().out
    assert mpimg.imread(out)[..., :3].std() > 0.05
    assert main(["heatmap", str(run)]) == 0
    assert (run / "heatmap.png").is_file()
    assert main(["heatmap", str(run), "--layer", "nope"]) == 2
    assert "`layer` should be one of" in capsys.readouterr().err


@needs_chromium
def test_report_renders_in_headless_chromium(planted, tmp_path):
    _, paths = planted
    img = screenshot(paths.html, tmp_path, 1200, 2000)
    assert img.std() > 0.1
    dark = (img.max(axis=2) < 0.5).mean()  # text and figure ink
    assert dark > 0.005
    coloured = (np.ptp(img, axis=2) > 0.2).mean()  # red/green summary text, heatmap colours
    assert coloured > 0.01
    assert not math.isnan(float(img.mean()))


def test_report_helpers_against_closed_forms():
    from gradlens.report import _claims as claims

    # One-way ANOVA ICC of a balanced design from scipy's F: (F - 1) / (F + m - 1).
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(8), 3)
    values = rng.normal(size=8)[groups] + rng.normal(size=24)
    f = ss.f_oneway(*[values[groups == g] for g in range(8)]).statistic
    assert claims.icc(values, groups) == pytest.approx((f - 1) / (f + 2))
    assert claims.icc(rng.normal(size=24) * 0 + 1.0, groups) == 0.0  # no variance at all
    # n_perm grows until m / (n_perm + 1) <= level / 2.
    n = claims.n_perm_for(6, 0.01, 499)
    assert n == 1200
    assert 6 / (n + 1) <= 0.01 / 2
    assert claims.n_perm_for(6, 0.01, 0) == 0
