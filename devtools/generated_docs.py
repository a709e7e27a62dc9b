"""Interface documents generated from the code and kept in the repository (openapi.json,
asyncapi.json): write them, or check that the committed file is current."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def render(document: dict[str, Any], *, sort_keys: bool) -> str:
    return json.dumps(document, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"


def write_or_check(argv: list[str] | None, default_path: Path, text: Callable[[], str], command: str) -> int:
    """``[--check] [PATH]``: write the document to PATH, or with ``--check`` write nothing and
    return 1 if the file differs from what the code generates now."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    path = Path(paths[0]) if paths else default_path
    generated = text()
    if check:
        current = path.read_text() if path.exists() else ""
        if current != generated:
            print(f"{path} is stale: run {command}", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    path.write_text(generated)
    print(f"wrote {path}")
    return 0
