"""A sweep's ``methods`` axis and the report's arms: plan, run, report, numbers read back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradlens import GradlensError, load_runs
from gradlens.report import build_report
from gradlens.search import SearchConfig, plan_sweep, run_sweep
from tests._tiny import TINY_SEARCH

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("torchjd")

TINY = {**TINY_SEARCH, "epochs": 1}


def _cfg(sweep: dict) -> SearchConfig:
    return SearchConfig.from_dict({"train": TINY, "sweep": sweep, "executor": {"workers": 1}})


@pytest.mark.parametrize(
    ("sweep", "match"),
    [
        ({"methods": ["gradnorm"]}, r"`sweep.methods\[0\]` should be a non-empty list"),
        ({"methods": ["dwa/per_layer"]}, r"`sweep.methods\[0\]`"),
        ({"methods": ["mgda", "mgda"]}, r"`sweep.methods` should be"),
        ({"methods": []}, r"`sweep.methods` should be"),
        ({"methods": ["mgda"], "p": [0.5], "grid": 3}, r"exactly one of"),
    ],
)
def test_methods_axis_is_validated(sweep, match):
    with pytest.raises(GradlensError, match=match):
        _cfg(sweep)


def test_plan_adds_one_run_per_method_size_and_seed():
    cfg = _cfg({"p": [0.5], "methods": ["upgrad/per_layer", "dwa"], "seeds": [0, 1]})
    plan = plan_sweep(cfg, ("left", "right"))
    ids = [r.id for r in plan]
    assert ids == ["w0.5-0.5_seed0", "w0.5-0.5_seed1", "m-upgrad-per_layer_seed0",
                   "m-upgrad-per_layer_seed1", "m-dwa_seed0", "m-dwa_seed1"]  # fmt: skip
    d = plan[2].train_dict(TINY, "s")
    assert (d["weighting"], d["per_layer"], "weights" in d) == ("upgrad", True, False)
    only = plan_sweep(_cfg({"methods": ["mgda"]}), ("left", "right"))
    assert [r.id for r in only] == ["m-mgda_seed0"]


def test_sweep_with_methods_then_report_shows_them_as_arms(tmp_path):
    out = tmp_path / "sweep"
    cfg = _cfg({"p": [0.3, 0.5], "methods": ["mgda", "uncertainty"], "seeds": [0, 1]})
    summary = run_sweep(cfg, out, progress=False)
    assert (summary["status"] == "done").all()
    assert "method mgda" in set(summary["weights"])
    paths = build_report(out, n_boot=200, n_perm=50, progress=False)
    md = paths.markdown.read_text()
    assert "Methods as arms" in md
    stats = json.loads(paths.json.read_text())
    # the weight analysis sees the static runs only
    assert stats["task_sets"][0]["n_joint_runs"] == 4
    arms = {a["arm"]: a for a in stats["arms"]}
    assert {"mgda", "uncertainty"} <= set(arms)
    best = [a for a in stats["arms"] if a["kind"] == "best static"]
    assert len(best) == 1
    # the numbers are those of the runs (read back from the stores)
    runs = load_runs(out)
    for name in ("mgda", "uncertainty"):
        sel = runs[runs["weighting"] == name]
        acc = sel[["final.test.left.accuracy", "final.test.right.accuracy"]].mean(axis=1)
        assert arms[name]["n"] == 2
        np.testing.assert_allclose(arms[name]["score"], acc.mean(), rtol=1e-12)
        np.testing.assert_allclose(
            arms[name]["seconds_per_step"], sel["seconds_per_step"].mean(), rtol=1e-12
        )
        assert arms[name]["ci_low"] <= arms[name]["score"] <= arms[name]["ci_high"]
        assert 0 <= arms[name]["conflict"] <= 1
        assert f"| {name} " in md
