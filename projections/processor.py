"""The unit of work of every writer: a batch of events, a scheduler tick, an admission.

All three lock the wallets they touch (in id order), load the aggregates, run the pure rules of
projections.rules, and write everything in the caller's transaction: the log, the journal, the
balances, the projections, the outbox and the rejected inputs. Nothing here computes money: the
rules do. The caller commits, and only then acks (the intake) or answers (admission).

The path of one batch (DESIGN section 10):

1. lock the batch's wallets; events of a wallet are only ever written under its lock, so the
   check for events already in the log cannot race with another writer;
2. drop duplicates: repeated within the batch, or already in the log (the ``(source, id)`` key);
3. apply each new event in batch order; an event whose resource has not started yet is left out
   of the log (the intake naks it with a delay) unless it is its last attempt, when it is
   rejected; rejected events go to ``rejected_inputs`` and are dead-lettered after the commit;
4. binary COPY appends the accepted events and their journal (``ledger.store.append_new``); then
   the changed projection rows, the serverless jobs seen, the outbox rows and the rejected inputs;
   the account balances last, so that the accounts every batch touches (revenue, clearing) are
   locked only until the commit.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Final

import psycopg

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
from ledger.store import AppendItem, EventKey, EventRecord, append_new, apply_balances
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
    load_wallets,
    lock_and_read_wallets,
    lock_wallet_versions,
    save_wallets,
)

MAX_BATCH: Final = 5_000


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


@dataclass
class BatchResult:
    dispositions: list[Disposition]
    rejections: dict[int, Rejection] = field(default_factory=dict)
    """Index in the batch -> why the rules refused it (to dead-letter after the commit)."""
    positions: dict[EventKey, int] = field(default_factory=dict)
    outbox: int = 0
    next_wakeups: dict[str, datetime | None] = field(default_factory=dict)
    written: dict[str, tuple[int, WalletState]] = field(default_factory=dict)
    """With a cache: each wallet's state after the batch and the row version it wrote (for
    ``WalletCache.keep`` once committed)."""


_STRIPE_FACTS: Final = (
    StripePaymentSucceededEvent,
    StripeRefundSucceededEvent,
    StripeDisputeOpenedEvent,
    StripeDisputeClosedEvent,
)


def _resource_keys(
    events: Sequence[LogEvent],
) -> tuple[set[str], set[tuple[str, str]], set[tuple[str, str, str]], set[str]]:
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
    return resources, endpoints, jobs, payments


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


def _messages(decision: Decision, now: datetime) -> list[OutboxMessage]:
    if not (decision.commands or decision.notices or decision.settlements):
        return []  # most events: a charge and nothing to tell anyone (the intake's hot path)
    return [
        *(stop_message(c) for c in decision.commands),
        *(notice_message(n, now=now) for n in decision.notices),
        *(settlement_message(s) for s in decision.settlements),
    ]


# How far back a redelivered input without an identity looks for its own earlier refusal: far beyond
# the longest redelivery schedule (max_deliver x nak_delay_max_s, 20 minutes by default).
REDELIVERY_WINDOW: Final = timedelta(hours=24)


def record_rejections(conn: psycopg.Connection[Any], rows: Sequence[RejectedInput], *, now: datetime) -> None:
    """Keep refused inputs with their reason, once per (source, id, reason); an input without an
    identity once per delivered message (see :func:`_already_recorded`)."""
    rows = _already_recorded(conn, rows, now=now)
    if not rows:
        return
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO rejected_inputs (received_at, reason, detail, subject, source, event_id, event_type,"
            "                             wallet_id, delivery_count, raw)"
            " SELECT %s, * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],"
            "                         %b::text[], %b::int4[], %b::bytea[])"
            " ON CONFLICT (source, event_id, reason) WHERE source IS NOT NULL AND event_id IS NOT NULL"
            " DO NOTHING",
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


def _rejection_of(ev: LogEvent, reason: RejectReason, detail: str) -> Rejection:
    return Rejection(
        reason=reason,
        detail=detail[:1000],
        source=ev.source,
        event_id=ev.id,
        event_type=ev.type,
        wallet_id=ev.wallet_id,
    )


def process_batch(
    conn: psycopg.Connection[Any],
    incoming: Sequence[Incoming],
    *,
    now: datetime,
    rejected: Sequence[RejectedInput] = (),
    cache: WalletCache | None = None,
) -> BatchResult:
    """Apply a batch in the caller's transaction (see the module docstring). Returns what became
    of each message, by index, for the adapter to ack, nak or dead-letter after the commit.

    ``cache``: the intake owner's wallets in memory (:class:`~projections.wallet_store.WalletCache`):
    the batch's wallets are locked reading only their versions, and only those not current in the
    cache are read. The caller puts ``result.written`` into the cache after its commit, and evicts
    the batch's wallets if anything fails."""
    if not (len(incoming) <= MAX_BATCH):
        fail(f"batch of {len(incoming)} > {MAX_BATCH}")
    require(now.tzinfo is not None, "now must be timezone-aware")
    result = BatchResult(dispositions=[Disposition.duplicate] * len(incoming))
    record_rejections(conn, rejected, now=now)
    if not incoming:
        return result
    loaded = _lock_and_load_batch(conn, incoming, cache)
    run = _decide_batch(incoming, loaded, result, now=now)
    # Under the wallet locks nobody else can have added these events since the check above, so they
    # go in by COPY; should one be there after all, the unique index fails the transaction.
    appended = append_new(conn, run.items, received_at=now)
    result.positions = appended.positions
    result.next_wakeups = {w: next_wakeup(s, now) for w, s in run.states.items()}
    versions = None if loaded.versions is None else {w: v + 1 for w, v in loaded.versions.items()}
    save_wallets(
        conn,
        loaded.before,
        run.states,
        next_wakeups=result.next_wakeups,
        now=now,
        stored_wakeups=loaded.stored_wakeups,
        versions=versions,
    )
    if versions is not None:
        result.written = {w: (versions[w], st) for w, st in run.states.items()}
    _insert_jobs(conn, run.job_rows, appended.positions)
    enqueue(conn, run.messages, now=now)
    result.outbox = len(run.messages)
    record_rejections(conn, run.refused, now=now)
    # Last: the rows of the busiest accounts (revenue, clearing) stay locked only until the commit
    # that follows (see ledger.store.apply_balances).
    apply_balances(conn, appended.balance_deltas)
    return result


