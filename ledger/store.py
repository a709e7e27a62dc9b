"""The append-only store: events and their journal transactions, one database transaction a batch.

Built for throughput: a batch of any size is three binary COPYs (events, transactions, entries),
never a round trip per event (:func:`append_new`). The store does not deduplicate: the caller
establishes that the events are new (the processor, under its wallet locks); should it not hold,
the unique index on ``(source, id)`` refuses the COPY and the transaction writes nothing. The
account balances are booked last by :func:`apply_balances`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg.types.json import Jsonb

from ledger.events import LogEvent, event_to_json
from ledger.invariants import fail, require, require_int
from ledger.journal import MAX_TXNS_PER_EVENT, JournalTxn

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


_EVENT_COLS: Final = "position, source, event_id, type, wallet_id, resource_id, event_time, received_at, payload"

_APPLY_BALANCES_SQL: Final = """
INSERT INTO account_balances AS b (account, balance_micros, last_position)
SELECT a, amt, pos FROM unnest(%b::text[], %b::int8[], %b::int8[]) AS x(a, amt, pos) ORDER BY a
ON CONFLICT (account) DO UPDATE
   SET balance_micros = b.balance_micros + EXCLUDED.balance_micros,
       last_position = greatest(b.last_position, EXCLUDED.last_position)
"""


_COPY_EVENTS: Final = f"COPY events ({_EVENT_COLS}) FROM STDIN (FORMAT BINARY)"
_COPY_EVENT_TYPES: Final = ("int8", "text", "text", "text", "text", "text", "timestamptz", "timestamptz", "jsonb")
_COPY_TXNS: Final = (
    "COPY journal_transactions (event_position, txn_no, kind, wallet_id, resource_id, product, gpu_type, memo,"
    " booked_at) FROM STDIN (FORMAT BINARY)"
)
_COPY_TXN_TYPES: Final = ("int8", "int2", "text", "text", "text", "text", "text", "text", "timestamptz")
_COPY_ENTRIES: Final = (
    "COPY journal_entries (event_position, txn_no, entry_no, account, amount_micros, booked_at, kind, wallet_id,"
    " resource_id, product, gpu_type) FROM STDIN (FORMAT BINARY)"
)
_COPY_ENTRY_TYPES: Final = (
    "int8",
    "int2",
    "int2",
    "text",
    "int8",
    "timestamptz",
    "text",
    "text",
    "text",
    "text",
    "text",
)


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
        wanted = sum(1 for item in items if item.position is None)
        reserved: list[int] = []
        if wanted:
            # Positions in batch order: a rebuild must apply a start before its readings.
            cur.execute("SELECT nextval('events_position_seq') FROM generate_series(1, %s)", (wanted,))
            reserved = [row[0] for row in cur.fetchall()]
        fresh = iter(reserved)
        positions: dict[EventKey, int] = {}
        placed: list[tuple[int, AppendItem]] = []
        for item in items:
            position = item.position if item.position is not None else next(fresh)
            positions[item.record.key] = position
            placed.append((position, item))
        with cur.copy(_COPY_EVENTS) as cp:
            cp.set_types(_COPY_EVENT_TYPES)
            for position, item in placed:
                r = item.record
                cp.write_row(
                    (
                        position,
                        r.source,
                        r.event_id,
                        r.type,
                        r.wallet_id,
                        r.resource_id,
                        r.event_time,
                        item.received_at or received_at,
                        as_jsonb(r.payload_json),
                    )
                )
        deltas: dict[str, tuple[int, int]] = {}
        batch_sum = 0
        with cur.copy(_COPY_TXNS) as cp:
            cp.set_types(_COPY_TXN_TYPES)
            for position, item in placed:
                if not (len(item.txns) <= MAX_TXNS_PER_EVENT):
                    fail(f"{item.record.key}: {len(item.txns)} transactions")
                for txn_no, txn in enumerate(item.txns):
                    cp.write_row(
                        (
                            position,
                            txn_no,
                            txn.kind,
                            txn.wallet_id,
                            txn.resource_id,
                            txn.product,
                            txn.gpu_type,
                            txn.memo,
                            item.record.event_time,
                        )
                    )
        with cur.copy(_COPY_ENTRIES) as cp:
            cp.set_types(_COPY_ENTRY_TYPES)
            for position, item in placed:
                event_time = item.record.event_time
                for txn_no, txn in enumerate(item.txns):
                    txn_sum = 0
                    for entry_no, posting in enumerate(txn.postings):
                        amount = require_int(posting.amount_micros, "amount_micros")
                        txn_sum += amount
                        total, last = deltas.get(posting.account, (0, position))
                        deltas[posting.account] = (total + amount, max(last, position))
                        cp.write_row(
                            (
                                position,
                                txn_no,
                                entry_no,
                                posting.account,
                                amount,
                                event_time,
                                txn.kind,
                                txn.wallet_id,
                                txn.resource_id,
                                txn.product,
                                txn.gpu_type,
                            )
                        )
                    if txn_sum != 0:
                        fail(f"{item.record.key} txn {txn_no} ({txn.kind}) sums to {txn_sum}")
                    batch_sum += txn_sum
    if batch_sum != 0 or sum(total for total, _ in deltas.values()) != 0:
        fail("the postings of a batch do not sum to zero")
    return AppendResult(positions=positions, duplicates=(), balance_deltas=deltas)


def apply_balances(conn: psycopg.Connection[Any], deltas: Mapping[str, tuple[int, int]]) -> None:
    """Book ``AppendResult.balance_deltas`` (account -> (delta, highest position)) into
    ``account_balances``, rows locked in account order (no deadlock between concurrent writers).

    Call it as the LAST statement before the commit. Why: a few accounts (``revenue:<product>``,
    ``stripe:clearing``) are in nearly every batch, and the first writer to update such a row holds
    it until its commit. Updated earlier, they would serialise concurrent writers (the partitions'
    intakes) from there to their commits; updated last, only for the commit itself."""
    if not deltas:
        return
    accounts = sorted(deltas)
    with conn.cursor() as cur:
        cur.execute(
            _APPLY_BALANCES_SQL,
            (accounts, [deltas[a][0] for a in accounts], [deltas[a][1] for a in accounts]),
        )
