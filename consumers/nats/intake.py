"""The JetStream intake: ``billing.in.>`` into the ledger, one database transaction per batch.

The path of a batch (DESIGN sections 3 and 10):

1. pull up to ``batch_size`` messages from the durable pull consumer on ``BILLING_IN`` (explicit
   acks, explicit ``ack_wait`` and ``max_deliver``);
2. parse each with :func:`ledger.events.parse_event`; a rejection, or an event whose ``walletId`` is
   not the subject's wallet (``subject_mismatch``), becomes a :class:`RejectedInput`;
3. ONE transaction: :func:`projections.processor.process_batch` and commit;
4. only after the commit: dead-letter every rejection (parse, subject, and the rules' refusals) to
   ``billing.dlq.<reason>`` with its reason in headers and a ``Nats-Msg-Id`` so a redelivery does
   not duplicate the dead letter; ack accepted, duplicate and dead-lettered messages; nak with a
   growing delay the ones whose rental has not started yet (their last delivery is dead-lettered
   as ``not_started`` by the processor instead).

A crash anywhere before the ack means redelivery, which the ``(source, id)`` key of the log turns
into a no-op: every event is counted exactly once.

**Any bytes** (issue 13). nats-py is patched (``consumers.nats.safety``) so that a subject that is not
UTF-8 reads as a ``surrogateescape`` string instead of ending the client's read loop; a refusal's
subject and detail are stored and published printable (``ledger.text``: NUL, control characters
and such bytes escaped, the subject reversibly), so every refused input is in rejected_inputs on its
first delivery; a dead letter's body is cut to ``MAX_DLQ_BODY_BYTES`` (header
``Billing-Body-Truncated``) so that a 1 MB input still fits the server's max_payload. The parser
also refuses reserved sources (``reserved_source``) and, with ``event_max_age_s``, old times
(``too_old``) unless the message is ``billing dlq replay --accept-old`` of that very dead letter
(:func:`verify_accept_old`).

**Subjects and consumers** (:class:`ConsumerSpec`). Unpartitioned (``BILLING_INTAKE_PARTITIONS=0``,
the default: single node, embedded server, tests): one durable ``billing-intake`` on ``billing.in.>``,
and a wallet's facts must arrive on ``billing.in.<walletId>``. Partitioned (N > 0, the cluster of
DESIGN section 8 whose NATS mapping stores ``billing.in.<p>.<walletId>``): one durable
``billing-intake-<p>`` per partition on ``billing.in.<p>.*``, run by the instance that owns the
partition (``consumers.nats.partitions``), and a fact is accepted only when ``p`` is
``FNV-1a-32(walletId) mod N`` (a producer can address a partition by hand); anything else is
``subject_mismatch``. This class is one consumer's loop either way.

When the transaction fails:

* database unavailable (a restart, a failover, a dropped connection: psycopg's ``OperationalError``
  / ``InterfaceError``): the batch stays *in hand*, un-acked, and is tried again with a bounded,
  doubling back-off, while in-progress acks keep JetStream from redelivering it. Holding the batch
  rather than nak-ing it spends no delivery attempts, so an outage never pushes a retried reading
  past ``max_deliver``. On SIGTERM during an outage the batch is nak-ed and redelivered later.
* any other error (a bug that one message triggers): the batch is split in halves, each its own
  transaction, down to the message that fails; the rest go through. That message is nak-ed with a
  delay; on its last delivery it is dead-lettered as ``processing_error`` (DLQ stream only: it has no
  :class:`~ledger.events.RejectReason`) rather than silently dropped by the server.

**Pull loop: raw ``$JS.API.CONSUMER.MSG.NEXT`` on the FastStream broker's nats-py connection, not
FastStream's batch subscriber.** FastStream's ``PullSub(batch=True)`` and nats-py ``fetch()`` run at
a fraction of the rate of pull requests sent by hand into one subscription callback (``fetch()``
spends two asyncio tasks per message; FastStream's batch pull is built on it; figures in
bench/README.md). FastStream's batch handler would also need
``AckPolicy.MANUAL`` and the raw messages to do what this contract asks (commit first, then ack
some, nak others with a per-message delay, dead-letter the rest, and hold the whole batch through a
database outage while the subscriber must not pull more), so it would add its decoding and handler
layers for nothing it is used for. The service keeps FastStream's ``NatsBroker`` for the
application (it owns the connection: reconnects, logging, drain) and the intake drives its pulls on
that connection. With the processor stubbed out this loop (pull, parse, one empty transaction, ack
each) is far faster than the service end to end: the batch transaction dominates (see
bench/README.md).

* one core subscription on a private inbox ``<inbox>.*`` collects every delivery into a buffer;
  each pull request has its own reply subject, so its end (status 404 no messages, 408 expired)
  is recognised, and a late delivery of an abandoned request is simply buffered;
* a request with ``no_wait`` takes what is there at once (a full batch under load); when nothing is,
  one long-poll for a single message (``expires`` = ``max_wait_s``) wakes the loop as soon as
  traffic resumes, and a ``no_wait`` request then takes the rest: low latency when quiet, full
  batches under load, never more than one request's worth of messages beyond the batch in flight;
* while a batch is in the database, the next one is already being pulled (prefetch);
* statuses other than 404/408 (409 max-ack-pending, leadership change...) are logged and the
  loop pulls again; a request that gets no answer (a reconnect lost it) is abandoned after a grace.

At SIGTERM the loop stops pulling, waits (bounded) for the outstanding request, finishes the batch
in hand and whatever was already delivered, commits, acks, flushes and returns.

**Who runs this loop.** One consumer's loop, nothing more: it does not know whether another process
pulls the same durable. ``billing up`` runs it only while it owns the durable
(``consumers.nats.partitions``: one owner at a time, unpartitioned or per partition), because two
instances pulling one durable apply a wallet's events out of stream order (a rental start before
the wallet's credit: a spurious stop command). The owner needs one fact from the loop when it ends:
:attr:`Intake.unsettled`, whether something delivered to it may have been left un-acked (it failed,
an ack or the final flush did not go out, a pull request was still unanswered). Only a loop that
ended settled lets the owner hand the durable over as *clean*: the next owner then pulls at once;
otherwise it first lets the left-overs expire so that JetStream redelivers them before anything newer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import hashlib
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import BadRequestError
from sqlalchemy import Engine

from consumers.nats import safety as nats_safety
from consumers.nats.names import NatsNames, partition_of
from consumers.runtime.errors import Backoff, is_transient
from consumers.runtime.loops import wait_any
from consumers.runtime.metrics import Metrics
from consumers.runtime.settings import Settings
from ledger.db import unit_of_work
from ledger.events import MAX_DETAIL_CHARS, MAX_EVENT_BYTES, Rejection, RejectReason, parse_event
from ledger.invariants import require
from ledger.text import printable
from projections.processor import BatchResult, Disposition, Incoming, RejectedInput, process_batch
from projections.rejected import too_old_refusals
from projections.wallet_store import WalletCache

log = logging.getLogger("billing.intake")

# Any bytes in a delivered subject or reply must not end the NATS client's read loop (the intake and
# admission share the connection): see consumers/nats/safety.py. Every process that imports the
# intake (the service, tools) reads messages the same way.
nats_safety.install()

ACCEPT_OLD_HEADER: Final = "Billing-Accept-Old"
"""Set by ``billing dlq replay --accept-old`` to the id of the ``too_old`` row of rejected_inputs
being replayed. The intake then skips the age check for that message, but only if that row exists,
is ``too_old``, and holds the same source, id and bytes (see :func:`verify_accept_old`)."""

MAX_DLQ_BODY_BYTES: Final = MAX_EVENT_BYTES
"""A dead letter's body at most: a larger input (too_large, up to the server's max_payload) would
not fit with its headers; its first bytes are published, rejected_inputs keeps all of it."""

PROCESSING_ERROR: Final = RejectReason.processing_error
"""Dead-letter reason of a message that made the processor fail on every delivery (DLQ stream only)."""

# A pull request is answered at once (no_wait) or at its expiry; one that gets no answer within
# this grace beyond that was lost (a reconnect) and is abandoned.
REQUEST_GRACE_S: Final = 5.0
# Pause after a pull request refused at once with a status other than "no messages" / "expired".
STATUS_BACKOFF_S: Final = 0.5
# A batch held while the database is unavailable: retried after this, doubling to db_retry_max_s.
DB_RETRY_FIRST_S: Final = 0.1
# JetStream publishes of dead letters and the final flush of acks.
PUBLISH_TIMEOUT_S: Final = 5.0
# The exponent of the nak back-off is capped so a large delivery count cannot overflow a float.
_MAX_BACKOFF_EXPONENT: Final = 30

_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")


# Batches delivered and not yet acked at most: the one in hand and the one prefetched meanwhile.
_BATCHES_UNACKED: Final = 2
# Wallets an owner keeps in memory by default (projections.wallet_store.WalletCache): a few KB each.
CACHE_WALLETS: Final = 50_000


@dataclass(frozen=True, slots=True)
class IntakeConfig:
    durable: str = "billing-intake"
    batch_size: int = 4000  # as consumers.runtime.settings (see the reason there)
    max_wait_s: float = 1.0
    ack_wait_s: float = 30.0
    max_deliver: int = 20
    max_ack_pending: int = 20_000
    nak_delay_s: float = 1.0
    nak_delay_max_s: float = 60.0
    db_retry_max_s: float = 5.0
    cache_wallets: int = CACHE_WALLETS
    """Wallet states the owner of the consumer keeps in memory at most (least recently used dropped)."""
    event_max_age_s: float | None = None
    """Events whose time is older than this are refused as too_old: the service sets it from
    BILLING_EVENT_MAX_AGE_S (default 7 days, :meth:`from_settings`); None (tools, and tests on fixed
    dates) is no lower bound."""

    def __post_init__(self) -> None:
        if not self.cache_wallets >= 5000:
            raise ValueError(f"cache_wallets {self.cache_wallets} < 5000 (a batch's wallets must fit)")
        if not 1 <= self.batch_size <= 5000:
            raise ValueError(f"batch_size {self.batch_size} outside 1..5000")
        if self.max_ack_pending < _BATCHES_UNACKED * self.batch_size:
            # The batch in hand and the prefetched one must fit, or the server
            # stops delivering until one is settled.
            raise ValueError(
                f"max_ack_pending {self.max_ack_pending} < {_BATCHES_UNACKED} x batch_size {self.batch_size}"
            )
        if self.max_deliver < 2:
            raise ValueError("max_deliver must allow at least one retry")
        if self.event_max_age_s is not None and not self.event_max_age_s > 0:
            raise ValueError(f"event_max_age_s {self.event_max_age_s} must be > 0")

    @classmethod
    def from_settings(cls, s: Settings) -> IntakeConfig:
        return cls(
            durable=s.intake_durable,
            batch_size=s.intake_batch_size,
            max_wait_s=s.intake_max_wait_s,
            ack_wait_s=s.intake_ack_wait_s,
            max_deliver=s.intake_max_deliver,
            max_ack_pending=max(s.intake_max_ack_pending, _BATCHES_UNACKED * s.intake_batch_size),
            nak_delay_s=s.intake_nak_delay_s,
            nak_delay_max_s=s.intake_nak_delay_max_s,
            db_retry_max_s=s.intake_db_retry_max_s,
            cache_wallets=s.intake_cache_wallets,
            event_max_age_s=s.event_max_age_s,
        )

    def nak_delay(self, delivered: int) -> float:
        """Delay before the next delivery of a retried message: doubling per delivery, capped."""
        exponent = min(max(delivered - 1, 0), _MAX_BACKOFF_EXPONENT)
        return min(self.nak_delay_s * float(2**exponent), self.nak_delay_max_s)


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """Which durable consumer an :class:`Intake` pulls, and which subjects its messages must have.

    Unpartitioned (``partitions == 0``): one durable on ``billing.in.>``, a wallet's facts on
    ``billing.in.<walletId>``. Partitioned (``consumers.nats.partitions``): one durable per partition on
    ``billing.in.<p>.*``, and one for the strays (subjects no partition takes, all refused)."""

    durable: str
    filter_subjects: tuple[str, ...]
    partitions: int = 0
    description: str = "billing intake: billing.in.> into the ledger"

    @classmethod
    def unpartitioned(cls, names: NatsNames, config: IntakeConfig) -> ConsumerSpec:
        return cls(config.durable, (names.in_subjects,))

    @classmethod
    def partition(cls, names: NatsNames, config: IntakeConfig, partition: int, partitions: int) -> ConsumerSpec:
        require(0 <= partition < partitions, f"partition {partition} outside 0..{partitions - 1}")
        return cls(
            f"{config.durable}-{partition}",
            (names.in_partition_filter(partition),),
            partitions,
            f"billing intake: partition {partition} of {partitions} (billing.in.{partition}.*) into the ledger",
        )

    @classmethod
    def strays(cls, names: NatsNames, config: IntakeConfig, partitions: int) -> ConsumerSpec:
        return cls(
            f"{config.durable}-strays",
            names.in_stray_filters,
            partitions,
            "billing intake: billing.in subjects outside the partitioned shape, dead-lettered",
        )


def consumer_config(names: NatsNames, config: IntakeConfig, spec: ConsumerSpec | None = None) -> ConsumerConfig:
    spec = spec or ConsumerSpec.unpartitioned(names, config)
    single = len(spec.filter_subjects) == 1
    return ConsumerConfig(
        name=spec.durable,
        durable_name=spec.durable,
        description=spec.description,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=config.ack_wait_s,
        max_deliver=config.max_deliver,
        max_ack_pending=config.max_ack_pending,
        filter_subject=spec.filter_subjects[0] if single else None,
        filter_subjects=None if single else list(spec.filter_subjects),
    )


async def ensure_consumer(
    js: JetStreamContext, names: NatsNames, config: IntakeConfig, spec: ConsumerSpec | None = None
) -> ConsumerInfo:
    """Create the durable consumer, or update it to this configuration (kept as is if the server
    refuses the change: it still works, and the warning says what differs)."""
    wanted = consumer_config(names, config, spec)
    durable = wanted.durable_name or config.durable
    info: ConsumerInfo
    try:
        info = await js.add_consumer(names.in_stream, wanted)
    except BadRequestError as exc:
        info = await js.consumer_info(names.in_stream, durable)
        log.warning(
            "consumer %s/%s kept with its existing configuration (ack_wait %s s, max_deliver %s): %s",
            names.in_stream,
            durable,
            info.config.ack_wait,
            info.config.max_deliver,
            exc.description,
        )
    return info


# --------------------------------------------------------------------------------------- failures


class _GaveUp(Exception):
    """The database stayed unavailable until shutdown: the batch is left for redelivery."""


# ------------------------------------------------------------------------------------- per message


@dataclass(frozen=True, slots=True)
class _Item:
    """One delivered message, parsed: an event for the processor, or already refused."""

    subject: str
    delivered: int
    stream_seq: int
    incoming: Incoming | None = None
    refused: RejectedInput | None = None
    accept_old: int | None = None
    """The rejected_inputs id its Billing-Accept-Old header names (a replay), else None."""


Delivery = tuple[str, bytes, int, int, int | None]
"""(subject, data, num_delivered, stream sequence, Billing-Accept-Old row id) of one JetStream
delivery, taken apart from nats-py's Msg (tests build them by hand)."""


