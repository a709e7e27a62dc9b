"""Admission replies (DESIGN section 5, rules R2, R3 and R5): NATS request-reply responders.

``billing.admission.rental``
    ask ``{"walletId", "resourceId", "pricePerHourMicros", "admissionId"?}``; answer
    ``{"admitted", "admissionId", "reason", "availableMicros"}``. Admitted iff the wallet's available
    balance is at least one hour of the price; an admitted answer places a hold of one hour's price
    (R3) until the matching ``gpu.rental.started``/``resumed`` arrives or 120 s pass. ``admissionId``
    is the ask's when it carries one (asking again with it is idempotent), else a new uuid4 hex.
``billing.admission.serverless``
    ask ``{"walletId", "endpointId"}``; answer ``{"admitted", "reason", "availableMicros"}``.
    Admitted iff available >= $0.10 and fewer than 60 jobs of the wallet were admitted in the
    rolling minute (R5).

A malformed ask is answered ``{"admitted": false, "reason": "invalid request: <what to fix>"}``.
If the decision cannot be taken (database unreachable), the answer is a refusal whose reason
starts with ``unavailable:`` (retry later); nothing is kept then.

Each answer is decided in one transaction (``projections.write_path.write`` of an ``AdmitRental``
or ``AdmitServerless`` command, which locks the wallet) and committed before the reply is sent; a
reply lost after the commit is harmless (a retry with the same ``admissionId`` is idempotent, and a
new ask for the same resource replaces that resource's hold).

Plain nats-py, not FastStream: this component receives the service's existing nats-py connection
and a stop event, like the relay and the scheduler; a FastStream broker opens and owns its own
connection and lifecycle. FastStream's automatic body validation would also work against the
contract here: a malformed ask must get an answer that says what to fix, so the raw body is
validated by hand anyway (pydantic v2 models below, camelCase aliases, strict ints). Subscriptions
use a queue group so several instances share the load, and each instance handles up to
``max_concurrency`` asks at once (different wallets proceed in parallel; one wallet's asks take
turns on its row lock). nats-py re-subscribes by itself after a reconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Final, Literal, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails
from sqlalchemy import Engine

from consumers.nats.names import NatsNames
from consumers.runtime.errors import Backoff, is_transient
from consumers.runtime.loops import utc_now, wait_any
from ledger.db import unit_of_work
from ledger.events import ID_PATTERN, MAX_PRICE_PER_HOUR_MICROS
from ledger.invariants import fail, require
from ledger.text import printable
from projections.rules import AdmissionAnswer, ServerlessAdmissionAnswer
from projections.wallet_store import lock_wallets
from projections.write_path import AdmitRental, AdmitServerless, write

log = logging.getLogger("billing.admission")

T = TypeVar("T")

DEFAULT_QUEUE_GROUP: Final = "billing-admission"
DEFAULT_MAX_CONCURRENCY: Final = 4
# How long a stopping responder waits for the asks in hand.
DRAIN_TIMEOUT_S: Final = 5.0
MAX_ERRORS_LISTED: Final = 5
MAX_QUOTED_CHARS: Final = 60
MAX_SHOWN_REPLY_CHARS: Final = 200  # of a reply subject in a log line (a subject may be long)

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
PricePerHourMicros = Annotated[int, Field(ge=0, le=MAX_PRICE_PER_HOUR_MICROS)]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        strict=True,
        frozen=True,
        extra="ignore",  # a newer compute plane may send more; what we need is checked strictly
    )


class RentalAsk(_Model):
    wallet_id: Id
    resource_id: Id
    price_per_hour_micros: PricePerHourMicros
    admission_id: Id | None = None


class ServerlessAsk(_Model):
    wallet_id: Id
    endpoint_id: Id


class RentalAnswer(_Model):
    admitted: bool
    admission_id: str
    reason: str
    available_micros: int


class ServerlessAnswer(_Model):
    admitted: bool
    reason: str
    available_micros: int


class InvalidAnswer(_Model):
    admitted: Literal[False] = False
    reason: str


_RENTAL_SHAPE: Final = (
    '{"walletId": "<id>", "resourceId": "<id>", "pricePerHourMicros": <integer>, "admissionId": "<id>" (optional)}'
)
_SERVERLESS_SHAPE: Final = '{"walletId": "<id>", "endpointId": "<id>"}'


class AdmissionMetrics:
    """The admission replies' Prometheus metrics, in ``registry`` (the service's)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.asks = Counter(
            "billing_admission_asks",
            "Admission asks answered, by kind (rental, serverless) and outcome "
            "(admitted, refused, invalid, unavailable).",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "billing_admission_seconds",
            "Time from an ask's arrival to its answer (decision, commit, reply).",
            ["kind"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )


# ------------------------------------------------------------------------------------ validation


def describe_validation_error(exc: ValidationError, shape: str) -> str:
    """``invalid request: pricePerHourMicros: must be an integer ...; expected {...}``."""
    errors = exc.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return f"invalid request: the body is not valid JSON; expected {shape}"
    if any(e["type"] in ("model_type", "model_attributes_type", "dict_type") for e in errors):
        return f"invalid request: the body must be a JSON object {shape}"
    parts = [_describe_one(e) for e in errors[:MAX_ERRORS_LISTED]]
    if len(errors) > MAX_ERRORS_LISTED:
        parts.append(f"and {len(errors) - MAX_ERRORS_LISTED} more")
    return f"invalid request: {'; '.join(parts)}; expected {shape}"


def _describe_one(e: ErrorDetails) -> str:
    where = ".".join(str(p) for p in e["loc"]) or "body"
    kind = e["type"]
    ctx: dict[str, Any] = dict(e.get("ctx") or {})
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{where}: must be an integer (a JSON number, not a string, boolean or fraction), got {_quote(e)}"
    if kind == "string_type":
        return f"{where}: must be a string, got {_quote(e)}"
    if kind == "string_pattern_mismatch":
        return f"{where}: must match {ctx.get('pattern')} (1 to 64 letters, digits, _ or -), got {_quote(e)}"
    if kind == "greater_than_equal":
        return f"{where}: must be >= {ctx.get('ge')}, got {_quote(e)}"
    if kind == "less_than_equal":
        return f"{where}: must be <= {ctx.get('le')}, got {_quote(e)}"
    return f"{where}: {e['msg']}, got {_quote(e)}"


def _quote(e: ErrorDetails) -> str:
    try:
        text = json.dumps(e.get("input"), ensure_ascii=True, default=str)
    except (TypeError, ValueError, RecursionError):
        text = repr(e.get("input"))
    return text if len(text) <= MAX_QUOTED_CHARS else text[: MAX_QUOTED_CHARS - 3] + "..."


def _dump(model: _Model) -> bytes:
    return model.model_dump_json(by_alias=True).encode()


# ------------------------------------------------------------------------------------- decisions


def decide_rental(
    engine: Engine, ask: RentalAsk, *, clock: Callable[[], datetime] = utc_now
) -> tuple[RentalAnswer, datetime | None]:
    """R2/R3 in one committed transaction. Returns the answer and the wallet's next wake-up.

    ``now`` is read once the wallet is locked, so one wallet's decisions are taken in the order
    of their instants (two asks racing for the lock would otherwise commit out of time order)."""
    admission_id = ask.admission_id or uuid.uuid4().hex
    with unit_of_work(engine) as uow:
        lock_wallets(uow.pg, [ask.wallet_id])
        command = AdmitRental(ask.wallet_id, ask.resource_id, ask.price_per_hour_micros, admission_id)
        written = write(uow.pg, command, now=clock())
        uow.commit()
    answer = written.answer
    if not isinstance(answer, AdmissionAnswer):
        fail("a rental admission without an answer")
    wakeup = written.next_wakeups.get(ask.wallet_id)
    reply = RentalAnswer(
        admitted=answer.admitted,
        admission_id=answer.admission_id,
        reason=answer.reason,
        available_micros=answer.available_micros,
    )
    return reply, wakeup


def decide_serverless(
    engine: Engine, ask: ServerlessAsk, *, clock: Callable[[], datetime] = utc_now
) -> ServerlessAnswer:
    """R5 in one committed transaction.

    The rules refuse an admission instant earlier than one already recorded for the wallet. Under
    the wallet's lock, ``now`` is the clock, or the wallet's latest recorded admission if that is
    later (another instance whose clock runs slightly ahead): the window then ends that much later
    for this job, never earlier, so the limit is never exceeded."""
    with unit_of_work(engine) as uow:
        lock_wallets(uow.pg, [ask.wallet_id])
        written = write(uow.pg, AdmitServerless(ask.wallet_id, ask.endpoint_id), now=clock())
        uow.commit()
    answer = written.answer
    if not isinstance(answer, ServerlessAdmissionAnswer):
        fail("a serverless admission without an answer")
    return ServerlessAnswer(admitted=answer.admitted, reason=answer.reason, available_micros=answer.available_micros)


class AdmissionResponder:
    """Turns one ask (raw bytes) into one answer (raw bytes); usable from any transport."""

    def __init__(
        self,
        engine: Engine,
        *,
        relay_kick: asyncio.Event | None = None,
        scheduler_kick: asyncio.Event | None = None,
        metrics: AdmissionMetrics | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.engine = engine
        self.relay_kick = relay_kick
        self.scheduler_kick = scheduler_kick
        self.metrics = metrics or AdmissionMetrics()
        self.clock = clock

    async def rental(self, raw: bytes) -> bytes:
        started = time.perf_counter()
        try:
            ask = RentalAsk.model_validate_json(raw)
        except ValidationError as exc:
            return self._invalid("rental", describe_validation_error(exc, _RENTAL_SHAPE), started)
        try:
            answer, wakeup = await self._decide(lambda: decide_rental(self.engine, ask, clock=self.clock))
        except Exception as exc:
            reason = _unavailable(exc)
            log.warning("rental admission for %s failed: %s", ask.wallet_id, reason, exc_info=not _expected(exc))
            body = RentalAnswer(admitted=False, admission_id=ask.admission_id or "", reason=reason, available_micros=0)
            return self._answered("rental", "unavailable", _dump(body), started)
        # The hold may have brought available to zero (stop commands in the outbox), and it moves
        # the predicted zero earlier: wake the relay and the scheduler.
        if self.relay_kick is not None:
            self.relay_kick.set()
        if wakeup is not None and self.scheduler_kick is not None:
            self.scheduler_kick.set()
        return self._answered("rental", "admitted" if answer.admitted else "refused", _dump(answer), started)

    async def serverless(self, raw: bytes) -> bytes:
        started = time.perf_counter()
        try:
            ask = ServerlessAsk.model_validate_json(raw)
        except ValidationError as exc:
            return self._invalid("serverless", describe_validation_error(exc, _SERVERLESS_SHAPE), started)
        try:
            answer = await self._decide(lambda: decide_serverless(self.engine, ask, clock=self.clock))
        except Exception as exc:
            reason = _unavailable(exc)
            log.warning("serverless admission for %s failed: %s", ask.wallet_id, reason, exc_info=not _expected(exc))
            body = ServerlessAnswer(admitted=False, reason=reason, available_micros=0)
            return self._answered("serverless", "unavailable", _dump(body), started)
        return self._answered("serverless", "admitted" if answer.admitted else "refused", _dump(answer), started)

    async def _decide(self, fn: Callable[[], T]) -> T:
        """Run a decision in a worker thread; one retry when the connection was lost under it
        (a pooled connection to a restarted server). Nothing is kept by a failed attempt."""
        try:
            return await asyncio.to_thread(fn)
        except Exception as exc:
            if not is_transient(exc):
                raise
            return await asyncio.to_thread(fn)

    def _invalid(self, kind: str, reason: str, started: float) -> bytes:
        return self._answered(kind, "invalid", _dump(InvalidAnswer(reason=reason)), started)

    def _answered(self, kind: str, outcome: str, body: bytes, started: float) -> bytes:
        self.metrics.asks.labels(kind=kind, outcome=outcome).inc()
        self.metrics.seconds.labels(kind=kind).observe(time.perf_counter() - started)
        return body


def _expected(exc: BaseException) -> bool:
    return is_transient(exc)


def _unavailable(exc: BaseException) -> str:
    if is_transient(exc):
        return "unavailable: billing cannot reach its database right now; nothing was held, retry shortly"
    return f"unavailable: billing could not decide ({type(exc).__name__}); nothing was held, retry shortly"


# ------------------------------------------------------------------------------------ transport


async def run_admission(
    engine: Engine,
    nc_or_js: NATS | JetStreamContext,
    names: NatsNames,
    stop: asyncio.Event,
    *,
    queue: str = DEFAULT_QUEUE_GROUP,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    relay_kick: asyncio.Event | None = None,
    scheduler_kick: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> None:
    """Answer admission asks on ``names.admission_rental`` and ``names.admission_serverless`` (queue
    group ``queue``) until ``stop`` is set; then stop taking asks and finish those in hand.

    ``relay_kick`` / ``scheduler_kick``: set after an admission that may have written stop commands
    or moved the wallet's predicted zero earlier. ``ready``: set once both subscriptions are made.
    ``registry``: where the metrics go (the service's registry for ``GET /metrics``). ``clock``: the
    instant ``now`` of the rules (wall-clock UTC).
    """
    require(max_concurrency >= 1, f"max_concurrency {max_concurrency}")
    nc = nc_or_js._nc if isinstance(nc_or_js, JetStreamContext) else nc_or_js
    responder = AdmissionResponder(
        engine,
        relay_kick=relay_kick,
        scheduler_kick=scheduler_kick,
        metrics=AdmissionMetrics(registry),
        clock=clock,
    )
    asks = _Asks(max_concurrency)
    subs = await _subscribe(nc, names, queue, stop, asks, responder)
    if subs:
        log.info(
            "admission replies on %s and %s (queue %s, up to %d at once)",
            names.admission_rental,
            names.admission_serverless,
            queue,
            max_concurrency,
        )
        if ready is not None:
            ready.set()
    try:
        while not stop.is_set():
            if nc.is_closed:
                log.error("admission: the NATS connection is closed for good; no asks can arrive until restart")
            await wait_any(stop, seconds=5.0)
    finally:
        for sub in subs:
            await _unsubscribe(sub)
        if asks.in_hand:
            await asyncio.wait(list(asks.in_hand), timeout=DRAIN_TIMEOUT_S)
        log.info("admission replies stopped")


async def _subscribe(
    nc: NATS, names: NatsNames, queue: str, stop: asyncio.Event, asks: _Asks, responder: AdmissionResponder
) -> list[Subscription]:
    """Both subscriptions, tried again with a backoff until they are made or ``stop`` is set."""
    subs: list[Subscription] = []
    backoff = Backoff()
    while not stop.is_set() and not subs:
        try:
            subs.append(await nc.subscribe(names.admission_rental, queue=queue, cb=asks.handler(responder.rental)))
            subs.append(
                await nc.subscribe(names.admission_serverless, queue=queue, cb=asks.handler(responder.serverless))
            )
        except Exception as exc:
            for sub in subs:
                await _unsubscribe(sub)
            subs.clear()
            delay = backoff.next()
            log.warning("admission: cannot subscribe (%s: %s), retrying in %.2f s", type(exc).__name__, exc, delay)
            await wait_any(stop, seconds=delay)
    return subs


class _Asks:
    """The asks in hand: at most ``max_concurrency`` at once (the subscription's queue holds the rest)."""

    def __init__(self, max_concurrency: int) -> None:
        self.slots = asyncio.Semaphore(max_concurrency)
        self.in_hand: set[asyncio.Task[None]] = set()

    def handler(self, answer: Callable[[bytes], Awaitable[bytes]]) -> Callable[[Msg], Awaitable[None]]:
        async def on_message(msg: Msg) -> None:
            if not msg.reply:
                # A publish, not a request: nobody would read the answer, and an admitted one would
                # hold an hour of the wallet's money for nothing.
                log.warning("admission: ask on %s without a reply subject ignored (use request-reply)", msg.subject)
                return
            if not _answerable(msg.reply):
                # Not UTF-8 (read through consumers.nats.safety): nats-py cannot publish to it
                # (UnicodeEncodeError), so decide nothing: an admitted ask would hold money for an
                # answer nobody gets. One line, the subject's bytes as escapes.
                log.warning(
                    "admission: ask on %s ignored: its reply subject %s is not UTF-8 (use a NATS client's request)",
                    msg.subject,
                    printable(msg.reply)[:MAX_SHOWN_REPLY_CHARS],
                )
                return
            await self.slots.acquire()  # back-pressure: the subscription's queue holds the rest
            task = asyncio.create_task(_answer(msg, answer, self.slots))
            self.in_hand.add(task)
            task.add_done_callback(self.in_hand.discard)

        return on_message


def _answerable(reply: str) -> bool:
    try:
        reply.encode()
    except UnicodeEncodeError:
        return False
    return True


async def _answer(msg: Msg, answer: Callable[[bytes], Awaitable[bytes]], slots: asyncio.Semaphore) -> None:
    try:
        await msg.respond(await answer(msg.data))
    except Exception as exc:  # the asker times out and retries; never kill the subscription
        log.warning("admission: could not answer on %s: %s: %s", msg.subject, type(exc).__name__, exc)
    finally:
        slots.release()


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception as exc:  # closed connection: nothing to undo
        log.debug("admission: unsubscribe failed: %s", exc)
