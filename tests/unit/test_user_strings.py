"""Strings people and producers read (dead-letter details, errors, stream descriptions) point into
this repository, never to the design file outside it (docstrings, for developers, are not scanned)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = ("DESIGN", "../shared", "/work/shared")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of the module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _visible_strings(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
    ]


@pytest.mark.parametrize("package", ["consumers", "projections", "ledger"])
def test_no_user_visible_string_names_a_file_outside_the_repo(package: str) -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{line}: {value[:80]!r}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, value in _visible_strings(path)
        if any(word in value for word in OUTSIDE)
    ]
    assert not offending, "\n".join(offending)


def test_the_unknown_field_detail_points_to_docs_events() -> None:
    from datetime import UTC, datetime

    from ledger.events import Rejection, parse_event

    body = (
        b'{"specversion": "1.0", "id": "e1", "source": "s", "type": "wallet.adjusted",'
        b' "time": "2026-11-28T10:00:00Z", "data": {"walletId": "w", "amountMicros": 1,'
        b' "reason": "r", "operator": "o", "cost": 5}}'
    )
    refused = parse_event(body, now=datetime(2026, 11, 28, 10, 1, tzinfo=UTC))
    assert isinstance(refused, Rejection)
    assert "data.cost: unknown field (field names are camelCase, as in docs/events.md)" in refused.detail
