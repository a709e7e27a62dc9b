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
from ledger.journal import ADJUSTMENTS, DISPUTES, REFUNDS, STRIPE_CLEARING

GROUP_KEYS: Final = ("day", "month", "product", "gpuType")
DEFAULT_GROUP_BY: Final = ("day", "product", "gpuType")
_GROUP_SQL: Final = {
    "day": "(booked_at AT TIME ZONE 'UTC')::date",
    "month": "to_char(booked_at AT TIME ZONE 'UTC', 'YYYY-MM')",
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


# Account types of the trial balance's subtotals, in the order they are shown.
ACCOUNT_TYPES: Final = ("wallets", "revenue", "clearing", "refunds", "disputes", "adjustments", "other")
_FIXED_ACCOUNT_TYPES: Final = {
    STRIPE_CLEARING: "clearing",
    REFUNDS: "refunds",
    DISPUTES: "disputes",
    ADJUSTMENTS: "adjustments",
}


def account_type(account: str) -> str:
    """``wallet:<id>`` -> wallets, ``revenue:<product>`` -> revenue, the fixed accounts by name."""
    if account.startswith("wallet:"):
        return "wallets"
    if account.startswith("revenue:"):
        return "revenue"
    return _FIXED_ACCOUNT_TYPES.get(account, "other")


def trial_balance_by_type(report: Report) -> Report:
    """The trial balance's accounts summed per :data:`ACCOUNT_TYPES` (pure: from the per-account rows).
    Types without an account are left out; the total is the same zero."""
    accounts: dict[str, int] = {}
    balances: dict[str, int] = {}
    for account, balance in report.rows:
        t = account_type(account)
        accounts[t] = accounts.get(t, 0) + 1
        balances[t] = balances.get(t, 0) + int(balance)
    rows = [(t, accounts[t], balances[t]) for t in ACCOUNT_TYPES if t in accounts]
    require(sum(r[2] for r in rows) == report.summary["totalMicros"], "trial balance subtotals differ from the total")
    return Report("trial-balance", ("type", "accounts", "balanceMicros"), rows, dict(report.summary))


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
        _statement_summary(wallet_id, start, end, opening, closing, by_kind),
    )


# A statement is one wallet over a period: a few lines a day. A bound keeps a mistaken period over
# a hostile wallet (a million refunds) from building an unbounded report; the caller shortens it.
MAX_STATEMENT_LINES: Final = 100_000

STATEMENT_LINE_COLUMNS: Final = (
    "at",
    "until",
    "kind",
    "resourceId",
    "product",
    "gpuType",
    "detail",
    "entries",
    "amountMicros",
)

# Charges: one line per resource and UTC day (a pod metered every minute is ~1,440 entries a day,
# one line to a reader). Every other movement is its own line with its memo (payment id, reason).
_CHARGE_LINES_SQL: Final = """
    SELECT min(booked_at), max(booked_at), 'charge', resource_id, product, gpu_type, NULL,
           count(*), sum(amount_micros)::bigint
      FROM ledger_entries
     WHERE account = :a AND kind = 'charge' AND booked_at >= :s AND booked_at < :e
     GROUP BY (booked_at AT TIME ZONE 'UTC')::date, resource_id, product, gpu_type
     ORDER BY 1, 4
     LIMIT :n
"""
_OTHER_LINES_SQL: Final = """
    SELECT e.booked_at, e.booked_at, e.kind, e.resource_id, e.product, e.gpu_type, t.memo, 1, e.amount_micros
      FROM journal_entries e
      JOIN journal_transactions t ON t.event_position = e.event_position AND t.txn_no = e.txn_no
     WHERE e.account = :a AND e.kind <> 'charge' AND e.booked_at >= :s AND e.booked_at < :e
     ORDER BY e.booked_at, e.event_position, e.txn_no
     LIMIT :n
"""


class StatementTooLong(ValueError):
    """More than :data:`MAX_STATEMENT_LINES` lines: the caller asks for a shorter period."""


def wallet_known(conn: Connection, wallet_id: str) -> bool:
    """Whether the ledger or the wallet projection has ever heard of this wallet."""
    return bool(
        conn.execute(
            text(
                "SELECT EXISTS (SELECT 1 FROM account_balances WHERE account = :a)"
                "    OR EXISTS (SELECT 1 FROM wallets WHERE wallet_id = :w)"
            ),
            {"a": f"wallet:{wallet_id}", "w": wallet_id},
        ).scalar_one()
    )


def statement_lines(conn: Connection, wallet_id: str, start: datetime, end: datetime) -> Report:
    """The statement as dated lines in booking order: one per resource and UTC day for charges
    (``at``/``until`` are its first and last charge), one per top-up, refund, dispute step and
    adjustment. The summary is :func:`statement`'s; ``opening + sum(lines) == closing`` is checked."""
    _aware(start, "from")
    _aware(end, "to")
    require(start <= end, "from must not be after to")
    params = {"a": f"wallet:{wallet_id}", "s": start, "e": end, "n": MAX_STATEMENT_LINES + 1}
    opening, closing = conn.execute(
        text(
            "SELECT coalesce(sum(amount_micros) FILTER (WHERE booked_at < :s), 0)::bigint,"
            "       coalesce(sum(amount_micros), 0)::bigint"
            "  FROM ledger_entries WHERE account = :a AND booked_at < :e"
        ),
        params,
    ).one()
    raw = [*conn.execute(text(_CHARGE_LINES_SQL), params).all(), *conn.execute(text(_OTHER_LINES_SQL), params).all()]
    if len(raw) > MAX_STATEMENT_LINES:
        raise StatementTooLong(f"more than {MAX_STATEMENT_LINES:,} statement lines: choose a shorter period")
    kind_order = {k: i for i, k in enumerate(STATEMENT_KINDS)}
    raw.sort(key=lambda r: (r[0], kind_order.get(r[2], len(kind_order)), r[3] or ""))
    lines = [(r[0], r[1], r[2], r[3], r[4], r[5], r[6] or None, int(r[7]), int(r[8])) for r in raw]
    by_kind: dict[str, int] = {}
    for line in lines:
        by_kind[line[2]] = by_kind.get(line[2], 0) + line[8]
    moved = sum(by_kind.values())
    require(int(opening) + moved == int(closing), f"statement of {wallet_id}: {opening} + {moved} != {closing}")
    return Report(
        "statement",
        STATEMENT_LINE_COLUMNS,
        lines,
        _statement_summary(wallet_id, start, end, int(opening), int(closing), by_kind),
    )


def _statement_summary(
    wallet_id: str, start: datetime, end: datetime, opening: int, closing: int, by_kind: dict[str, int]
) -> dict[str, Any]:
    return {
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
    }


def revenue(conn: Connection, start: datetime, end: datetime, group_by: Sequence[str] = DEFAULT_GROUP_BY) -> Report:
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
    # Summary keys are camelCase like every JSON field; the statuses stay snake_case enum values.
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
        {"from": start.isoformat(), "to": end.isoformat(), **{_camel(k): n for k, n in counts.items()}},
    )


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