class _Action(enum.Enum):
    ack = "ack"
    nak = "nak"
    dead_letter = "dead_letter"
    release = "release"  # shutdown during an outage: nak for an immediate redelivery elsewhere


@dataclass(frozen=True, slots=True)
class _Outcome:
    action: _Action
    disposition: str
    dead_letter: Rejection | None = None


def _metadata(msg: Msg) -> tuple[int, int, int]:
    """(num_delivered, stream sequence, num_pending) of a JetStream delivery, read from its ack
    subject ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>``.
    By hand for that form because nats-py's ``msg.metadata`` also builds a datetime and two
    dataclasses per message (a visible share of the service process's CPU in a profile of the
    intake: see bench/README.md);
    any other form (a JetStream domain) goes through nats-py."""
    reply = msg.reply
    if reply:
        tokens = reply.split(".")
        if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
            return int(tokens[4]), int(tokens[5]), int(tokens[8])
    meta = msg.metadata
    return meta.num_delivered, meta.sequence.stream, meta.num_pending


def expected_subject(names: NatsNames, wallet_id: str, partitions: int) -> str:
    """The only subject a wallet's facts may arrive on: ``billing.in.<walletId>`` unpartitioned,
    ``billing.in.<p>.<walletId>`` with ``p = FNV-1a-32(walletId) mod partitions`` partitioned."""
    if partitions == 0:
        return names.in_subject(wallet_id)
    return names.in_partition_subject(partition_of(wallet_id, partitions), wallet_id)


