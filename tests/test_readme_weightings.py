"""The README's multi-task optimization example runs as written and prints what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_weighting_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchjd")
    text = README.read_text()
    section = text[text.index("## Multi-task optimization methods from the Gram") :]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert block is not None
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md:weightings", "exec"), {})
    out = capsys.readouterr().out
    assert "conflict" in out
    assert "cosine" in out
    assert (tmp_path / "runs" / "upgrad" / "meta.json").exists()
