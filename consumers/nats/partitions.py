"""Who pulls each durable consumer of ``billing.in``: one owner at a time (DESIGN sections 8 and 10).

A wallet's facts must be applied in stream order: a ``gpu.rental.started`` applied before the wallet's
credit makes the rules see a running pod on a $0 wallet and emit a ``balance_exhausted`` stop command for
a funded wallet. Two instances pulling one durable break that order (each takes the next messages while
the other is still in its transaction), so every durable has at most one puller, in both modes:

* **unpartitioned** (``BILLING_INTAKE_PARTITIONS=0``, the default): the durable ``billing-intake`` on
  ``billing.in.>`` is one owned *unit* (unit 0). One instance pulls it; the others stand by (ready,
  serving HTTP, admission, relay and scheduler) and take it over when the owner dies or releases it;
* **partitioned** (``BILLING_INTAKE_PARTITIONS=N``): the NATS subject mapping (deploy/nats/accounts.conf)
  ``billing.in.* -> billing.in.{{partition(N,1)}}.{{wildcard(1)}}`` stores a wallet's usage facts as
  ``billing.in.<p>.<walletId>`` with ``p = FNV-1a-32(walletId) mod N``; each of the N durables
  ``billing-intake-<p>`` (filter ``billing.in.<p>.*``) is a unit, and the instances share them.

**Who owns a unit: a PostgreSQL session-level advisory lock.** Unit ``p`` belongs to the instance whose
dedicated connection holds ``pg_try_advisory_lock(<class>, p)`` (``<class>`` is derived from the
namespace, the durable name and the mode, so two services, two test runs or the two modes sharing a
database never collide). The lock lives exactly as long as that connection: a ``kill -9``'d instance's
sockets close, PostgreSQL frees its locks at once, and the survivors take its units at their next
rebalance (``BILLING_INTAKE_REBALANCE_S``, 2 s by default). TCP keepalives bound how long a silently
vanished host (no FIN) keeps them. The exclusion sits where the writes happen: an instance that loses
NATS but keeps the database still owns its units and nobody else writes them; one that loses the
connection of a lock stops that unit's intake at its next check.

**Fair share.** Each instance also holds a *shared* advisory lock ``(<member class>, 0)`` on its own
connection while it runs; the live instances are the holders of that lock (``pg_locks``), no table and
no heartbeat to expire (with ``BILLING_INTAKE_WRITERS``, each writer process of an instance is a member
of its own, consumers/service/writers.py: "instance" below means any member). Every ``rebalance_s``
(with jitter; every ``UNDER_SHARE_POLL_S`` at most while it owns less than its share, so that freed
units are taken within a fraction of a second) an instance:

1. checks the connection of every lock it holds (``SELECT 1``, bounded); a lost one stops that unit's
   intake (the batch in hand is finished; the wallet row locks of ``projections.processor`` keep that
   correct even if another instance has already started);
2. counts the live instances ``L`` and computes its share ``ceil(units / L)``;
3. releases units beyond its share (highest first): it stops their intake (the batch in hand is
   committed and acked, the prefetched messages handled), and only then unlocks;
4. below its share, tries the units nobody holds (per ``pg_locks``), starting at an offset of its own so
   that instances starting together do not all reach for unit 0, with ``pg_try_advisory_lock`` as the
   arbiter.

The shares sum to at least the number of units, so nothing stays unowned once the live count is right;
with 2 instances and N=8 each holds 4, and when one dies the other holds all 8 within one rebalance
period. Unpartitioned, the share of every instance is the one unit: whoever takes the lock first pulls,
and a standby takes over within one rebalance period of the owner's death or release.

Partitioned, the owner of partition 0 also runs ``billing-intake-strays`` (filters ``billing.in.*`` and
``billing.in.*.*.>``): the subjects no partition consumer takes. Everything it receives is dead-lettered
as ``subject_mismatch`` with a detail that says what is wrong (typically: the server has no mapping),
instead of piling up unread in the stream. Its order does not matter (it only refuses).

**Order across a change of owner.** JetStream keeps a delivered, un-acked message *pending* until its
``ack_wait`` expires, then queues it for redelivery, and serves a pull from that redelivery queue first
(the expired ones in stream order), new messages after. An owner that stops cleanly (a rebalance,
SIGTERM) settles everything delivered to it before it unlocks: committed and acked, dead-lettered, or
nak-ed (immediately: redelivered first; or with a delay: a reading whose rental has not started yet,
*parked* on purpose). An owner that dies leaves its batch in hand and its prefetch pending for up to
``ack_wait`` (30 s), while the next owner's first pulls would get the *newer* messages at once: the same
reordering as two pullers (bug #7: a wallet's rental start applied before its credit).

So before its first pull, a new owner whose predecessor did not release the unit cleanly, on a
consumer with ``num_ack_pending > 0``, has the server **queue the dead owner's deliveries for
redelivery now**: it updates the durable's ``ack_wait`` to ``TAKEOVER_ACK_WAIT_S`` (0.25 s), waits that
long plus ``TAKEOVER_MARGIN_S``, sets ``ack_wait`` back, and only then pulls. About 0.5 s after the
takeover instead of ``ack_wait`` (30.5 s); fault suite rows 11-13
(``tests/integration/test_cluster.py``) check it, and the takeover times measured there are in
bench/README.md.

* *Why that requeues exactly the dead owner's messages.* nats-server decides expiry on every check of
  its pending timer as ``now - last delivery >= the consumer's current ack_wait``, and an update of
  ``ack_wait`` re-arms that timer at 100 ms (``consumer.updateConfig``, ``checkPending``; tried here on
  2.9.10 and 2.15.1). Every delivery to the dead owner, and every in-progress ack it sent, happened
  before it died, it died before its lock was free, and the server drops a pull request whose
  subscriber is gone (nobody else pulls meanwhile): so within ``TAKEOVER_ACK_WAIT_S`` (+ the 100 ms)
  of the update, all of them are in the redelivery queue. Nothing acked is touched: the server's own
  pending set is what comes back, with its delivery counts (``max_deliver`` still counts), and the
  consumer keeps its name, sequences and ack floor.
* *Why in stream order.* Each check moves what has expired into the queue sorted by stream sequence;
  deliveries expire in the order of their last delivery, and an owner's first deliveries come in
  stream order (a batch and the prefetch after it): so the queue holds the dead owner's messages in
  stream order, ahead of everything not yet delivered, which comes after. The only messages whose
  place in the queue is not their stream position are those already being retried (a *parked*
  reading, a message nak-ed after a processing failure): their delayed redelivery already puts them
  behind newer messages in normal running, by design (a reading waits for its rental's start).
* *What comes back twice.* Exactly what waiting for ``ack_wait`` brought back: the dead owner's
  un-acked deliveries, some of them committed before it died (between its commit and its ack). An
  accepted or duplicate event is then a duplicate by the log's ``(source, id)`` key; a refused input
  with a readable identity is recorded once by ``rejected_inputs``' ``(source, event_id, reason)``
  key, and its dead letter is dropped by the DLQ stream's duplicate window (``Nats-Msg-Id`` of the
  refusal); one without (not JSON, not UTF-8) is recognised by its reason, subject and bytes within
  24 hours (``record_rejections``) and not recorded again. That window is a commit-to-ack gap of a
  few milliseconds per crash, as before; nothing acked is delivered again.
* *Parked readings.* A nak with a delay is stored by the server as a last delivery of
  ``now + delay - ack_wait``; with ``ack_wait`` short for a moment, a reading with less than
  ``ack_wait - TAKEOVER_ACK_WAIT_S`` of its delay left comes back at the takeover instead: one
  delivery early, its count kept, then parked again by the intake with the delay of its count. So an
  unclean takeover shortens a parked reading's life before its ``not_started`` dead letter by at most
  one delivery; a longer delay is untouched (its deadline is the old one once ``ack_wait`` is back).
* *Clean or not: the table* ``intake_owners`` *(stream, durable) -> owner, state.* ``num_ack_pending``
  alone cannot tell a dead owner's batch from parked readings, which stay pending after the cleanest of
  releases; requeueing at every rebalance and deploy would bring parked readings back for nothing. So,
  on the lock's own connection (only the holder writes): on acquiring, the owner reads the row and marks
  it ``held`` by a token unique to this acquisition, before its first pull; after a clean stop (its
  :class:`~consumers.nats.intake.Intake` returned with ``unsettled`` False: everything delivered settled,
  acks flushed) it marks it ``released`` (where the owner is still its token), and only then unlocks.
  A new owner pulls at once when it finds ``released``, or its own earlier token for a unit it stopped
  cleanly but could not mark (its lock's connection had dropped); anything else (``held`` by another:
  that one died or was cut off; no row: the first run) counts as unclean. A row written by a dead
  owner is harmless: the next owner overwrites it. A clean hand-over never touches the consumer.
* *Failures.* ``ack_wait`` is set back before any pull, whatever happens; if that update fails the
  unit's intake fails before pulling and is restarted (back-off), and the next attempt, or the next
  owner, starts with :func:`~consumers.nats.intake.ensure_consumer`, which sets the configured ``ack_wait``
  again (a short one left by an owner that died in the middle is recognised and replaced). If the
  server refuses the short ``ack_wait``, or the consumer has a ``backoff`` (its deadlines are not
  ``ack_wait``), the new owner falls back to waiting until they have expired by themselves (the
  consumer's ``ack_wait`` + ``TAKEOVER_MARGIN_S`` after the takeover, ending earlier if
  ``num_ack_pending`` drops to 0), as before. An owner that was only cut off from PostgreSQL (alive,
  still finishing its batch) has its batch requeued too: both apply it, the wallet row locks of
  ``projections.processor`` serialise them, and each applies a wallet's events in stream order, so
  the second is a no-op.
* *Alternatives weighed.* Deleting the durable and recreating it at ``ack_floor + 1`` (option (a) of
  issue 13), or a consumer per owner epoch created at its predecessor's ack floor (option (b)): with
  explicit acks the floor stays behind the oldest un-acked message, which is a parked reading minutes
  old as often as not, so everything acked after it is delivered and processed again. For an accepted
  event that is a no-op by the ``(source, id)`` key, but not for every refused input: an input with no
  readable identity (not JSON, not UTF-8) has no ``(source, id, reason)`` key in ``rejected_inputs``
  and would be recorded again, and a refusal decided by state (``invalid_transition``: a resume
  before its pause) would be decided again against a later state and could be applied. The recreated
  consumer also starts every delivery count at 1 (a parked reading would never reach ``max_deliver``
  and its ``not_started`` dead letter across repeated crashes) and forgets the delays; and deleting a
  durable races with an owner that is only cut off (its restart would recreate it with
  ``DeliverPolicy.ALL``: the whole stream again). Nak-ing the dead owner's messages from the new
  owner is not possible (JetStream takes an ack only on the reply subject of that delivery, which
  only the dead owner knew). Waiting for ``ack_wait`` (what this did before) keeps order but stalls a
  crashed unit for 30.5 s.

**Why not JetStream pinned-client priority groups** (``priority_policy: pinned_client``, nats-server
2.11+; the installed 2.15.1 has them): nats-py 2.16 has no API for them (no ``priority_groups`` in
``ConsumerConfig``, no ``group``/pin id in pulls), so the raw pull loop would have to carry the pin
protocol by hand; the pin moves on the *NATS* side only (an instance cut off from PostgreSQL but not from
NATS stays pinned and holds its batches, while one cut off from NATS but not from PostgreSQL can still
be mid-commit when the pin moves); the handover time is the pinned TTL rather than a closed socket; and
a new pinned client still gets newer messages before the old one's un-acked ones expire. The advisory
lock puts the exclusion next to the writes and costs one idle connection per owned unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import random
import secrets
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import psycopg
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo
from nats.js.errors import BadRequestError
from prometheus_client import Counter, Gauge
from psycopg.sql import SQL, Identifier
from sqlalchemy import Engine

from consumers.nats.intake import ConsumerSpec, Intake, IntakeConfig, ensure_consumer
from consumers.nats.names import NatsNames, fnv1a_32, partition_of
from consumers.runtime.errors import Backoff
from consumers.runtime.loops import wait_any
from consumers.runtime.metrics import Metrics
from ledger.invariants import fail

__all__ = [
    "OwnedIntake",
    "PartitionLocks",
    "fair_share",
    "fnv1a_32",
    "lock_classes",
    "partition_of",
    "requeue_unacked",
    "run_owned",
]

log = logging.getLogger("billing.partitions")

LOCK_QUERY_TIMEOUT_S: Final = 5.0
"""A lock query (check, count, try, mark) that takes longer counts as a lost connection."""
CONNECT_TIMEOUT_S: Final = 5
# libpq TCP keepalives of the lock connections: a host that vanished without closing its sockets
# loses its locks after about idle + interval * count seconds.
KEEPALIVES_IDLE_S: Final = 5
KEEPALIVES_INTERVAL_S: Final = 2
KEEPALIVES_COUNT: Final = 3
RELEASE_WITHIN_S: Final = 30.0
"""How long a released unit's intake gets to finish its batch before it is cancelled."""
RESTART_DELAY_S: Final = 1.0
RESTART_DELAY_MAX_S: Final = 15.0
"""Back-off of a unit's intake that failed (e.g. its consumer could not be created during a NATS
leader election): doubling, capped; the unit is kept meanwhile."""
# Joining the intake's members (the membership lock) is retried after this, doubling to the max.
JOIN_RETRY_FIRST_S: Final = 0.5
JOIN_RETRY_MAX_S: Final = 10.0
TAKEOVER_ACK_WAIT_S: Final = 0.25
"""The durable's ack_wait for a moment after an unclean takeover (see the module's documentation):
the dead owner's un-acked deliveries expire and are queued for redelivery within this much of the
update. Below the smallest ack_wait the settings allow (1 s), so one left behind is recognised."""
TAKEOVER_MARGIN_S: Final = 0.2
"""Waited beyond TAKEOVER_ACK_WAIT_S (or, in the fallback, beyond the consumer's ack_wait): the
server's pending timer is re-armed 100 ms after the update and fires a millisecond after an expiry,
plus scheduling on a loaded machine."""
TAKEOVER_UPDATES: Final = 3
"""Tries of each ack_wait update of a takeover (a NATS blip); then the unit's intake fails, before
any pull, and is restarted with a back-off."""
TAKEOVER_POLL_S: Final = 0.5
"""During the fallback wait, how often the consumer's un-acked count is read (0: nothing to wait for)."""
# An instance that owns less than its share comes back this often (at most) instead of every
# rebalance_s: a unit freed by a clean shutdown, a crash or a scale-down is taken within a fraction of
# a second rather than a whole period, and instances that start together (or a whole cluster whose
# units come free at once) pull within about this much of each other. Owning its share, an instance
# keeps the full period. The cost is two small queries on the lock connection per poll.
UNDER_SHARE_POLL_S: Final = 0.25
MEMBER_KEY: Final = 0