def _mismatch_detail(subject: str, wallet_id: str, expected: str, names: NatsNames, partitions: int) -> str:
    if partitions == 0:
        detail = (
            f"data.walletId {wallet_id} does not match the subject '{subject}': "
            f"events of a wallet are published to '{expected}' only"
        )
        prefix = names.subject("billing.in.")
        middle = subject[len(prefix) : -len(wallet_id) - 1] if subject.startswith(prefix) else ""
        if subject.endswith(f".{wallet_id}") and middle.isdigit():
            detail += (
                "; the subject has the partitioned shape billing.in.<p>.<walletId> of a NATS mapping: "
                "set BILLING_INTAKE_PARTITIONS to the mapping's N"
            )
        return detail
    p = partition_of(wallet_id, partitions)
    if subject == names.in_subject(wallet_id):
        return (
            f"subject '{subject}' is not partitioned: with {partitions} partitions the NATS mapping "
            f"'billing.in.*' -> 'billing.in.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}' stores "
            f"wallet {wallet_id}'s events as {expected!r}; is the mapping missing from the server's account?"
        )
    return (
        f"data.walletId {wallet_id} does not match the subject '{subject}': wallet {wallet_id} is in "
        f"partition {p} of {partitions} (FNV-1a-32 of the wallet id mod {partitions}); its events are "
        f"stored as {expected!r} only"
    )


