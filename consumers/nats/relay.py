"""The outbox relay (DESIGN sections 5 and 10): publishes committed outbox rows to JetStream.

One pass is one unit of work: :func:`projections.outbox.claim` locks up to ``batch_size``
unpublished rows (oldest first, ``FOR UPDATE SKIP LOCKED``, no high-water mark, so a row whose
transaction committed late is simply found by a later pass); each row is published to
``names.subject(row.subject)`` with ``Nats-Msg-Id: row.msg_id`` (``js.publish_async`` for the whole
batch, in id order on the wire, then every PubAck awaited with a bound); the acknowledged rows are
marked published and the transaction commits. A crash anywhere before the commit leaves the rows
unpublished: they are published again and JetStream's duplicate window (and the consumer's own
dedup by id) drops the repeat. At least once, never skipped.

A row JetStream refuses (no stream for its subject, a stream limit) stays unpublished and is
retried after a backoff; the rows acknowledged in the same pass are still marked, so one bad row
does not hold the others back.

Waking up: the relay polls every ``poll_interval`` seconds (bounded) and also wakes at once when the
optional ``kick`` event is set; writers in the same process set it after they commit outbox rows.
A full batch is followed by the next pass at once. Why not PostgreSQL LISTEN/NOTIFY: the rows are
written by code this module does not own (a NOTIFY needs a trigger on ``outbox`` or a call in every
writer's transaction), LISTEN needs a dedicated connection with its own reconnect logic, and the
in-process kick already covers every writer of a process (each process runs its own relay, and
``SKIP LOCKED`` lets several relays share the table). Rows written by another process are found by
the short poll, which is also the fallback for anything a kick misses.

Failures (PostgreSQL down, NATS disconnected or restarting) roll the pass back and retry with a
bounded exponential backoff; the loop never exits before ``stop`` is set. NATS reconnects are the
client's job: connect with ``max_reconnect_attempts=-1`` so that it never gives up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import PubAck
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import Engine

from consumers.nats.names import NatsNames
from consumers.runtime.errors import DEFAULT_BACKOFF_INITIAL_S, DEFAULT_BACKOFF_MAX_S, Backoff
from consumers.runtime.loops import ThreadedUnitOfWork, utc_now, wait_any
from ledger.db import unit_of_work
from ledger.invariants import require
from projections.outbox import MAX_CLAIM_ROWS, ClaimedMessage, claim, delete_published, mark_published

log = logging.getLogger("billing.relay")

DEFAULT_POLL_INTERVAL_S: Final = 0.5
MAX_POLL_INTERVAL_S: Final = 5.0
DEFAULT_ACK_TIMEOUT_S: Final = 5.0
DEFAULT_PRUNE_BATCH: Final = 10_000

_DELAY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class RelayMetrics:
    """The relay's Prometheus metrics, in ``registry`` (the service's, for ``GET /metrics``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.published = Counter(
            "billing_outbox_published", "Outbox rows published to JetStream and marked published.", registry=r
        )
        self.duplicates = Counter(
            "billing_outbox_duplicate_acks",
            "Publishes JetStream acknowledged as duplicates (a republished row).",
            registry=r,
        )
        self.publish_failures = Counter(
            "billing_outbox_publish_failures", "Outbox rows whose publish failed (retried later).", registry=r
        )
        self.pass_failures = Counter(
            "billing_outbox_relay_pass_failures", "Relay passes rolled back (PostgreSQL or NATS).", registry=r
        )
        self.delay = Histogram(
            "billing_outbox_relay_delay_seconds",
            "Seconds from an outbox row's creation to its PubAck.",
            buckets=_DELAY_BUCKETS,
            registry=r,
        )


@dataclass
class RelayPass:
    """What one pass did: rows claimed, rows acknowledged and marked, rows that failed."""

    claimed: int = 0
    published: int = 0
    failed: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)


def jetstream_of(nc_or_js: NATS | JetStreamContext) -> JetStreamContext:
    """The JetStream context to publish with (a new one over a connection)."""
    if isinstance(nc_or_js, NATS):
        return nc_or_js.jetstream()
    return nc_or_js


async def publish_claimed(
    js: JetStreamContext,
    names: NatsNames,
    rows: Sequence[ClaimedMessage],
    *,
    ack_timeout: float = DEFAULT_ACK_TIMEOUT_S,
) -> tuple[list[tuple[ClaimedMessage, PubAck]], list[tuple[ClaimedMessage, BaseException]]]:
    """Publish ``rows`` in order with ``Nats-Msg-Id`` and await every PubAck (at most
    ``ack_timeout`` seconds for the lot). Returns (acknowledged, failed) rows.

    Raises only if the publishing itself could not start (connection closed, buffer full); the
    caller then treats the whole batch as failed.
    """
    futures: list[asyncio.Future[PubAck]] = []
    try:
        for row in rows:
            futures.append(
                await js.publish_async(
                    names.subject(row.subject), row.payload_json, headers={"Nats-Msg-Id": row.msg_id}
                )
            )
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    if futures:
        _, pending = await asyncio.wait(futures, timeout=ack_timeout)
        for f in pending:
            f.cancel()  # also releases publish_async's bookkeeping for this publish
    acked: list[tuple[ClaimedMessage, PubAck]] = []
    failed: list[tuple[ClaimedMessage, BaseException]] = []
    for row, f in zip(rows, futures, strict=True):
        if f.cancelled():
            failed.append((row, TimeoutError(f"no PubAck within {ack_timeout} s")))
        elif (exc := f.exception()) is not None:
            failed.append((row, exc))
        else:
            acked.append((row, f.result()))
    return acked, failed