RELEASED: Final = "released"
"""``intake_owners.state`` of a unit let go cleanly (else ``held``: owned, or its owner died)."""


def lock_classes(names: NatsNames, durable: str, *, partitioned: bool = True) -> tuple[int, int]:
    """(unit class, member class): the first key of ``pg_advisory_lock(int4, int4)``.

    Derived from the namespace, the durable name and the mode, so that services or test runs sharing
    one database never share locks, and an unpartitioned instance never counts as a member of a
    partitioned service (or holds its partition 0). Non-negative, so that ``pg_locks.classid`` (an
    oid) shows it as is."""
    key = f"billing-intake\x00{names.namespace}\x00{durable}"
    if not partitioned:
        key += "\x00unpartitioned"
    digest = hashlib.sha256(key.encode()).digest()
    unit_class = int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
    member_class = int.from_bytes(digest[4:8], "big") & 0x7FFFFFFF
    if member_class == unit_class:
        member_class ^= 1
    return unit_class, member_class


def fair_share(partitions: int, live: int) -> int:
    """Units one of ``live`` instances should own: ``ceil(partitions / live)``."""
    return math.ceil(partitions / max(live, 1))


def _conninfo(engine: Engine) -> str:
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


_LOCKS_OF_CLASS = (
    "SELECT objid::bigint FROM pg_locks"
    " WHERE locktype = 'advisory' AND granted AND objsubid = 2"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND classid = %s::bigint::oid"
)

