"""The one write path of the wallets: every writer's unit of work goes through :func:`write`.

A writer (the intake's batches, the Stripe facts of confirms and webhooks, the scheduler's ticks,
the admission holds) states *what* it wants as a command (:class:`Facts`, :class:`Tick`,
:class:`AdmitRental`, :class:`AdmitServerless`); :func:`write` does the rest in the caller's
transaction, always in the same steps:

1. lock the command's wallets and load their state, through a :class:`StateSource` (by default
   :data:`POSTGRES`: ``SELECT ... FOR UPDATE`` in id order, then the aggregates from the tables;
   a single-writer intake passes its own source, which keeps the states in memory);
2. decide with the pure rules of :mod:`projections.rules` (the ``_decide_*`` functions below do no
   I/O: they turn the loaded states and the command into a :class:`_Plan`);
3. persist the plan: the log and its journal (``ledger.store.append_new``), the wallets' rows
   (through the source), the serverless jobs seen, the outbox, the refused inputs, and the account
   balances last, so that the accounts every writer touches (revenue, clearing) stay locked only
   until the commit that follows.

The caller commits, and only then acks (the intake) or answers (admission, HTTP). Domain refusals
come back in the :class:`Written` result (dispositions, rejections, admission answers), never as
transport errors; a broken invariant raises (``ledger.invariants``).

The path of a batch of facts (DESIGN section 10): events of a wallet are only ever written under
its lock, so the check for events already in the log (the ``(source, id)`` key) cannot race with
another writer; a repeat within the batch or of the log is a duplicate; an event whose resource has
not started yet is left out of the log (the intake naks it with a delay) unless it is its last
attempt, when it is rejected; then the housekeeping runs once per wallet at the batch's instant.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Protocol

import psycopg

from ledger import schema
from ledger.events import (
    LogEvent,
    Rejection,
    RejectReason,
    RentalStartedEvent,
    ServerlessJobCompletedEvent,
    StripeDisputeClosedEvent,
    StripeDisputeOpenedEvent,
    StripePaymentSucceededEvent,
    StripeRefundSucceededEvent,
)
from ledger.invariants import fail, require
from ledger.store import AppendItem, AppendResult, EventKey, EventRecord, append_new, apply_balances
from ledger.text import storable
from projections.messages import notice_message, settlement_message, stop_message
from projections.outbox import OutboxMessage, enqueue
from projections.rules import (
    AdmissionAnswer,
    Decision,
    RentalState,
    ServerlessAdmissionAnswer,
    WalletState,
    admit_rental,
    admit_serverless,
    apply_fact,
    next_wakeup,
    tick,
)
from projections.wallet_store import (
    WalletCache,
    WalletRow,
    load_wallets,
    lock_and_read_wallets,
    lock_wallet_versions,
    save_wallets,
)

MAX_BATCH: Final = 5_000
"""Facts in one write (the intake's largest batch)."""

# How far back a redelivered input without an identity looks for its own earlier refusal: far beyond
# the longest redelivery schedule (max_deliver x nak_delay_max_s, 20 minutes by default).
REDELIVERY_WINDOW: Final = timedelta(hours=24)


# ----------------------------------------------------------------------------------- commands


class Disposition(enum.StrEnum):
    accepted = "accepted"
    """In the log now (charged, or a no-op such as an older reading)."""
    duplicate = "duplicate"
    """Already in the log, or earlier in this batch: nothing written."""
    retry = "retry"
    """Its resource has not started yet: not written; nak with a delay."""
    rejected = "rejected"
    """Refused by the rules: recorded in rejected_inputs; dead-letter it."""


@dataclass(frozen=True, slots=True)
class Incoming:
    event: LogEvent
    raw: bytes
    subject: str | None = None
    delivery_count: int | None = None
    last_attempt: bool = False
    """A not-started event on its last attempt is rejected instead of retried."""
    received_at: datetime | None = None
    """Set by a rebuild only (the original instant); the live path uses the batch's ``now``."""
    position: int | None = None
    """Set by a rebuild only (the original position)."""


@dataclass(frozen=True, slots=True)
class RejectedInput:
    rejection: Rejection
    raw: bytes
    subject: str | None = None
    delivery_count: int | None = None


@dataclass(frozen=True, slots=True)
class Facts:
    """Facts for the log (a batch of the intake, Stripe's facts), in order; ``rejected``: inputs
    the adapter refused before the rules (unparseable, wrong subject), recorded in the same
    transaction."""

    incoming: Sequence[Incoming]
    rejected: Sequence[RejectedInput] = ()


@dataclass(frozen=True, slots=True)
class Tick:
    """The rules' time-driven decisions for these wallets (R4 stops and re-issues, notices, holds)."""

    wallet_ids: Sequence[str]


@dataclass(frozen=True, slots=True)
class AdmitRental:
    """R2/R3: answer a start or resume, and keep the hold."""

    wallet_id: str
    resource_id: str
    price_per_hour_micros: int
    admission_id: str


@dataclass(frozen=True, slots=True)
class AdmitServerless:
    """R5: answer a job, and count it in the rolling minute."""

    wallet_id: str
    endpoint_id: str


Command = Facts | Tick | AdmitRental | AdmitServerless


@dataclass
class Written:
    """What one write decided. Every field is meaningful for every command (empty when it does not
    apply): ``dispositions``/``rejections``/``positions`` for facts, ``answer`` for admissions."""

    dispositions: list[Disposition] = field(default_factory=list)
    """What became of each fact, by index in the command (to ack, nak or dead-letter)."""
    rejections: dict[int, Rejection] = field(default_factory=dict)
    """Index of a fact -> why the rules refused it (to dead-letter after the commit)."""
    positions: dict[EventKey, int] = field(default_factory=dict)
    outbox: int = 0
    wallets: int = 0
    commands: int = 0
    notices: int = 0
    next_wakeups: dict[str, datetime | None] = field(default_factory=dict)
    balances_micros: dict[str, int] = field(default_factory=dict)
    """Each locked wallet's balance after the write (what ``account_balances`` holds at the commit)."""
    answer: AdmissionAnswer | ServerlessAdmissionAnswer | None = None
    cache_entries: dict[str, tuple[int, WalletState]] = field(default_factory=dict)
    """With :class:`CachedState`: each saved wallet's row version and state, for ``WalletCache.keep``
    once the caller's commit has returned."""


# ---------------------------------------------------------------------------------- state source


@dataclass(frozen=True, slots=True)
class Keys:
    """What a write names beside its wallets: rentals (of any wallet), endpoints and jobs
    (wallet, endpoint[, job]) and PaymentIntents, loaded with the wallets."""

    resources: frozenset[str] = frozenset()
    endpoints: frozenset[tuple[str, str]] = frozenset()
    jobs: frozenset[tuple[str, str, str]] = frozenset()
    payments: frozenset[str] = frozenset()


@dataclass
class Locked:
    wallet_ids: list[str]
    """Sorted, each locked for the transaction."""
    rows: Sequence[WalletRow] = ()
    """What the source read while locking (opaque to the write path)."""


@dataclass
class Loaded:
    states: dict[str, WalletState]
    foreign: dict[str, RentalState]
    """Rentals the write names that belong to wallets it has not locked."""
    stored_wakeups: dict[str, datetime | None] = field(default_factory=dict)


class StateSource(Protocol):
    """Where :func:`write` locks, loads and saves wallets. ``save`` is called with every locked
    wallet; a source with a cache writes through and must forget what it holds when the
    transaction does not commit (the write path does not know)."""

    def lock(self, conn: psycopg.Connection[Any], wallet_ids: Iterable[str]) -> Locked: ...

    def load(self, conn: psycopg.Connection[Any], locked: Locked, keys: Keys) -> Loaded: ...

    def save(
        self,
        conn: psycopg.Connection[Any],
        loaded: Loaded,
        after: dict[str, WalletState],
        *,
        next_wakeups: dict[str, datetime | None],
        now: datetime,
    ) -> None: ...


def _load(
    conn: psycopg.Connection[Any], locked: Locked, keys: Keys, *, known: Mapping[str, WalletState] | None = None
) -> Loaded:
    """The locked wallets and what ``keys`` names, read from the tables except the ``known`` states."""
    stored: dict[str, datetime | None] = {}
    states, foreign = load_wallets(
        conn,
        locked.wallet_ids,
        resource_ids=keys.resources,
        endpoint_keys=keys.endpoints,
        job_keys=keys.jobs,
        payment_ids=keys.payments,
        wallet_rows=locked.rows or None,
        stored_wakeups=stored,
        known=known,
    )
    return Loaded(states, foreign, stored)


class PostgresState:
    """Lock ``FOR UPDATE`` in id order and load from the tables, every time (no cache)."""

    def lock(self, conn: psycopg.Connection[Any], wallet_ids: Iterable[str]) -> Locked:
        ids, rows = lock_and_read_wallets(conn, wallet_ids)
        return Locked(ids, rows)

    def load(self, conn: psycopg.Connection[Any], locked: Locked, keys: Keys) -> Loaded:
        return _load(conn, locked, keys)

    def save(
        self,
        conn: psycopg.Connection[Any],
        loaded: Loaded,
        after: dict[str, WalletState],
        *,
        next_wakeups: dict[str, datetime | None],
        now: datetime,
    ) -> None:
        save_wallets(
            conn, loaded.states, after, next_wakeups=next_wakeups, now=now, stored_wakeups=loaded.stored_wakeups
        )


POSTGRES: Final = PostgresState()


class CachedState:
    """The intake owner's source: its wallets in memory (:class:`~projections.wallet_store.WalletCache`).

    ``lock`` locks the rows ``FOR UPDATE`` in id order reading only their versions; ``load`` takes
    the cached states whose version is the row's and reads only the others (plus the rentals,
    endpoints, jobs and payments the write names that a cached state lacks); ``save`` writes every
    wallet with ``locked version + 1``. Nothing enters the cache here: the caller keeps
    :attr:`entries` after its commit returned and evicts the write's wallets on any failure, so the
    cache is never ahead of the database. One source per write (it holds that write's versions)."""

    def __init__(self, cache: WalletCache) -> None:
        self.cache = cache
        self.versions: dict[str, int] = {}
        self.entries: dict[str, tuple[int, WalletState]] = {}

    def lock(self, conn: psycopg.Connection[Any], wallet_ids: Iterable[str]) -> Locked:
        ids, self.versions = lock_wallet_versions(conn, wallet_ids)
        return Locked(ids)

    def load(self, conn: psycopg.Connection[Any], locked: Locked, keys: Keys) -> Loaded:
        return _load(conn, locked, keys, known=self.cache.current(self.versions))

    def save(
        self,
        conn: psycopg.Connection[Any],
        loaded: Loaded,
        after: dict[str, WalletState],
        *,
        next_wakeups: dict[str, datetime | None],
        now: datetime,
    ) -> None:
        versions = {w: v + 1 for w, v in self.versions.items()}
        save_wallets(
            conn,
            loaded.states,
            after,
            next_wakeups=next_wakeups,
            now=now,
            stored_wakeups=loaded.stored_wakeups,
            versions=versions,
        )
        self.entries = {w: (versions[w], st) for w, st in after.items()}


# --------------------------------------------------------------------------------------- write


@dataclass
class _Plan:
    """What the deciders want written; :func:`_persist` writes it."""

    written: Written
    after: dict[str, WalletState] | None
    """Every locked wallet's new state; None: nothing to save."""
    now: datetime
    """The instant the wallets are saved at."""
    items: list[AppendItem] = field(default_factory=list)
    job_rows: list[tuple[str, str, str, EventKey]] = field(default_factory=list)
    messages: list[OutboxMessage] = field(default_factory=list)
    refused: list[RejectedInput] = field(default_factory=list)


def write(conn: psycopg.Connection[Any], command: Command, *, now: datetime, source: StateSource = POSTGRES) -> Written:
    """Lock, load, decide, save, append and enqueue ``command`` in the caller's transaction (see
    the module docstring). Returns what was decided, for the adapter to act on after the commit."""
    require(now.tzinfo is not None, "now must be timezone-aware")
    if isinstance(command, Facts):
        if not (len(command.incoming) <= MAX_BATCH):
            fail(f"batch of {len(command.incoming)} > {MAX_BATCH}")
        record_rejections(conn, command.rejected, now=now)
        if not command.incoming:
            return Written()
        locked = source.lock(conn, (i.event.wallet_id for i in command.incoming))
        todo = _new_facts(conn, command.incoming)
        loaded = source.load(conn, locked, _keys_of([command.incoming[i].event for i in todo]))
        plan = _decide_facts(loaded, command.incoming, todo, now)
    else:
        ids = command.wallet_ids if isinstance(command, Tick) else [command.wallet_id]
        loaded = source.load(conn, source.lock(conn, ids), Keys())
        if isinstance(command, Tick):
            plan = _decide_tick(loaded, now)
        elif isinstance(command, AdmitRental):
            plan = _decide_rental(loaded, command, now)
        else:
            plan = _decide_serverless(loaded, command, now)
    _persist(conn, source, loaded, plan, now=now)
    return plan.written


def _persist(conn: psycopg.Connection[Any], source: StateSource, loaded: Loaded, plan: _Plan, *, now: datetime) -> None:
    # Under the wallet locks nobody else can have added these events since the check, so they go in
    # by COPY; should one be there after all, the unique index fails the transaction.
    appended = append_new(conn, plan.items, received_at=now) if plan.items else AppendResult({}, ())
    plan.written.positions = appended.positions
    after = loaded.states if plan.after is None else plan.after
    plan.written.balances_micros = {w: s.balance_micros for w, s in after.items()}
    if plan.after is not None:
        source.save(conn, loaded, plan.after, next_wakeups=plan.written.next_wakeups, now=plan.now)
    _record_jobs(conn, plan.job_rows, appended.positions)
    enqueue(conn, plan.messages, now=now)
    plan.written.outbox = len(plan.messages)
    record_rejections(conn, plan.refused, now=now)
    # Last: the rows of the busiest accounts (revenue, clearing) stay locked only until the commit
    # that follows (see ledger.store.apply_balances).
    apply_balances(conn, appended.balance_deltas)


# ------------------------------------------------------------------------------------- deciders


def messages_of(decision: Decision, now: datetime) -> list[OutboxMessage]:
    """The outbox rows of one decision: its stop commands, notices and settlements."""
    if not (decision.commands or decision.notices or decision.settlements):
        return []  # most events: a charge and nothing to tell anyone (the intake's hot path)
    return [
        *(stop_message(c) for c in decision.commands),
        *(notice_message(n, now=now) for n in decision.notices),
        *(settlement_message(s) for s in decision.settlements),
    ]


def _ticked(states: dict[str, WalletState], at: Mapping[str, datetime], plan: _Plan) -> None:
    """The housekeeping of each wallet of ``at`` at its instant, into ``states`` and ``plan``."""
    for wid, instant in at.items():
        states[wid], decision = tick(states[wid], instant)
        plan.messages.extend(messages_of(decision, instant))
        plan.written.commands += len(decision.commands)
        plan.written.notices += len(decision.notices)


def _decide_tick(loaded: Loaded, now: datetime) -> _Plan:
    states = dict(loaded.states)
    plan = _Plan(Written(wallets=len(states)), after=states, now=now)
    _ticked(states, dict.fromkeys(sorted(states), now), plan)
    plan.written.next_wakeups = {w: next_wakeup(s, now) for w, s in states.items()}
    return plan


def _decide_rental(loaded: Loaded, ask: AdmitRental, now: datetime) -> _Plan:
    before = loaded.states[ask.wallet_id]
    answer, state = admit_rental(before, ask.resource_id, ask.price_per_hour_micros, ask.admission_id, now)
    states = {ask.wallet_id: state}
    plan = _Plan(Written(wallets=1, answer=answer), after=states, now=now)
    # A hold can bring available to zero: the housekeeping then stops what runs (R4).
    _ticked(states, {ask.wallet_id: now}, plan)
    plan.written.next_wakeups = {ask.wallet_id: next_wakeup(states[ask.wallet_id], now)}
    return plan


def _decide_serverless(loaded: Loaded, ask: AdmitServerless, now: datetime) -> _Plan:
    before = loaded.states[ask.wallet_id]
    # `now` was read before the lock: a racing ask of the same wallet may have committed a later
    # instant. Time never goes back for the rolling window.
    now = max((now, *before.serverless_admissions))
    answer, state = admit_serverless(before, ask.endpoint_id, now)
    plan = _Plan(Written(wallets=1, answer=answer), after=None, now=now)
    if state != before:
        plan.after = {ask.wallet_id: state}
        plan.written.next_wakeups = {ask.wallet_id: next_wakeup(state, now)}
    return plan


_STRIPE_FACTS: Final = (
    StripePaymentSucceededEvent,
    StripeRefundSucceededEvent,
    StripeDisputeOpenedEvent,
    StripeDisputeClosedEvent,
)


def _keys_of(events: Sequence[LogEvent]) -> Keys:
    resources: set[str] = set()
    endpoints: set[tuple[str, str]] = set()
    jobs: set[tuple[str, str, str]] = set()
    payments: set[str] = set()
    for ev in events:
        if isinstance(ev, _STRIPE_FACTS):
            payments.add(ev.data.payment_intent_id)
        elif isinstance(ev, ServerlessJobCompletedEvent):
            endpoints.add((ev.wallet_id, ev.data.endpoint_id))
            jobs.add((ev.wallet_id, ev.data.endpoint_id, ev.data.job_id))
        elif ev.resource_id is not None:
            resources.add(ev.resource_id)
    return Keys(frozenset(resources), frozenset(endpoints), frozenset(jobs), frozenset(payments))


def _new_facts(conn: psycopg.Connection[Any], incoming: Sequence[Incoming]) -> list[int]:
    """Indexes of the facts to apply, in order: the first of each key, unless the log has it."""
    first: dict[EventKey, int] = {}
    for idx, item in enumerate(incoming):
        first.setdefault(item.event.key, idx)
    existing = _existing_keys(conn, list(first))
    return sorted(idx for key, idx in first.items() if key not in existing)


def _existing_keys(conn: psycopg.Connection[Any], keys: Sequence[EventKey]) -> set[EventKey]:
    if not keys:
        return set()
    with conn.cursor() as cur:
        cur.execute(
            "SELECT e.source, e.event_id FROM events e"
            "  JOIN unnest(%b::text[], %b::text[]) AS k(s, i) ON e.source = k.s AND e.event_id = k.i",
            ([k[0] for k in keys], [k[1] for k in keys]),
        )
        return {(s, i) for s, i in cur.fetchall()}


def _rejection_of(ev: LogEvent, reason: RejectReason, detail: str) -> Rejection:
    return Rejection(
        reason=reason,
        detail=detail[:1000],
        source=ev.source,
        event_id=ev.id,
        event_type=ev.type,
        wallet_id=ev.wallet_id,
    )


def _refuse(plan: _Plan, idx: int, item: Incoming, rejection: Rejection) -> None:
    plan.written.dispositions[idx] = Disposition.rejected
    plan.written.rejections[idx] = rejection
    plan.refused.append(RejectedInput(rejection, item.raw, item.subject, item.delivery_count))


def _decide_facts(loaded: Loaded, incoming: Sequence[Incoming], todo: Sequence[int], now: datetime) -> _Plan:
    states = dict(loaded.states)
    written = Written(dispositions=[Disposition.duplicate] * len(incoming), wallets=len(states))
    plan = _Plan(written, after=states, now=now)
    # The wallet of every rental the batch names: loaded ones (of other wallets, and of the
    # batch's own wallets) and those started in this batch. An event naming another wallet's
    # rental is refused, whoever else is in the batch.
    owner = {rid: r.wallet_id for rid, r in loaded.foreign.items()}
    for wid, st in loaded.states.items():
        owner.update((rid, wid) for rid in st.rentals)
    for idx in todo:
        _decide_fact(plan, states, owner, idx, incoming[idx], now)
    # Housekeeping once per wallet at the batch's instant (see rules.apply_fact): stop commands,
    # their re-issue, notices, expired holds. A rebuild gives each event its original instant;
    # there the last event's instant stands for the wallet's.
    last_at: dict[str, datetime] = {}
    for idx in todo:
        if written.dispositions[idx] == Disposition.accepted:
            last_at[incoming[idx].event.wallet_id] = incoming[idx].received_at or now
    _ticked(states, last_at, plan)
    written.next_wakeups = {w: next_wakeup(s, now) for w, s in states.items()}
    return plan


def _decide_fact(
    plan: _Plan, states: dict[str, WalletState], owner: dict[str, str], idx: int, item: Incoming, now: datetime
) -> None:
    ev = item.event
    rid = ev.resource_id if not isinstance(ev, ServerlessJobCompletedEvent) else None
    if rid is not None and owner.get(rid, ev.wallet_id) != ev.wallet_id:
        detail = f"resource {rid} belongs to wallet {owner[rid]}, not {ev.wallet_id}"
        _refuse(plan, idx, item, _rejection_of(ev, RejectReason.wallet_mismatch, detail))
        return
    prior = states[ev.wallet_id]
    state, decision = apply_fact(prior, ev)
    if decision.outcome == "not_started" and not item.last_attempt:
        plan.written.dispositions[idx] = Disposition.retry
        return
    if decision.outcome in ("rejected", "not_started"):
        reason, detail = decision.rejection or (
            RejectReason.not_started,
            f"{ev.type} for {rid}, which has not started (no gpu.rental.started seen), "
            f"after {item.delivery_count or 0} deliveries",
        )
        _refuse(plan, idx, item, _rejection_of(ev, reason, detail))
        return
    states[ev.wallet_id] = state
    if isinstance(ev, RentalStartedEvent):
        owner[ev.data.resource_id] = ev.wallet_id
    if isinstance(ev, ServerlessJobCompletedEvent):
        job = (ev.data.endpoint_id, ev.data.job_id)
        if job not in prior.jobs_seen:  # first sight of the job: remember it for ever
            plan.job_rows.append((ev.wallet_id, *job, ev.key))
    plan.items.append(
        AppendItem(EventRecord.from_event(ev), decision.txns, position=item.position, received_at=item.received_at)
    )
    plan.messages.extend(messages_of(decision, item.received_at or now))
    plan.written.dispositions[idx] = Disposition.accepted


# ---------------------------------------------------------------------------- rows beside wallets


def columns_of(table: Any, *, without: Sequence[str] = ()) -> list[str]:
    """A table's columns in ledger.schema's order (the schema is stated once), less ``without``."""
    return [c.name for c in table.columns if c.name not in without]


_JOB_COLUMNS: Final = columns_of(schema.serverless_jobs)
_RECORD_JOBS_SQL: Final = (
    f"INSERT INTO serverless_jobs ({', '.join(_JOB_COLUMNS)})"
    " SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::int8[])"
)


def _record_jobs(
    conn: psycopg.Connection[Any], job_rows: Sequence[tuple[str, str, str, EventKey]], positions: Mapping[EventKey, int]
) -> None:
    """The serverless jobs first seen in this write, with their event's position (for ever)."""
    if not job_rows:
        return
    require(_JOB_COLUMNS == ["wallet_id", "endpoint_id", "job_id", "event_position"], "serverless_jobs changed")
    with conn.cursor() as cur:
        cur.execute(
            _RECORD_JOBS_SQL,
            (
                [j[0] for j in job_rows],
                [j[1] for j in job_rows],
                [j[2] for j in job_rows],
                [positions[j[3]] for j in job_rows],
            ),
        )


_REJECTED_COLUMNS: Final = columns_of(schema.rejected_inputs, without=("id",))
_RECORD_REJECTIONS_SQL: Final = (
    f"INSERT INTO rejected_inputs ({', '.join(_REJECTED_COLUMNS)})"
    " SELECT %s, * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],"
    "                         %b::text[], %b::int4[], %b::bytea[])"
    " ON CONFLICT (source, event_id, reason) WHERE source IS NOT NULL AND event_id IS NOT NULL"
    " DO NOTHING"
)


def record_rejections(conn: psycopg.Connection[Any], rows: Sequence[RejectedInput], *, now: datetime) -> None:
    """Keep refused inputs with their reason, once per (source, id, reason); an input without an
    identity once per delivered message (see :func:`_already_recorded`)."""
    rows = _already_recorded(conn, rows, now=now)
    if not rows:
        return
    require(_REJECTED_COLUMNS[0] == "received_at" and len(_REJECTED_COLUMNS) == 10, "rejected_inputs changed")
    with conn.cursor() as cur:
        cur.execute(
            _RECORD_REJECTIONS_SQL,
            (
                now,
                [r.rejection.reason.value for r in rows],
                # storable: PostgreSQL text holds no NUL nor a lone surrogate; one such character in
                # a detail or a subject failed the whole transaction (issue 13), and the refusal was
                # never recorded. The intake already makes both printable; this is the last guard.
                [storable(r.rejection.detail) for r in rows],
                [None if r.subject is None else storable(r.subject) for r in rows],
                [r.rejection.source for r in rows],
                [r.rejection.event_id for r in rows],
                [r.rejection.event_type for r in rows],
                [r.rejection.wallet_id for r in rows],
                [r.delivery_count for r in rows],
                [r.raw for r in rows],
            ),
        )


def _already_recorded(
    conn: psycopg.Connection[Any], rows: Sequence[RejectedInput], *, now: datetime
) -> Sequence[RejectedInput]:
    """``rows`` less the redeliveries of inputs without an identity that are already recorded.

    An input with a (source, id) is kept once by the unique index. One without (invalid JSON, an
    empty body) would get a row per delivery when its first delivery was committed but not acked (a
    crash, a dead letter that could not be published): such a redelivery (delivery count > 1) is
    dropped if a row with the same reason, subject and bytes was recorded within REDELIVERY_WINDOW.
    Two identical messages on one subject are indistinguishable anyway. Only redeliveries pay for
    the look-up (the index on reason and received_at bounds it)."""
    later = [
        i
        for i, r in enumerate(rows)
        if (r.delivery_count or 1) > 1 and (r.rejection.source is None or r.rejection.event_id is None)
    ]
    if not later:
        return rows
    seen: set[int] = set()
    with conn.cursor() as cur:
        for i in later:
            r = rows[i]
            cur.execute(
                "SELECT 1 FROM rejected_inputs WHERE reason = %s AND received_at >= %s"
                " AND subject IS NOT DISTINCT FROM %s AND raw = %b LIMIT 1",
                (
                    r.rejection.reason.value,
                    now - REDELIVERY_WINDOW,
                    None if r.subject is None else storable(r.subject),
                    r.raw,
                ),
            )
            if cur.fetchone() is not None:
                seen.add(i)
    return [r for i, r in enumerate(rows) if i not in seen]
