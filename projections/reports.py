"""Finance reports from the ledger alone (DESIGN section 6): trial balance, wallet statements,
revenue, debts, rejected inputs and the Stripe reconciliation.

Every report is a :class:`Report` (columns and rows of plain values, money as integer micros), so
the HTTP API, the CLI (table, JSON, CSV) and tests all read the same thing. Reports read the
journal through the views of migration 0005, which a BI tool can read through the read-only role.

Reads scan ``journal_entries`` alone (each entry carries its transaction's booking instant, kind,
wallet, resource, product and GPU type), never a join over millions of rows.

Instants: a journal transaction is booked at its event's time (usage is recognised when it
happened, not when the reading arrived). Periods are half-open ``[from, to)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

from sqlalchemy import Connection, text

from ledger.invariants import require

GROUP_KEYS: Final = ("day", "product", "gpuType")
_GROUP_SQL: Final = {
    "day": "(booked_at AT TIME ZONE 'UTC')::date",
    "product": "product",
    "gpuType": "gpu_type",
}


@dataclass(frozen=True)
class Report:
    name: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    summary: dict[str, Any] = field(default_factory=dict)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


def _aware(t: datetime, what: str) -> datetime:
    require(t.tzinfo is not None, f"{what} must be timezone-aware")
    return t


def trial_balance(conn: Connection, at: datetime) -> Report:
    """Every account's balance at ``at`` (transactions booked at or before it); the total is zero."""
    rows = conn.execute(
        text(
            "SELECT account, sum(amount_micros)::bigint FROM ledger_entries WHERE booked_at <= :at"
            " GROUP BY account ORDER BY account"
        ),
        {"at": _aware(at, "at")},
    ).all()
    total = sum(int(r[1]) for r in rows)
    require(total == 0, f"trial balance at {at} sums to {total}")
    return Report(
        "trial-balance",
        ("account", "balanceMicros"),
        [(r[0], int(r[1])) for r in rows],
        {"at": at.isoformat(), "totalMicros": total},
    )


STATEMENT_KINDS: Final = ("topup", "charge", "refund", "dispute_hold", "dispute_release", "dispute_lost", "adjustment")


def statement(conn: Connection, wallet_id: str, start: datetime, end: datetime) -> Report:
    """Opening balance, movements of the period by kind (charges per resource), closing balance.
    ``opening + sum(movements) == closing`` is checked."""
    _aware(start, "from")
    _aware(end, "to")
    require(start <= end, "from must not be after to")
    account = f"wallet:{wallet_id}"
    opening = int(
        conn.execute(
            text("SELECT coalesce(sum(amount_micros), 0) FROM ledger_entries WHERE account = :a AND booked_at < :s"),
            {"a": account, "s": start},
        ).scalar_one()
    )
    movements = conn.execute(
        text(
            "SELECT kind, coalesce(resource_id, ''), product, count(*), sum(amount_micros)::bigint"
            "  FROM ledger_entries WHERE account = :a AND booked_at >= :s AND booked_at < :e"
            " GROUP BY kind, resource_id, product ORDER BY kind, resource_id"
        ),
        {"a": account, "s": start, "e": end},
    ).all()
    closing = int(
        conn.execute(
            text("SELECT coalesce(sum(amount_micros), 0) FROM ledger_entries WHERE account = :a AND booked_at < :e"),
            {"a": account, "e": end},
        ).scalar_one()
    )
    moved = sum(int(m[4]) for m in movements)
    require(opening + moved == closing, f"statement of {wallet_id}: {opening} + {moved} != {closing}")
    by_kind: dict[str, int] = {}
    for m in movements:
        by_kind[m[0]] = by_kind.get(m[0], 0) + int(m[4])
    rows = [(m[0], m[1] or None, m[2], int(m[3]), int(m[4])) for m in movements]
    return Report(
        "statement",
        ("kind", "resourceId", "product", "entries", "amountMicros"),
        rows,
        {
            "walletId": wallet_id,
            "from": start.isoformat(),
            "to": end.isoformat(),
            "openingBalanceMicros": opening,
            "topupsMicros": by_kind.get("topup", 0),
            "chargesMicros": by_kind.get("charge", 0),
            "refundsMicros": by_kind.get("refund", 0),
            "disputesMicros": sum(by_kind.get(k, 0) for k in ("dispute_hold", "dispute_release", "dispute_lost")),
            "adjustmentsMicros": by_kind.get("adjustment", 0),
            "closingBalanceMicros": closing,
        },
    )


