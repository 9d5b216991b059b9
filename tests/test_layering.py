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


#: (importer, private module of another subpackage) -> why the import is allowed. Everything else
#: imports another subpackage only through its public ``__init__`` or public modules. The engines'
#: shared contract, ``gradlens.engines._base``, is open to the measuring core that drives engines.
PRIVATE_IMPORTS_ALLOWED = {
    ("gradlens.profiler", "gradlens.engines._base"): "the engines' contract the profiler drives",
    ("gradlens.profiler", "gradlens.engines._graph"): "the graph index it builds for its engine",
    ("gradlens.profiler", "gradlens.weightings._apply"): "Gram weightings applied in its backward",
    ("gradlens._profiler_checks", "gradlens.engines._base"): "checks against the engines' contract",
    ("gradlens._profiler_checks", "gradlens.engines._graph"): "the profiler's graph index, checked",
    ("gradlens.distributed", "gradlens.engines._base"): "wraps an engine across ranks",
    ("gradlens.distributed", "gradlens.engines._unbatchable"): "vmap errors, named as engines do",
    ("gradlens.testing", "gradlens.engines._base"): "resolve_shared: the engines' parameter choice",
    ("gradlens.weightings._apply", "gradlens.engines._base"): "writes .grad as the engines do",
    ("gradlens.weightings._apply", "gradlens.engines._unbatchable"): "vmap errors, as named there",
    ("gradlens.bench._weightings", "gradlens.engines._base"): "quiet_vmap, as the engines call it",
}  # fmt: skip


def _is_private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _private_imports(root: Path) -> list[tuple[str, str, str]]:
    """``(importer, imported, "path:line")`` for every import (module level or inside a function)
    of a private module (a ``_x`` below a subpackage) of another subpackage of gradlens; the
    subpackage is the name after ``gradlens.`` (top-level private modules are shared by all)."""
    paths = {}
    for p in (root / "gradlens").rglob("*.py"):
        parts = list(p.relative_to(root).with_suffix("").parts)
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    found = []
    for name, path in sorted(paths.items()):
        own = name.split(".")[1] if "." in name else ""
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importer's package, level - 1 up
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
                targets = [targets[0]] + [t for t in targets[1:] if t in paths]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                if parts[0] != "gradlens" or len(parts) < 3 or parts[1] == own:
                    continue
                if any(_is_private(p) for p in parts[2:]):
                    found.append((name, target, f"{path.relative_to(root)}:{node.lineno}"))
    return found


def test_private_import_finder_finds_planted_imports(tmp_path):
    pkg = tmp_path / "gradlens"
    for rel, src in {
        "__init__.py": "",
        "a/__init__.py": "from gradlens.a._p import x\n",
        "a/_p.py": "x = 1\n",
        "a/q.py": "from . import _p\nimport gradlens.a._p\n",
        "b/__init__.py": "",
        "b/m.py": "import gradlens.a\n\ndef f():\n    from gradlens.a import _p, q\n",
        "b/_n.py": "from gradlens.a._p import x\nfrom gradlens._paths import y\n",
        "_paths.py": "",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(src)
    assert _private_imports(tmp_path) == [
        ("gradlens.b._n", "gradlens.a._p", "gradlens/b/_n.py:1"),
        ("gradlens.b.m", "gradlens.a._p", "gradlens/b/m.py:4"),
    ]


def test_no_module_imports_a_private_module_of_another_subpackage():
    """design.md: each subsystem is a subpackage of private modules behind a public ``__init__``;
    another subpackage uses its public ``__init__`` or public modules (e.g. gradlens.store.files,
    gradlens.plots.style), or a helper shared by all lives in a private top-level gradlens/_x.py."""
    found = _private_imports(Path(__file__).resolve().parents[1])
    assert ("gradlens.testing", "gradlens.engines._base") in {(a, b) for a, b, _ in found}  # it ran
    allowed = PRIVATE_IMPORTS_ALLOWED
    bad = [f"{where}: {a} imports {b}" for a, b, where in found if (a, b) not in allowed]
    assert bad == [], (
        "modules import a private module of another subpackage (import the name from that "
        "subpackage's public __init__ or a public module of it, move a helper shared by all to a "
        "private top-level gradlens/_x.py, or allow the pair, with a reason, in "
        "PRIVATE_IMPORTS_ALLOWED):\n" + "\n".join(bad)
    )
    stale = sorted(set(PRIVATE_IMPORTS_ALLOWED) - {(a, b) for a, b, _ in found})
    assert stale == [], f"PRIVATE_IMPORTS_ALLOWED lists imports that no longer exist: {stale}"
