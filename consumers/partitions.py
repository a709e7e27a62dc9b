"""The partitioned intake (DESIGN section 8): N durable consumers, one active owner per partition.

The NATS subject mapping (deploy/nats/accounts.conf)
``billing.in.* -> billing.in.{{partition(N,1)}}.{{wildcard(1)}}`` stores a wallet's usage facts as
``billing.in.<p>.<walletId>`` with ``p = FNV-1a-32(walletId) mod N``. With
``BILLING_INTAKE_PARTITIONS=N`` every instance of the service can pull any of the N durable
consumers ``billing-intake-<p>`` (filter ``billing.in.<p>.*``), but at any time exactly one instance
pulls each, so a wallet always has a single writer, and its facts are applied in stream order.

**Who owns a partition: a PostgreSQL session-level advisory lock.** Partition ``p`` belongs to the
instance whose dedicated connection holds ``pg_try_advisory_lock(<class>, p)`` (``<class>`` is derived
from the namespace and the durable name, so two services or test runs sharing a database never
collide). The lock lives exactly as long as that connection: a ``kill -9``'d instance's sockets close,
PostgreSQL frees its locks at once, and the survivors take its partitions at their next rebalance
(``BILLING_INTAKE_REBALANCE_S``, 2 s by default). TCP keepalives bound how long a silently vanished host
(no FIN) keeps them. The exclusion sits where the writes happen: an instance that loses NATS but keeps
the database still owns its partitions and nobody else writes them; one that loses the connection of a
lock stops that partition's intake at its next check.

**Fair share.** Each instance also holds a *shared* advisory lock ``(<member class>, 0)`` on its own
connection while it runs; the live instances are the holders of that lock (``pg_locks``), no table and
no heartbeat to expire. Every ``rebalance_s`` (with jitter) an instance:

1. checks the connection of every lock it holds (``SELECT 1``, bounded); a lost one stops that
   partition's intake (the batch in hand is finished; the wallet row locks of
   ``projections.processor`` keep that correct even if another instance has already started);
2. counts the live instances ``L`` and computes its share ``ceil(N / L)``;
3. releases partitions beyond its share (highest first): it stops their intake (the batch in hand is
   committed and acked, the prefetched messages handled), and only then unlocks;
4. below its share, tries the partitions nobody holds (per ``pg_locks``), starting at an offset of its
   own so that instances starting together do not all reach for partition 0, with
   ``pg_try_advisory_lock`` as the arbiter.

The shares sum to at least N, so nothing stays unowned once the live count is right; with 2 instances
and N=8 each holds 4, and when one dies the other holds all 8 within one rebalance period.

The owner of partition 0 also runs ``billing-intake-strays`` (filters ``billing.in.*`` and
``billing.in.*.*.>``): the subjects no partition consumer takes. Everything it receives is dead-lettered
as ``subject_mismatch`` with a detail that says what is wrong (typically: the server has no mapping),
instead of piling up unread in the stream.

**Why not JetStream pinned-client priority groups** (``priority_policy: pinned_client``, nats-server
2.11+; the installed 2.15.1 has them): nats-py 2.16 has no API for them (no ``priority_groups`` in
``ConsumerConfig``, no ``group``/pin id in pulls), so the raw pull loop would have to carry the pin
protocol by hand; the pin moves on the *NATS* side only (an instance cut off from PostgreSQL but not from
NATS stays pinned and holds its batches, while one cut off from NATS but not from PostgreSQL can still
be mid-commit when the pin moves); and the handover time is the pinned TTL rather than a closed socket.
The advisory lock puts the exclusion next to the writes and costs one idle connection per partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import psycopg
from nats.aio.client import Client
from prometheus_client import Counter, Gauge
from sqlalchemy import Engine

from consumers.intake import ConsumerSpec, Intake, IntakeConfig
from consumers.metrics import Metrics
from consumers.names import NatsNames, fnv1a_32, partition_of

__all__ = [
    "PartitionLocks",
    "PartitionedIntake",
    "fair_share",
    "fnv1a_32",
    "lock_classes",
    "partition_of",
    "run_partitioned",
]

log = logging.getLogger("billing.partitions")

LOCK_QUERY_TIMEOUT_S: Final = 5.0
"""A lock query (check, count, try) that takes longer counts as a lost connection."""
CONNECT_TIMEOUT_S: Final = 5
# libpq TCP keepalives of the lock connections: a host that vanished without closing its sockets
# loses its locks after about idle + interval * count seconds.
KEEPALIVES_IDLE_S: Final = 5
KEEPALIVES_INTERVAL_S: Final = 2
KEEPALIVES_COUNT: Final = 3
RELEASE_WITHIN_S: Final = 30.0
"""How long a released partition's intake gets to finish its batch before it is cancelled."""
RESTART_DELAY_S: Final = 1.0
RESTART_DELAY_MAX_S: Final = 15.0
"""Back-off of a partition's intake that failed (e.g. its consumer could not be created during a
NATS leader election): doubling, capped; the partition is kept meanwhile."""
MEMBER_KEY: Final = 0


