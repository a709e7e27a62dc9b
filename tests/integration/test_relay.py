"""The outbox relay against the real PostgreSQL and a real JetStream: no row skipped when writers
commit out of id order, exactly one stream message per row (Nats-Msg-Id dedup) when a relay dies
between publish and mark or loses its PubAcks, recovery after a NATS server restart and after its
database connections are killed, pruning of old published rows."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, text

from consumers.nats.names import NatsNames
from consumers.nats.relay import jetstream_of, prune_published, publish_claimed, run_relay
from consumers.runtime.embedded import EmbeddedNats
from consumers.runtime.loops import ThreadedUnitOfWork
from ledger.db import make_engine, unit_of_work
from ledger.schema import APP_ROLE
from projections.outbox import OutboxMessage, claim, enqueue
from tests.integration.outbound import (
    connect,
    count_on_subject,
    create_outbound_streams,
    delete_outbound_streams,
    namespace_of,
    read_stream,
    stop_task,
    utc_now,
    wait_until,
    write_outbox,
)

if TYPE_CHECKING:
    from tests.conftest import TestDatabase

pytestmark = pytest.mark.integration


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Any]:
    conn = await connect(nats_url)
    yield conn
    await conn.close()


@pytest.fixture
async def names(nc: Any, unique: str) -> AsyncIterator[NatsNames]:
    names = namespace_of(unique)
    js = nc.jetstream()
    await create_outbound_streams(js, names)
    yield names
    await delete_outbound_streams(js, names)


@pytest.fixture
def relay_engine(database: TestDatabase, unique: str) -> Iterator[Engine]:
    """The relay's own engine (as the service role), named so its backends can be found and killed."""
    engine = make_engine(database.url, role=APP_ROLE, connect_args={"application_name": f"relay-{unique}"[:63]})
    yield engine
    engine.dispose()


@pytest.fixture
def writers_engine(database: TestDatabase) -> Iterator[Engine]:
    engine = make_engine(database.url, role=APP_ROLE, pool_size=20)
    yield engine
    engine.dispose()


def notices(wallet: str, prefix: str, n: int, start: int = 0) -> list[OutboxMessage]:
    return [
        OutboxMessage(
            subject=f"billing.out.notices.{wallet}",
            msg_id=f"{prefix}-{i}",
            payload={"walletId": wallet, "kind": "low_balance", "balanceMicros": i, "projectedZeroAt": None},
        )
        for i in range(start, start + n)
    ]


def unpublished(engine: Engine, msg_ids: list[str]) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM outbox WHERE msg_id = ANY(:m) AND published_at IS NULL"), {"m": msg_ids}
            ).scalar_one()
        )


async def stream_msg_ids(js: Any, stream: str, subject: str) -> list[str]:
    return [m.headers["Nats-Msg-Id"] for m in await read_stream(js, stream, subject) if m.headers]


def start_relay(engine: Engine, nc: Any, names: NatsNames, **kw: Any) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_relay(engine, nc, names, stop, **kw))
    return stop, task