@dataclass(slots=True)
class _Loaded:
    """A batch's wallets, locked and loaded: what the rules start from."""

    todo: list[int]
    """Indexes of the events new to the log, first sight in the batch, in batch order."""
    before: dict[str, WalletState]
    foreign: dict[str, RentalState]
    stored_wakeups: dict[str, datetime | None]
    versions: dict[str, int] | None
    """With a cache: each wallet row's locked version."""


def _lock_and_load_batch(
    conn: psycopg.Connection[Any], incoming: Sequence[Incoming], cache: WalletCache | None
) -> _Loaded:
    wallets = (i.event.wallet_id for i in incoming)
    versions: dict[str, int] | None = None
    known: dict[str, WalletState] = {}
    if cache is None:
        wallet_ids, wallet_rows = lock_and_read_wallets(conn, wallets)
    else:
        wallet_ids, versions = lock_wallet_versions(conn, wallets)
        known, wallet_rows = cache.current(versions), None
    first: dict[EventKey, int] = {}
    for idx, item in enumerate(incoming):
        first.setdefault(item.event.key, idx)
    existing = _existing_keys(conn, list(first))
    todo = sorted(idx for key, idx in first.items() if key not in existing)
    resources, endpoints, jobs, payments = _resource_keys([incoming[i].event for i in todo])
    stored_wakeups: dict[str, datetime | None] = {}
    before, foreign = load_wallets(
        conn,
        wallet_ids,
        resource_ids=resources,
        endpoint_keys=endpoints,
        job_keys=jobs,
        payment_ids=payments,
        wallet_rows=wallet_rows,
        stored_wakeups=stored_wakeups,
        known=known,
    )
    return _Loaded(todo, before, foreign, stored_wakeups, versions)