def lock_classes(names: NatsNames, durable: str) -> tuple[int, int]:
    """(partition class, member class): the first key of ``pg_advisory_lock(int4, int4)``.

    Derived from the namespace and the durable name, so that services or test runs sharing one
    database never share locks. Non-negative, so that ``pg_locks.classid`` (an oid) shows it as is."""
    digest = hashlib.sha256(f"billing-intake\x00{names.namespace}\x00{durable}".encode()).digest()
    partition_class = int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
    member_class = int.from_bytes(digest[4:8], "big") & 0x7FFFFFFF
    if member_class == partition_class:
        member_class ^= 1
    return partition_class, member_class


def fair_share(partitions: int, live: int) -> int:
    """Partitions one of ``live`` instances should own: ``ceil(partitions / live)``."""
    return math.ceil(partitions / max(live, 1))


def _conninfo(engine: Engine) -> str:
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


_LOCKS_OF_CLASS = (
    "SELECT objid::bigint FROM pg_locks"
    " WHERE locktype = 'advisory' AND granted AND objsubid = 2"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND classid = %s::bigint::oid"
)


class PartitionLocks:
    """The PostgreSQL side: the membership lock and one session advisory lock per held partition,
    each on its own autocommit connection (closing the connection releases the lock)."""

    def __init__(self, conninfo: str, names: NatsNames, durable: str, instance: str) -> None:
        self._conninfo = conninfo
        self.partition_class, self.member_class = lock_classes(names, durable)
        self._app_name = f"billing-intake {instance}"[:63]
        self._member: psycopg.AsyncConnection[Any] | None = None
        self._probe: psycopg.AsyncConnection[Any] | None = None
        self._held: dict[int, psycopg.AsyncConnection[Any]] = {}

    @property
    def held(self) -> set[int]:
        return set(self._held)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        return await asyncio.wait_for(
            psycopg.AsyncConnection.connect(
                self._conninfo,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name=self._app_name,
                keepalives=1,
                keepalives_idle=KEEPALIVES_IDLE_S,
                keepalives_interval=KEEPALIVES_INTERVAL_S,
                keepalives_count=KEEPALIVES_COUNT,
            ),
            timeout=CONNECT_TIMEOUT_S + 1,
        )

    @staticmethod
    async def _discard(conn: psycopg.AsyncConnection[Any] | None) -> None:
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=LOCK_QUERY_TIMEOUT_S)

    async def _scalar(self, conn: psycopg.AsyncConnection[Any], sql: str, params: Sequence[Any] = ()) -> Any:
        async def go() -> Any:
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
            return row[0] if row else None

        return await asyncio.wait_for(go(), timeout=LOCK_QUERY_TIMEOUT_S)

    # --- membership -------------------------------------------------------------------------------

    async def join(self) -> None:
        """Hold the shared membership lock (on a fresh connection if the old one is gone)."""
        if self._member is not None and not self._member.closed:
            return
        conn = await self._connect()
        try:
            ok = await self._scalar(conn, "SELECT pg_try_advisory_lock_shared(%s, %s)", (self.member_class, MEMBER_KEY))
        except BaseException:
            await self._discard(conn)
            raise
        if not ok:  # nobody takes it exclusively; a refusal means something else uses these keys
            await self._discard(conn)
            raise RuntimeError(f"advisory lock ({self.member_class}, {MEMBER_KEY}) held exclusively by someone else")
        self._member = conn

    async def live_instances(self) -> int | None:
        """Instances holding the membership lock (this one included); None if our membership
        connection is gone (it is reopened by the next :meth:`join`)."""
        if self._member is None:
            return None
        try:
            count = await self._scalar(
                self._member, f"SELECT count(*) FROM ({_LOCKS_OF_CLASS} AND objid = %s) m", (self.member_class, 0)
            )
        except Exception as exc:
            log.warning("membership connection lost (%s): rejoining", exc)
            await self._discard(self._member)
            self._member = None
            return None
        return max(int(count), 1)

    async def taken(self) -> set[int] | None:
        """Partitions some instance holds (per ``pg_locks``); None if that cannot be read now."""
        if self._member is None:
            return None
        try:

            async def go() -> set[int]:
                assert self._member is not None
                cur = await self._member.execute(_LOCKS_OF_CLASS, (self.partition_class,))
                return {int(r[0]) for r in await cur.fetchall()}

            return await asyncio.wait_for(go(), timeout=LOCK_QUERY_TIMEOUT_S)
        except Exception as exc:
            log.warning("could not read the partition locks (%s)", exc)
            return None

    # --- partitions -------------------------------------------------------------------------------

    async def try_acquire(self, partition: int) -> bool:
        """Take partition ``p``'s lock if nobody holds it; the connection that took it is kept."""
        if partition in self._held:
            return True
        try:
            if self._probe is None or self._probe.closed:
                self._probe = await self._connect()
            got = await self._scalar(
                self._probe, "SELECT pg_try_advisory_lock(%s, %s)", (self.partition_class, partition)
            )
        except Exception as exc:
            log.warning("could not try the lock of partition %d (%s)", partition, exc)
            await self._discard(self._probe)
            self._probe = None
            return False
        if not got:
            return False
        self._held[partition], self._probe = self._probe, None
        return True

    async def still_held(self, partition: int) -> bool:
        """Whether the connection holding ``p``'s lock still answers (then the lock is still ours)."""
        conn = self._held.get(partition)
        if conn is None:
            return False
        try:
            return bool(await self._scalar(conn, "SELECT 1") == 1)
        except Exception as exc:
            log.error("the connection holding partition %d's lock is gone (%s)", partition, exc)
            await self._discard(self._held.pop(partition, None))
            return False

    async def release(self, partition: int) -> None:
        conn = self._held.pop(partition, None)
        if conn is None:
            return
        with contextlib.suppress(Exception):  # closing the connection releases the lock anyway
            await self._scalar(conn, "SELECT pg_advisory_unlock(%s, %s)", (self.partition_class, partition))
        await self._discard(conn)

    async def close(self) -> None:
        for p in list(self._held):
            await self.release(p)
        await self._discard(self._probe)
        await self._discard(self._member)
        self._probe = self._member = None


