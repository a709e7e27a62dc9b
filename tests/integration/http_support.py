"""Shared pieces of the HTTP API tests: settings, a settable clock, a live uvicorn server in a thread,
signed webhooks, and ledger look-ups."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import uvicorn
from pydantic import SecretStr
from sqlalchemy import Engine, text

from consumers.runtime.settings import Settings
from tests.fake_stripe import sign_webhook

WALLET_TOKEN = "tok_wallet_3f9a1c"
FINANCE_TOKEN = "tok_finance_77b2de"
BOTH_TOKEN = "tok_both_c0ffee"
WEBHOOK_SECRET = "whsec_test_billing_0123456789"
WALLET_AUTH = {"Authorization": f"Bearer {WALLET_TOKEN}"}


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_tokens": SecretStr(f"{WALLET_TOKEN}:wallet;{FINANCE_TOKEN}:finance;{BOTH_TOKEN}:wallet,finance"),
        "stripe_webhook_secret": SecretStr(WEBHOOK_SECRET),
        **overrides,
    }
    return Settings(**values)


class Clock:
    """The service clock of a test: the real time unless pinned with ``at``."""

    def __init__(self) -> None:
        self.at: datetime | None = None

    def __call__(self) -> datetime:
        return self.at or datetime.now(UTC)


def signed(event: dict[str, Any], *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> tuple[bytes, dict]:
    body = json.dumps(event)
    headers = {"Stripe-Signature": sign_webhook(body, secret, timestamp), "Content-Type": "application/json"}
    return body.encode(), headers


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[str]:
    """The app on a real uvicorn server on 127.0.0.1 (free port), in a thread; yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="billing-http-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_http(url: str) -> None:
    with httpx.Client(timeout=2) as c:
        c.get(url)


# ------------------------------------------------------------------------------------ the ledger


def balance(engine: Engine, account: str) -> int:
    with engine.connect() as conn:
        value = conn.execute(
            text("SELECT balance_micros FROM account_balances WHERE account = :a"), {"a": account}
        ).scalar()
    return int(value or 0)


def wallet_balance(engine: Engine, wallet_id: str) -> int:
    return balance(engine, f"wallet:{wallet_id}")


def entries_sum(engine: Engine, account: str) -> int:
    with engine.connect() as conn:
        value = conn.execute(
            text("SELECT coalesce(sum(amount_micros), 0) FROM journal_entries WHERE account = :a"), {"a": account}
        ).scalar()
    return int(value or 0)


def count(engine: Engine, sql: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar() or 0)


def stripe_events(engine: Engine, fact_id: str) -> int:
    return count(engine, "SELECT count(*) FROM events WHERE source = 'stripe' AND event_id = :i", i=fact_id)


def topup_txns(engine: Engine, wallet_id: str) -> int:
    return count(
        engine, "SELECT count(*) FROM journal_transactions WHERE wallet_id = :w AND kind = 'topup'", w=wallet_id
    )


def webhook_row(engine: Engine, event_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = (
            conn.execute(
                text("SELECT id, type, handled, payload FROM stripe_webhook_events WHERE id = :i"), {"i": event_id}
            )
            .mappings()
            .first()
        )
    return None if row is None else dict(row)


def ledger_total(engine: Engine) -> int:
    """Sum of every journal entry: zero at every commit."""
    return count(engine, "SELECT coalesce(sum(amount_micros), 0) FROM journal_entries")