# One statement, one snapshot: the previous holder's row as it was, and this acquisition's mark.
_CLAIM = (
    "WITH previous AS (SELECT state, owner FROM intake_owners WHERE stream = %(stream)s AND durable = %(durable)s),"
    " mark AS (INSERT INTO intake_owners (stream, durable, owner, state, changed_at)"
    "  VALUES (%(stream)s, %(durable)s, %(owner)s, 'held', now())"
    "  ON CONFLICT (stream, durable) DO UPDATE"
    "  SET owner = EXCLUDED.owner, state = EXCLUDED.state, changed_at = EXCLUDED.changed_at)"
    " SELECT state, owner FROM previous"
)
_RELEASE = (
    "UPDATE intake_owners SET state = 'released', changed_at = now()"
    " WHERE stream = %(stream)s AND durable = %(durable)s AND owner = %(owner)s AND state = 'held'"
)


@dataclass(frozen=True, slots=True)
class Claim:
    """This instance's mark on a unit it has just locked, and what the previous holder left."""

    stream: str
    durable: str
    owner: str
    """Token of this acquisition (``<instance>/<random>``), as ``intake_owners.owner``."""
    previous_state: str | None
    """``held`` or ``released``; None when the unit never had an owner that marked it."""
    previous_owner: str | None


