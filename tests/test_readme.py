"""The README's code runs as written (its quickstart drifted from the API in peers' projects)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_quickstart_runs(tmp_path, monkeypatch, capsys):
    blocks = _python_blocks(README.read_text())
    assert blocks, "the README should hold a python quickstart"
    monkeypatch.chdir(tmp_path)
    ns: dict[str, object] = {}
    exec(compile(blocks[0], "README.md:quickstart", "exec"), ns)
    assert (tmp_path / "runs" / "quickstart" / "meta.json").exists()
    out = capsys.readouterr().out
    assert "cosine" in out
    quick = blocks[0].strip().splitlines()
    assert len(quick) <= 25


def test_readme_gives_the_two_setup_commands():
    text = README.read_text()
    assert "gradlens demo" in text
    assert 'pytest -m "not slow"' in text
    assert "pip install torch==2.13.0" in text


def _readme_test_command() -> str:
    """The shell line of the README's ``Tests`` block (the command a new user runs)."""
    text = README.read_text()
    block = re.search(r"^Tests\b.*?```bash\n(.*?)\n```", text, flags=re.S | re.M)
    assert block, "the README should hold a `Tests` paragraph followed by a bash block"
    return block.group(1).strip()


def test_ci_runs_the_readme_test_command_verbatim():
    command = _readme_test_command()
    assert command.endswith('pytest -m "not slow"'), command
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert command in [line.strip() for line in ci], (
        f".ci/run should run the README's test command verbatim: {command!r}"
    )

