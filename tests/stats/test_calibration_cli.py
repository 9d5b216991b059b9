"""The calibration command line (``python -m gradlens.stats.calibration``) end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_calibration_cli_prints_a_section_table():
    out = subprocess.run(
        [sys.executable, "-m", "gradlens.stats.calibration", "--quick", "--only", "within"],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) >= 4  # header + rows of the within-run table
    assert "(total" in out.stdout


def test_calibration_cli_refuses_an_unknown_section():
    out = subprocess.run(
        [sys.executable, "-m", "gradlens.stats.calibration", "--only", "nonsense"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert "invalid choice: 'nonsense'" in out.stderr
