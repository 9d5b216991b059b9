"""The analyses' shared logic (fast) and the four scripts end to end in ``--quick`` mode.

The end-to-end tests train tiny models (5-45 s each on a loaded 2-core machine) and are marked
``slow``: ``pytest tests/test_analyses.py -m slow``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyses import _common, capacity, conflict, optimal_weight, pbt

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
        _png_ok(quick_dirs[1] / f"conflict_timeline_{name}.png")
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
    _png_ok(quick_dirs[1] / "pbt_schedules.png")