def _previous_owner(claim: Claim, *, clean: bool) -> str:
    """The previous owner for the log, as a person reads it."""
    if claim.previous_owner is None:
        return "first owner (no previous owner recorded)"
    if clean:
        return f"previous owner {claim.previous_owner} let go cleanly"
    return f"previous owner {claim.previous_owner} did not let go cleanly ({claim.previous_state or 'unmarked'})"


class PartitionLocks:
    """The PostgreSQL side: the membership lock and one session advisory lock per held unit, each on
    its own autocommit connection (closing the connection releases the lock), and the unit's row of
    ``intake_owners``, written on the connection that holds its lock."""

    def __init__(
        self,
        conninfo: str,
        names: NatsNames,
        durable: str,
        instance: str,
        *,
        partitioned: bool = True,
        role: str | None = None,
    ) -> None:
        self._conninfo = conninfo
        self.partition_class, self.member_class = lock_classes(names, durable, partitioned=partitioned)
        self._app_name = f"billing-intake {instance}"[:63]
        self._role = role or None
        self._member: psycopg.AsyncConnection[Any] | None = None
        self._probe: psycopg.AsyncConnection[Any] | None = None
        self._held: dict[int, psycopg.AsyncConnection[Any]] = {}
        self._claims: dict[int, Claim] = {}

    @property
    def held(self) -> set[int]:
        return set(self._held)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await asyncio.wait_for(
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
        if self._role is not None:
            # The service's privileges on intake_owners, as its engine has (ledger.db.make_engine).
            try:
                await asyncio.wait_for(
                    conn.execute(SQL("SET ROLE {}").format(Identifier(self._role))),
                    timeout=LOCK_QUERY_TIMEOUT_S,
                )
            except BaseException:
                await self._discard(conn)
                raise
        return conn

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
        """Units some instance holds (per ``pg_locks``); None if that cannot be read now."""
        if self._member is None:
            return None
        try:

            async def go() -> set[int]:
                assert self._member is not None
                cur = await self._member.execute(_LOCKS_OF_CLASS, (self.partition_class,))
                return {int(r[0]) for r in await cur.fetchall()}

            return await asyncio.wait_for(go(), timeout=LOCK_QUERY_TIMEOUT_S)
        except Exception as exc:
            log.warning("could not read the intake locks (%s)", exc)
            return None

    # --- units ------------------------------------------------------------------------------------

    async def try_acquire(self, partition: int) -> bool:
        """Take unit ``p``'s lock if nobody holds it; the connection that took it is kept."""
        if partition in self._held:
            return True
        try:
            if self._probe is None or self._probe.closed:
                self._probe = await self._connect()
            got = await self._scalar(
                self._probe, "SELECT pg_try_advisory_lock(%s, %s)", (self.partition_class, partition)
            )
        except Exception as exc:
            log.warning("could not try the lock of unit %d (%s)", partition, exc)
            await self._discard(self._probe)
            self._probe = None
            return False
        if not got:
            return False
        self._held[partition], self._probe = self._probe, None
        return True

    async def claim(self, partition: int, stream: str, durable: str, owner: str) -> Claim:
        """Mark a unit this instance has just locked as ``held`` by ``owner`` (before its first pull),
        returning what the previous holder left. Raises if the mark cannot be written (the caller
        gives the lock up: pulling unmarked would let a successor take a crash for a clean stop)."""
        conn = self._held.get(partition)
        if conn is None:
            fail(f"claim of unit {partition} without its lock")

        async def go() -> tuple[str, str] | None:
            cur = await conn.execute(_CLAIM, {"stream": stream, "durable": durable, "owner": owner})
            row = await cur.fetchone()
            return (str(row[0]), str(row[1])) if row else None

        previous = await asyncio.wait_for(go(), timeout=LOCK_QUERY_TIMEOUT_S)
        claim = Claim(stream, durable, owner, *(previous or (None, None)))
        self._claims[partition] = claim
        return claim

    async def still_held(self, partition: int) -> bool:
        """Whether the connection holding ``p``'s lock still answers (then the lock is still ours)."""
        conn = self._held.get(partition)
        if conn is None:
            return False
        try:
            return bool(await self._scalar(conn, "SELECT 1") == 1)
        except Exception as exc:
            log.error("the connection holding unit %d's lock is gone (%s)", partition, exc)
            self._claims.pop(partition, None)
            await self._discard(self._held.pop(partition, None))
            return False

    async def release(self, partition: int, *, clean: bool = False) -> bool:
        """Unlock a unit; with ``clean`` (its intake settled everything delivered to it) first mark its
        row ``released`` on the lock's connection. Returns whether that mark was written."""
        conn = self._held.pop(partition, None)
        claim = self._claims.pop(partition, None)
        if conn is None:
            return False
        marked = False
        if clean and claim is not None:
            try:

                async def go() -> int:
                    cur = await conn.execute(
                        _RELEASE, {"stream": claim.stream, "durable": claim.durable, "owner": claim.owner}
                    )
                    return cur.rowcount

                marked = await asyncio.wait_for(go(), timeout=LOCK_QUERY_TIMEOUT_S) == 1
            except Exception as exc:
                log.warning(
                    "could not mark unit %d released (%s): its next owner will wait for ack_wait", partition, exc
                )
        with contextlib.suppress(Exception):  # closing the connection releases the lock anyway
            await self._scalar(conn, "SELECT pg_advisory_unlock(%s, %s)", (self.partition_class, partition))
        await self._discard(conn)
        return marked

    async def close(self) -> None:
        for p in list(self._held):
            await self.release(p)
        await self._discard(self._probe)
        await self._discard(self._member)
        self._probe = self._member = None


@dataclass
class _Owned:
    partition: int
    claim: Claim
    unclean: bool
    """The previous owner may have left deliveries un-acked: wait for them before the first pull."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    main: asyncio.Task[bool] | None = None
    tasks: list[asyncio.Task[bool]] = field(default_factory=list)
    clean: bool = False
    """Set when stopped: the unit's consumer ended with nothing delivered left un-acked."""


class _OwnershipMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.owned = Gauge(
            "billing_intake_partitions_owned",
            "Units of billing.in whose consumer this instance runs (partitions; unpartitioned: 0 or 1).",
            registry=r,
        )
        self.partition = Gauge(
            "billing_intake_partition_owned",
            "1 while this instance owns the unit (its PostgreSQL advisory lock), else 0.",
            ["partition"],
            registry=r,
        )
        self.live = Gauge(
            "billing_intake_live_instances", "Instances of the service holding the membership lock.", registry=r
        )
        self.changes = Counter(
            "billing_intake_partition_changes",
            "Unit ownership changes of this instance (acquired, released, lost).",
            ["change"],
            registry=r,
        )
        self.rounds = Counter(
            "billing_intake_rebalances",
            "Rebalance rounds completed (locks checked, live instances counted, units taken or given up).",
            registry=r,
        )
        self.takeover_waits = Counter(
            "billing_intake_takeover_waits",
            "Takeovers of a unit its previous owner had not released cleanly, with messages un-acked: the"
            " first pull waited until they were queued for redelivery (ack_wait shortened for a moment).",
            registry=r,
        )
        self.takeover_wait_seconds = Counter(
            "billing_intake_takeover_wait_seconds", "Time spent in those waits.", registry=r
        )
        self.acquired_at = Gauge(
            "billing_intake_unit_acquired_timestamp_seconds",
            "When this instance last took a unit over (Unix time): with the intake's counters, how long it"
            " took to commit again after a takeover.",
            registry=r,
        )
        self.takeover_fallbacks = Counter(
            "billing_intake_takeover_fallbacks",
            "Of those takeovers, the ones that waited for the consumer's full ack_wait instead (the server"
            " refused the short ack_wait, or the consumer has a backoff).",
            registry=r,
        )


class OwnedIntake:
    """Owns a fair share of the units (the N partitions, or the one unpartitioned durable) and runs one
    :class:`~consumers.nats.intake.Intake` per owned unit (see the module's documentation)."""

    def __init__(
        self,
        nc: Client,
        engine: Engine,
        names: NatsNames,
        config: IntakeConfig,
        partitions: int = 0,
        *,
        rebalance_s: float = 2.0,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] | None = None,
        relay_kick: asyncio.Event | None = None,
        scheduler_kick: asyncio.Event | None = None,
        ready: asyncio.Event | None = None,
        conninfo: str | None = None,
        role: str | None = None,
        instance: str | None = None,
    ) -> None:
        if partitions < 0:
            raise ValueError(f"partitions must be 0 (unpartitioned) or more, not {partitions}")
        self._nc, self._engine, self._names, self._config = nc, engine, names, config
        self._js = nc.jetstream()
        self._partitions = partitions
        self._units = max(partitions, 1)
        self._rebalance_s = rebalance_s
        self._metrics = metrics or Metrics()
        self._ownership = _OwnershipMetrics(self._metrics)
        self._clock, self._relay_kick, self._scheduler_kick, self._ready = clock, relay_kick, scheduler_kick, ready
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self._locks = PartitionLocks(
            conninfo or _conninfo(engine),
            names,
            config.durable,
            self.instance,
            partitioned=partitions > 0,
            role=role,
        )
        # Where this instance starts looking for free units: spread, so that instances starting
        # together do not race for the same ones.
        offset = random.randrange(self._units)
        self._order = [(offset + i) % self._units for i in range(self._units)]
        self._owned: dict[int, _Owned] = {}
        # Units this instance stopped cleanly but could not mark released (their lock's connection
        # was gone): unit -> the owner token of that acquisition. Finding its own token on the row
        # when it takes the unit again, it knows the hand-over was clean.
        self._left_clean: dict[int, str] = {}
        self._under_share = True
        """Whether the last round ended owning less than the share (see UNDER_SHARE_POLL_S)."""
        for p in range(self._units):
            self._ownership.partition.labels(str(p)).set(0)

    @property
    def owned(self) -> list[int]:
        return sorted(self._owned)

    def _main_spec(self, p: int) -> ConsumerSpec:
        if self._partitions == 0:
            return ConsumerSpec.unpartitioned(self._names, self._config)
        return ConsumerSpec.partition(self._names, self._config, p, self._partitions)

    # --- lifetime ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "intake of %s: %s, instance %s, rebalance every %.1f s, advisory lock classes %d (units) / %d (members)",
            self._names.in_stream,
            f"{self._partitions} partitions (durables {self._config.durable}-<p>)"
            if self._partitions
            else f"unpartitioned (durable {self._config.durable}, one instance pulls it, the others stand by)",
            self.instance,
            self._rebalance_s,
            self._locks.partition_class,
            self._locks.member_class,
        )
        try:
            backoff = Backoff(JOIN_RETRY_FIRST_S, JOIN_RETRY_MAX_S, jitter=0.0)
            while not stop.is_set():
                try:
                    await self._locks.join()
                    break
                except Exception as exc:
                    delay = backoff.next()
                    log.warning("cannot join the intake's members (%s): retrying in %.1f s", exc, delay)
                    await wait_any(stop, seconds=delay)
            if self._ready is not None and not stop.is_set():
                self._ready.set()
            while not stop.is_set():
                try:
                    await self._rebalance(stop)
                    self._ownership.rounds.inc()
                except Exception:
                    log.exception("rebalance failed; trying again")
                period_s = self._rebalance_s if not self._under_share else min(self._rebalance_s, UNDER_SHARE_POLL_S)
                await wait_any(stop, seconds=period_s * random.uniform(0.75, 1.25))
        finally:
            try:
                await self._stop_all()
            finally:
                await self._locks.close()
                self._ownership.owned.set(0)
            log.info("intake ownership stopped (instance %s)", self.instance)

    async def _stop_all(self) -> None:
        for o in await self._stop_partitions(list(self._owned), why="shutdown"):
            await self._release(o)

    async def _release(self, o: _Owned) -> None:
        """Unlock a stopped unit, marked released when its consumer ended clean."""
        marked = await self._locks.release(o.partition, clean=o.clean)
        if o.clean and not marked:
            self._left_clean[o.partition] = o.claim.owner

    # --- one round --------------------------------------------------------------------------------

    async def _rebalance(self, stop: asyncio.Event) -> None:
        ps = sorted(self._owned)
        held = await asyncio.gather(*(self._locks.still_held(p) for p in ps))
        lost = [p for p, ok in zip(ps, held, strict=True) if not ok]
        if lost:
            self._ownership.changes.labels("lost").inc(len(lost))
            for o in await self._stop_partitions(lost, why="its lock's database connection was lost"):
                if o.clean:  # nobody can be told but this instance itself, if it takes the unit again
                    self._left_clean[o.partition] = o.claim.owner
        live = await self._locks.live_instances()
        if live is None:
            with contextlib.suppress(Exception):
                await self._locks.join()
            return
        self._ownership.live.set(live)
        share = fair_share(self._units, live)
        try:
            await self._take_share(share, live, stop)
        finally:
            self._under_share = len(self._owned) < share

    async def _take_share(self, share: int, live: int, stop: asyncio.Event) -> None:
        """Release the units beyond ``share``, then take free ones up to it."""
        extras = sorted(self._owned, reverse=True)[: max(len(self._owned) - share, 0)]
        if extras and not stop.is_set():
            # Their intakes first (each commits and acks its batch in hand), then the locks.
            for o in await self._stop_partitions(extras, why=f"rebalance: {live} live instances, share {share}"):
                await self._release(o)
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
            if not await self._locks.try_acquire(p):
                continue
            durable = self._main_spec(p).durable
            try:
                claim = await self._locks.claim(
                    p, self._names.in_stream, durable, f"{self.instance}/{secrets.token_hex(4)}"
                )
            except Exception as exc:
                log.warning("could not mark unit %d (%s) as held (%s): lock given up", p, durable, exc)
                await self._locks.release(p)
                continue
            clean = claim.previous_state == RELEASED or (
                claim.previous_owner is not None and self._left_clean.get(p) == claim.previous_owner
            )
            self._left_clean.pop(p, None)
            self._start_partition(p, claim, unclean=not clean)
            self._ownership.changes.labels("acquired").inc()
            self._ownership.acquired_at.set_to_current_time()
            log.info(
                "unit %d (%s) acquired by %s (now %s; %d live instance(s), share %d); %s",
                p,
                durable,
                self.instance,
                self.owned,
                live,
                share,
                _previous_owner(claim, clean=clean),
            )

    def _start_partition(self, p: int, claim: Claim, *, unclean: bool) -> None:
        owned = _Owned(p, claim, unclean)
        main = self._main_spec(p)
        owned.main = asyncio.create_task(self._run_consumer(owned, main, ordered=True), name=f"billing-{main.durable}")
        owned.tasks = [owned.main]
        if self._partitions and p == 0:
            # Refusals only: their order does not matter, so no wait for a predecessor's left-overs.
            strays = ConsumerSpec.strays(self._names, self._config, self._partitions)
            owned.tasks.append(
                asyncio.create_task(self._run_consumer(owned, strays, ordered=False), name=f"billing-{strays.durable}")
            )
        self._owned[p] = owned
        self._ownership.partition.labels(str(p)).set(1)
        self._ownership.owned.set(len(self._owned))

    async def _stop_partitions(self, ps: Sequence[int], *, why: str) -> list[_Owned]:
        """Stop the intakes of these units together, each finishing its batch in hand (bounded, then
        cancelled); the caller releases the locks afterwards. Returns them, ``clean`` set."""
        owned = [self._owned[p] for p in ps if p in self._owned]
        for o in owned:
            o.stop.set()
        tasks = [t for o in owned for t in o.tasks]
        try:
            _, pending = await asyncio.wait(tasks, timeout=RELEASE_WITHIN_S) if tasks else (set(), set())
            if pending:
                log.warning("%d unit intake(s) still running after %.0f s: cancelled", len(pending), RELEASE_WITHIN_S)
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=5)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        finally:
            for o in owned:
                main = o.main
                o.clean = bool(
                    main is not None
                    and main.done()
                    and not main.cancelled()
                    and main.exception() is None
                    and main.result()
                )
                self._owned.pop(o.partition, None)
                self._ownership.partition.labels(str(o.partition)).set(0)
            self._ownership.owned.set(len(self._owned))
        log.info(
            "unit(s) %s given up by %s (%s; %s; now %s)",
            [o.partition for o in owned],
            self.instance,
            why,
            ", ".join(f"unit {o.partition} {'clean' if o.clean else 'NOT clean'}" for o in owned),
            self.owned,
        )
        return owned

    async def _run_consumer(self, owned: _Owned, spec: ConsumerSpec, *, ordered: bool) -> bool:
        """One unit's intake until its ``stop``; restarted with a back-off if it fails. Returns whether
        it ended with nothing delivered to this unit left un-acked (then its release is clean).

        ``ordered``: before a pull that could overtake messages left un-acked (by the previous owner,
        or by this unit's own intake that failed), have them queued for redelivery first."""
        stop = owned.stop
        unclean = ordered and owned.unclean
        backoff = Backoff(RESTART_DELAY_S, RESTART_DELAY_MAX_S, jitter=0.0)
        while not stop.is_set():  # ends at stop; each round is one intake run or one bounded wait
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
                if unclean:
                    if not await self._requeue_leftovers(owned.partition, spec, stop):
                        return False  # stopped first: the left-overs are still pending for the next owner
                    unclean = False
                await intake.run(stop)
                return not intake.unsettled
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # What it had in hand is un-acked now: the next run must not pull past it.
                unclean = ordered and (unclean or intake.unsettled)
                delay = backoff.next()
                log.error("intake %s failed (%r): restarting in %.1f s", spec.durable, exc, delay, exc_info=exc)
                await wait_any(stop, seconds=delay)
        return not unclean

    async def _requeue_leftovers(self, p: int, spec: ConsumerSpec, stop: asyncio.Event) -> bool:
        """Before the first pull after an unclean takeover: if the consumer has messages un-acked, have
        the server queue them for redelivery now (:func:`requeue_unacked`), so that they come back, in
        stream order, before anything newer (see the module's documentation). Returns False if
        ``stop`` came first. Raises, before any pull, if ``ack_wait`` cannot be set back."""
        info = await ensure_consumer(self._js, self._names, self._config, spec)
        pending = int(info.num_ack_pending or 0)
        if pending == 0:
            return True
        if info.config.backoff:
            return await self._let_leftovers_expire(p, spec, stop, info, why="the consumer has a backoff")
        # Back to the ack_wait it has, or the configured one if an owner that died in the middle of a
        # takeover left the short one behind.
        current = float(info.config.ack_wait or 0)
        restore_s = current if current > TAKEOVER_ACK_WAIT_S else self._config.ack_wait_s
        self._ownership.takeover_waits.inc()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            requeued = await requeue_unacked(self._js, self._names.in_stream, info, restore_s=restore_s, stop=stop)
        finally:
            self._ownership.takeover_wait_seconds.inc(loop.time() - started)
        if not requeued:
            return await self._let_leftovers_expire(p, spec, stop, info, why="the server refused a short ack_wait")
        if stop.is_set():
            return False
        log.warning(
            "unit %d (%s): the previous owner did not release it cleanly; its %d un-acked message(s) queued"
            " for redelivery ahead of anything newer (ack_wait %.1f s for a moment, back to %.1f s):"
            " pulling %.2f s after the takeover",
            p,
            spec.durable,
            pending,
            TAKEOVER_ACK_WAIT_S,
            restore_s,
            loop.time() - started,
        )
        return True

    async def _let_leftovers_expire(
        self, p: int, spec: ConsumerSpec, stop: asyncio.Event, info: ConsumerInfo, *, why: str
    ) -> bool:
        """The fallback of :meth:`_requeue_leftovers`: wait until the un-acked messages have expired by
        themselves (JetStream then redelivers them, in stream order, before anything newer). Bounded
        by the consumer's ack_wait (see the module's documentation). Returns False if ``stop`` came
        first."""
        # The longest a delivery stays pending before the server queues it for redelivery.
        ack_wait_s = max([float(info.config.ack_wait or self._config.ack_wait_s), *(info.config.backoff or [])])
        wait_s = ack_wait_s + TAKEOVER_MARGIN_S
        log.warning(
            "unit %d (%s): the previous owner did not release it cleanly and %d message(s) are un-acked (%s):"
            " waiting up to %.1f s for their redelivery before pulling anything newer",
            p,
            spec.durable,
            int(info.num_ack_pending or 0),
            why,
            wait_s,
        )
        self._ownership.takeover_fallbacks.inc()
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + wait_s
        try:
            # At most wait_s / TAKEOVER_POLL_S rounds: each sleeps until the next poll, the deadline or stop.
            while (left := deadline - loop.time()) > 0:
                await wait_any(stop, seconds=min(TAKEOVER_POLL_S, left))
                if stop.is_set():
                    return False
                try:
                    info = await asyncio.wait_for(
                        self._js.consumer_info(self._names.in_stream, spec.durable), timeout=LOCK_QUERY_TIMEOUT_S
                    )
                except Exception as exc:  # a NATS blip: the deadline still holds
                    log.debug("consumer info of %s during the takeover wait failed: %r", spec.durable, exc)
                    continue
                if not info.num_ack_pending:
                    break  # settled by an owner that was still alive: nothing left to overtake
        finally:
            self._ownership.takeover_wait_seconds.inc(loop.time() - started)
        log.info("unit %d (%s): pulling after %.1f s", p, spec.durable, loop.time() - started)
        return True


