"""The Stripe tables beside the ledger, for consumers.stripe.facts: webhooks recorded once by
Stripe's event id, and the wallet a PaymentIntent is booked to. The money itself goes through the
write path (projections.write_path) as Stripe facts of the log."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

import psycopg

from ledger import schema
from ledger.invariants import require
from projections.write_path import columns_of

_WEBHOOK_COLUMNS: Final = columns_of(schema.stripe_webhook_events)
_RECORD_WEBHOOK_SQL: Final = (
    f"INSERT INTO stripe_webhook_events ({', '.join(_WEBHOOK_COLUMNS)})"
    " VALUES (%s, %s, %s, %s, %s::jsonb) ON CONFLICT (id) DO NOTHING RETURNING id"
)


class UnstorableWebhook(Exception):
    """PostgreSQL refused the payload (e.g. a number beyond its numeric range)."""


def record_webhook(
    conn: psycopg.Connection[Any], *, event_id: str, type: str, received_at: datetime, handled: bool, payload: str
) -> bool:
    """Record a webhook in the caller's transaction. False if it was recorded before (a concurrent
    delivery got there first); raises :class:`UnstorableWebhook` for a payload the database refuses."""
    require(_WEBHOOK_COLUMNS == ["id", "type", "received_at", "handled", "payload"], "stripe_webhook_events changed")
    with conn.cursor() as cur:
        try:
            cur.execute(_RECORD_WEBHOOK_SQL, (event_id, type, received_at, handled, payload))
        except psycopg.DataError as error:
            raise UnstorableWebhook(str(error.diag.message_primary)) from None
        return cur.fetchone() is not None


def webhook_handled(conn: psycopg.Connection[Any], event_id: str) -> bool | None:
    """Whether the webhook was handled when it was recorded; None if it was never received."""
    with conn.cursor() as cur:
        cur.execute("SELECT handled FROM stripe_webhook_events WHERE id = %s", (event_id,))
        row = cur.fetchone()
    return None if row is None else bool(row[0])


def wallet_of_payment(conn: psycopg.Connection[Any], payment_intent_id: str) -> str | None:
    """The wallet the ledger books this PaymentIntent to, or None if the ledger has not seen it."""
    with conn.cursor() as cur:
        cur.execute("SELECT wallet_id FROM stripe_payments WHERE payment_intent_id = %s", (payment_intent_id,))
        row = cur.fetchone()
    return None if row is None else str(row[0])
