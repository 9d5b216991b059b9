"""``gradlens watch``: the live view, end to end in a subprocess while this process writes the run
chunk by chunk; the frame's content; the CLI's errors."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import gradlens as gl
from gradlens._commands.watch import render, sparkline
from gradlens.cli import main

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("a", "b", "c")
COS_AB = [-1.0, -1 / 3, 1 / 3, 1.0]


def _snap(step: int, c: float) -> gl.Snapshot:
    def gram(x: float) -> torch.Tensor:
        return torch.tensor([[1.0, x, 0.0], [x, 1.0, 0.0], [0.0, 0.0, 4.0]], dtype=torch.float64)

    return gl.Snapshot(
        step, TASKS, gram(c), {"trunk.0": gram(c), "trunk.2": gram(-c)}, torch.ones(3)
    )


def _frames(text: str) -> list[str]:
    return [f for f in text.split("gradlens watch ") if f.strip()]


def test_watch_follows_a_run_as_chunks_commit(tmp_path):
    run_dir = tmp_path / "run"
    writer = gl.RunWriter(run_dir, meta={"tasks": list(TASKS)}, flush_every=1)
    writer.add_snapshot(_snap(0, COS_AB[0]))  # flush_every=1: one committed chunk per probe
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "gradlens.cli",
        "watch",
        str(run_dir),
        "--interval",
        "0.05",
        "--until-done",
        "--color",
        "never",
    ]
    lines: queue.Queue[str] = queue.Queue()
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    ) as proc:
        reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout])
        reader.start()
        seen = []
        try:
            while not any("conflict in" in x for x in seen):  # the first frame is complete
                seen.append(lines.get(timeout=120))
            for step in (1, 2, 3):
                writer.add_snapshot(_snap(step, COS_AB[step]))
            writer.close()
            assert proc.wait(timeout=120) == 0, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
            reader.join(timeout=60)
    while not lines.empty():
        seen.append(lines.get())
    frames = _frames("".join(seen))
    assert len(frames) >= 2
    first, last = frames[0], frames[-1]
    assert f"writer: live (pid {os.getpid()})" in first
    assert "probed steps: 1 (0 .. 0)" in first
    assert "writer: closed" in last
    assert "probed steps: 4 (0 .. 3)" in last
    # the sparkline of a|b is the cosine -1, -1/3, 1/3, 1 on the fixed [-1, 1] scale
    assert "a|b   ▁▃▆█   last  +1.00   conflict in 2/4 probes" in last
    assert "a|c   ▅▅▅▅   last  +0.00   conflict in 0/4 probes" in last
    # per layer, the latest cosines: trunk.2's a|b is -1
    assert any(x.split()[:2] == ["trunk.2", "-1.00"] for x in last.splitlines())


def test_frame_content_and_limits(tmp_path):
    with gl.RunWriter(tmp_path / "r", meta={"tasks": list(TASKS)}) as w:
        pass
    assert "no committed chunk yet" in render(tmp_path / "r")
    with gl.RunWriter(tmp_path / "r2", meta={"tasks": list(TASKS)}) as w:
        for step, c in enumerate(COS_AB[::-1]):  # a|b ends at -1, the lowest pair
            w.add_snapshot(_snap(step * 10, c))
    frame = render(tmp_path / "r2", max_pairs=1, max_layers=1, color=True)
    assert "the 1 lowest of 3 pairs" in frame
    assert "... 1 more layers (--layers)" in frame
    assert "\x1b[31m -1.00\x1b[0m" in frame  # a|b's conflict, in red
    assert "a|c" not in frame


def test_sparkline_bins_long_series():
    v = np.concatenate([-np.ones(50), np.ones(50)])
    assert sparkline(v, 4) == "▁▁██"
    assert sparkline(np.array([np.nan, 0.0]), 4) == " ▅"


def test_cli_once_and_errors(tmp_path, capsys):
    with gl.RunWriter(tmp_path / "r", meta={"tasks": list(TASKS)}) as w:
        w.add_snapshot(_snap(0, -0.5))
    assert main(["watch", str(tmp_path / "r"), "--once"]) == 0
    out = capsys.readouterr().out
    assert "writer: closed" in out
    assert "\x1b[" not in out  # not a terminal: no colour, no screen clearing
    assert main(["watch", str(tmp_path / "nope"), "--once"]) == 2
    assert "`RUN_DIR` should be a run directory" in capsys.readouterr().err
    assert main(["watch", str(tmp_path / "r"), "--width", "0"]) == 2
    assert "`--width` should be an int >= 1; found 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["watch"])
