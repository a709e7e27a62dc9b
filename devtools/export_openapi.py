"""Write the HTTP API's OpenAPI document to ``openapi.json`` (kept in the repository).

    python -m devtools.export_openapi [--check] [PATH]

``--check`` writes nothing and exits 1 if the file is stale; tests/integration/test_openapi.py
fails the same way. No database, NATS or Stripe is touched: the app is only described.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy import create_engine

from consumers.http.app import create_app
from consumers.runtime.settings import Settings
from devtools import generated_docs

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
    return generated_docs.render(document, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    return generated_docs.write_or_check(
        argv, DEFAULT_PATH, lambda: render(openapi_document()), "python -m devtools.export_openapi"
    )


if __name__ == "__main__":
    raise SystemExit(main())
