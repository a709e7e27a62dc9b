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

from collections.abc import Sequence
from datetime import datetime
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
from projections.messages import notice_message, settlement_message, stop_message
from projections.outbox import OutboxMessage, enqueue
from projections.rules import (
    AdmissionAnswer,
    Decision,
    ServerlessAdmissionAnswer,
    apply_fact,
    next_wakeup,
    tick,
)
from projections.wallet_store import load_wallets, lock_and_read_wallets, save_wallets
from projections.write_path import (
    MAX_BATCH,
    AdmitRental,
    AdmitServerless,
    Disposition,
    Incoming,
    RejectedInput,
    Tick,
    Written,
    record_rejections,
    write,
)

# The types and the row writers of the one write path (projections.write_path), here under their old
# names for the callers of process_batch.
BatchResult = Written
TickResult = Written

__all__ = [
    "MAX_BATCH",
    "BatchResult",
    "Disposition",
    "Incoming",
    "RejectedInput",
    "TickResult",
    "admit_rental_request",
    "admit_serverless_request",
    "process_batch",
    "record_rejections",
    "tick_wallets",
]


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
) -> BatchResult:
    """Apply a batch in the caller's transaction (see the module docstring). Returns what became
    of each message, by index, for the adapter to ack, nak or dead-letter after the commit."""
    if not (len(incoming) <= MAX_BATCH):
        fail(f"batch of {len(incoming)} > {MAX_BATCH}")
    require(now.tzinfo is not None, "now must be timezone-aware")
    result = BatchResult(dispositions=[Disposition.duplicate] * len(incoming))
    record_rejections(conn, rejected, now=now)
    if not incoming:
        return result

    wallet_ids, wallet_rows = lock_and_read_wallets(conn, (i.event.wallet_id for i in incoming))
    stored_wakeups: dict[str, datetime | None] = {}
    first: dict[EventKey, int] = {}
    for idx, item in enumerate(incoming):
        first.setdefault(item.event.key, idx)
    existing = _existing_keys(conn, list(first))
    todo = [idx for key, idx in first.items() if key not in existing]
    todo.sort()
    events = [incoming[i].event for i in todo]
    resources, endpoints, jobs, payments = _resource_keys(events)
    before, foreign = load_wallets(
        conn,
        wallet_ids,
        resource_ids=resources,
        endpoint_keys=endpoints,
        job_keys=jobs,
        payment_ids=payments,
        wallet_rows=wallet_rows,
        stored_wakeups=stored_wakeups,
    )
    states = dict(before)
    # The wallet of every rental the batch names: loaded ones (of other wallets, and of the
    # batch's own wallets) and those started in this batch. An event naming another wallet's
    # rental is refused, whoever else is in the batch.
    owner = {rid: r.wallet_id for rid, r in foreign.items()}
    for wid, st in before.items():
        owner.update((rid, wid) for rid in st.rentals)

    items: list[AppendItem] = []
    job_rows: list[tuple[str, str, str, EventKey]] = []
    messages: list[OutboxMessage] = []
    refused: list[RejectedInput] = []
    for idx in todo:
        item = incoming[idx]
        ev = item.event
        at = item.received_at or now
        rid = ev.resource_id if not isinstance(ev, ServerlessJobCompletedEvent) else None
        if rid is not None and owner.get(rid, ev.wallet_id) != ev.wallet_id:
            rejection = _rejection_of(
                ev,
                RejectReason.wallet_mismatch,
                f"resource {rid} belongs to wallet {owner[rid]}, not {ev.wallet_id}",
            )
            result.dispositions[idx] = Disposition.rejected
            result.rejections[idx] = rejection
            refused.append(RejectedInput(rejection, item.raw, item.subject, item.delivery_count))
            continue
        prior = states[ev.wallet_id]
        state, decision = apply_fact(prior, ev)
        if decision.outcome == "not_started" and not item.last_attempt:
            result.dispositions[idx] = Disposition.retry
            continue
        if decision.outcome in ("rejected", "not_started"):
            reason, detail = decision.rejection or (
                RejectReason.not_started,
                f"{ev.type} for {rid}, which has not started (no gpu.rental.started seen), "
                f"after {item.delivery_count or 0} deliveries",
            )
            rejection = _rejection_of(ev, reason, detail)
            result.dispositions[idx] = Disposition.rejected
            result.rejections[idx] = rejection
            refused.append(RejectedInput(rejection, item.raw, item.subject, item.delivery_count))
            continue
        states[ev.wallet_id] = state
        if isinstance(ev, RentalStartedEvent):
            owner[ev.data.resource_id] = ev.wallet_id
        if isinstance(ev, ServerlessJobCompletedEvent):
            job = (ev.data.endpoint_id, ev.data.job_id)
            if job not in prior.jobs_seen:  # first sight of the job: remember it for ever
                job_rows.append((ev.wallet_id, *job, ev.key))
        items.append(
            AppendItem(
                EventRecord.from_event(ev),
                decision.txns,
                position=item.position,
                received_at=item.received_at,
            )
        )
        messages.extend(_messages(decision, at))
        result.dispositions[idx] = Disposition.accepted

    # Housekeeping once per wallet at the batch's instant (see rules.apply_fact): stop commands,
    # their re-issue, notices, expired holds. A rebuild gives each event its original instant;
    # there the last event's instant stands for the wallet's.
    last_at: dict[str, datetime] = {}
    for idx in todo:
        if result.dispositions[idx] == Disposition.accepted:
            last_at[incoming[idx].event.wallet_id] = incoming[idx].received_at or now
    for wid, at in last_at.items():
        states[wid], decision = tick(states[wid], at)
        messages.extend(_messages(decision, at))

    # Under the wallet locks nobody else can have added these events since the check above, so they
    # go in by COPY; should one be there after all, the unique index fails the transaction.
    appended = append_new(conn, items, received_at=now)
    result.positions = appended.positions

    result.next_wakeups = {w: next_wakeup(s, now) for w, s in states.items()}
    save_wallets(conn, before, states, next_wakeups=result.next_wakeups, now=now, stored_wakeups=stored_wakeups)
    if job_rows:
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO serverless_jobs (wallet_id, endpoint_id, job_id, event_position)"
                " SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::int8[])",
                (
                    [j[0] for j in job_rows],
                    [j[1] for j in job_rows],
                    [j[2] for j in job_rows],
                    [appended.positions[j[3]] for j in job_rows],
                ),
            )
    enqueue(conn, messages, now=now)
    result.outbox = len(messages)
    record_rejections(conn, refused, now=now)
    # Last: the rows of the busiest accounts (revenue, clearing) stay locked only until the commit
    # that follows (see ledger.store.apply_balances).
    apply_balances(conn, appended.balance_deltas)
    return result


# ------------------------------------------------------------------------- scheduler and admission
# The other writers' entry points, kept for their callers (tests): each is one command of
# projections.write_path.write.


def tick_wallets(conn: psycopg.Connection[Any], wallet_ids: Sequence[str], *, now: datetime) -> Written:
    """The scheduler's unit of work (see :class:`projections.write_path.Tick`)."""
    return write(conn, Tick(wallet_ids), now=now)


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
    written = write(conn, AdmitRental(wallet_id, resource_id, price_per_hour_micros, admission_id), now=now)
    if not isinstance(written.answer, AdmissionAnswer):
        fail("a rental admission without an answer")
    return written.answer, written.next_wakeups.get(wallet_id)


def admit_serverless_request(
    conn: psycopg.Connection[Any], *, wallet_id: str, endpoint_id: str, now: datetime
) -> ServerlessAdmissionAnswer:
    """R5 in a transaction: answer, and count the admission in the rolling minute."""
    written = write(conn, AdmitServerless(wallet_id, endpoint_id), now=now)
    if not isinstance(written.answer, ServerlessAdmissionAnswer):
        fail("a serverless admission without an answer")
    return written.answer
