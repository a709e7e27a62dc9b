"""The layout of ``consumers/http``: no import circle through it, no function over 70 lines
(nested route functions count inside their builder), and no SQL in the adapter (its reads are
functions of ``projections``). Read from the source with ``ast``: nothing is imported."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HTTP = ROOT / "consumers" / "http"
PACKAGES = ("consumers", "projections", "ledger")
MAX_FUNCTION_LINES = 70
MAX_MODULES = 1000  # a bound on the walk: the tree has about a hundred


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    assert len(found) < MAX_MODULES, len(found)
    return found


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports, at any depth of the file (lazy imports count)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out.update(n for n in names if n in known)
    return out


def _cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A path start -> ... -> start in ``graph``, or None (iterative depth-first search)."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_import_circle_through_consumers_http() -> None:
    known = _sources()
    graph = {name: _imports(path, known) - {name} for name, path in known.items()}
    for name in sorted(known):
        if name.startswith("consumers.http"):
            assert _cycle_through(name, graph) is None, " -> ".join(_cycle_through(name, graph) or [])


def test_consumers_http_imports_no_old_module() -> None:
    gone = {"consumers.http_api", "consumers.finance_api", "consumers.http_limits", "consumers.api_errors"}
    for path in [p for top in (*PACKAGES, "tests", "bench", "bin") for p in (ROOT / top).rglob("*.py")]:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in gone:
                raise AssertionError(f"{path.relative_to(ROOT)} imports {node.module}")


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_no_function_over_70_lines() -> None:
    for path in [*sorted(HTTP.glob("*.py")), ROOT / "projections" / "queries.py"]:
        for fn in _functions(ast.parse(path.read_text(), str(path))):
            first = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
            lines = (fn.end_lineno or fn.lineno) - first + 1
            assert lines <= MAX_FUNCTION_LINES, f"{path.name}:{fn.lineno} {fn.name} has {lines} lines"


def test_no_sql_in_the_http_adapter() -> None:
    for path in sorted(HTTP.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sqlalchemy"):
                imported = {a.name for a in node.names}
                assert not imported & {"text", "select", "insert", "update", "delete"}, path.name
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                head = node.value.lstrip().upper()
                assert not head.startswith(("SELECT ", "INSERT ", "UPDATE ", "DELETE ", "SET ")), path.name
