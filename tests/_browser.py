"""Headless Chromium for the screenshot tests of the HTML report and the per-run page."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest


def chromium() -> str | None:
    """The first Chromium-like browser on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


#: Skip a screenshot test where no browser can be had, and say why.
needs_chromium = pytest.mark.skipif(
    chromium() is None,
    reason="no chromium on PATH (CI installs Debian's with .ci/install-chromium.sh; without apt "
    "it cannot, and the HTML is then only checked structurally)",
)


def screenshot(page: Path, workdir: Path, width: int, height: int) -> np.ndarray:
    """Render ``page`` in headless Chromium at ``width x height``; the RGB image, in [0, 1]."""
    browser = chromium()
    assert browser is not None
    shot = workdir / "shot.png"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={workdir / 'profile'}",
        f"--screenshot={shot}",
        f"--window-size={width},{height}",
        page.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (height, width)
    return img
