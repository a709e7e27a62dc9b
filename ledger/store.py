"""The append-only store: events and their journal transactions, one database transaction a batch.

Built for throughput: a batch of any size is three binary COPYs (events, transactions, entries),
never a round trip per event (:func:`append_new`), their column lists from :mod:`ledger.schema`.
The store does not deduplicate: the caller establishes that the events are new (the processor,
under its wallet locks); should it not hold, the unique index on ``(source, id)`` refuses the COPY
and the transaction writes nothing. The wallet balances are booked last by :func:`apply_balances`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg.types.json import Jsonb

from ledger import schema
from ledger.events import LogEvent, event_to_json
from ledger.invariants import fail, require, require_int
from ledger.journal import MAX_TXNS_PER_EVENT, JournalTxn, wallet_account
from ledger.schema import copy_statement

EventKey = tuple[str, str]

# A batch is one transaction; the bound keeps memory and lock time finite.
MAX_BATCH_EVENTS: Final = 10_000


@dataclass(frozen=True, slots=True)
class EventRecord:
    """An accepted event as the log stores it."""

    source: str
    event_id: str
    type: str
    wallet_id: str
    resource_id: str | None
    event_time: datetime
    payload_json: str

    @property
    def key(self) -> EventKey:
        return (self.source, self.event_id)

    @classmethod
    def from_event(cls, event: LogEvent) -> EventRecord:
        payload = event_to_json(event).decode()
        # jsonb cannot hold NUL; the parser refuses it, so meeting one here is a bug.
        if not ("\\u0000" not in payload):
            fail(f"event {event.key}: NUL in payload")
        return cls(
            source=event.source,
            event_id=event.id,
            type=event.type,
            wallet_id=event.wallet_id,
            resource_id=event.resource_id,
            event_time=event.time,
            payload_json=payload,
        )


@dataclass(frozen=True, slots=True)
class AppendItem:
    record: EventRecord
    txns: tuple[JournalTxn, ...] = ()
    position: int | None = None
    """Only a rebuild (`billing verify`) gives positions: the original ones, so the rebuilt
    journal has the same keys. The live path leaves it None and the log numbers the event."""
    received_at: datetime | None = None
    """Defaults to the batch's ``received_at``; a rebuild passes the original instant."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    positions: dict[EventKey, int]
    """Position in the log of each event this batch added."""
    duplicates: tuple[EventKey, ...]
    """Events already in the log (or repeated within the batch): nothing was written for them."""
    balance_deltas: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Account -> (sum of the new postings, highest position), for :func:`apply_balances`."""


_APPLY_BALANCES_SQL: Final = """
INSERT INTO account_balances AS b (account, balance_micros, last_position)
SELECT a, amt, pos FROM unnest(%b::text[], %b::int8[], %b::int8[]) AS x(a, amt, pos) ORDER BY a
ON CONFLICT (account) DO UPDATE
   SET balance_micros = b.balance_micros + EXCLUDED.balance_micros,
       last_position = greatest(b.last_position, EXCLUDED.last_position)