async def test_rows_committed_out_of_id_order_are_all_published_exactly_once(
    relay_engine: Engine, writers_engine: Engine, nc: Any, names: NatsNames, unique: str
) -> None:
    wallet = f"w{unique[-39:]}"
    subject = names.subject(f"billing.out.notices.{wallet}")
    js = nc.jetstream()
    loop = asyncio.get_running_loop()
    kick = asyncio.Event()
    stop, task = start_relay(relay_engine, nc, names, kick=kick, poll_interval=0.2, batch_size=50)

    held_n, free_n, txns_per_free, rows_per_txn = 4, 12, 4, 5
    inserted = threading.Barrier(held_n + 1)
    release = threading.Event()
    held_ids: list[int] = []
    lock = threading.Lock()

    def held_writer(k: int) -> None:
        """Takes its ids first, commits last."""
        with unit_of_work(writers_engine) as uow:
            msgs = notices(wallet, f"{unique}-held{k}", rows_per_txn)
            enqueue(uow.pg, msgs, now=utc_now())
            ids = [
                r[0]
                for r in uow.pg.execute("SELECT id FROM outbox WHERE msg_id = ANY(%s)", ([m.msg_id for m in msgs],))
            ]
            with lock:
                held_ids.extend(ids)
            inserted.wait(timeout=30)
            assert release.wait(timeout=60)
            uow.commit()
        loop.call_soon_threadsafe(kick.set)

    def free_writer(k: int) -> None:
        for t in range(txns_per_free):
            write_outbox(writers_engine, notices(wallet, f"{unique}-free{k}-{t}", rows_per_txn))
            if t % 2 == 0:
                loop.call_soon_threadsafe(kick.set)

    with ThreadPoolExecutor(max_workers=held_n + free_n) as pool:
        try:
            held = [loop.run_in_executor(pool, held_writer, k) for k in range(held_n)]
            await loop.run_in_executor(None, inserted.wait, 30)  # every held transaction has its ids
            free = [loop.run_in_executor(pool, free_writer, k) for k in range(free_n)]
            await asyncio.gather(*free)
            free_total = free_n * txns_per_free * rows_per_txn
            # Everything committed so far is published while the lower ids are still uncommitted.
            await wait_until(
                lambda: _eq(count_on_subject(js, names.out_stream, subject), free_total), timeout=20, what="free rows"
            )
            with relay_engine.connect() as conn:
                max_published = conn.execute(
                    text("SELECT max(id) FROM outbox WHERE msg_id LIKE :p AND published_at IS NOT NULL"),
                    {"p": f"{unique}-free%"},
                ).scalar_one()
            assert min(held_ids) < max_published, "the held rows must have lower ids than rows already published"
        finally:
            release.set()
        await asyncio.gather(*held)

    total = (held_n + free_n * txns_per_free) * rows_per_txn
    await wait_until(
        lambda: _eq(count_on_subject(js, names.out_stream, subject), total), timeout=20, what="all rows in the stream"
    )
    all_ids = [m.msg_id for k in range(held_n) for m in notices(wallet, f"{unique}-held{k}", rows_per_txn)]
    await wait_until(lambda: unpublished(relay_engine, all_ids) == 0, timeout=10, what="held rows marked")
    await stop_task(stop, task)

    ids = await stream_msg_ids(js, names.out_stream, subject)
    assert len(ids) == total, "each row once"
    assert len(set(ids)) == total, "each row exactly once"
    assert {i for i in ids if "-held" in i} == set(all_ids)
    bodies = [json.loads(m.data) for m in await read_stream(js, names.out_stream, subject)]
    assert all(b["walletId"] == wallet for b in bodies)


async def _eq(value: Any, expected: int) -> bool:
    return (await value) == expected


async def test_relay_killed_between_publish_and_mark_republishes_and_jetstream_dedups(
    relay_engine: Engine, nc: Any, names: NatsNames, unique: str
) -> None:
    wallet = f"w{unique[-39:]}"
    subject = names.subject(f"billing.out.notices.{wallet}")
    msgs = notices(wallet, unique, 20)
    ids = [m.msg_id for m in msgs]
    write_outbox(relay_engine, msgs)
    js = jetstream_of(nc)

    # A relay that published and died before marking: its transaction never commits.
    async with ThreadedUnitOfWork(relay_engine) as tx:
        rows = await tx.run(claim, 500)
        ours = [r for r in rows if r.msg_id in set(ids)]
        assert len(ours) == 20
        _, failed = await publish_claimed(js, names, rows)
        assert not failed
        # (no mark_published, no commit: killed here)
    assert unpublished(relay_engine, ids) == 20
    assert await count_on_subject(js, names.out_stream, subject) == 20

    registry = CollectorRegistry()
    stop, task = start_relay(relay_engine, nc, names, poll_interval=0.1, registry=registry)
    try:
        await wait_until(lambda: unpublished(relay_engine, ids) == 0, timeout=10, what="rows marked published")
    finally:
        await stop_task(stop, task)
    assert await count_on_subject(js, names.out_stream, subject) == 20, "the republish was deduplicated"
    assert (registry.get_sample_value("billing_outbox_duplicate_acks_total") or 0) >= 20
    assert sorted(await stream_msg_ids(js, names.out_stream, subject)) == sorted(ids)


