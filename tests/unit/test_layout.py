"""The layout's rules, checked on the source (README "Layout"): who may import whom, no import circle,
no function over 70 lines in the service's code (TigerBeetle's limit), adapters without SQL of their own.

Imports are read with ``ast`` from every module, function-local imports included (a lazy import
that hides a circle is still a circle); only ``if TYPE_CHECKING:`` blocks are left out, they never run.
"""

from __future__ import annotations

import ast
import collections
import pathlib
import re

import pytest

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICE = ("ledger", "projections", "consumers")
MAX_FUNCTION_LINES = 70

# area -> the areas it may import (besides itself). An area is a top-level package, or a sub-package
# of consumers. devtools (demo, document generators) sits outside the service: only the CLI reaches it.
ALLOWED: dict[str, set[str]] = {
    "ledger": set(),
    "projections": {"ledger"},
    "consumers.runtime": {"ledger", "projections"},
    "consumers.nats": {"consumers.runtime", "ledger", "projections"},
    "consumers.stripe": {"consumers.runtime", "ledger", "projections"},
    "consumers.http": {"consumers.runtime", "consumers.stripe", "consumers.nats", "ledger", "projections"},
    "consumers.service": {
        "consumers.runtime",
        "consumers.nats",
        "consumers.http",
        "consumers.stripe",
        "ledger",
        "projections",
    },
    "consumers.cli": {
        "consumers.runtime",
        "consumers.nats",
        "consumers.http",
        "consumers.stripe",
        "consumers.service",
        "devtools",
        "ledger",
        "projections",
    },
    "consumers": set(),  # the package's own __init__
    "devtools": {
        "consumers.runtime",
        "consumers.nats",
        "consumers.http",
        "consumers.stripe",
        "consumers.service",
        "ledger",
        "projections",
    },
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    out: dict[str, pathlib.Path] = {}
    for top in (*SERVICE, "devtools"):
        for path in sorted((ROOT / top).rglob("*.py")):
            out[_module_name(path)] = path
    assert len(out) > 50, f"the source tree was not found under {ROOT}"
    return out


MODULES = _modules()


def _area(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "consumers" and len(parts) > 1:
        return "consumers." + parts[1]
    return parts[0]


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    skip = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(r for a in node.names if (r := _resolve(a.name)))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                r = _resolve(f"{node.module}.{a.name}") or _resolve(node.module)
                if r:
                    found.add(r)
    found.discard(module)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_area_is_known() -> None:
    unknown = sorted({_area(m) for m in MODULES} - set(ALLOWED))
    assert not unknown, f"modules outside the layout's areas (README 'Layout'): {unknown}"


def test_areas_import_only_what_the_layout_allows() -> None:
    wrong = sorted(
        f"{m} imports {dep}"
        for m, deps in GRAPH.items()
        for dep in deps
        if _area(dep) != _area(m) and _area(dep) not in ALLOWED[_area(m)]
    )
    assert not wrong, "imports against the layout:\n" + "\n".join(wrong)


def _cycles() -> list[list[str]]:
    """Tarjan's strongly connected components of the module graph, iteratively (bounded by the graph)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(GRAPH):
        if root in index:
            continue
        work = [(root, iter(sorted(GRAPH[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(GRAPH[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circle() -> None:
    assert not _cycles(), f"import circles: {_cycles()}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    # the check above must be able to fail: a circle planted in a copy of the graph is found
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    saved = dict(GRAPH)
    GRAPH.clear()
    GRAPH.update(planted)
    try:
        assert _cycles() == [["a", "b", "c"]]
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def _long_functions(tree: ast.AST, path: pathlib.Path) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_over_70_lines() -> None:
    long_ones = [
        entry
        for module, path in MODULES.items()
        if _area(module) != "devtools"
        for entry in _long_functions(ast.parse(path.read_text()), path)
    ]
    assert not long_ones, "functions over 70 lines (split them):\n" + "\n".join(long_ones)


# SQL that names a domain table: only ledger and projections may hold it.
_DOMAIN_SQL = re.compile(
    r"\b(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM|FROM|JOIN)\s+(?:ledger\.)?"
    r"(?:events|journal_\w+|account_balances|wallets|rentals|serverless_\w+|outbox|rejected_inputs|stripe_\w+)\b",
)


def test_adapters_hold_no_sql_against_domain_tables() -> None:
    offenders = sorted(
        f"{path.relative_to(ROOT)}:{n}"
        for module, path in MODULES.items()
        if _area(module).startswith("consumers")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if _DOMAIN_SQL.search(line) and not line.lstrip().startswith("#")
    )
    assert not offenders, "SQL against domain tables in adapters (move it to projections):\n" + "\n".join(offenders)


def test_adapters_do_not_reach_the_tables() -> None:
    # SQLAlchemy Core against the tables is SQL too: only ledger and projections import ledger.schema
    offenders = sorted(m for m, deps in GRAPH.items() if _area(m).startswith("consumers") and "ledger.schema" in deps)
    assert not offenders, f"adapters importing ledger.schema (move the query to projections): {offenders}"


def test_areas_follow_the_flow() -> None:
    # the layout of README's table: each sub-package of consumers exists and holds modules
    counts = collections.Counter(_area(m) for m in MODULES)
    for area in ("consumers.nats", "consumers.http", "consumers.stripe", "consumers.cli", "consumers.runtime"):
        assert counts[area] >= 2, f"{area} is missing or empty"
