"""Helpers of the relay, scheduler and admission tests: the outbound streams of one test's namespace,
reading a stream back, waiting on a condition (bounded), writing outbox rows and events."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import nats
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError
from sqlalchemy import Engine

from consumers.nats.names import NatsNames
from ledger.db import unit_of_work
from ledger.events import Event, event_to_json
from projections.outbox import OutboxMessage, enqueue
from projections.processor import BatchResult, Incoming, process_batch

DUPLICATE_WINDOW_S = 120.0


def utc_now() -> datetime:
    return datetime.now(UTC)


def namespace_of(unique: str) -> NatsNames:
    return NatsNames(unique[-40:])


async def create_outbound_streams(js: JetStreamContext, names: NatsNames) -> None:
    """COMPUTE_COMMANDS and BILLING_OUT of this namespace, as the service declares them."""
    for name, subjects in (
        (names.commands_stream, [names.stop_subject]),
        (names.out_stream, [names.out_subjects]),
    ):
        await js.add_stream(
            StreamConfig(name=name, subjects=subjects, storage=StorageType.FILE, duplicate_window=DUPLICATE_WINDOW_S)
        )


async def delete_outbound_streams(js: JetStreamContext, names: NatsNames) -> None:
    for name in (names.commands_stream, names.out_stream):
        with contextlib.suppress(TimeoutError, NotFoundError, nats.errors.Error):
            await js.delete_stream(name)


async def count_on_subject(js: JetStreamContext, stream: str, subject: str) -> int:
    info = await js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def read_stream(js: JetStreamContext, stream: str, subject: str) -> list[Msg]:
    """Every message of ``stream`` on ``subject`` (an ephemeral consumer, read to the end)."""
    expected = await count_on_subject(js, stream, subject)
    if expected == 0:
        return []
    sub = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0),
    )
    out: list[Msg] = []
    try:
        deadline = time.monotonic() + 10
        while len(out) < expected and time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(batch=min(500, expected - len(out)), timeout=2)
            except nats.errors.TimeoutError:
                continue
            out.extend(msgs)
            for m in msgs:
                await m.ack()
    finally:
        await sub.unsubscribe()
    return out


async def wait_until(
    condition: Callable[[], Any] | Callable[[], Awaitable[Any]],
    *,
    timeout: float,  # noqa: ASYNC109 - a bound on polling, not an I/O timeout
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll ``condition`` (sync or async) until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        last = result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


def write_outbox(engine: Engine, messages: Sequence[OutboxMessage]) -> None:
    with unit_of_work(engine) as uow:
        enqueue(uow.pg, messages, now=utc_now())
        uow.commit()


def process(engine: Engine, events: Sequence[Event], *, now: datetime | None = None) -> BatchResult:
    with unit_of_work(engine) as uow:
        result = process_batch(uow.pg, [Incoming(e, event_to_json(e)) for e in events], now=now or utc_now())
        uow.commit()
    return result


async def connect(url: str, **kwargs: Any) -> nats.NATS:
    return await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.1, connect_timeout=2, **kwargs)


async def stop_task(stop: asyncio.Event, task: asyncio.Task[Any], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    stop.set()
    await asyncio.wait_for(task, timeout)
