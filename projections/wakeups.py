"""The wake-ups of the wallets, as the auto-stop scheduler reads them (consumers.service.scheduler).

Every writer stores each wallet's next wake-up (``wallets.next_wakeup_at``, from
``rules.next_wakeup``) through the write path; these are the reads of it, and of the stop commands a
tick issued (in the tick's transaction, under the wallet locks).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import psycopg


def due_wallets_with_instants(
    conn: psycopg.Connection[Any],
    now: datetime,
    limit: int,
    exclude: Sequence[str] = (),
    only: Sequence[str] | None = None,
) -> list[tuple[str, datetime]]:
    """Wallets whose next wake-up is due at ``now`` (predicted zero, re-issue, hold expiry...), with
    each wallet's stored wake-up, earliest first, leaving ``exclude`` out (and only among ``only``
    when given)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT wallet_id, next_wakeup_at FROM wallets"
            " WHERE next_wakeup_at <= %s AND NOT (wallet_id = ANY(%s::text[]))"
            "   AND (%s::text[] IS NULL OR wallet_id = ANY(%s::text[]))"
            " ORDER BY next_wakeup_at LIMIT %s",
            (now, list(exclude), None if only is None else list(only), None if only is None else list(only), limit),
        )
        return [(r[0], r[1]) for r in cur.fetchall()]


def earliest_wakeup(conn: psycopg.Connection[Any], exclude: Sequence[str] = ()) -> datetime | None:
    """The earliest stored wake-up of any wallet, leaving ``exclude`` out."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT min(next_wakeup_at) FROM wallets"
            " WHERE next_wakeup_at IS NOT NULL AND NOT (wallet_id = ANY(%s::text[]))",
            (list(exclude),),
        )
        row = cur.fetchone()
        return row[0] if row else None


# Joined, not ``wallet_id = ANY(...)`` (see projections.wallet_store.BATCH_LOOKUPS_SQL): the rentals
# table keeps every rental ever started; ``status <> 'ended'`` selects its partial index.
STOPS_ISSUED_SQL: Final = (
    "SELECT r.wallet_id, r.resource_id, r.stop_attempts FROM unnest(%s::text[]) AS k(w)"
    "  JOIN rentals r ON r.wallet_id = k.w AND r.status <> 'ended'"
    " WHERE r.status = 'running' AND r.stop_issued_at = %s"
)


def stops_issued_at(
    conn: psycopg.Connection[Any], wallet_ids: Sequence[str], issued_at: datetime
) -> list[tuple[str, str, int]]:
    """(wallet, resource, attempts) of the stop commands issued at exactly ``issued_at`` (this tick's,
    read in its transaction under the wallet locks)."""
    with conn.cursor() as cur:
        cur.execute(STOPS_ISSUED_SQL, (list(wallet_ids), issued_at))
        return [(r[0], r[1], r[2]) for r in cur.fetchall()]