@dataclass(slots=True)
class _Run:
    """What the rules decided for a batch: the new states and what to write."""

    states: dict[str, WalletState]
    items: list[AppendItem] = field(default_factory=list)
    job_rows: list[tuple[str, str, str, EventKey]] = field(default_factory=list)
    messages: list[OutboxMessage] = field(default_factory=list)
    refused: list[RejectedInput] = field(default_factory=list)


def _refuse(result: BatchResult, run: _Run, idx: int, item: Incoming, reason: RejectReason, detail: str) -> None:
    rejection = _rejection_of(item.event, reason, detail)
    result.dispositions[idx] = Disposition.rejected
    result.rejections[idx] = rejection
    run.refused.append(RejectedInput(rejection, item.raw, item.subject, item.delivery_count))


def _decide_batch(incoming: Sequence[Incoming], loaded: _Loaded, result: BatchResult, *, now: datetime) -> _Run:
    run = _Run(states=dict(loaded.before))
    # The wallet of every rental the batch names: loaded ones (of other wallets, and of the
    # batch's own wallets) and those started in this batch. An event naming another wallet's
    # rental is refused, whoever else is in the batch.
    owner = {rid: r.wallet_id for rid, r in loaded.foreign.items()}
    for wid, st in loaded.before.items():
        owner.update((rid, wid) for rid in st.rentals)
    for idx in loaded.todo:
        _decide_one(incoming[idx], idx, run, owner, result, now=now)
    # Housekeeping once per wallet at the batch's instant (see rules.apply_fact): stop commands,
    # their re-issue, notices, expired holds. A rebuild gives each event its original instant;
    # there the last event's instant stands for the wallet's.
    last_at: dict[str, datetime] = {}
    for idx in loaded.todo:
        if result.dispositions[idx] == Disposition.accepted:
            last_at[incoming[idx].event.wallet_id] = incoming[idx].received_at or now
    for wid, at in last_at.items():
        run.states[wid], decision = tick(run.states[wid], at)
        run.messages.extend(_messages(decision, at))
    return run


def _decide_one(
    item: Incoming, idx: int, run: _Run, owner: dict[str, str], result: BatchResult, *, now: datetime
) -> None:
    ev = item.event
    rid = ev.resource_id if not isinstance(ev, ServerlessJobCompletedEvent) else None
    if rid is not None and owner.get(rid, ev.wallet_id) != ev.wallet_id:
        detail = f"resource {rid} belongs to wallet {owner[rid]}, not {ev.wallet_id}"
        _refuse(result, run, idx, item, RejectReason.wallet_mismatch, detail)
        return
    prior = run.states[ev.wallet_id]
    state, decision = apply_fact(prior, ev)
    if decision.outcome == "not_started" and not item.last_attempt:
        result.dispositions[idx] = Disposition.retry
        return
    if decision.outcome in ("rejected", "not_started"):
        reason, detail = decision.rejection or (
            RejectReason.not_started,
            f"{ev.type} for {rid}, which has not started (no gpu.rental.started seen), "
            f"after {item.delivery_count or 0} deliveries",
        )
        _refuse(result, run, idx, item, reason, detail)
        return
    run.states[ev.wallet_id] = state
    if isinstance(ev, RentalStartedEvent):
        owner[ev.data.resource_id] = ev.wallet_id
    if isinstance(ev, ServerlessJobCompletedEvent):
        job = (ev.data.endpoint_id, ev.data.job_id)
        if job not in prior.jobs_seen:  # first sight of the job: remember it for ever
            run.job_rows.append((ev.wallet_id, *job, ev.key))
    run.items.append(
        AppendItem(EventRecord.from_event(ev), decision.txns, position=item.position, received_at=item.received_at)
    )
    run.messages.extend(_messages(decision, item.received_at or now))
    result.dispositions[idx] = Disposition.accepted