def revenue(conn: Connection, start: datetime, end: datetime, group_by: Sequence[str] = GROUP_KEYS) -> Report:
    """Recognised revenue (credits to ``revenue:<product>``) in ``[from, to)``, grouped."""
    keys = list(dict.fromkeys(group_by))
    for k in keys:
        require(k in GROUP_KEYS, f"unknown groupBy {k!r}; choose from {', '.join(GROUP_KEYS)}")
    select = ", ".join(f"{_GROUP_SQL[k]} AS g{i}" for i, k in enumerate(keys))
    groups = ", ".join(f"g{i}" for i in range(len(keys)))
    sql = (
        f"SELECT {select + ', ' if keys else ''}sum(amount_micros)::bigint"
        "  FROM ledger_entries WHERE account LIKE 'revenue:%' AND booked_at >= :s AND booked_at < :e"
        + (f" GROUP BY {groups} ORDER BY {groups}" if keys else "")
    )
    rows = conn.execute(text(sql), {"s": _aware(start, "from"), "e": _aware(end, "to")}).all()
    out = [(*(str(v) if v is not None else None for v in r[:-1]), int(r[-1] or 0)) for r in rows]
    if not keys and out == [(0,)]:
        out = []
    return Report(
        "revenue",
        (*keys, "revenueMicros"),
        out,
        {"from": start.isoformat(), "to": end.isoformat(), "totalMicros": sum(r[-1] for r in out)},
    )


def debts(conn: Connection) -> Report:
    """Wallets below zero (usage after the money ran out, R7), most owed first."""
    rows = conn.execute(
        text("SELECT wallet_id, balance_micros FROM ledger_debts ORDER BY balance_micros, wallet_id")
    ).all()
    return Report(
        "debts",
        ("walletId", "balanceMicros"),
        [(r[0], int(r[1])) for r in rows],
        {"wallets": len(rows), "totalMicros": sum(int(r[1]) for r in rows)},
    )


def rejected_inputs(conn: Connection, start: datetime, end: datetime) -> Report:
    rows = conn.execute(
        text(
            "SELECT reason, count(*), min(received_at), max(received_at) FROM rejected_inputs"
            " WHERE received_at >= :s AND received_at < :e GROUP BY reason ORDER BY count(*) DESC, reason"
        ),
        {"s": _aware(start, "from"), "e": _aware(end, "to")},
    ).all()
    return Report(
        "rejected",
        ("reason", "count", "first", "last"),
        [(r[0], int(r[1]), r[2].isoformat(), r[3].isoformat()) for r in rows],
        {"from": start.isoformat(), "to": end.isoformat(), "total": sum(int(r[1]) for r in rows)},
    )


# ------------------------------------------------------------------------------ Stripe reconciliation


@dataclass(frozen=True)
class StripeRecord:
    """One money movement as Stripe's own records (its list APIs) show it."""

    kind: Literal["payment", "refund"]
    stripe_id: str
    amount_micros: int
    wallet_id: str | None
    created: datetime


def ledger_stripe_records(conn: Connection, start: datetime, end: datetime) -> list[StripeRecord]:
    rows = conn.execute(
        text(
            "SELECT type, event_id, (payload->'data'->>'amountMicros')::bigint, wallet_id, event_time"
            "  FROM events WHERE source = 'stripe'"
            "   AND type IN ('stripe.payment.succeeded', 'stripe.refund.succeeded')"
            "   AND event_time >= :s AND event_time < :e ORDER BY position"
        ),
        {"s": _aware(start, "from"), "e": _aware(end, "to")},
    ).all()
    return [
        StripeRecord("payment" if r[0] == "stripe.payment.succeeded" else "refund", r[1], int(r[2]), r[3], r[4])
        for r in rows
    ]


def reconcile(ledger: Iterable[StripeRecord], stripe: Iterable[StripeRecord], start: datetime, end: datetime) -> Report:
    """Match the ledger's top-ups and refunds with Stripe's records by Stripe id: matched, missing in
    the ledger, missing in Stripe, amount mismatch. Pure: the caller fetches both sides."""
    mine = {(r.kind, r.stripe_id): r for r in ledger}
    theirs = {(r.kind, r.stripe_id): r for r in stripe}
    rows: list[tuple[Any, ...]] = []
    counts = {"matched": 0, "missing_in_ledger": 0, "missing_in_stripe": 0, "amount_mismatch": 0}
    for key in sorted(mine.keys() | theirs.keys()):
        a, b = mine.get(key), theirs.get(key)
        if a is not None and b is not None:
            status = "matched" if a.amount_micros == b.amount_micros else "amount_mismatch"
        elif a is None:
            status = "missing_in_ledger"
        else:
            status = "missing_in_stripe"
        counts[status] += 1
        either = a if a is not None else b
        require(either is not None, "reconciliation key without a record")
        rows.append(
            (
                status,
                key[0],
                key[1],
                either.wallet_id if either is not None else None,
                a.amount_micros if a else None,
                b.amount_micros if b else None,
            )
        )
    return Report(
        "stripe-reconciliation",
        ("status", "kind", "stripeId", "walletId", "ledgerMicros", "stripeMicros"),
        rows,
        {"from": start.isoformat(), "to": end.isoformat(), **counts},
    )