async def requeue_unacked(
    js: JetStreamContext, stream: str, info: ConsumerInfo, *, restore_s: float, stop: asyncio.Event | None = None
) -> bool:
    """Have nats-server queue every delivery of this durable that is un-acked for redelivery now:
    its ``ack_wait`` set to TAKEOVER_ACK_WAIT_S, TAKEOVER_ACK_WAIT_S + TAKEOVER_MARGIN_S waited
    (less if ``stop`` is set), then ``ack_wait`` set to ``restore_s``. Only for a durable nobody pulls
    meanwhile (its owner is dead); a parked delivery with more than ``restore_s -
    TAKEOVER_ACK_WAIT_S`` of its delay left stays parked (see the module's documentation).

    Returns False if the server refused the short ack_wait (nothing changed); raises if ``ack_wait``
    cannot be set back (the caller must not pull then)."""
    durable = info.config.durable_name or info.name
    try:
        await _set_ack_wait(js, stream, info, TAKEOVER_ACK_WAIT_S)
    except BadRequestError as exc:
        log.warning("%s/%s: ack_wait %.1f s refused (%s)", stream, durable, TAKEOVER_ACK_WAIT_S, exc.description)
        return False
    try:
        if stop is None:
            await asyncio.sleep(TAKEOVER_ACK_WAIT_S + TAKEOVER_MARGIN_S)
        else:
            await wait_any(stop, seconds=TAKEOVER_ACK_WAIT_S + TAKEOVER_MARGIN_S)
    finally:
        # Whatever happened meanwhile (stop, cancellation): no pull with the short ack_wait.
        await _set_ack_wait(js, stream, info, restore_s)
    return True


