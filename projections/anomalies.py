"""Stripe facts finance must look at (issue 13 item 8): money Stripe moved that the service applied
as Stripe said, although Stripe would never send it so (a bug, or a leaked webhook secret).

Two kinds, both derivable from the log alone, so ``billing verify`` rebuilds them byte for byte:

- ``exceeds_payment``: a refund, dispute hold or lost dispute larger than what its payment still
  had in the ledger. The rules (projections.rules, ``EXCEEDS_PAYMENT_FLAG``) apply it in full and
  flag its journal memo; the row is that journal transaction.
- ``event_time``: a webhook whose ``created`` was more than the webhook tolerance (300 s) away from
  the service clock. Booked at its receipt instead (so no producer's clock books into a closed
  period); Stripe's claim is kept in the fact's ``data.stripeCreated``.

A :class:`projections.reports.Report` like every report (HTTP ``GET /finance/anomalies``, the CLI
``billing report anomalies``). Periods are half-open ``[from, to)`` on the booking instant.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Connection, text

from ledger.invariants import require
from projections.reports import Report
from projections.rules import EXCEEDS_PAYMENT_FLAG

KINDS: Final = ("exceeds_payment", "event_time")
COLUMNS: Final = (
    "kind",
    "bookedAt",
    "walletId",
    "paymentIntentId",
    "stripeId",
    "entryKind",
    "amountMicros",
    "stripeCreatedAt",
    "memo",
)
# Journal kinds whose memo only the rules write (an adjustment's memo holds a producer's text).
_FLAGGED_KINDS: Final = ("refund", "dispute_hold", "dispute_lost")
MAX_ROWS: Final = 10_000

_SQL: Final = f"""
SELECT 'exceeds_payment' AS kind, t.booked_at, t.wallet_id, e.payload->'data'->>'paymentIntentId',
       e.event_id, t.kind,
       (SELECT max(abs(j.amount_micros)) FROM journal_entries j
         WHERE j.event_position = t.event_position AND j.txn_no = t.txn_no),
       NULL::bigint, t.memo, e.position, t.txn_no
  FROM journal_transactions t JOIN events e ON e.position = t.event_position
 WHERE e.source = 'stripe' AND t.kind IN ('refund', 'dispute_hold', 'dispute_lost')
   AND t.memo LIKE :flag AND t.booked_at >= :s AND t.booked_at < :e
   -- The same period on the event (a transaction is booked at its event's time): the Stripe events'
   -- partial index finds the rows; journal_transactions has no index on booked_at (migration 0007).
   AND e.event_time >= :s AND e.event_time < :e
UNION ALL
SELECT 'event_time', e.event_time, e.wallet_id, e.payload->'data'->>'paymentIntentId', e.event_id, e.type,
       (e.payload->'data'->>'amountMicros')::bigint, (e.payload->'data'->>'stripeCreated')::bigint, '',
       e.position, -1
  FROM events e
 WHERE e.source = 'stripe' AND e.payload->'data' ? 'stripeCreated'
   AND e.event_time >= :s AND e.event_time < :e
 ORDER BY 10, 11
 LIMIT {MAX_ROWS + 1}
"""


def _created_text(created: int | None) -> str | None:
    """Stripe's claimed instant as ISO text, or the raw number when no datetime can hold it."""
    if created is None:
        return None
    try:
        return datetime.fromtimestamp(created, UTC).isoformat()
    except (OverflowError, OSError, ValueError):
        return str(created)


def anomalies(conn: Connection, start: datetime, end: datetime) -> Report:
    """The flagged Stripe facts booked in ``[start, end)``, in log order; summary: a count per kind."""
    require(start.tzinfo is not None and end.tzinfo is not None, "anomalies: instants must be aware")
    rows = conn.execute(text(_SQL), {"flag": f"%{EXCEEDS_PAYMENT_FLAG.strip()}", "s": start, "e": end}).all()
    require(len(rows) <= MAX_ROWS, f"more than {MAX_ROWS} anomalies: choose a shorter period")
    out: list[tuple[Any, ...]] = [
        (r[0], r[1].astimezone(UTC).isoformat(), r[2], r[3], r[4], r[5], int(r[6] or 0), _created_text(r[7]), r[8])
        for r in rows
    ]
    counts = {kind: sum(1 for r in out if r[0] == kind) for kind in KINDS}
    summary = {"from": start.isoformat(), "to": end.isoformat(), "exceedsPayment": counts["exceeds_payment"]}
    summary["eventTime"] = counts["event_time"]
    return Report("anomalies", COLUMNS, out, summary)


def flagged_in(conn: Any, event_ids: Sequence[str]) -> dict[str, int]:
    """How many of these Stripe facts' journal transactions the rules flagged ``exceeds_payment``
    (psycopg connection of the writer's unit of work, after process_batch): for the metric."""
    if not event_ids:
        return {}
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM journal_transactions t JOIN events e ON e.position = t.event_position"
            " WHERE e.source = 'stripe' AND e.event_id = ANY(%s) AND t.kind = ANY(%s) AND t.memo LIKE %s",
            (list(event_ids), list(_FLAGGED_KINDS), f"%{EXCEEDS_PAYMENT_FLAG.strip()}"),
        )
        row = cur.fetchone()
    n = int(row[0]) if row else 0
    return {"exceeds_payment": n} if n else {}