"""

# Column lists and types from ledger.schema; each row below is written in the table's column order.
_COPY_EVENTS: Final = copy_statement(schema.events)
_COPY_TXNS: Final = copy_statement(schema.journal_transactions)
_COPY_ENTRIES: Final = copy_statement(schema.journal_entries)
_WALLET_PREFIX: Final = wallet_account("")


def _already_json(text: Any) -> str:
    """The ``dumps`` of :class:`Jsonb` for a payload that is JSON text already (the record's)."""
    return str(text)


def as_jsonb(payload_json: str) -> Jsonb:
    """A payload that is JSON text already, for a binary COPY into a ``jsonb`` column (without the
    wrapper psycopg would dump the ``str`` as a JSON string, not as the object it spells)."""
    return Jsonb(payload_json, dumps=_already_json)


def append_new(conn: psycopg.Connection[Any], items: Sequence[AppendItem], *, received_at: datetime) -> AppendResult:
    """Append events known to be new, with their journal, by binary COPY, in the caller's
    transaction; the balances are left to the caller (:func:`apply_balances`, last).

    Precondition: none of these events is in the log and no key repeats. The intake's processor
    establishes that under the wallet locks (every event of a wallet is written under its lock, and
    the log was checked for the batch's keys after taking them). Should it not hold (the same
    ``(source, id)`` sent for two wallets at once), the unique index refuses the COPY: the statement
    fails, the transaction is rolled back and nothing is written, as with any failed batch.

    Why COPY: a multi-row INSERT with its conflict check, array parameters and joins costs the
    client and the server more than COPY does for the same rows, and this is the intake's hottest
    statement (see bench/README.md).
    """
    if not (len(items) <= MAX_BATCH_EVENTS):
        fail(f"batch of {len(items)} > {MAX_BATCH_EVENTS}")
    require(received_at.tzinfo is not None, "received_at must be timezone-aware")
    if not items:
        return AppendResult(positions={}, duplicates=())
    keys = {item.record.key for item in items}
    if len(keys) != len(items):
        fail("append_new: a key repeats within the batch")
    with conn.cursor() as cur:
        placed = _place(cur, items)
        _copy_events(cur, placed, received_at)
        _copy_transactions(cur, placed)
        deltas = _copy_entries(cur, placed)
    # Each transaction was checked on its own; the batch is checked whole, as the deltas sum.
    if sum(total for total, _ in deltas.values()) != 0:
        fail("the postings of a batch do not sum to zero")
    positions = {item.record.key: position for position, item in placed}
    return AppendResult(positions=positions, duplicates=(), balance_deltas=deltas)


def _place(cur: psycopg.Cursor[Any], items: Sequence[AppendItem]) -> list[tuple[int, AppendItem]]:
    """Each item with its position: a rebuild's own, else one reserved now, in batch order (a
    rebuild must apply a start before its readings)."""
    wanted = sum(1 for item in items if item.position is None)
    reserved: list[int] = []
    if wanted:
        cur.execute("SELECT nextval('events_position_seq') FROM generate_series(1, %s)", (wanted,))
        reserved = [row[0] for row in cur.fetchall()]
    fresh = iter(reserved)
    return [(item.position if item.position is not None else next(fresh), item) for item in items]


def _copy_events(cur: psycopg.Cursor[Any], placed: Sequence[tuple[int, AppendItem]], received_at: datetime) -> None:
    with cur.copy(_COPY_EVENTS.sql) as cp:
        cp.set_types(_COPY_EVENTS.types)
        for position, item in placed:
            r = item.record
            cp.write_row(
                (
                    *(position, r.source, r.event_id, r.type, r.wallet_id, r.resource_id, r.event_time),
                    *(item.received_at or received_at, as_jsonb(r.payload_json)),
                )
            )


def _copy_transactions(cur: psycopg.Cursor[Any], placed: Sequence[tuple[int, AppendItem]]) -> None:
    with cur.copy(_COPY_TXNS.sql) as cp:
        cp.set_types(_COPY_TXNS.types)
        for position, item in placed:
            if not (len(item.txns) <= MAX_TXNS_PER_EVENT):
                fail(f"{item.record.key}: {len(item.txns)} transactions")
            booked_at = item.record.event_time
            for txn_no, t in enumerate(item.txns):
                cp.write_row(
                    (position, txn_no, t.kind, t.wallet_id, t.resource_id, t.product, t.gpu_type, t.memo, booked_at)
                )


def _copy_entries(cur: psycopg.Cursor[Any], placed: Sequence[tuple[int, AppendItem]]) -> dict[str, tuple[int, int]]:
    """The entries, each transaction checked to sum to zero before its rows leave; returns the
    balance deltas (account -> (sum of its new postings, highest position))."""
    deltas: dict[str, tuple[int, int]] = {}
    with cur.copy(_COPY_ENTRIES.sql) as cp:
        cp.set_types(_COPY_ENTRIES.types)
        for position, item in placed:
            booked_at = item.record.event_time
            for txn_no, t in enumerate(item.txns):
                txn_sum = 0
                for entry_no, posting in enumerate(t.postings):
                    amount = require_int(posting.amount_micros, "amount_micros")
                    txn_sum += amount
                    total, last = deltas.get(posting.account, (0, position))
                    deltas[posting.account] = (total + amount, max(last, position))
                    cp.write_row(
                        (
                            *(position, txn_no, entry_no, posting.account, amount, booked_at, t.kind),
                            *(t.wallet_id, t.resource_id, t.product, t.gpu_type),
                        )
                    )
                if txn_sum != 0:
                    fail(f"{item.record.key} txn {txn_no} ({t.kind}) sums to {txn_sum}")
    return deltas


def apply_balances(conn: psycopg.Connection[Any], deltas: Mapping[str, tuple[int, int]]) -> None:
    """Book the wallet accounts of ``AppendResult.balance_deltas`` (account -> (delta, highest
    position)) into ``account_balances``, rows locked in account order (no deadlock between
    concurrent writers). The shared accounts (``revenue:<product>``, ``stripe:clearing``, ...) are
    not booked: their balances are derived on read (view ``ledger_account_balances``), so that no
    row is in every batch, locked by each writer until its commit (migration 0007).

    Call it as the LAST statement before the commit: a wallet's row, once updated, is held until
    the commit; updated last, only for the commit itself."""
    accounts = sorted(a for a in deltas if a.startswith(_WALLET_PREFIX))
    if not accounts:
        return
    with conn.cursor() as cur:
        cur.execute(
            _APPLY_BALANCES_SQL,
            (accounts, [deltas[a][0] for a in accounts], [deltas[a][1] for a in accounts]),
        )