class LostAcks:
    """A JetStream context whose publishes reach the server but whose PubAcks are lost (once)."""

    def __init__(self, js: Any) -> None:
        self.js = js
        self.lose = True
        self.lost = 0

    async def publish_async(self, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        real = await self.js.publish_async(*args, **kwargs)
        await real  # stored by the server
        if not self.lose:
            return real
        self.lost += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_exception(TimeoutError("PubAck lost"))
        return fut


async def test_lost_pubacks_are_retried_and_deduplicated(
    relay_engine: Engine, nc: Any, names: NatsNames, unique: str
) -> None:
    wallet = f"w{unique[-39:]}"
    subject = names.subject(f"billing.out.notices.{wallet}")
    msgs = notices(wallet, unique, 10)
    ids = [m.msg_id for m in msgs]
    flaky = LostAcks(nc.jetstream())
    stop, task = start_relay(relay_engine, flaky, names, poll_interval=0.1, backoff_initial=0.05, backoff_max=0.2)
    try:
        write_outbox(relay_engine, msgs)
        await wait_until(lambda: flaky.lost >= 10, timeout=10, what="publishes whose acks were lost")
        assert unpublished(relay_engine, ids) == 10
        flaky.lose = False
        await wait_until(lambda: unpublished(relay_engine, ids) == 0, timeout=10, what="rows marked published")
    finally:
        await stop_task(stop, task)
    assert await count_on_subject(flaky.js, names.out_stream, subject) == 10


async def test_relay_recovers_after_the_nats_server_restarts(relay_engine: Engine, tmp_path: Path, unique: str) -> None:
    """The relay's connection is closed by the server going away and reopened by the client when it
    is back; rows written meanwhile are published once, rows published before are kept."""
    server = EmbeddedNats(tmp_path / "nats")
    url = server.start()
    names = namespace_of(unique)
    wallet = f"w{unique[-39:]}"
    subject = names.subject(f"billing.out.notices.{wallet}")
    nc = await connect(url)
    registry = CollectorRegistry()
    kick = asyncio.Event()
    stop, task = start_relay(
        relay_engine, nc, names, kick=kick, poll_interval=0.1, ack_timeout=1.0, backoff_max=0.5, registry=registry
    )
    try:
        js = nc.jetstream()
        await create_outbound_streams(js, names)
        before = notices(wallet, f"{unique}-a", 10)
        write_outbox(relay_engine, before)
        kick.set()
        await wait_until(lambda: unpublished(relay_engine, [m.msg_id for m in before]) == 0, timeout=10, what="a")

        server.stop()
        await wait_until(lambda: not nc.is_connected, timeout=10, what="the client to notice")
        during = notices(wallet, f"{unique}-b", 10)
        write_outbox(relay_engine, during)
        kick.set()
        await wait_until(
            lambda: (registry.get_sample_value("billing_outbox_relay_pass_failures_total") or 0) >= 1,
            timeout=15,
            what="a failed pass while NATS is down",
        )
        assert unpublished(relay_engine, [m.msg_id for m in during]) == 10

        server.start()
        await wait_until(lambda: nc.is_connected, timeout=15, what="the client to reconnect")
        await wait_until(
            lambda: unpublished(relay_engine, [m.msg_id for m in during]) == 0, timeout=20, what="rows after restart"
        )
        ids = await stream_msg_ids(js, names.out_stream, subject)
        assert sorted(ids) == sorted(m.msg_id for m in before + during)
    finally:
        await stop_task(stop, task)
        await nc.close()
        server.stop()


async def test_relay_recovers_after_its_database_connections_are_killed(
    relay_engine: Engine, owner_engine: Engine, nc: Any, names: NatsNames, unique: str
) -> None:
    wallet = f"w{unique[-39:]}"
    subject = names.subject(f"billing.out.notices.{wallet}")
    js = nc.jetstream()
    stop, task = start_relay(relay_engine, nc, names, poll_interval=0.1, backoff_max=0.5)
    try:
        first = notices(wallet, f"{unique}-a", 5)
        write_outbox(relay_engine, first)
        await wait_until(lambda: unpublished(relay_engine, [m.msg_id for m in first]) == 0, timeout=10, what="a")
        with owner_engine.connect() as conn:
            killed = conn.execute(
                text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :a"),
                {"a": f"relay-{unique}"[:63]},
            ).scalar_one()
        assert killed >= 1
        second = notices(wallet, f"{unique}-b", 5)
        write_outbox(relay_engine, second)  # a new pooled connection (pre-ping replaces dead ones)
        await wait_until(lambda: unpublished(relay_engine, [m.msg_id for m in second]) == 0, timeout=15, what="b")
    finally:
        await stop_task(stop, task)
    assert await count_on_subject(js, names.out_stream, subject) == 10


def test_prune_deletes_only_old_published_rows(app_engine: Engine, owner_engine: Engine, unique: str) -> None:
    wallet = f"w{unique[-39:]}"
    old, fresh, pending = (
        notices(wallet, f"{unique}-old", 3),
        notices(wallet, f"{unique}-new", 2),
        notices(wallet, f"{unique}-pending", 2),
    )
    write_outbox(app_engine, old + fresh + pending)
    long_ago = utc_now() - timedelta(days=400)
    with owner_engine.begin() as conn:
        conn.execute(
            text("UPDATE outbox SET published_at = :t WHERE msg_id = ANY(:m)"),
            {"t": long_ago, "m": [m.msg_id for m in old]},
        )
        conn.execute(
            text("UPDATE outbox SET published_at = now() WHERE msg_id = ANY(:m)"), {"m": [m.msg_id for m in fresh]}
        )
    # Far past every other test's rows: only the rows published 400 days ago are older than 365 days.
    assert prune_published(app_engine, older_than_days=365, batch=2) == 3
    with app_engine.connect() as conn:
        left = conn.execute(
            text("SELECT msg_id FROM outbox WHERE msg_id LIKE :p ORDER BY msg_id"), {"p": f"{unique}-%"}
        ).scalars()
        assert sorted(left) == sorted(m.msg_id for m in fresh + pending)
