"""Every python block of docs/integrations.md runs as written (each asserts its own claims)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
#: the optional library each block needs, by a word it imports
NEEDS = {"WandbSink": "wandb", "MLflowSink": "mlflow", "transformers": "transformers"}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_page_has_its_examples():
    assert len(BLOCKS) == 8


def _params() -> list:
    """The scripts needing an extra start a W&B run, an MLflow store or a Trainer (seconds
    each): slow, since tests/sinks/test_dashboards.py and
    tests/integrations/test_transformers.py cover the same code in the fast suite."""
    out = []
    for i, code in enumerate(BLOCKS):
        heavy = any(word in code for word in NEEDS)
        out.append(pytest.param(i, marks=[pytest.mark.slow] if heavy else []))
    return out


@pytest.mark.parametrize("index", _params())
def test_example_runs(index, tmp_path, monkeypatch, capsys):
    code = BLOCKS[index]
    for word, lib in NEEDS.items():
        if word in code:
            pytest.importorskip(lib)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # restored after the test
    exec(compile(code, f"{DOC.name}:block{index}", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    if "WandbSink" in code:
        assert "0 0" in out  # nothing dropped
    if "GradlensTrainerCallback" in code:
        assert "[0, 2, 4]" in out
    if "load_state_dict" in code:
        assert "[0, 2, 4, 6, 8]" in out
    if "ACCUM" in code:
        assert "[(0, 0), (4, 2), (8, 4)]" in out
    if "late.rules" in code:
        assert "{'0': 'generic', '2': 'generic'} {'0': 'linear', '2': 'linear'}" in out
        assert "('forward-not-recorded',) 1" in out
    if "requires_grad_(False)" in code:
        assert "('2',) None" in out
    if "use_reentrant=False" in code:
        assert "gramian ['linear']" in out
        assert "True 0" in out  # refused by a GradlensError, the step not advanced
