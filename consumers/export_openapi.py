"""Write the HTTP API's OpenAPI document to ``openapi.json`` (kept in the repository).

    python -m consumers.export_openapi [--check] [PATH]

``--check`` writes nothing and exits 1 if the file is stale; tests/integration/test_openapi.py
fails the same way. No database, NATS or Stripe is touched: the app is only described.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy import create_engine

from consumers.http_api import create_app
from consumers.settings import Settings

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "openapi.json"


def openapi_document() -> dict[str, Any]:
    # An engine is never connected to by describing the app; the settings carry no secret.
    engine = create_engine("postgresql+psycopg://billing@localhost/billing")
    settings = Settings(api_tokens=SecretStr(""), stripe_api_key=SecretStr(""), stripe_webhook_secret=SecretStr(""))
    try:
        return create_app(engine, settings).openapi()
    finally:
        engine.dispose()


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    path = Path(paths[0]) if paths else DEFAULT_PATH
    text = render(openapi_document())
    if check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            print(f"{path} is stale: run python -m consumers.export_openapi", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