async def relay_once(
    engine: Engine,
    js: JetStreamContext,
    names: NatsNames,
    *,
    batch_size: int = MAX_CLAIM_ROWS,
    ack_timeout: float = DEFAULT_ACK_TIMEOUT_S,
    metrics: RelayMetrics | None = None,
) -> RelayPass:
    """One pass: claim, publish, mark what was acknowledged, commit. Raises if PostgreSQL fails or
    nothing could be published at all (nothing is marked then)."""
    result = RelayPass()
    async with ThreadedUnitOfWork(engine) as tx:
        rows = await tx.run(claim, batch_size)
        result.claimed = len(rows)
        if not rows:
            return result
        acked, failed = await publish_claimed(js, names, rows, ack_timeout=ack_timeout)
        result.failed = len(failed)
        result.errors = sorted({f"{type(e).__name__}: {e}" for _, e in failed})
        if failed and not acked:
            raise RelayError(f"{len(failed)} outbox rows not published: {'; '.join(result.errors[:3])}")
        now = utc_now()
        await tx.run(mark_published, [row.id for row, _ in acked], now=now)
        await tx.commit()
    result.published = len(acked)
    result.duplicates = sum(1 for _, ack in acked if ack.duplicate)
    if metrics is not None:
        metrics.published.inc(result.published)
        metrics.duplicates.inc(result.duplicates)
        metrics.publish_failures.inc(result.failed)
        for row, _ in acked:
            metrics.delay.observe(max(0.0, (now - row.created_at).total_seconds()))
    return result


class RelayError(RuntimeError):
    """No row of a pass could be published."""


async def run_relay(
    engine: Engine,
    nc_or_js: NATS | JetStreamContext,
    names: NatsNames,
    stop: asyncio.Event,
    *,
    kick: asyncio.Event | None = None,
    batch_size: int = MAX_CLAIM_ROWS,
    poll_interval: float = DEFAULT_POLL_INTERVAL_S,
    ack_timeout: float = DEFAULT_ACK_TIMEOUT_S,
    backoff_initial: float = DEFAULT_BACKOFF_INITIAL_S,
    backoff_max: float = DEFAULT_BACKOFF_MAX_S,
    prune_after_days: float | None = None,
    prune_every: float = 3600.0,
    registry: CollectorRegistry | None = None,
) -> None:
    """Publish outbox rows until ``stop`` is set (see the module docstring).

    ``kick``: set it after committing outbox rows to wake the relay at once. ``prune_after_days``:
    when set, every ``prune_every`` seconds delete rows published more than that many days ago.
    ``registry``: where the relay's metrics go (the service's registry for ``GET /metrics``).
    """
    require(0 < batch_size <= MAX_CLAIM_ROWS, f"batch_size {batch_size}")
    require(0 < poll_interval <= MAX_POLL_INTERVAL_S, f"poll_interval {poll_interval} (0, {MAX_POLL_INTERVAL_S}]")
    require(ack_timeout > 0, "ack_timeout")
    js = jetstream_of(nc_or_js)
    metrics = RelayMetrics(registry)
    backoff = Backoff(backoff_initial, backoff_max)
    loop = asyncio.get_running_loop()
    next_prune = loop.time() + min(prune_every, 60.0)
    log.info("outbox relay started (batch %d, poll %.2f s, namespace %r)", batch_size, poll_interval, names.namespace)
    while not stop.is_set():
        if kick is not None:
            kick.clear()  # before the claim: a kick set during the pass triggers another pass
        try:
            done = await relay_once(engine, js, names, batch_size=batch_size, ack_timeout=ack_timeout, metrics=metrics)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.pass_failures.inc()
            delay = backoff.next_logged(log, "outbox relay pass failed", exc, expected=(RelayError,))
            await wait_any(stop, seconds=delay)
            continue
        if done.failed:
            delay = backoff.next()
            log.warning(
                "outbox relay: %d published, %d failed (retry in %.2f s): %s",
                done.published,
                done.failed,
                delay,
                "; ".join(done.errors[:3]),
            )
            await wait_any(stop, seconds=delay)
            continue
        if backoff.failures:
            log.info("outbox relay recovered after %d failed passes", backoff.failures)
        backoff.reset()
        if done.published:
            log.debug("outbox relay published %d rows (%d duplicates)", done.published, done.duplicates)
        if prune_after_days is not None and loop.time() >= next_prune:
            next_prune = loop.time() + prune_every
            await _prune(engine, prune_after_days)
        if done.claimed == batch_size:
            continue  # more may be waiting
        await wait_any(stop, kick, seconds=poll_interval)
    log.info("outbox relay stopped")


async def _prune(engine: Engine, older_than_days: float) -> None:
    try:
        pruned = await asyncio.to_thread(prune_published, engine, older_than_days=older_than_days)
        if pruned:
            log.info("outbox relay pruned %d rows published more than %s days ago", pruned, older_than_days)
    except Exception as exc:  # pruning is housekeeping: never stop relaying for it
        log.warning("outbox prune failed: %s: %s", type(exc).__name__, exc)


def prune_published(
    engine: Engine,
    *,
    older_than_days: float,
    batch: int = DEFAULT_PRUNE_BATCH,
    now: datetime | None = None,
) -> int:
    """Delete outbox rows published more than ``older_than_days`` days ago, ``batch`` rows per
    transaction (short locks). Unpublished rows are never touched. Returns how many were deleted.

    The facts stay in the log and the journal; the published messages stay in their streams.
    """
    require(older_than_days >= 0, f"older_than_days {older_than_days}")
    require(0 < batch <= 100_000, f"prune batch {batch}")
    cutoff = (now or utc_now()) - timedelta(days=older_than_days)
    total = 0
    while True:
        with unit_of_work(engine) as uow:
            deleted = delete_published(uow.pg, before=cutoff, limit=batch)
            uow.commit()
        total += deleted
        if deleted < batch:
            return total
