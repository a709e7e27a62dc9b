"""NATS side of bench/bench_e2e.py: which server, publishing a workload, and baseline A (a bare
nats-py consumer of the same messages, with nothing behind it).

Baseline A, two ways, both on a durable pull consumer with explicit acks, acking every message:

* ``fetch``: nats-py's own ``pull_subscribe(...).fetch(1000)``;
* ``raw``: pull requests sent by hand (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>`` with a batch
  of 1000), the deliveries collected by one core subscription callback, the next request sent as
  soon as a batch is complete and the finished batch acked meanwhile. This is the shape of the
  service's own intake loop (``consumers/intake.py``), without parsing, database or dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from bench.e2e_workload import Message

WINDOW = 1000
BATCH = 1000


@contextlib.contextmanager
def nats_server() -> Iterator[str]:
    """A NATS URL with JetStream: the environment's, the local default port, else an embedded one."""
    url = os.environ.get("BILLING_BENCH_NATS_URL") or os.environ.get("BILLING_TEST_NATS_URL")
    if url:
        yield url
        return
    try:
        socket.create_connection(("127.0.0.1", 4222), 1).close()
        yield "nats://127.0.0.1:4222"
        return
    except OSError:
        pass
    from consumers.embedded import EmbeddedNats

    with tempfile.TemporaryDirectory(prefix="billing-bench-nats-") as d, EmbeddedNats(Path(d)) as srv:
        yield srv.url


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(url, max_reconnect_attempts=2, connect_timeout=5)
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()


async def publish_all(
    js: JetStreamContext,
    subject_of: Callable[[Message], str],
    messages: Sequence[Message],
    *,
    on_publish: Callable[[int], None] | None = None,
) -> float:
    """``publish_async`` in windows of 1000, each window's PubAcks awaited; ``Nats-Msg-Id`` where
    the producer sets one. ``on_publish(i)`` is called just before message i is handed to the
    client. Returns the wall seconds spent."""
    t = time.perf_counter()
    for i in range(0, len(messages), WINDOW):
        futures = []
        for k in range(i, min(i + WINDOW, len(messages))):
            m = messages[k]
            if on_publish is not None:
                on_publish(k)
            headers = {"Nats-Msg-Id": m.msg_id} if m.msg_id else None
            futures.append(await js.publish_async(subject_of(m), m.data, headers=headers))
        acks = await asyncio.gather(*futures)
        dup = [a for a in acks if a.duplicate]
        if dup:
            raise RuntimeError(f"{len(dup)} messages dropped as duplicates by JetStream: {dup[:2]}")
    return time.perf_counter() - t


async def wait_drained(js: JetStreamContext, stream: str, durable: str, within_s: float = 10.0) -> None:
    """Acks are fire-and-forget: the server applies them a moment later."""
    deadline = time.monotonic() + within_s
    while True:
        ci = await js.consumer_info(stream, durable)
        if ci.num_pending == 0 and ci.num_ack_pending == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{stream}/{durable}: pending {ci.num_pending}, ack pending {ci.num_ack_pending}")
        await asyncio.sleep(0.05)


async def baseline_a(url: str, namespace: str, messages: Sequence[Message]) -> dict[str, float]:
    """Publish the messages to a bare stream (file storage, like the service's), then consume them
    twice, each consumer acking every message. Returns msgs/s of publish, fetch and raw."""
    stream = f"{namespace.upper()}_RAW"
    n = len(messages)
    out: dict[str, float] = {}
    async with connect(url) as nc:
        js = nc.jetstream(timeout=30)
        await js.add_stream(
            StreamConfig(name=stream, subjects=[f"{namespace}.raw.>"], storage=StorageType.FILE, duplicate_window=120)
        )
        try:
            dt = await publish_all(js, lambda m: f"{namespace}.raw.{m.wallet_id}", messages)
            out["publish"] = n / dt

            config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=20_000, ack_wait=60)
            sub = await js.pull_subscribe(f"{namespace}.raw.>", durable="fetch", stream=stream, config=config)
            got = 0
            t = time.perf_counter()
            while got < n:
                batch = await sub.fetch(BATCH, timeout=10)
                for m in batch:
                    await m.ack()
                got += len(batch)
            await nc.flush()
            out["fetch"] = n / (time.perf_counter() - t)
            await wait_drained(js, stream, "fetch")
            await sub.unsubscribe()

            out["raw"] = n / await _raw_pull(nc, js, stream, n)
            await wait_drained(js, stream, "raw")
        finally:
            await js.delete_stream(stream)
    return out


async def _raw_pull(nc: Client, js: JetStreamContext, stream: str, n: int) -> float:
    await js.add_consumer(
        stream, ConsumerConfig(durable_name="raw", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=20_000, ack_wait=60)
    )
    inbox = nc.new_inbox()
    buffer: list[Msg] = []
    complete = asyncio.Event()
    want = 0

    async def on_msg(msg: Msg) -> None:
        if not msg.reply:  # a status (404/408) ending a request: no payload, no ack subject
            complete.set()
            return
        buffer.append(msg)
        if len(buffer) >= want:
            complete.set()

    async def request(batch: int) -> None:
        nonlocal want
        want = batch
        complete.clear()
        body = json.dumps({"batch": batch, "expires": 10_000_000_000}).encode()
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.raw", body, reply=inbox)

    sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=4 * BATCH)
    got = 0
    t = time.perf_counter()
    await request(min(BATCH, n))
    while got < n:
        await asyncio.wait_for(complete.wait(), 15)
        batch, buffer[:] = list(buffer), []
        got += len(batch)
        if got < n:
            await request(min(BATCH, n - got))  # the next batch is on its way while this one is acked
        for m in batch:
            await m.ack()
    await nc.flush()
    dt = time.perf_counter() - t
    await sub.unsubscribe()
    return dt


async def delete_streams(url: str, names: Sequence[str]) -> None:
    async with connect(url) as nc:
        js = nc.jetstream(timeout=10)
        for name in names:
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
