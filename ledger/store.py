"""The append-only store: events and their journal transactions, one database transaction a batch.

Built for throughput: a batch of any size is one SQL statement (parallel arrays passed as binary
parameters and expanded with ``unnest``), never a round trip per event. Idempotent on
``(source, id)``: a duplicate, whether already in the log or twice in the batch, writes nothing
and is reported as a duplicate. Concurrent appends of the same event from two connections write
it once: the unique index makes the second wait for the first and then do nothing.
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

# A batch is one statement and one transaction; the bound keeps memory and lock time finite.
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
    """``book_balances=False`` only: account -> (sum of the new postings, highest position), for
    :func:`apply_balances`. Empty when the statement booked the balances itself."""


_EVENT_COLS: Final = "position, source, event_id, type, wallet_id, resource_id, event_time, received_at, payload"

# One statement: insert the events that are new, then the journal of exactly those events (joined
# on the key, so a duplicate's journal falls out with it), then (unless the caller books them itself,
# see :func:`apply_balances`) the balances of the touched accounts. Balance rows are locked in account
# order so that concurrent batches cannot deadlock.
_APPEND_CTES: Final = f"""
WITH new_events AS (
    INSERT INTO events ({_EVENT_COLS})
    SELECT coalesce(pos, nextval('events_position_seq')), s, i, t, w, r, et, coalesce(rc, %(received_at)s),
           p::jsonb
      FROM unnest(%(pos)b::int8[], %(src)b::text[], %(eid)b::text[], %(typ)b::text[], %(wal)b::text[],
                  %(res)b::text[], %(etm)b::timestamptz[], %(rcv)b::timestamptz[], %(pay)b::text[])
           AS x(pos, s, i, t, w, r, et, rc, p)
    ON CONFLICT (source, event_id) DO NOTHING
    RETURNING position, source, event_id, event_time
), txns AS (
    INSERT INTO journal_transactions
           (event_position, txn_no, kind, wallet_id, resource_id, product, gpu_type, memo, booked_at)
    SELECT e.position, x.n, x.k, x.w, x.r, x.p, x.g, x.m, e.event_time
      FROM unnest(%(t_src)b::text[], %(t_eid)b::text[], %(t_no)b::int2[], %(t_kind)b::text[],
                  %(t_wal)b::text[], %(t_res)b::text[], %(t_prod)b::text[], %(t_gpu)b::text[],
                  %(t_memo)b::text[]) AS x(s, i, n, k, w, r, p, g, m)
      JOIN new_events e ON e.source = x.s AND e.event_id = x.i
    RETURNING event_position
), entries AS (
    INSERT INTO journal_entries (event_position, txn_no, entry_no, account, amount_micros,
                                 booked_at, kind, wallet_id, resource_id, product, gpu_type)
    SELECT e.position, x.n, x.en, x.a, x.amt, e.event_time, x.k, x.w, x.r, x.p, x.g
      FROM unnest(%(e_src)b::text[], %(e_eid)b::text[], %(e_no)b::int2[], %(e_eno)b::int2[],
                  %(e_acc)b::text[], %(e_amt)b::int8[], %(e_kind)b::text[], %(e_wal)b::text[],
                  %(e_res)b::text[], %(e_prod)b::text[], %(e_gpu)b::text[])
           AS x(s, i, n, en, a, amt, k, w, r, p, g)
      JOIN new_events e ON e.source = x.s AND e.event_id = x.i
    RETURNING event_position, account, amount_micros
)"""

_APPEND_SQL: Final = f"""{_APPEND_CTES}, balances AS (
    INSERT INTO account_balances AS b (account, balance_micros, last_position)
    SELECT account, sum(amount_micros), max(event_position) FROM entries
     GROUP BY account ORDER BY account
    ON CONFLICT (account) DO UPDATE
       SET balance_micros = b.balance_micros + EXCLUDED.balance_micros,
           last_position = greatest(b.last_position, EXCLUDED.last_position)
)
SELECT position, source, event_id FROM new_events
"""

# The same without the balances: the caller books them with :func:`apply_balances` as the last
# statement of its transaction (the entries CTE is still run: a data-modifying CTE always is).
_APPEND_SQL_DEFERRED_BALANCES: Final = f"""{_APPEND_CTES}
SELECT position, source, event_id FROM new_events
"""

_APPLY_BALANCES_SQL: Final = """
INSERT INTO account_balances AS b (account, balance_micros, last_position)
SELECT a, amt, pos FROM unnest(%b::text[], %b::int8[], %b::int8[]) AS x(a, amt, pos) ORDER BY a
ON CONFLICT (account) DO UPDATE
   SET balance_micros = b.balance_micros + EXCLUDED.balance_micros,
       last_position = greatest(b.last_position, EXCLUDED.last_position)
