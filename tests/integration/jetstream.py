"""Helpers of the JetStream tests: a namespace per test with the contract's streams, publishing
events, an in-process intake, and bounded waits on conditions (never bare sleeps)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import timedelta
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck, RawStreamMsg
from sqlalchemy import Engine, text

from consumers.nats import intake
from consumers.nats.intake import IntakeConfig
from consumers.nats.names import NatsNames
from consumers.nats.streams import ensure_streams, stream_specs
from consumers.runtime.metrics import Metrics
from ledger.events import Event, event_to_json
from tests.factories import T0

NOW = T0 + timedelta(minutes=2)
"""The intake's clock in these tests: the charging vectors were computed at this instant."""

POLL_S = 0.02


def namespace_of(unique: str) -> str:
    """A NATS namespace (at most 40 characters) from the per-test unique name."""
    return unique[-40:].lstrip("_") or "t"


async def wait_until(
    condition: Callable[[], Awaitable[bool] | bool], *, within: float = 15.0, what: str = "condition"
) -> None:
    """Poll ``condition`` (sync or async) every few ms until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(POLL_S)


@contextlib.asynccontextmanager
async def jetstream(nats_url: str, unique: str) -> AsyncIterator[tuple[Client, JetStreamContext, NatsNames]]:
    """A connection and the contract's streams in a namespace of this test; deleted afterwards."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    names = NatsNames(namespace_of(unique))
    await ensure_streams(js, names, replicas=1)
    try:
        yield nc, js, names
    finally:
        for spec in stream_specs(names):
            with contextlib.suppress(Exception):
                await js.delete_stream(spec.name)
        await nc.close()


async def publish_raw(
    js: JetStreamContext, subject: str, raw: bytes, *, msg_id: str | None = None, stream: str | None = None
) -> PubAck:
    return await js.publish(subject, raw, stream=stream, headers={"Nats-Msg-Id": msg_id} if msg_id else None)


async def publish_events(js: JetStreamContext, names: NatsNames, events: Iterable[Event], *, tag: str = "") -> int:
    """Publish each event to billing.in.<its wallet>; returns the last stream sequence."""
    last = 0
    for i, ev in enumerate(events):
        ack = await publish_raw(
            js,
            names.in_subject(ev.wallet_id),
            event_to_json(ev),
            msg_id=f"{tag}{ev.source}/{ev.id}/{i}",
            stream=names.in_stream,
        )
        last = ack.seq
    return last


async def publish_retrying(
    js: JetStreamContext, subject: str, raw: bytes, *, msg_id: str, within: float = 30.0, attempt_s: float = 2.0
) -> PubAck:
    """A producer's publish through a NATS node failure: tried again (same ``Nats-Msg-Id``, so the
    stream keeps one copy) on a timeout or a lost connection, for at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await js.publish(subject, raw, timeout=attempt_s, headers={"Nats-Msg-Id": msg_id})
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"publish to {subject} failed for {within} s: {exc!r}") from exc
            await asyncio.sleep(0.1)


async def drained(js: JetStreamContext, names: NatsNames, durable: str, last_seq: int) -> bool:
    """Every message up to ``last_seq`` delivered and acked (none pending, none awaiting a retry)."""
    info = await js.consumer_info(names.in_stream, durable)
    return bool(info.num_pending == 0 and info.num_ack_pending == 0 and info.ack_floor.stream_seq >= last_seq)


async def dead_letters(js: JetStreamContext, names: NatsNames) -> list[RawStreamMsg]:
    """Every message of this namespace's DLQ stream, in order."""
    info = await js.stream_info(names.dlq_stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        out.append(await js.get_msg(names.dlq_stream, seq))
    return out


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def running_intake(
    nc: Client,
    engine: Engine,
    names: NatsNames,
    config: IntakeConfig,
    *,
    metrics: Metrics | None = None,
    clock: Callable[[], Any] = lambda: NOW,
) -> AsyncIterator[asyncio.Task[None]]:
    """The intake as an asyncio task of the test; stopped (and awaited, bounded) on exit."""
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        intake.run(nc, engine, names, config, stop, metrics=metrics, clock=clock, ready=ready),
        name="test-intake",
    )
    ready_waiter = asyncio.ensure_future(ready.wait())
    await asyncio.wait([task, ready_waiter], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    ready_waiter.cancel()
    if task.done():
        task.result()  # raise its failure
    assert ready.is_set(), "intake not ready within 10 s"
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


def query(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params).all())


def balance(engine: Engine, wallet_id: str) -> int | None:
    rows = query(engine, "SELECT balance_micros FROM account_balances WHERE account = :a", a=f"wallet:{wallet_id}")
    return rows[0][0] if rows else None
