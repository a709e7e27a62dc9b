"""The transactional outbox: messages decided in a transaction are written in that transaction.

Stop commands, notices and settlements are rows of ``outbox``, inserted by the same database
transaction as the facts that caused them; the relay publishes them afterwards, at least once,
with ``Nats-Msg-Id`` set so JetStream (and the consumer downstream) drops a repeat.

No row is ever skipped. The known pitfall is a relay that remembers the highest id it has published
and asks for ``id > last``: identity values are taken at INSERT but become visible at COMMIT, so a
transaction that took id 7 and commits after id 8 was published is skipped for ever. This relay
keeps no high-water mark: it claims whatever is still unpublished (``published_at IS NULL``, a
partial index keeps that cheap) with ``FOR UPDATE SKIP LOCKED`` and marks what it published.
A late-committing row is simply found on the next pass.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import psycopg

from ledger.invariants import require

# A relay pass publishes at most this many rows; the bound caps the lock time and memory.
MAX_CLAIM_ROWS: Final = 500


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    subject: str
    msg_id: str
    """Deduplication id downstream (``Nats-Msg-Id``): the commandId of a stop command."""
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ClaimedMessage:
    id: int
    subject: str
    msg_id: str
    payload_json: bytes
    created_at: datetime


def enqueue(conn: psycopg.Connection[Any], messages: Sequence[OutboxMessage], *, now: datetime) -> None:
    """Write messages in the caller's transaction (one statement)."""
    if not messages:
        return
    for m in messages:
        require(0 < len(m.subject) <= 255 and " " not in m.subject, f"bad subject {m.subject!r}")
        require(0 < len(m.msg_id) <= 255, f"bad msg id {m.msg_id!r}")
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO outbox (subject, msg_id, payload, created_at)"
            " SELECT s, m, p::jsonb, %(now)s FROM unnest(%(s)b::text[], %(m)b::text[], %(p)b::text[]) AS x(s, m, p)",
            {
                "now": now,
                "s": [m.subject for m in messages],
                "m": [m.msg_id for m in messages],
                "p": [json.dumps(m.payload, separators=(",", ":"), sort_keys=True) for m in messages],
            },
        )


def claim(conn: psycopg.Connection[Any], limit: int = MAX_CLAIM_ROWS) -> list[ClaimedMessage]:
    """Lock up to ``limit`` unpublished rows, oldest first, skipping rows another relay holds.

    The caller publishes them, then calls :func:`mark_published` and commits. A crash in between
    leaves them unpublished: they are published again (at least once, deduplicated by msg id).
    """
    require(0 < limit <= MAX_CLAIM_ROWS, f"claim limit {limit}")
    with conn.cursor() as cur:
        cur.execute(
            "SELECT id, subject, msg_id, payload::text, created_at FROM outbox"
            " WHERE published_at IS NULL ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
            (limit,),
        )
        return [ClaimedMessage(r[0], r[1], r[2], r[3].encode(), r[4]) for r in cur.fetchall()]


# Joined, not ``id = ANY(...)``: see projections.wallet_store.BATCH_LOOKUPS_SQL.
MARK_PUBLISHED_SQL: Final = (
    "UPDATE outbox o SET published_at = %s FROM unnest(%s::int8[]) AS k(id)"
    " WHERE o.id = k.id AND o.published_at IS NULL"
)


def mark_published(conn: psycopg.Connection[Any], ids: Sequence[int], *, now: datetime) -> None:
    if not ids:
        return
    with conn.cursor() as cur:
        cur.execute(MARK_PUBLISHED_SQL, (now, list(ids)))


def delete_published(conn: psycopg.Connection[Any], *, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` rows published before ``before`` (oldest first, skipping rows another
    transaction holds); unpublished rows are never touched. Returns how many were deleted."""
    require(0 < limit <= 100_000, f"delete limit {limit}")
    with conn.cursor() as cur:
        cur.execute(
            "DELETE FROM outbox WHERE id IN ("
            "  SELECT id FROM outbox WHERE published_at < %s ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)",
            (before, limit),
        )
        return cur.rowcount