"""


def _params(items: Sequence[AppendItem], received_at: datetime) -> dict[str, Any]:
    columns = (
        "pos src eid typ wal res etm rcv pay "
        "t_src t_eid t_no t_kind t_wal t_res t_prod t_gpu t_memo "
        "e_src e_eid e_no e_eno e_acc e_amt e_kind e_wal e_res e_prod e_gpu"
    ).split()
    p: dict[str, list[Any]] = {k: [] for k in columns}
    batch_sum = 0
    for item in items:
        r = item.record
        p["pos"].append(item.position)
        p["rcv"].append(item.received_at)
        p["src"].append(r.source)
        p["eid"].append(r.event_id)
        p["typ"].append(r.type)
        p["wal"].append(r.wallet_id)
        p["res"].append(r.resource_id)
        p["etm"].append(r.event_time)
        p["pay"].append(r.payload_json)
        if not (len(item.txns) <= MAX_TXNS_PER_EVENT):
            fail(f"{r.key}: {len(item.txns)} transactions")
        for txn_no, txn in enumerate(item.txns):
            p["t_src"].append(r.source)
            p["t_eid"].append(r.event_id)
            p["t_no"].append(txn_no)
            p["t_kind"].append(txn.kind)
            p["t_wal"].append(txn.wallet_id)
            p["t_res"].append(txn.resource_id)
            p["t_prod"].append(txn.product)
            p["t_gpu"].append(txn.gpu_type)
            p["t_memo"].append(txn.memo)
            txn_sum = 0
            for entry_no, posting in enumerate(txn.postings):
                amount = require_int(posting.amount_micros, "amount_micros")
                txn_sum += amount
                p["e_src"].append(r.source)
                p["e_eid"].append(r.event_id)
                p["e_no"].append(txn_no)
                p["e_eno"].append(entry_no)
                p["e_acc"].append(posting.account)
                p["e_amt"].append(amount)
                p["e_kind"].append(txn.kind)
                p["e_wal"].append(txn.wallet_id)
                p["e_res"].append(txn.resource_id)
                p["e_prod"].append(txn.product)
                p["e_gpu"].append(txn.gpu_type)
            if txn_sum != 0:
                fail(f"{r.key} txn {txn_no} ({txn.kind}) sums to {txn_sum}")
            batch_sum += txn_sum
    if batch_sum != 0:
        fail(f"batch sums to {batch_sum}")
    return {"received_at": received_at, **p}


def append_batch(
    conn: psycopg.Connection[Any],
    items: Sequence[AppendItem],
    *,
    received_at: datetime,
    book_balances: bool = True,
) -> AppendResult:
    """Append events and their journal in the caller's transaction (commit is the caller's).

    The first occurrence of a key within the batch wins; later ones are duplicates.

    ``book_balances=False``: the balances are left to the caller, who passes
    ``result.balance_deltas`` to :func:`apply_balances` as the LAST statement before its commit.
    Why: a few accounts (``revenue:<product>``, ``stripe:clearing``) are in nearly every batch, and
    the first writer to update such a row holds it until its commit. Updated inside this statement,
    they would serialise concurrent writers (the partitions' intakes) from here to their commits;
    updated last, only for the commit itself.
    """
    if not (len(items) <= MAX_BATCH_EVENTS):
        fail(f"batch of {len(items)} > {MAX_BATCH_EVENTS}")
    require(received_at.tzinfo is not None, "received_at must be timezone-aware")
    first: dict[EventKey, AppendItem] = {}
    in_batch_dups: list[EventKey] = []
    for item in items:
        if item.record.key in first:
            in_batch_dups.append(item.record.key)
        else:
            first[item.record.key] = item
    # Batch order, never re-sorted: positions must follow the order the events were decided in,
    # or a rebuild would apply a reading before its start. (Two writers racing on the same events
    # in different orders could deadlock; PostgreSQL then aborts one, whose batch is redelivered.)
    unique = list(first.values())
    if not unique:
        return AppendResult(positions={}, duplicates=tuple(in_batch_dups))
    with conn.cursor() as cur:
        cur.execute(_APPEND_SQL if book_balances else _APPEND_SQL_DEFERRED_BALANCES, _params(unique, received_at))
        rows = cur.fetchall()
    positions = {(src, eid): pos for pos, src, eid in rows}
    dups = [k for k in first if k not in positions]
    deltas: dict[str, tuple[int, int]] = {}
    if not book_balances:
        for item in unique:
            position = positions.get(item.record.key)
            if position is None:
                continue  # a duplicate: its journal was not written
            for txn in item.txns:
                for posting in txn.postings:
                    total, last = deltas.get(posting.account, (0, position))
                    deltas[posting.account] = (total + posting.amount_micros, max(last, position))
        if sum(total for total, _ in deltas.values()) != 0:
            fail("the balance deltas of a batch do not sum to zero")
    return AppendResult(positions=positions, duplicates=(*dups, *in_batch_dups), balance_deltas=deltas)


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
    transaction; the balances are left to the caller (:func:`apply_balances`, last, as with
    ``append_batch(book_balances=False)``).

    Precondition: none of these events is in the log and no key repeats. The intake's processor
    establishes that under the wallet locks (every event of a wallet is written under its lock, and
    the log was checked for the batch's keys after taking them). Should it not hold (the same
    ``(source, id)`` sent for two wallets at once), the unique index refuses the COPY: the statement
    fails, the transaction is rolled back and nothing is written, as with any failed batch.

    Why COPY: measured beside the one-statement path (``bench/bench_store.py``), the multi-row
    INSERT with its conflict check, array parameters and joins costs the client and the server
    about half again what COPY does for the same rows; this is the intake's hottest statement.
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
    Call it last before the commit (see :func:`append_batch`)."""
    if not deltas:
        return
    accounts = sorted(deltas)
    with conn.cursor() as cur:
        cur.execute(
            _APPLY_BALANCES_SQL,
            (accounts, [deltas[a][0] for a in accounts], [deltas[a][1] for a in accounts]),
        )
