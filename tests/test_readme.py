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



def _layout_rows() -> list[tuple[str, str]]:
    text = README.read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    rows = []
    for line in block.strip().splitlines():
        path, _, desc = line.partition(" ")
        if path.startswith("gradlens/"):
            rows.append((path, desc.strip()))
    return rows


def _listed_modules(desc: str) -> set[str]:
    """``"a, b (words); _c; sub/"`` -> ``{"a", "b", "_c", "sub/"}``: the names before any
    parenthesis, separated by commas and semicolons."""
    plain = re.sub(r"\([^)]*\)", "", desc)
    return {tok.strip() for tok in re.split(r"[,;]", plain) if tok.strip()}


def test_layout_section_matches_the_package_tree():
    root = README.parent
    rows = _layout_rows()
    files = {p for p, _ in rows if p.endswith(".py")}
    top = {f"gradlens/{p.name}" for p in (root / "gradlens").glob("*.py")}
    assert files == top, "README's layout should list exactly the top-level modules"
    pkgs = {p for p, _ in rows if p.endswith("/")}
    on_disk = {
        f"{d.relative_to(root).as_posix()}/"
        for d in (root / "gradlens").rglob("*")
        if d.is_dir() and (d / "__init__.py").exists()
    }
    assert pkgs == on_disk, "README's layout should list every subpackage"
    for path, desc in rows:
        if not path.endswith("/"):
            continue
        d = root / path
        mods = {p.stem for p in d.glob("*.py") if p.stem != "__init__"}
        subs = {f"{s.name}/" for s in d.iterdir() if (s / "__init__.py").exists()}
        assert _listed_modules(desc) == mods | subs, f"README's layout row for {path}"


def test_layout_parser_reads_a_row():
    assert _listed_modules("a, b (x, y); _c; sub/") == {"a", "b", "_c", "sub/"}


def test_the_zoo_tables_are_the_committed_measurement():
    """The README's real-model time and memory tables are rendered from the bench's JSON files
    they cite (``benchmarks/zoo_table.py``; the small-size run and the ``--size base`` run): no
    number in them is typed by hand."""
    import json
    import runpy

    root = README.parent
    text = README.read_text()
    render = runpy.run_path(str(root / "benchmarks" / "zoo_table.py"))
    # each table's files (the base-size table: its T = 8 run and its T = 3 run)
    for names in (("cpu_zoo_exact_engines.json",), ("cpu_zoo_base.json", "cpu_zoo_base_t3.json")):
        rows = []
        for name in names:
            path = f"benchmarks/results/{name}"
            assert f"--json {path}" in text, f"the README cites the command that wrote {path}"
            rows += json.loads((root / path).read_text())["time"]
        assert render["time_table"](rows) in text, names
        assert render["memory_table"](rows) in text, names