async def _set_ack_wait(js: JetStreamContext, stream: str, info: ConsumerInfo, ack_wait_s: float) -> None:
    """Update a durable to ``ack_wait_s``, nothing else of its configuration changed (an editable
    field: its sequences, pending set and delivery counts stay). A few bounded tries; a refusal
    (BadRequestError) is raised at once."""
    wanted = info.config.evolve(ack_wait=ack_wait_s)
    durable = wanted.durable_name or info.name
    for attempt in range(1, TAKEOVER_UPDATES + 1):
        try:
            updated = await asyncio.wait_for(js.add_consumer(stream, wanted), timeout=LOCK_QUERY_TIMEOUT_S)
        except BadRequestError:
            raise  # refused: trying again would not change that
        except Exception as exc:
            if attempt == TAKEOVER_UPDATES:
                raise
            log.warning("ack_wait of %s/%s not updated (%r): trying again", stream, durable, exc)
            await asyncio.sleep(0.1 * attempt)
            continue
        got = float(updated.config.ack_wait or 0)
        if abs(got - ack_wait_s) > 0.001:
            raise RuntimeError(f"{stream}/{durable}: ack_wait {ack_wait_s} s asked, the server kept {got} s")
        return


async def run_owned(
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
    role: str | None = None,
) -> None:
    """Run the intake of ``billing up`` until ``stop`` is set: the unpartitioned durable
    (``partitions`` 0) or a fair share of the N partitions, each unit pulled only while this instance
    owns it; then stop every owned unit's intake (each finishes its batch in hand), mark the clean
    ones released and unlock. ``ready`` is set once the instance has joined (owner or standby).
    ``role``: the database role of the service (``SET ROLE`` on the lock connections too)."""
    await OwnedIntake(
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
        role=role,
    ).run(stop)