def _insert_jobs(
    conn: psycopg.Connection[Any], job_rows: list[tuple[str, str, str, EventKey]], positions: dict[EventKey, int]
) -> None:
    if not job_rows:
        return
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO serverless_jobs (wallet_id, endpoint_id, job_id, event_position)"
            " SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::int8[])",
            (
                [j[0] for j in job_rows],
                [j[1] for j in job_rows],
                [j[2] for j in job_rows],
                [positions[j[3]] for j in job_rows],
            ),
        )


# ------------------------------------------------------------------------- scheduler and admission


@dataclass
class TickResult:
    wallets: int
    commands: int
    notices: int
    next_wakeups: dict[str, datetime | None]


def _lock_and_load(
    conn: psycopg.Connection[Any], wallet_ids: Sequence[str]
) -> tuple[list[str], dict[str, WalletState], dict[str, datetime | None]]:
    """The scheduler's and admission's wallets, locked and loaded: their sorted ids, their states
    and their stored next wake-ups (for ``save_wallets``, which then leaves unchanged rows alone)."""
    ids, rows = lock_and_read_wallets(conn, wallet_ids)
    stored: dict[str, datetime | None] = {}
    before, _ = load_wallets(conn, ids, wallet_rows=rows, stored_wakeups=stored)
    return ids, before, stored


def tick_wallets(conn: psycopg.Connection[Any], wallet_ids: Sequence[str], *, now: datetime) -> TickResult:
    """The scheduler's unit of work: at ``now``, the rules' time-driven decisions (R4 stop commands
    and their re-issue, notices, expired holds) for these wallets, outbox rows in the same
    transaction, and each wallet's next wake-up."""
    ids, before, stored = _lock_and_load(conn, wallet_ids)
    after: dict[str, WalletState] = {}
    messages: list[OutboxMessage] = []
    commands = notices = 0
    for wid in ids:
        state, decision = tick(before[wid], now)
        after[wid] = state
        messages.extend(_messages(decision, now))
        commands += len(decision.commands)
        notices += len(decision.notices)
    wakeups = {w: next_wakeup(s, now) for w, s in after.items()}
    save_wallets(conn, before, after, next_wakeups=wakeups, now=now, stored_wakeups=stored)
    enqueue(conn, messages, now=now)
    return TickResult(wallets=len(ids), commands=commands, notices=notices, next_wakeups=wakeups)


def admit_rental_request(
    conn: psycopg.Connection[Any],
    *,
    wallet_id: str,
    resource_id: str,
    price_per_hour_micros: int,
    admission_id: str,
    now: datetime,
) -> tuple[AdmissionAnswer, datetime | None]:
    """R2/R3 in a transaction: answer, and keep the hold. Returns the wallet's next wake-up."""
    _, before, stored = _lock_and_load(conn, [wallet_id])
    answer, state = admit_rental(before[wallet_id], resource_id, price_per_hour_micros, admission_id, now)
    # A hold can bring available to zero: the housekeeping then stops what runs (R4).
    state, decision = tick(state, now)
    wakeup = next_wakeup(state, now)
    save_wallets(conn, before, {wallet_id: state}, next_wakeups={wallet_id: wakeup}, now=now, stored_wakeups=stored)
    enqueue(conn, _messages(decision, now), now=now)
    return answer, wakeup


def admit_serverless_request(
    conn: psycopg.Connection[Any], *, wallet_id: str, endpoint_id: str, now: datetime
) -> ServerlessAdmissionAnswer:
    """R5 in a transaction: answer, and count the admission in the rolling minute."""
    _, before, stored = _lock_and_load(conn, [wallet_id])
    # `now` was read before the lock: a racing ask of the same wallet may have committed a later
    # instant. Time never goes back for the rolling window.
    now = max((now, *before[wallet_id].serverless_admissions))
    answer, state = admit_serverless(before[wallet_id], endpoint_id, now)
    if state != before[wallet_id]:
        wakeup = next_wakeup(state, now)
        save_wallets(
            conn, before, {wallet_id: replace(state)}, next_wakeups={wallet_id: wakeup}, now=now, stored_wakeups=stored
        )
    return answer