def prepare(
    msgs: Sequence[Msg],
    *,
    now: datetime,
    names: NatsNames,
    max_deliver: int,
    partitions: int = 0,
    max_age_s: float | None = None,
) -> list[_Item]:
    """Parse every message (pure, CPU only); refuse a fact whose subject is not its wallet's
    (``partitions``: 0 unpartitioned, else the mapping's N, see :func:`expected_subject`), and
    one older than ``max_age_s`` (None: no lower bound) unless a replay vouches for it."""
    return prepare_deliveries(
        [delivery_of(m) for m in msgs],
        now=now,
        names=names,
        max_deliver=max_deliver,
        partitions=partitions,
        max_age_s=max_age_s,
    )


def delivery_of(msg: Msg) -> Delivery:
    delivered, seq, _ = _metadata(msg)
    return (msg.subject, msg.data, delivered, seq, _accept_old_of(msg))


def _accept_old_of(msg: Msg) -> int | None:
    """The row id of a Billing-Accept-Old header (only ever trusted after verify_accept_old)."""
    value = msg.headers.get(ACCEPT_OLD_HEADER) if msg.headers else None
    # isascii: "²".isdigit() is True and int("²") raises; a producer's header must not break a batch.
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 18:
        return None
    return int(value)


def prepare_deliveries(
    deliveries: Sequence[Delivery],
    *,
    now: datetime,
    names: NatsNames,
    max_deliver: int,
    partitions: int = 0,
    max_age_s: float | None = None,
) -> list[_Item]:
    """:func:`prepare` of deliveries already taken apart.

    A subject is recorded printable (ledger.text: NUL, control characters and bytes that are not
    UTF-8 escaped reversibly), so that the refusal of any input is stored on its first delivery."""
    max_age = None if max_age_s is None else timedelta(seconds=max_age_s)
    items = []
    for subject, raw, delivered, seq, accept_old in deliveries:
        parsed = parse_event(raw, now=now, max_age=max_age)
        claim = None
        if isinstance(parsed, Rejection) and parsed.reason is RejectReason.too_old and accept_old is not None:
            parsed, claim = parse_event(raw, now=now), accept_old  # checked in the transaction
        if isinstance(parsed, Rejection):
            refused = RejectedInput(parsed, raw, printable(subject), delivered)
            items.append(_Item(subject, delivered, seq, refused=refused))
            continue
        expected = expected_subject(names, parsed.wallet_id, partitions)
        if subject != expected:
            detail = _mismatch_detail(printable(subject), parsed.wallet_id, expected, names, partitions)
            rejection = Rejection(
                reason=RejectReason.subject_mismatch,
                detail=detail[:MAX_DETAIL_CHARS],
                source=parsed.source,
                event_id=parsed.id,
                event_type=parsed.type,
                wallet_id=parsed.wallet_id,
            )
            refused = RejectedInput(rejection, raw, printable(subject), delivered)
            items.append(_Item(subject, delivered, seq, refused=refused))
            continue
        last = delivered >= max_deliver
        incoming = Incoming(parsed, raw, subject=subject, delivery_count=delivered, last_attempt=last)
        items.append(_Item(subject, delivered, seq, incoming=incoming, accept_old=claim))
    return items


def parsed_items(incoming: Sequence[Incoming]) -> list[_Item]:
    """Items of events parsed elsewhere (tests, tools), as :func:`prepare` makes them: for
    :func:`transact`, the writer's unit of work."""
    return [_Item(i.subject or "", i.delivery_count or 1, 0, incoming=i) for i in incoming]


