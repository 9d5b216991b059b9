"""Calibration of ``gradlens report`` end to end: simulated sweeps written through the public
store, read by ``build_report``, judged from ``stats.json`` (helpers in ``tests/_calibrate.py``).

The default suite builds one null and one planted report (about 20 s); ``-m slow`` runs the
rates quoted in ``docs/stats.md`` at a smaller number of reports.
"""

from __future__ import annotations

import math

import pytest

from tests._calibrate import calibrate, report_once


def test_a_null_report_supports_nothing_and_its_intervals_cover(tmp_path):
    res = report_once(tmp_path / "null", "null", 11)
    assert res["supported"] == []
    # Every test of the report produced p-values that can be judged.
    for test in ("primary", "secondary", "gain", "within_run", "within_pooled", "trend"):
        assert res["p"][test], test
        assert all(0.0 < p <= 1.0 for p in res["p"][test])
    assert len(res["cover"]["gain"]) == 4  # 2 sizes x 2 tasks, truth 0
    assert sum(res["cover"]["gain"]) >= 3
    assert sum(res["cover"]["within_run"]) >= 0.8 * len(res["cover"]["within_run"])


def test_a_planted_report_finds_the_planted_association(tmp_path):
    res = report_once(tmp_path / "planted", "planted", 12)
    text = " ".join(res["supported"])
    assert "weight of left and conflict frequency have a monotone association" in text
    assert res["supported_association"]
    assert all(math.isfinite(p) for p in res["p"]["gain"])


@pytest.mark.slow
def test_null_reports_hold_their_level():
    res = calibrate("null", 60)
    assert res["any_supported"] <= 0.05
    # Permutation tests of whole configurations and t-tests: level held per test.
    for test in ("primary", "secondary", "gain", "within_run"):
        assert 0.02 <= res[f"fpr.{test}"] <= 0.08, (test, res[f"fpr.{test}"])
    # One p-value per report (binomial error +-0.055 at 60), too few to hold these two to
    # [0.02, 0.08] here: measured 0.083 (pooled within-run) and 0.000 (trend) before the
    # sign-flip and permutation tests; their level is checked at the stats level, with
    # hundreds of draws, in tests/stats/test_small_samples.py (numbers in docs/stats.md).
    assert res["fpr.within_pooled"] <= 0.10
    assert res["fpr.trend"] <= 0.08
    assert 0.92 <= res["cover.gain"] <= 0.98


@pytest.mark.slow
def test_clustered_null_reports_hold_their_level():
    res = calibrate("clustered", 60)
    assert res["supported_association"] <= 0.05
    for test in ("primary", "secondary", "within_run"):
        assert 0.02 <= res[f"fpr.{test}"] <= 0.08, (test, res[f"fpr.{test}"])


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [3, 5, 10])
def test_planted_reports_cover_the_true_gain_and_record_power(seeds):
    res = calibrate("planted", 30 if seeds < 10 else 15, seeds=seeds)
    assert 0.92 <= res["cover.gain"] <= 0.98
    assert res["power.beats/worse"] > 0.5
    if seeds >= 5:
        assert res["power.weight->conflict"] > 0.5
