"""The real `billing up` as a subprocess against the run's PostgreSQL and NATS: ready, charging,
metrics, a clean exit 0 on SIGTERM, and exactly-once counting across a `kill -9` mid-stream. Also
`billing dlq list` / `billing dlq replay`, and /readyz answering 503 when the database is gone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy import Engine, create_engine

from consumers.http.app import create_service_app
from consumers.http.operations import Readiness
from consumers.nats.intake import IntakeConfig
from consumers.runtime.metrics import Metrics
from ledger.events import event_to_json
from tests.factories import adjusted, make_event, metered
from tests.integration.jetstream import (
    balance,
    drained,
    jetstream,
    namespace_of,
    publish_events,
    publish_raw,
    query,
    running_intake,
    wait_until,
)

if TYPE_CHECKING:
    from tests.conftest import TestDatabase

pytestmark = pytest.mark.integration

BILLING = str(Path(sys.executable).with_name("billing"))
READY_WITHIN_S = 20.0
EXIT_WITHIN_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """`billing up` in a subprocess, its output in a log file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.port = int(env["BILLING_HTTP_PORT"])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([BILLING, "up"], env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ready(self) -> None:
        async def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"billing up exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                async with httpx.AsyncClient(timeout=1.0) as client:
                    return (await client.get(f"http://127.0.0.1:{self.port}/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_until(answers, within=READY_WITHIN_S, what="/readyz 200")

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=5.0) as client:
            return await client.get(f"http://127.0.0.1:{self.port}{path}")

    def terminate(self) -> int:
        """SIGTERM, and the exit status (bounded wait)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=EXIT_WITHIN_S)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no cleanup at all
        self.proc.wait(timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture
def service_env(database: TestDatabase, nats_url: str, unique: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        {
            "BILLING_DATABASE_URL": database.url,
            "BILLING_NATS_URL": nats_url,
            "BILLING_NATS_NAMESPACE": namespace_of(unique),
            "BILLING_HTTP_HOST": "127.0.0.1",
            "BILLING_HTTP_PORT": str(free_port()),
            "BILLING_DATA_DIR": str(tmp_path / "data"),
            "BILLING_SHUTDOWN_TIMEOUT_S": "10",
            "BILLING_INTAKE_MAX_WAIT_S": "0.2",
            # tests.factories dates events 2026-11-28 (T0): no too_old refusal on the real clock.
            "BILLING_EVENT_MAX_AGE_S": str(100 * 365 * 86_400),
        }
    )
    return env


@contextlib.contextmanager
def service(env: dict[str, str], log_path: Path) -> Iterator[Service]:
    svc = Service(env, log_path)
    try:
        yield svc
    finally:
        svc.stop()


async def test_billing_up_charges_and_exits_0_on_sigterm(
    service_env: dict[str, str], nats_url: str, app_engine: Engine, unique: str, tmp_path: Path
) -> None:
    w, p = f"w{unique[-39:]}", f"p{unique[-39:]}"
    now = datetime.now(UTC).replace(microsecond=0)
    start = make_event(
        "gpu.rental.started",
        {
            "walletId": w,
            "resourceId": p,
            "resourceKind": "pod",
            "gpuType": "A100",
            "gpuCount": 1,
            "tier": "on_demand",
            "pricePerHourMicros": 3_600_000,
        },
        time=now,
    )
    events = [adjusted(w, 10_000_000, time=now), start, metered(w, p, 1000, time=now)]
    with service(service_env, tmp_path / "billing.log") as svc:
        svc.start()
        await svc.ready()
        async with jetstream(nats_url, unique) as (_nc, js, names):
            await publish_events(js, names, events)
            await publish_raw(js, names.in_subject(w), b"not json at all")
            # 1000 s at $3.60/h = $1.00 charged
            await wait_until(lambda: balance(app_engine, w) == 9_000_000, what="the wallet to be charged")
            await wait_until(
                lambda: (
                    query(app_engine, "SELECT count(*) FROM rejected_inputs WHERE subject = :s", s=names.in_subject(w))
                    == [(1,)]
                ),
                what="the bad message to be recorded",
            )
            metrics = (await svc.get("/metrics")).text
            assert 'billing_intake_messages_total{disposition="accepted"} 3.0' in metrics
            assert 'billing_dead_letters_total{reason="invalid_json"} 1.0' in metrics
            assert "billing_intake_batch_seconds_bucket" in metrics
            assert (await svc.get("/healthz")).json() == {"status": "ok"}

            started = time.monotonic()
            assert svc.terminate() == 0
            assert time.monotonic() - started < EXIT_WITHIN_S
    log = svc.log()
    assert log.count("billing up: database") == 1, log
    assert "SIGTERM received" in log
    assert "intake stopped" in log


async def test_kill_9_mid_stream_counts_every_event_exactly_once(
    service_env: dict[str, str], nats_url: str, app_engine: Engine, unique: str, tmp_path: Path
) -> None:
    wallets = [f"k{i:02d}{unique[-36:]}" for i in range(20)]
    now = datetime.now(UTC).replace(microsecond=0)
    events = [
        adjusted(wallets[i % 20], 1_000 + i, id_=f"k9-{i}-{unique}"[:200], source="compute/kill9", time=now)
        for i in range(2000)
    ]
    expected = {w: sum(1_000 + i for i in range(2000) if i % 20 == n) for n, w in enumerate(wallets)}
    env = {
        **service_env,
        # Small batches so the kill lands between commits; a short ack_wait so whatever the killed
        # process held unacked is redelivered within the test.
        "BILLING_INTAKE_BATCH_SIZE": "50",
        "BILLING_INTAKE_ACK_WAIT_S": "2",
    }

    def counted() -> int:
        return int(query(app_engine, "SELECT count(*) FROM events WHERE wallet_id = ANY(:w)", w=wallets)[0][0])

    async with jetstream(nats_url, unique) as (_nc, js, names):
        with service(env, tmp_path / "billing.log") as svc:
            svc.start()
            await svc.ready()
            await _publish_fast(js, names, events[:1000])
            await wait_until(lambda: counted() > 0, what="the first batches to commit")
            svc.kill()
            killed_at = counted()
            await _publish_fast(js, names, events[1000:])  # published while nothing consumes
            svc.start()
            await svc.ready()
            await wait_until(lambda: counted() == 2000, within=20, what="all 2,000 events counted")
            info = await js.stream_info(names.in_stream)
            await wait_until(
                lambda: drained(js, names, "billing-intake", info.state.last_seq), what="every message acked"
            )
            assert svc.terminate() == 0
    print(f"kill -9 landed after {killed_at} of 2000 events were committed")  # for the record (-s)
    assert counted() == 2000
    assert query(
        app_engine,
        "SELECT count(DISTINCT (source, event_id)) FROM events WHERE wallet_id = ANY(:w)",
        w=wallets,
    ) == [(2000,)]
    for w in wallets:
        assert balance(app_engine, w) == expected[w], w


async def test_sigterm_mid_stream_finishes_the_batch_in_hand_and_exits_0(
    service_env: dict[str, str], nats_url: str, app_engine: Engine, unique: str, tmp_path: Path
) -> None:
    wallets = [f"s{i:02d}{unique[-36:]}" for i in range(10)]
    now = datetime.now(UTC).replace(microsecond=0)
    events = [
        adjusted(wallets[i % 10], 1 + i, id_=f"st-{i}-{unique}"[:200], source="compute/sigterm", time=now)
        for i in range(2000)
    ]
    env = {**service_env, "BILLING_INTAKE_BATCH_SIZE": "50"}

    def counted() -> int:
        return int(query(app_engine, "SELECT count(*) FROM events WHERE wallet_id = ANY(:w)", w=wallets)[0][0])

    async with jetstream(nats_url, unique) as (_nc, js, names):
        with service(env, tmp_path / "billing.log") as svc:
            svc.start()
            await svc.ready()
            await _publish_fast(js, names, events)
            await wait_until(lambda: counted() > 0, what="the first batches to commit")
            started = time.monotonic()
            assert svc.terminate() == 0, svc.log()[-3000:]
            assert time.monotonic() - started < EXIT_WITHIN_S

            async def acks_settled() -> bool:
                info = await js.consumer_info(names.in_stream, "billing-intake")
                return bool(info.num_ack_pending == 0)

            await wait_until(acks_settled, what="no message left unacked by the stopped service")
            info = await js.consumer_info(names.in_stream, "billing-intake")
            stopped_at = counted()
            # Everything delivered was committed and then acked, nothing more, nothing less.
            assert info.ack_floor.stream_seq == stopped_at
            assert info.num_redelivered == 0
            print(f"SIGTERM landed after {stopped_at} of 2000 events were committed")  # for the record (-s)

            svc.start()
            await svc.ready()
            await wait_until(lambda: counted() == 2000, within=20, what="the rest counted after the restart")
            assert svc.terminate() == 0
    for n, w in enumerate(wallets):
        assert balance(app_engine, w) == sum(1 + i for i in range(2000) if i % 10 == n), w


async def _publish_fast(js, names, events, window: int = 500) -> None:
    """publish_async in windows, each message with its own Nats-Msg-Id, every PubAck awaited."""
    for i in range(0, len(events), window):
        futures = [
            await js.publish_async(
                names.in_subject(ev.wallet_id), event_to_json(ev), headers={"Nats-Msg-Id": f"{ev.source}/{ev.id}"}
            )
            for ev in events[i : i + window]
        ]
        await asyncio.wait_for(asyncio.gather(*futures), timeout=10)


async def test_dlq_list_and_replay(service_env: dict[str, str], nats_url: str, app_engine: Engine, unique: str) -> None:
    """A misrouted event is dead-lettered; `billing dlq replay --id` sends it to its wallet's
    subject, where the intake accepts it. A replayed invalid JSON has no wallet: skipped."""
    w = f"w{unique[-39:]}"
    misrouted = adjusted(w, 4_000_000, id_=f"mis-{unique}")
    config = IntakeConfig(durable="intake", max_wait_s=0.2)
    async with (
        jetstream(nats_url, unique) as (nc, js, names),
        running_intake(nc, app_engine, names, config, metrics=Metrics(), clock=lambda: datetime.now(UTC)),
    ):
        await publish_raw(js, names.in_subject(f"x{w[1:]}"), event_to_json(misrouted))
        await publish_raw(js, names.in_subject(w), b"{broken")
        await wait_until(
            lambda: len(_rejected(app_engine, names.namespace)) == 2, what="both inputs to be dead-lettered"
        )
        (mis_id, reason), (broken_id, broken_reason) = _rejected(app_engine, names.namespace)
        assert (reason, broken_reason) == ("subject_mismatch", "invalid_json")

        listed = _cli(service_env, "dlq", "list", "--reason", "subject_mismatch", "--limit", "100000")
        assert listed.returncode == 0, listed.stderr
        assert re.search(rf"│\s*{mis_id}\s*│.*subject_mismatch", listed.stdout), listed.stdout
        assert _cli(service_env, "dlq", "list", "--reason", "nonsense").returncode == 2

        replayed = _cli(service_env, "dlq", "replay", "--id", str(mis_id), "--id", str(broken_id))
        assert replayed.returncode == 0, replayed.stderr
        assert f"skipped {broken_id} (invalid_json)" in replayed.stdout
        assert "replayed 1 of 2" in replayed.stdout
        await wait_until(lambda: balance(app_engine, w) == 4_000_000, what="the replayed event to be charged")
        # Replayed again: the (source, id) key makes it a no-op.
        assert _cli(service_env, "dlq", "replay", "--id", str(mis_id)).returncode == 0
        info = await js.stream_info(names.in_stream)
        await wait_until(lambda: drained(js, names, config.durable, info.state.last_seq), what="all consumed")
    assert balance(app_engine, w) == 4_000_000
    assert len(_rejected(app_engine, names.namespace)) == 2  # the table is append-only and unmarked


def _rejected(engine: Engine, namespace: str) -> list[tuple[int, str]]:
    rows = query(
        engine,
        "SELECT id, reason FROM rejected_inputs WHERE subject LIKE :prefix ORDER BY id",
        prefix=f"{namespace}.%",
    )
    return [(int(r[0]), str(r[1])) for r in rows]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BILLING, *args], env=env, capture_output=True, text=True, timeout=30, check=False)


async def test_readyz_is_503_when_the_database_is_unreachable() -> None:
    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 1})
    ready = asyncio.Event()
    ready.set()
    app = create_service_app(engine, lambda: None, Metrics().registry, Readiness({"intake": ready}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://billing") as client:
        response = await client.get("/readyz")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "not ready"
        assert body["checks"]["database"].startswith("unavailable")
        assert body["checks"]["nats"] == "not connected"
        assert (await client.get("/healthz")).status_code == 200
    engine.dispose()
