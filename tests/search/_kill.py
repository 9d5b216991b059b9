"""kill -9 of a ``gradlens`` command at a chosen moment (the sweep and PBT resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def kill_when(args: list[str], ready: Callable[[], bool], timeout: float = 300.0) -> None:
    """Run ``python -m gradlens.cli *args``, SIGKILL it as soon as ``ready()`` holds (polled every
    10 ms) and wait for it; fail if the command ends first."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradlens.cli", *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"`gradlens {args[0]}` ended before it could be killed"
            assert time.monotonic() < deadline, f"`gradlens {args[0]}` never got ready"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