@dataclass
class _Owned:
    partition: int
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class _OwnershipMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.owned = Gauge(
            "billing_intake_partitions_owned", "Partitions of billing.in whose consumer this instance runs.", registry=r
        )
        self.partition = Gauge(
            "billing_intake_partition_owned",
            "1 while this instance owns the partition (its PostgreSQL advisory lock), else 0.",
            ["partition"],
            registry=r,
        )
        self.live = Gauge(
            "billing_intake_live_instances", "Instances of the service holding the membership lock.", registry=r
        )
        self.changes = Counter(
            "billing_intake_partition_changes",
            "Partition ownership changes of this instance (acquired, released, lost).",
            ["change"],
            registry=r,
        )


class PartitionedIntake:
    """Owns a fair share of the N partitions and runs one :class:`~consumers.intake.Intake` per
    owned partition (see the module's documentation)."""

    def __init__(
        self,
        nc: Client,
        engine: Engine,
        names: NatsNames,
        config: IntakeConfig,
        partitions: int,
        *,
        rebalance_s: float = 2.0,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] | None = None,
        relay_kick: asyncio.Event | None = None,
        scheduler_kick: asyncio.Event | None = None,
        ready: asyncio.Event | None = None,
        conninfo: str | None = None,
        instance: str | None = None,
    ) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, not {partitions}")
        self._nc, self._engine, self._names, self._config = nc, engine, names, config
        self._partitions = partitions
        self._rebalance_s = rebalance_s
        self._metrics = metrics or Metrics()
        self._ownership = _OwnershipMetrics(self._metrics)
        self._clock, self._relay_kick, self._scheduler_kick, self._ready = clock, relay_kick, scheduler_kick, ready
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self._locks = PartitionLocks(conninfo or _conninfo(engine), names, config.durable, self.instance)
        # Where this instance starts looking for free partitions: spread, so that instances starting
        # together do not race for the same ones.
        offset = random.randrange(partitions)
        self._order = [(offset + i) % partitions for i in range(partitions)]
        self._owned: dict[int, _Owned] = {}
        for p in range(partitions):
            self._ownership.partition.labels(str(p)).set(0)

    @property
    def owned(self) -> list[int]:
        return sorted(self._owned)

    # --- lifetime ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "partitioned intake: %d partitions of %s (durables %s-<p>), instance %s, rebalance every %.1f s,"
            " advisory lock classes %d (partitions) / %d (members)",
            self._partitions,
            self._names.in_stream,
            self._config.durable,
            self.instance,
            self._rebalance_s,
            self._locks.partition_class,
            self._locks.member_class,
        )
        try:
            delay = 0.5
            while not stop.is_set():
                try:
                    await self._locks.join()
                    break
                except Exception as exc:
                    log.warning("cannot join the intake's members (%s): retrying in %.1f s", exc, delay)
                    await _sleep_unless(stop, delay)
                    delay = min(delay * 2, 10.0)
            if self._ready is not None and not stop.is_set():
                self._ready.set()
            while not stop.is_set():
                try:
                    await self._rebalance(stop)
                except Exception:
                    log.exception("rebalance failed; trying again")
                await _sleep_unless(stop, self._rebalance_s * random.uniform(0.75, 1.25))
        finally:
            try:
                await self._stop_all()
            finally:
                await self._locks.close()
                self._ownership.owned.set(0)
            log.info("partitioned intake stopped (instance %s)", self.instance)

    async def _stop_all(self) -> None:
        ps = list(self._owned)
        await self._stop_partitions(ps, why="shutdown")
        for p in ps:
            await self._locks.release(p)

    # --- one round --------------------------------------------------------------------------------

    async def _rebalance(self, stop: asyncio.Event) -> None:
        ps = sorted(self._owned)
        held = await asyncio.gather(*(self._locks.still_held(p) for p in ps))
        lost = [p for p, ok in zip(ps, held, strict=True) if not ok]
        if lost:
            self._ownership.changes.labels("lost").inc(len(lost))
            await self._stop_partitions(lost, why="its lock's database connection was lost")
        live = await self._locks.live_instances()
        if live is None:
            with contextlib.suppress(Exception):
                await self._locks.join()
            return
        self._ownership.live.set(live)
        share = fair_share(self._partitions, live)
        extras = sorted(self._owned, reverse=True)[: max(len(self._owned) - share, 0)]
        if extras and not stop.is_set():
            # Their intakes first (each commits and acks its batch in hand), then the locks.
            await self._stop_partitions(extras, why=f"rebalance: {live} live instances, share {share}")
            for p in extras:
                await self._locks.release(p)
            self._ownership.changes.labels("released").inc(len(extras))
        if len(self._owned) >= share or stop.is_set():
            return
        taken = await self._locks.taken()
        if taken is None:
            return
        for p in self._order:
            if len(self._owned) >= share or stop.is_set():
                break
            if p in taken or p in self._owned:
                continue
            if await self._locks.try_acquire(p):
                self._start_partition(p)
                self._ownership.changes.labels("acquired").inc()
                log.info(
                    "partition %d acquired by %s (now %s; %d live instance(s), share %d)",
                    p,
                    self.instance,
                    self.owned,
                    live,
                    share,
                )

    def _start_partition(self, p: int) -> None:
        owned = _Owned(p)
        specs = [ConsumerSpec.partition(self._names, self._config, p, self._partitions)]
        if p == 0:
            specs.append(ConsumerSpec.strays(self._names, self._config, self._partitions))
        owned.tasks = [
            asyncio.create_task(self._run_consumer(spec, owned.stop), name=f"billing-intake-{spec.durable}")
            for spec in specs
        ]
        self._owned[p] = owned
        self._ownership.partition.labels(str(p)).set(1)
        self._ownership.owned.set(len(self._owned))

    async def _stop_partitions(self, ps: Sequence[int], *, why: str) -> None:
        """Stop the intakes of these partitions together, each finishing its batch in hand (bounded,
        then cancelled); the caller releases the locks afterwards."""
        owned = [self._owned[p] for p in ps if p in self._owned]
        for o in owned:
            o.stop.set()
        tasks = [t for o in owned for t in o.tasks]
        try:
            _, pending = await asyncio.wait(tasks, timeout=RELEASE_WITHIN_S) if tasks else (set(), set())
            if pending:
                log.warning(
                    "%d partition intake(s) still running after %.0f s: cancelled", len(pending), RELEASE_WITHIN_S
                )
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=5)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        finally:
            for o in owned:
                self._owned.pop(o.partition, None)
                self._ownership.partition.labels(str(o.partition)).set(0)
            self._ownership.owned.set(len(self._owned))
        log.info(
            "partition(s) %s given up by %s (%s; now %s)", [o.partition for o in owned], self.instance, why, self.owned
        )

    async def _run_consumer(self, spec: ConsumerSpec, stop: asyncio.Event) -> None:
        """One partition's intake until ``stop``; restarted with a back-off if it fails."""
        delay = RESTART_DELAY_S
        while not stop.is_set():
            intake = Intake(
                self._nc,
                self._engine,
                self._names,
                self._config,
                metrics=self._metrics,
                clock=self._clock,
                relay_kick=self._relay_kick,
                scheduler_kick=self._scheduler_kick,
                spec=spec,
            )
            try:
                await intake.run(stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("intake %s failed (%r): restarting in %.1f s", spec.durable, exc, delay, exc_info=exc)
                await _sleep_unless(stop, delay)
                delay = min(delay * 2, RESTART_DELAY_MAX_S)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def run_partitioned(
    nc: Client,
    engine: Engine,
    names: NatsNames,
    config: IntakeConfig,
    partitions: int,
    stop: asyncio.Event,
    *,
    rebalance_s: float = 2.0,
    metrics: Metrics | None = None,
    clock: Callable[[], datetime] | None = None,
    relay_kick: asyncio.Event | None = None,
    scheduler_kick: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the partitioned intake until ``stop`` is set; then stop every owned partition's intake
    (each finishes its batch in hand) and release the locks."""
    await PartitionedIntake(
        nc,
        engine,
        names,
        config,
        partitions,
        rebalance_s=rebalance_s,
        metrics=metrics,
        clock=clock,
        relay_kick=relay_kick,
        scheduler_kick=scheduler_kick,
        ready=ready,
    ).run(stop)
