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
from typing import Any

import psycopg

from ledger.invariants import fail
from projections.rules import AdmissionAnswer, ServerlessAdmissionAnswer
from projections.wallet_store import WalletCache
from projections.write_path import (
    MAX_BATCH,
    POSTGRES,
    AdmitRental,
    AdmitServerless,
    CachedState,
    Disposition,
    Facts,
    Incoming,
    RejectedInput,
    StateSource,
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


def process_batch(
    conn: psycopg.Connection[Any],
    incoming: Sequence[Incoming],
    *,
    now: datetime,
    rejected: Sequence[RejectedInput] = (),
    cache: WalletCache | None = None,
) -> BatchResult:
    """Apply a batch in the caller's transaction (see the module docstring): one
    :class:`~projections.write_path.Facts` command of the one write path. Returns what became of each
    message, by index, for the adapter to ack, nak or dead-letter after the commit.

    ``cache``: the intake owner's wallets in memory (:class:`~projections.write_path.CachedState`):
    the batch's wallets are locked reading only their versions, and only those not current in the
    cache are read. The caller keeps ``result.cache_entries`` in the cache after its commit, and
    evicts the batch's wallets if anything fails."""
    source: StateSource = POSTGRES if cache is None else CachedState(cache)
    result = write(conn, Facts(incoming, rejected), now=now, source=source)
    if isinstance(source, CachedState):
        result.cache_entries = source.entries
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
