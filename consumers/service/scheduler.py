"""Predictive auto-stop (R4): the scheduler turns predicted instants into stop commands on time.

Every writer of a wallet stores the wallet's next wake-up (``wallets.next_wakeup_at``, from
``rules.next_wakeup``): the predicted instant its available balance reaches zero, the re-issue of
an unanswered stop command (the rules' backoff), the expiry of a hold, the instant it turns low.
The scheduler keeps the earliest of them and sleeps exactly until it, then, in one unit of work,
runs the rules' tick for every wallet due (a ``Tick`` of ``projections.write_path``): stop commands,
re-issues and notices become outbox rows in that transaction, and each wallet's next wake-up is
stored again. After the commit it kicks the relay, which publishes the commands.

It wakes earlier when ``kick`` is set (a writer moved a wake-up earlier) and re-reads the earliest
wake-up at least every ``refresh_interval`` seconds anyway (writers in other processes do not kick
it). Nothing is kept in memory that the database does not hold: after a restart the deadline is
simply read again, and a wake-up missed while the service was down is due at once.

Several schedulers (one per process) may run: ticks lock the wallets they touch, and a tick of a
wallet that another scheduler just ticked decides nothing new (the rules' bookkeeping says the
command is already out).

A wallet whose tick fails for a reason other than a database outage (a bug, a row the rules refuse)
is ticked alone, and if it fails again it is left aside for a while (bounded backoff) and logged,
so that one bad wallet never delays the auto-stop of the others.

Metric: ``billing_autostop_command_delay_seconds{issue="first"|"reissue"}``, seconds from the
predicted instant (the wallet's stored wake-up: the zero instant for a first command, the backoff's
due time for a re-issue) to the stop command written (the commit).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import psycopg
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import Engine

from consumers.nats.names import NatsNames
from consumers.runtime.errors import DEFAULT_BACKOFF_INITIAL_S, DEFAULT_BACKOFF_MAX_S, Backoff, is_transient
from consumers.runtime.loops import ThreadedUnitOfWork, utc_now, wait_any
from ledger.invariants import require
from projections.wakeups import due_wallets_with_instants, earliest_wakeup, stops_issued_at
from projections.write_path import Tick, Written, write

log = logging.getLogger("billing.scheduler")

DEFAULT_REFRESH_INTERVAL_S: Final = 2.0
MAX_REFRESH_INTERVAL_S: Final = 10.0
DEFAULT_BATCH_SIZE: Final = 500
# A wallet whose tick fails on its own is retried after 5 s, doubling up to 5 minutes.
QUARANTINE_INITIAL_S: Final = 5.0
QUARANTINE_MAX_S: Final = 300.0
# The shortest sleep: asyncio timers may fire a hair early; never spin.
MIN_SLEEP_S: Final = 0.001

_DELAY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class SchedulerMetrics:
    """The scheduler's Prometheus metrics, in ``registry`` (the service's, for ``GET /metrics``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stop_delay = Histogram(
            "billing_autostop_command_delay_seconds",
            "Seconds from the predicted instant (zero balance for a first stop command, the backoff's due "
            "time for a re-issue) to the stop command written to the outbox (commit).",
            ["issue"],
            buckets=_DELAY_BUCKETS,
            registry=r,
        )
        self.ticks = Counter("billing_scheduler_ticks", "Scheduler units of work committed.", registry=r)
        self.wallets = Counter("billing_scheduler_wallets_ticked", "Wallets ticked by the scheduler.", registry=r)
        self.stop_commands = Counter(
            "billing_scheduler_stop_commands", "Stop commands written by the scheduler.", ["issue"], registry=r
        )
        self.failures = Counter(
            "billing_scheduler_failures", "Scheduler database work rolled back and retried.", registry=r
        )
        self.quarantined = Gauge(
            "billing_scheduler_quarantined_wallets", "Wallets left aside after their tick failed.", registry=r
        )
        self.next_wakeup = Gauge(
            "billing_scheduler_next_wakeup_timestamp_seconds",
            "Unix time of the earliest wake-up the scheduler waits for (0: none).",
            registry=r,
        )


@dataclass
class TickOutcome:
    """One scheduler unit of work."""

    now: datetime
    wallets: list[str] = field(default_factory=list)
    result: Written | None = None
    delays: list[tuple[str, str, str, float]] = field(default_factory=list)
    """(wallet, resource, "first"/"reissue", seconds from the predicted instant to the commit)."""

    @property
    def messages(self) -> int:
        return 0 if self.result is None else self.result.commands + self.result.notices


# ---------------------------------------------------------------------------------- unit of work


