"""The one-way data flow, as imports: the measuring core loads nothing of the harness or extras.

engines -> snapshots -> store -> stats/plots -> report: the core (profiler, engines, metrics,
store, snapshot) must import neither the study harness (train, data, models, search), nor the
across-run layers (stats, plots, report), nor the CLI, nor any optional extra; those load only
inside the functions that need them.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

CORE = [
    "gradlens",
    "gradlens.profiler",
    "gradlens.engines",
    "gradlens.metrics",
    "gradlens.store",
    "gradlens.testing",
    "gradlens.schedules",
    "gradlens.distributed",
]
HARNESS = ["train", "data", "models", "search", "stats", "plots", "report", "cli", "_commands"]
EXTRAS = [
    "matplotlib", "seaborn", "scipy", "sklearn", "ray", "lightning", "tensorboard", "torchjd",
    "wandb", "mlflow", "transformers",
]  # fmt: skip


def _loaded_after_importing(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def _is_harness(module: str) -> bool:
    """``gradlens.train``, ``gradlens.train._data``, ``gradlens.stats._core``, ... (any depth)."""
    parts = module.split(".")
    if parts[0] != "gradlens" or len(parts) < 2:
        return False
    top = parts[1].lstrip("_")
    return any(top == h.lstrip("_") or top.startswith(h.lstrip("_") + "_") for h in HARNESS)


def test_harness_names_are_recognised():
    assert _is_harness("gradlens.stats._core")
    assert _is_harness("gradlens.search.sweep")
    assert not _is_harness("gradlens.store._io")
    assert not _is_harness("gradlens.distributed")


def test_the_measuring_core_imports_no_harness_and_no_extra():
    loaded = _loaded_after_importing(CORE)
    assert "gradlens.profiler" in loaded  # the check ran
    harness = sorted(m for m in loaded if _is_harness(m))
    assert harness == [], f"the measuring core loaded {harness}"
    extras = sorted(m for m in EXTRAS if m in loaded)
    assert extras == [], f"the measuring core loaded optional extras {extras}"


def _module_imports(root: Path) -> dict[str, set[str]]:
    """gradlens module -> the gradlens modules it imports when it is loaded (statements at module
    level; ``if TYPE_CHECKING:`` blocks and imports inside functions are not followed)."""
    paths = {}
    for p in (root / "gradlens").rglob("*.py"):
        parts = list(p.relative_to(root).with_suffix("").parts)
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        out = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    out.add(sub if sub in paths else node.module)
        graph[name] = {m for m in out if m in paths and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_gradlens_modules():
    """Loading any module never re-enters one that is still loading (e.g. snapshot <-> metrics:
    shared constants live in gradlens._types, which imports nothing)."""
    graph = _module_imports(Path(__file__).resolve().parents[1])
    assert "gradlens.snapshot" in graph  # the scan ran
    assert graph["gradlens._types"] == set()
    assert _cycles(graph) == []


MAX_FILE_LINES = 620  # "about 600"
MAX_BODY_LINES = 80  # a function's statements, its docstring not counted


def _long_code(root: Path) -> list[str]:
    """Files of gradlens/ over MAX_FILE_LINES lines and functions whose body (docstring excluded)
    is over MAX_BODY_LINES lines."""
    found = []
    for path in sorted((root / "gradlens").rglob("*.py")):
        src = path.read_text()
        rel = path.relative_to(root)
        if src.count("\n") > MAX_FILE_LINES:
            found.append(f"{rel}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]
            if body and (n := (body[-1].end_lineno or 0) - body[0].lineno + 1) > MAX_BODY_LINES:
                found.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    return found


def test_long_code_finder_finds_a_planted_long_function(tmp_path):
    (tmp_path / "gradlens").mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_BODY_LINES + 1))
    (tmp_path / "gradlens" / "m.py").write_text(f'def f():\n    """Doc."""\n{body}')
    assert _long_code(tmp_path) == [f"gradlens/m.py:1 f: {MAX_BODY_LINES + 1} lines"]


def test_no_long_module_and_no_long_function():
    """Issue 19: no file in gradlens/ above about 600 lines, no function above about 80."""
    assert _long_code(Path(__file__).resolve().parents[1]) == []


def test_every_type_ignore_names_its_error_code_and_a_reason():
    bare = []
    for path in sorted((Path(__file__).resolve().parents[1] / "gradlens").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "type: ignore" in line and not re.search(r"type: ignore\[[a-z, -]+\] +# \S", line):
                bare.append(f"{path.name}:{n}")
    assert bare == []