def verify_accept_old(conn: psycopg.Connection[Any], items: Sequence[_Item], *, max_age_s: float | None) -> list[_Item]:
    """The items, with each old event whose Billing-Accept-Old claim does not hold refused as
    ``too_old`` after all.

    The header alone proves nothing (any producer can set it): the age check is skipped only for the
    replay of a row of rejected_inputs that refused this very input (same source, id and bytes) as
    ``too_old``. So an event gets in old only after it was refused as too old once and someone with
    the database's rejected_inputs at hand (``billing dlq replay --accept-old``) sent it back."""
    claims = {i.accept_old for i in items if i.accept_old is not None and i.incoming is not None}
    if not claims:
        return list(items)
    rows = too_old_refusals(conn, claims)
    out = []
    for item in items:
        incoming = item.incoming
        if item.accept_old is None or incoming is None:
            out.append(item)
            continue
        ev = incoming.event
        if rows.get(item.accept_old) == (ev.source, ev.id, incoming.raw):
            out.append(item)
            continue
        rejection = Rejection(
            reason=RejectReason.too_old,
            detail=(
                f"time {ev.time.isoformat()} is older than {int(max_age_s or 0)} s (BILLING_EVENT_MAX_AGE_S), and its "
                f"{ACCEPT_OLD_HEADER}: {item.accept_old} does not name the too_old dead letter of this event "
                "(only `billing dlq replay --accept-old` of that dead letter lets an old event in)"
            )[:MAX_DETAIL_CHARS],
            source=ev.source,
            event_id=ev.id,
            event_type=ev.type,
            wallet_id=ev.wallet_id,
        )
        refused = RejectedInput(rejection, incoming.raw, printable(item.subject), item.delivered)
        out.append(replace(item, incoming=None, refused=refused, accept_old=None))
    return out


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What one committed transaction decided, per message of the batch in order."""

    outcomes: tuple[_Outcome, ...]
    outbox: int
    """Outbox rows written (the relay is woken when > 0)."""
    wakeups: bool
    """Whether a wallet of the batch has a wake-up (the scheduler is woken)."""


# One shared (frozen) outcome per plain disposition: no object per message for most messages.
_PLAIN_OUTCOMES: Final = {
    Disposition.accepted: _Outcome(_Action.ack, Disposition.accepted.value),
    Disposition.duplicate: _Outcome(_Action.ack, Disposition.duplicate.value),
    Disposition.retry: _Outcome(_Action.nak, Disposition.retry.value),
}


def outcomes_of(items: Sequence[_Item], result: BatchResult) -> tuple[_Outcome, ...]:
    """What to do with each message once the transaction has committed (pure)."""
    outcomes: list[_Outcome] = []
    n = 0
    for item in items:
        if item.refused is not None:
            outcomes.append(_Outcome(_Action.dead_letter, "rejected", item.refused.rejection))
            continue
        disposition = result.dispositions[n]
        if disposition is Disposition.rejected:
            outcomes.append(_Outcome(_Action.dead_letter, disposition.value, result.rejections[n]))
        else:
            outcomes.append(_PLAIN_OUTCOMES[disposition])
        n += 1
    require(n == len(result.dispositions), "a disposition without its message")
    return tuple(outcomes)


def transact(
    engine: Engine,
    items: Sequence[_Item],
    now: datetime,
    *,
    max_age_s: float | None = None,
    cache: WalletCache | None = None,
) -> BatchOutcome:
    """One batch's transaction: the processor on the parsed items, commit, and the outcomes
    (``max_age_s``: the bound the items were parsed with, for the detail of a refused replay).

    ``cache``: the owner's wallets in memory. Written through only once the commit has returned;
    if anything fails (the commit included: it may or may not have happened), the batch's wallets
    are evicted, so the cache is never ahead of the database."""
    try:
        with unit_of_work(engine) as uow:
            items = verify_accept_old(uow.pg, items, max_age_s=max_age_s)
            incoming = [i.incoming for i in items if i.incoming is not None]
            refused = [i.refused for i in items if i.refused is not None]
            result = process_batch(uow.pg, incoming, now=now, rejected=refused, cache=cache)
            uow.commit()
    except BaseException:
        if cache is not None:
            cache.evict(i.incoming.event.wallet_id for i in items if i.incoming is not None)
        raise
    if cache is not None:
        cache.keep(result.cache_entries)
    wakeups = any(w is not None for w in result.next_wakeups.values())
    return BatchOutcome(outcomes_of(items, result), result.outbox, wakeups)


def _header_value(value: str, limit: int = MAX_DETAIL_CHARS) -> str:
    # printable first: NUL, CR/LF and bytes that were not UTF-8 (a subject) cannot be in a header.
    return _HEADER_UNSAFE.sub(" ", printable(value, reversible=False))[:limit]


def dead_letter_headers(dl: Rejection, *, subject: str, delivered: int, stream: str, stream_seq: int) -> dict[str, str]:
    """Headers of a dead letter; the body is the input's bytes exactly as received.

    ``Nats-Msg-Id`` is the identity of the refusal: (reason, source, id) when the input had a
    readable identity (as ``rejected_inputs`` keeps it once), else the input's stream sequence. A
    redelivery of the same input is then dropped by the DLQ stream's duplicate window.
    """
    if dl.source is not None and dl.event_id is not None:
        digest = hashlib.sha256(f"{dl.source}\x00{dl.event_id}".encode()).hexdigest()[:40]
        msg_id = f"dlq-{dl.reason}-{digest}"
    else:
        msg_id = f"dlq-{dl.reason}-{stream}-{stream_seq}"
    headers = {
        "Nats-Msg-Id": msg_id,
        "Billing-Reason": dl.reason,
        "Billing-Detail": _header_value(dl.detail),
        "Billing-Subject": _header_value(printable(subject), limit=4 * MAX_DETAIL_CHARS),  # reversible
        "Billing-Delivery-Count": str(delivered),
        "Billing-Stream": stream,
        "Billing-Stream-Sequence": str(stream_seq),
    }
    for name, value in (
        ("Billing-Source", dl.source),
        ("Billing-Event-Id", dl.event_id),
        ("Billing-Event-Type", dl.event_type),
        ("Billing-Wallet-Id", dl.wallet_id),
    ):
        if value is not None:
            headers[name] = _header_value(value)
    return headers


# ------------------------------------------------------------------------------------------ pulls


@dataclass(eq=False)
class _PullRequest:
    reply: str
    batch: int
    received: int = 0
    status: str | None = None
    """The status that ended it (404 no messages, 408 expired, 409 ...), None if filled or pending."""
    done: asyncio.Event = field(default_factory=asyncio.Event)


class _Puller:
    """Pull requests sent by hand; deliveries of every request land in one buffer."""

    def __init__(self, nc: Client, stream: str, durable: str, buffer_limit: int) -> None:
        self._nc = nc
        self._durable = durable
        self._last_status: str | None = None
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._seq = 0
        self._buffer_limit = buffer_limit
        self._sub: Subscription | None = None
        self.buffer: deque[Msg] = deque()
        self.current: _PullRequest | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(
            f"{self._inbox}.*",
            cb=self._on_msg,
            pending_msgs_limit=self._buffer_limit,
            pending_bytes_limit=self._buffer_limit * 70_000,
        )

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.reply:
            # A status that ends a pull request (JetStream deliveries always carry an ack reply).
            status = msg.headers.get("Status") if msg.headers else None
            request = self.current
            if request is not None and msg.subject == request.reply:
                request.status = status
                request.done.set()
            if status not in ("404", "408"):
                description = msg.headers.get("Description") if msg.headers else None
                # Once per streak: during a leader election every retry gets the same 503.
                level = logging.DEBUG if status == self._last_status else logging.WARNING
                log.log(level, "pull request of %s ended with status %s %s", self._durable, status, description or "")
                self._last_status = status
            else:
                self._last_status = None
            return
        if not msg.reply.startswith("$JS.ACK."):
            log.warning("ignored a message on the intake's inbox that is not a JetStream delivery: %s", msg.subject)
            return
        self.buffer.append(msg)
        self._last_status = None
        request = self.current
        if request is not None:
            request.received += 1
            if request.received >= request.batch:
                request.done.set()

    async def request(self, batch: int, *, expires_s: float | None = None) -> _PullRequest:
        """Ask for up to ``batch`` messages: at once (no_wait) or waiting up to ``expires_s``."""
        self._seq += 1
        request = _PullRequest(reply=f"{self._inbox}.{self._seq}", batch=batch)
        body: dict[str, Any] = {"batch": batch}
        if expires_s is None:
            body["no_wait"] = True
        else:
            body["expires"] = int(expires_s * 1_000_000_000)
        self.current = request
        await self._nc.publish(self._next_subject, json.dumps(body).encode(), reply=request.reply)
        return request

    async def wait(self, request: _PullRequest, within: float, stop: asyncio.Event | None = None) -> None:
        """Until the request is answered, or ``stop`` is set, or the timeout (then it is abandoned)."""
        if request.done.is_set():
            return
        waiters = [asyncio.ensure_future(request.done.wait())]
        if stop is not None:
            waiters.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if not request.done.is_set() and (stop is None or not stop.is_set()):
            log.debug("pull request %s unanswered after %.1f s: abandoned", request.reply, within)
            request.done.set()

    def take(self, n: int) -> list[Msg]:
        return [self.buffer.popleft() for _ in range(min(n, len(self.buffer)))]


# ------------------------------------------------------------------------------------------ intake


class Intake:
    def __init__(
        self,
        nc: Client,
        engine: Engine,
        names: NatsNames,
        config: IntakeConfig,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] | None = None,
        relay_kick: asyncio.Event | None = None,
        scheduler_kick: asyncio.Event | None = None,
        ready: asyncio.Event | None = None,
        spec: ConsumerSpec | None = None,
    ) -> None:
        self._nc = nc
        self._spec = spec or ConsumerSpec.unpartitioned(names, config)
        self._relay_kick = relay_kick
        self._scheduler_kick = scheduler_kick
        self._ready = ready
        self._js = nc.jetstream()
        self._engine = engine
        self._names = names
        self._config = config
        self._metrics = metrics or Metrics()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._max_deliver = config.max_deliver
        self._puller = _Puller(nc, names.in_stream, self._spec.durable, buffer_limit=4 * config.batch_size + 1000)
        self._in_hand: list[Msg] = []
        """The batch being processed and settled (for in-progress acks while it runs long)."""
        self._in_hand_since = 0.0
        self.cache = WalletCache(config.cache_wallets)
        """This consumer's wallets in memory: kept while this loop runs (the owner owns the
        consumer), dropped with the loop (a loss of ownership ends it)."""
        self._ack_failures = 0
        self.unsettled = False
        """Whether a delivery to this loop may be pending un-acked at the server: True from the first
        pull until :meth:`run` returns having settled (acked, nak-ed or dead-lettered) everything
        delivered to it and flushed; stays True if it raised, or an ack/nak or the flush failed."""

    # --- lifetime ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        info = await ensure_consumer(self._js, self._names, self._config, self._spec)
        self._max_deliver = info.config.max_deliver or self._config.max_deliver
        await self._puller.start()
        keepalive = asyncio.create_task(self._keep_in_progress(), name="intake-in-progress")
        if self._ready is not None:
            self._ready.set()
        log.info(
            "intake consuming %s from %s/%s (batch %d, ack_wait %s s, max_deliver %d)",
            ", ".join(self._spec.filter_subjects),
            self._names.in_stream,
            self._spec.durable,
            self._config.batch_size,
            info.config.ack_wait,
            self._max_deliver,
        )
        flushed = False
        self.unsettled = True  # from the first pull on, until everything delivered is settled
        try:
            while not stop.is_set():
                batch = await self._next_batch(stop)
                if batch:
                    await self._handle(batch, stop)
            answered = await self._drain(stop)
            await self._puller.close()  # nothing more lands in the buffer after this
            await self._release_leftovers()
            flushed = await self._flush()
            self.unsettled = not (answered and flushed and self._ack_failures == 0)
        finally:
            # On the way out of a failure what is still in hand is left for redelivery; and the
            # wallets in memory go with the loop (whoever owns the consumer next loads them).
            self.cache.clear()
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive
            await self._puller.close()
            if not flushed:
                await self._flush()
            log.info(
                "intake stopped (%s)%s", self._spec.durable, " with deliveries unsettled" if self.unsettled else ""
            )

    async def _drain(self, stop: asyncio.Event) -> bool:
        """At shutdown: let the outstanding request end, then finish what was delivered. Returns
        whether that request ended (False: abandoned; a late delivery to it may be left pending)."""
        request = self._puller.current
        if request is not None and not request.done.is_set():
            await self._puller.wait(request, within=self._config.max_wait_s + 0.5)
        while self._puller.buffer:
            await self._handle(self._puller.take(self._config.batch_size), stop)
        return request is None or request.done.is_set()

    async def _release_leftovers(self) -> None:
        """Deliveries that landed between the drain and the unsubscribe (a late answer of an abandoned
        request): nak-ed without delay, so JetStream redelivers them at once, ahead of newer messages,
        instead of after ack_wait."""
        for msg in self._puller.take(len(self._puller.buffer)):
            try:
                await msg.nak()
            except Exception as exc:  # connection gone: it stays pending until ack_wait
                self._ack_failures += 1
                log.warning("could not nak a late delivery at shutdown: %s", exc)

    async def _flush(self) -> bool:
        """Whether the server has received everything sent so far (acks and naks above all)."""
        try:
            await self._nc.flush(timeout=int(PUBLISH_TIMEOUT_S))
        except Exception as exc:
            log.warning(
                "final flush of %s failed (%s): its last acks may not have reached NATS", self._spec.durable, exc
            )
            return False
        return True

    async def _next_batch(self, stop: asyncio.Event) -> list[Msg]:
        p, size = self._puller, self._config.batch_size
        if p.current is not None and not p.current.done.is_set():  # the prefetch sent with the last batch
            await p.wait(p.current, within=REQUEST_GRACE_S)
        if len(p.buffer) < size and not stop.is_set():
            await p.wait(await p.request(size - len(p.buffer)), within=REQUEST_GRACE_S)
        if not p.buffer and not stop.is_set():
            # Quiet: wait for one message, then take whatever else has arrived with it.
            poll = await p.request(1, expires_s=self._config.max_wait_s)
            await p.wait(poll, within=self._config.max_wait_s + REQUEST_GRACE_S, stop=stop)
            if p.buffer and not stop.is_set():
                await p.wait(await p.request(size - len(p.buffer)), within=REQUEST_GRACE_S)
            elif not p.buffer and poll.status not in (None, "408"):
                # Refused at once (409: max ack pending reached, leadership change...): do not spin.
                await wait_any(stop, seconds=STATUS_BACKOFF_S)
        batch = p.take(size)
        if batch and len(p.buffer) < size and not stop.is_set():
            await p.request(size - len(p.buffer))  # prefetch while this batch is in the database
        return batch

    async def _keep_in_progress(self) -> None:
        """While a batch runs long (a slow or unavailable database), tell JetStream it is being
        worked on, so it is not redelivered to another consumer meanwhile."""
        interval = max(self._config.ack_wait_s / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
            in_hand = self._in_hand
            if not in_hand or time.monotonic() - self._in_hand_since < interval:
                continue
            for msg in [*in_hand, *self._puller.buffer]:
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    # --- one batch --------------------------------------------------------------------------------

    async def _handle(self, msgs: list[Msg], stop: asyncio.Event) -> None:
        """One batch, in this process: parse, one transaction (the processor with this consumer's
        wallets in memory), commit, then settle (dead letters, acks, naks, one flush). The next
        batch is being pulled meanwhile (the prefetch of :meth:`_next_batch`), and is handled only
        after this one is settled: one writer, batches in stream order, so a wallet's events are
        applied in order by construction."""
        started = time.perf_counter()
        self._in_hand, self._in_hand_since = msgs, time.monotonic()
        try:
            now = self._clock()
            # Inline, not in a worker thread: a few ms a batch; in a thread it only fights the
            # event loop for the GIL (see bench/README.md).
            items = prepare(
                msgs,
                now=now,
                names=self._names,
                max_deliver=self._max_deliver,
                partitions=self._spec.partitions,
                max_age_s=self._config.event_max_age_s,
            )
            outcomes = await self._process(list(range(len(items))), items, now, stop)
            require(len(outcomes) == len(items), f"{len(outcomes)} outcomes for {len(items)} messages")
            await self._settle(msgs, items, outcomes)
        finally:
            self._in_hand = []
        elapsed = time.perf_counter() - started
        self._metrics.batch_size.observe(len(msgs))
        self._metrics.batch_seconds.observe(elapsed)
        if log.isEnabledFor(logging.DEBUG):
            counts = collections.Counter(o.disposition for o in outcomes.values())
            log.debug("batch of %d in %.1f ms: %s", len(msgs), elapsed * 1000, dict(sorted(counts.items())))
        self._metrics.consumer_lag.set(_metadata(msgs[-1])[2])

    async def _transact(self, items: Sequence[_Item], now: datetime) -> BatchOutcome:
        # In a worker thread: the event loop meanwhile receives the prefetched batch and serves
        # the service's other components.
        return await asyncio.to_thread(
            transact, self._engine, items, now, max_age_s=self._config.event_max_age_s, cache=self.cache
        )

    async def _transact_holding(self, items: Sequence[_Item], now: datetime, stop: asyncio.Event) -> BatchOutcome:
        """The transaction, tried again while the database is unavailable (the batch stays in hand)."""
        backoff: Backoff | None = None  # made at the first failure only
        while True:
            try:
                return await self._transact(items, now)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._metrics.batch_failures.labels("database").inc()
                if stop.is_set():
                    log.warning(
                        "database unavailable at shutdown (%s): %d messages released for redelivery", exc, len(items)
                    )
                    raise _GaveUp from exc
                backoff = backoff or Backoff(
                    min(DB_RETRY_FIRST_S, self._config.db_retry_max_s), self._config.db_retry_max_s, jitter=0.0
                )
                delay = backoff.next()
                log.warning("database unavailable (%s): batch of %d held, retrying in %.1f s", exc, len(items), delay)
                await wait_any(stop, seconds=delay)

    async def _process(
        self, idx: list[int], items: list[_Item], now: datetime, stop: asyncio.Event
    ) -> dict[int, _Outcome]:
        """Outcome per message index; splits the batch to isolate a message that makes it fail."""
        part = [items[i] for i in idx]
        try:
            result = await self._transact_holding(part, now, stop)
        except _GaveUp:
            return {i: _Outcome(_Action.release, "released") for i in idx}
        except Exception as exc:
            self._metrics.batch_failures.labels("error").inc()
            if len(idx) > 1:
                log.exception("batch of %d failed; splitting it to isolate the message that fails", len(idx))
                half = len(idx) // 2
                out = await self._process(idx[:half], items, now, stop)
                out.update(await self._process(idx[half:], items, now, stop))
                return out
            item = items[idx[0]]
            log.exception("message %d of %s failed in the processor", item.stream_seq, self._names.in_stream)
            if item.delivered < self._max_deliver:
                return {idx[0]: _Outcome(_Action.nak, "failed")}
            detail = f"the processor failed on every delivery ({item.delivered}): {type(exc).__name__}: {exc}"
            source = event_id = event_type = wallet_id = None
            parsed = item.incoming.event if item.incoming is not None else None
            if parsed is not None:
                source, event_id, event_type, wallet_id = parsed.source, parsed.id, parsed.type, parsed.wallet_id
            dl = Rejection(PROCESSING_ERROR, detail[:MAX_DETAIL_CHARS], source, event_id, event_type, wallet_id)
            return {idx[0]: _Outcome(_Action.dead_letter, "rejected", dl)}

        # Wake the relay for the outbox rows just committed, and the scheduler for moved wake-ups.
        if result.outbox and self._relay_kick is not None:
            self._relay_kick.set()
        if result.wakeups and self._scheduler_kick is not None:
            self._scheduler_kick.set()
        require(len(result.outcomes) == len(idx), f"{len(result.outcomes)} outcomes for {len(idx)} messages")
        return dict(zip(idx, result.outcomes, strict=True))

    async def _settle(self, msgs: list[Msg], items: list[_Item], outcomes: dict[int, _Outcome]) -> None:
        """After the commit: dead letters first (so an ack never precedes its dead letter), then acks
        and naks, then a flush so they have reached the server before the next batch."""
        dead = [(i, o.dead_letter) for i, o in outcomes.items() if o.action is _Action.dead_letter and o.dead_letter]
        published = await asyncio.gather(
            *(self._publish_dead_letter(msgs[i], items[i], dl) for i, dl in dead), return_exceptions=True
        )
        failed_dlq = set()
        for (i, dl), res in zip(dead, published, strict=True):
            if isinstance(res, BaseException):
                failed_dlq.add(i)
                if items[i].delivered < self._max_deliver:
                    log.warning("dead letter %s of message %d not published (%s): redelivered", dl.reason, i, res)
                else:  # the server delivers it no more; rejected_inputs keeps it (unless processing_error)
                    log.error(
                        "dead letter %s of %s message %d not published on its last delivery (%s); acked",
                        dl.reason,
                        self._names.in_stream,
                        items[i].stream_seq,
                        res,
                    )
            else:
                self._metrics.dead_letters.labels(dl.reason).inc()
        counted: collections.Counter[str] = collections.Counter()
        for i, outcome in sorted(outcomes.items()):
            msg = msgs[i]
            try:
                if i in failed_dlq and items[i].delivered < self._max_deliver:
                    await msg.nak(delay=self._config.nak_delay(items[i].delivered))
                elif outcome.action in (_Action.ack, _Action.dead_letter):
                    await msg.ack()
                elif outcome.action is _Action.nak:
                    await msg.nak(delay=self._config.nak_delay(items[i].delivered))
                else:
                    await msg.nak()
            except Exception as exc:  # connection gone: the message is redelivered, a no-op then
                self._ack_failures += 1
                log.warning("could not ack/nak message %d: %s", items[i].stream_seq, exc)
            counted[outcome.disposition] += 1
        for disposition, n in counted.items():  # once per label, not per message (labels() is not free)
            self._metrics.events_in.labels(disposition).inc(n)
        with contextlib.suppress(Exception):
            await self._nc.flush(timeout=int(PUBLISH_TIMEOUT_S))

    async def _publish_dead_letter(self, msg: Msg, item: _Item, dl: Rejection) -> None:
        headers = dead_letter_headers(
            dl, subject=item.subject, delivered=item.delivered, stream=self._names.in_stream, stream_seq=item.stream_seq
        )
        body = msg.data
        if len(body) > MAX_DLQ_BODY_BYTES:
            headers["Billing-Body-Truncated"] = f"{len(body)} bytes received, the first {MAX_DLQ_BODY_BYTES} here"
            body = body[:MAX_DLQ_BODY_BYTES]
        await self._js.publish(
            self._names.dlq_subject(dl.reason),
            body,
            timeout=PUBLISH_TIMEOUT_S,
            stream=self._names.dlq_stream,
            headers=headers,
        )


async def run(
    nc: Client,
    engine: Engine,
    names: NatsNames,
    config: IntakeConfig,
    stop: asyncio.Event,
    *,
    metrics: Metrics | None = None,
    clock: Callable[[], datetime] | None = None,
    relay_kick: asyncio.Event | None = None,
    scheduler_kick: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the intake until ``stop`` is set; then finish the batch in hand and return.

    One consumer's loop with no ownership: for one process alone on the durable (tests, tools).
    ``billing up`` runs :func:`consumers.nats.partitions.run_owned`, which runs this loop only while the
    instance owns the durable.

    ``relay_kick`` / ``scheduler_kick``: set after a commit that wrote outbox rows / moved a
    wallet's wake-up. ``ready``: set once the consumer exists and the intake is pulling."""
    intake = Intake(
        nc,
        engine,
        names,
        config,
        metrics=metrics,
        clock=clock,
        relay_kick=relay_kick,
        scheduler_kick=scheduler_kick,
        ready=ready,
    )
    await intake.run(stop)