async def tick_due(
    engine: Engine,
    now: datetime,
    *,
    limit: int = DEFAULT_BATCH_SIZE,
    exclude: Sequence[str] = (),
    only: Sequence[str] | None = None,
    metrics: SchedulerMetrics | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> TickOutcome:
    """Tick the wallets due at ``now`` (at most ``limit``; only those of ``only`` when given) in one
    unit of work, commit, and measure each stop command's delay from its predicted instant."""
    outcome = TickOutcome(now=now)
    async with ThreadedUnitOfWork(engine) as tx:
        due = await tx.run(due_wallets_with_instants, now, limit, exclude, only)
        if not due:
            return outcome
        outcome.wallets = [w for w, _ in due]
        outcome.result = await tx.run(_tick, outcome.wallets, now)
        issued = await tx.run(stops_issued_at, outcome.wallets, now) if outcome.result.commands else []
        await tx.commit()
    written = clock()
    predicted = dict(due)
    for wallet, resource, attempts in issued:
        issue = "first" if attempts == 1 else "reissue"
        delay = (written - predicted[wallet]).total_seconds()
        outcome.delays.append((wallet, resource, issue, delay))
        if metrics is not None:
            metrics.stop_delay.labels(issue=issue).observe(max(0.0, delay))
            metrics.stop_commands.labels(issue=issue).inc()
    if metrics is not None:
        metrics.ticks.inc()
        metrics.wallets.inc(len(outcome.wallets))
    return outcome


def _tick(conn: psycopg.Connection[Any], wallet_ids: list[str], now: datetime) -> Written:
    return write(conn, Tick(wallet_ids), now=now)


# ------------------------------------------------------------------------------------------ loop


class _Quarantine:
    """Wallets whose tick failed on its own, each with its own bounded backoff."""

    def __init__(self, metrics: SchedulerMetrics) -> None:
        self._until: dict[str, float] = {}
        self._backoff: dict[str, Backoff] = {}
        self._metrics = metrics

    def add(self, wallet_id: str, now_mono: float, reason: str) -> None:
        backoff = self._backoff.setdefault(wallet_id, Backoff(QUARANTINE_INITIAL_S, QUARANTINE_MAX_S, jitter=0.0))
        delay = backoff.next()
        self._until[wallet_id] = now_mono + delay
        self._metrics.quarantined.set(len(self._until))
        log.error("scheduler: wallet %s left aside for %.0f s: %s", wallet_id, delay, reason)

    def release_expired(self, now_mono: float) -> None:
        for w in [w for w, t in self._until.items() if t <= now_mono]:
            del self._until[w]  # retried; its backoff grows if it fails again
        self._metrics.quarantined.set(len(self._until))

    def forget(self, wallet_ids: Sequence[str]) -> None:
        for w in wallet_ids:
            if w not in self._until:
                self._backoff.pop(w, None)

    @property
    def wallets(self) -> list[str]:
        return sorted(self._until)

    def next_release(self) -> float | None:
        return min(self._until.values(), default=None)


async def run_scheduler(
    engine: Engine,
    nc_or_js: NATS | JetStreamContext | None,
    names: NatsNames,
    stop: asyncio.Event,
    *,
    kick: asyncio.Event | None = None,
    relay_kick: asyncio.Event | None = None,
    refresh_interval: float = DEFAULT_REFRESH_INTERVAL_S,
    batch_size: int = DEFAULT_BATCH_SIZE,
    backoff_initial: float = DEFAULT_BACKOFF_INITIAL_S,
    backoff_max: float = DEFAULT_BACKOFF_MAX_S,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> None:
    """Run the auto-stop scheduler until ``stop`` is set (see the module docstring).

    ``nc_or_js`` and ``names`` are not used (the scheduler writes outbox rows; the relay publishes
    them); they keep the signature of the other components. ``kick``: set it after a commit that may
    have moved a wallet's wake-up earlier (one indexed query per wake-up, coalesced).
    ``relay_kick``: set after every tick that wrote commands or notices. ``registry``: where the
    scheduler's metrics go (the service's registry for ``GET /metrics``). ``clock``: the instant
    ``now`` of the rules (wall-clock UTC; sleeps are real seconds until the deadline by this clock).
    """
    require(0 < refresh_interval <= MAX_REFRESH_INTERVAL_S, f"refresh_interval {refresh_interval}")
    require(0 < batch_size <= 10_000, f"batch_size {batch_size}")
    metrics = SchedulerMetrics(registry)
    ticker = _Ticker(engine, batch_size, metrics, clock)
    loop = asyncio.get_running_loop()
    backoff = Backoff(backoff_initial, backoff_max)
    deadline: datetime | None = None
    read_at = -math.inf
    log.info("auto-stop scheduler started (refresh %.1f s, batch %d)", refresh_interval, batch_size)
    while not stop.is_set():
        try:
            if kick is not None and kick.is_set():
                kick.clear()
                read_at = -math.inf
            ticker.quarantine.release_expired(loop.time())
            if loop.time() - read_at >= refresh_interval:
                deadline = await _read_deadline(engine, ticker.quarantine.wallets)
                read_at = loop.time()
                metrics.next_wakeup.set(deadline.timestamp() if deadline else 0)
            now = clock()
            if deadline is not None and deadline <= now:
                written = await ticker.tick(now)
                read_at = -math.inf  # the wake-ups just changed
                if written and relay_kick is not None:
                    relay_kick.set()
            else:
                wait = refresh_interval - (loop.time() - read_at)
                await wait_any(stop, kick, seconds=_sleep_s(wait, deadline, ticker.quarantine, clock))
                continue
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.failures.inc()
            read_at = -math.inf
            await wait_any(stop, seconds=backoff.next_logged(log, "scheduler: database work failed", exc))
            continue
        if backoff.failures:
            log.info("scheduler recovered after %d failures", backoff.failures)
        backoff.reset()
    log.info("auto-stop scheduler stopped")


def _sleep_s(wait: float, deadline: datetime | None, quarantine: _Quarantine, clock: Callable[[], datetime]) -> float:
    """How long to sleep: until the refresh (``wait``), the deadline or a quarantine's end, whichever
    comes first, and never less than MIN_SLEEP_S (never spin)."""
    if deadline is not None:
        wait = min(wait, (deadline - clock()).total_seconds())
    release = quarantine.next_release()
    if release is not None:
        wait = min(wait, release - asyncio.get_running_loop().time())
    return max(wait, MIN_SLEEP_S)


async def _read_deadline(engine: Engine, exclude: Sequence[str]) -> datetime | None:
    async with ThreadedUnitOfWork(engine) as tx:
        return await tx.run(earliest_wakeup, exclude)


class _Ticker:
    def __init__(
        self, engine: Engine, batch_size: int, metrics: SchedulerMetrics, clock: Callable[[], datetime]
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.batch_size = batch_size
        self.metrics = metrics
        self.quarantine = _Quarantine(metrics)

    async def tick(self, now: datetime) -> int:
        """Tick what is due at ``now``; returns the outbox rows written. A failure that is not an
        outage is narrowed down to the wallets causing it, which are left aside for a while."""
        try:
            outcome = await tick_due(
                self.engine,
                now,
                limit=self.batch_size,
                exclude=self.quarantine.wallets,
                metrics=self.metrics,
                clock=self.clock,
            )
        except Exception as exc:
            if is_transient(exc):
                raise
            log.warning("scheduler: tick failed (%s: %s); ticking the due wallets one by one", type(exc).__name__, exc)
            return await self._one_by_one(now)
        self._after(outcome)
        return outcome.messages

    async def _one_by_one(self, now: datetime) -> int:
        async with ThreadedUnitOfWork(self.engine) as tx:
            due = await tx.run(due_wallets_with_instants, now, self.batch_size, self.quarantine.wallets)
        written = 0
        for wallet_id, _ in due:
            try:
                outcome = await tick_due(
                    self.engine,
                    now,
                    limit=1,
                    exclude=self.quarantine.wallets,
                    only=[wallet_id],
                    metrics=self.metrics,
                    clock=self.clock,
                )
            except Exception as exc:
                if is_transient(exc):
                    raise
                self.quarantine.add(wallet_id, asyncio.get_running_loop().time(), f"{type(exc).__name__}: {exc}")
                continue
            self._after(outcome)
            written += outcome.messages
        return written

    def _after(self, outcome: TickOutcome) -> None:
        if outcome.result is None:
            return
        self.quarantine.forget(outcome.wallets)
        for wallet, resource, issue, delay in outcome.delays:
            log.info(
                "stop command (%s) for %s/%s written %.3f s after its predicted instant", issue, wallet, resource, delay
            )
        # A wake-up still due after its tick would make the loop spin: leave that wallet aside.
        mono = asyncio.get_running_loop().time()
        for wallet, wakeup in outcome.result.next_wakeups.items():
            if wakeup is not None and wakeup <= outcome.now:
                self.quarantine.add(wallet, mono, f"its next wake-up {wakeup.isoformat()} is still due after a tick")
