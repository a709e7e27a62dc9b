"""Slow and hostile HTTP clients against the real `billing up` process (issue 13 items 6 and 9):
slowloris heads and bodies closed within their deadline while other clients are answered, idle
keep-alive connections closed, the connection limit, and the token and size checks made before a
byte of the body is read (large unauthenticated bodies: 401 at once, memory flat)."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.jetstream import namespace_of

pytestmark = pytest.mark.integration

BILLING = str(Path(sys.executable).with_name("billing"))
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0
KEEPALIVE_S = 2
MAX_CONNECTIONS = 40
WALLET_TOKEN = "tok_limits_wallet_5d1e0c9a2b"
SLOW_SOCKETS = 6
# How late a deadline may fire on a loaded 2-core machine (it must never fire early).
SLACK_S = 1.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(database: Any, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """`billing up` with short HTTP bounds; yields (base URL, pid)."""
    tmp = tmp_path_factory.mktemp("http_limits")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        {
            "BILLING_DATABASE_URL": database.url,
            "BILLING_NATS_URL": nats_url,
            "BILLING_NATS_NAMESPACE": namespace_of(f"httplimits_{secrets.token_hex(4)}"),
            "BILLING_HTTP_HOST": "127.0.0.1",
            "BILLING_HTTP_PORT": str(port),
            "BILLING_DATA_DIR": str(tmp / "data"),
            "BILLING_API_TOKENS": f"{WALLET_TOKEN}:wallet",
            "BILLING_HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "BILLING_HTTP_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
            "BILLING_HTTP_KEEPALIVE_TIMEOUT_S": str(KEEPALIVE_S),
            "BILLING_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
            "BILLING_SHUTDOWN_TIMEOUT_S": "5",
        }
    )
    log_path = tmp / "billing.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([BILLING, "up"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"billing up exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"billing up not serving HTTP:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield base, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


async def _slow_head(port: int, results: list[tuple[float, bytes]]) -> None:
    """A slowloris: one byte of a never-ending header every second; how long until the server
    closed the socket, and what it said."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    said = b""
    try:
        for byte in request:  # 200+ s worth of bytes: only the server's deadline ends this
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                said = await asyncio.wait_for(reader.read(4096), timeout=1.0)
            except TimeoutError:
                continue
            break  # data, or b"" (closed)
    except (ConnectionResetError, BrokenPipeError):
        pass
    results.append((time.monotonic() - started, said))
    writer.close()


async def _slow_body(port: int, results: list[tuple[float, bytes]]) -> None:
    """The head at once, then a body of 100 bytes, one a second."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /stripe/webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    await writer.drain()
    started = time.monotonic()
    said = b""
    try:
        for _ in range(100):
            writer.write(b"{")
            await writer.drain()
            try:
                said = await asyncio.wait_for(reader.read(4096), timeout=1.0)
            except TimeoutError:
                continue
            break
    except (ConnectionResetError, BrokenPipeError):
        pass
    results.append((time.monotonic() - started, said))
    writer.close()


async def _silent(port: int, results: list[float]) -> None:
    """Connects and sends nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    await asyncio.wait_for(reader.read(4096), timeout=HEADER_TIMEOUT_S + 10)
    results.append(time.monotonic() - started)
    writer.close()


async def test_slow_clients_are_closed_within_the_limit_while_others_are_answered(server: tuple[str, int]) -> None:
    base, _pid = server
    port = int(base.rsplit(":", 1)[1])
    heads: list[tuple[float, bytes]] = []
    bodies: list[tuple[float, bytes]] = []
    silent: list[float] = []
    slow = [
        *(_slow_head(port, heads) for _ in range(SLOW_SOCKETS)),
        *(_slow_body(port, bodies) for _ in range(2)),
        _silent(port, silent),
    ]
    slow_tasks = [asyncio.ensure_future(t) for t in slow]
    answered: list[float] = []
    async with httpx.AsyncClient(timeout=5) as client:
        while not all(t.done() for t in slow_tasks):  # bounded: every slow task ends by its deadline
            started = time.monotonic()
            r = await client.get(f"{base}/healthz")
            assert r.status_code == 200
            answered.append(time.monotonic() - started)
            await asyncio.sleep(0.2)
    await asyncio.gather(*slow_tasks)
    print(
        f"\nslow heads closed after {sorted(round(t, 2) for t, _ in heads)} s, slow bodies after "
        f"{sorted(round(t, 2) for t, _ in bodies)} s, silent after {[round(t, 2) for t in silent]} s; "
        f"{len(answered)} other requests answered meanwhile, slowest {max(answered):.3f} s"
    )
    assert len(heads) == SLOW_SOCKETS
    for elapsed, said in heads:
        assert HEADER_TIMEOUT_S - 0.1 <= elapsed <= HEADER_TIMEOUT_S + SLACK_S
        assert said.startswith(b"HTTP/1.1 408 ")
    for elapsed, _said in bodies:
        assert BODY_TIMEOUT_S - 0.1 <= elapsed <= BODY_TIMEOUT_S + SLACK_S
    assert HEADER_TIMEOUT_S - 0.1 <= silent[0] <= HEADER_TIMEOUT_S + SLACK_S
    assert len(answered) >= 5
    assert max(answered) < 1.0


async def test_an_idle_keep_alive_connection_is_closed(server: tuple[str, int]) -> None:
    base, _pid = server
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    first = await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), timeout=5)  # the whole response
    assert first.startswith(b"HTTP/1.1 200 ")
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(4096), timeout=KEEPALIVE_S + 10) == b""
    assert KEEPALIVE_S - 0.1 <= time.monotonic() - started <= KEEPALIVE_S + SLACK_S
    writer.close()


async def test_past_the_connection_limit_requests_are_503_until_the_idle_ones_are_closed(
    server: tuple[str, int],
) -> None:
    base, _pid = server
    port = int(base.rsplit(":", 1)[1])
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            assert (await client.get(f"{base}/healthz")).status_code == 503
            await asyncio.sleep(HEADER_TIMEOUT_S + SLACK_S)  # the idle ones' deadline passes
            assert (await client.get(f"{base}/healthz")).status_code == 200
    finally:
        for _reader, writer in idle:
            writer.close()


def _rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 1e6


async def test_large_bodies_are_refused_before_they_are_read(server: tuple[str, int]) -> None:
    base, pid = server
    ten_mb = b"{" * 10_000_000
    auth = {"Authorization": f"Bearer {WALLET_TOKEN}"}
    async with httpx.AsyncClient(timeout=30) as client:
        await client.get(f"{base}/healthz")
        before = _rss_mb(pid)

        async def timed(**kw: Any) -> tuple[float, httpx.Response]:
            started = time.monotonic()
            r = await client.post(f"{base}/wallet/confirm", **kw)
            return time.monotonic() - started, r

        for _round in range(3):  # 15 x 10 MB: memory would grow by 150 MB if they were read
            answers = await asyncio.gather(*(timed(content=ten_mb) for _ in range(5)))
            for elapsed, r in answers:
                assert r.status_code == 401
                assert r.json()["error"] == "unauthenticated"
                assert elapsed < 2.0
        bad_token = await timed(content=ten_mb, headers={"Authorization": "Bearer nope"})
        assert bad_token[1].json()["error"] == "invalid_token"

        async def chunks() -> Any:
            for _ in range(100):
                yield b"{" * 100_000

        chunked = await timed(content=chunks())
        assert chunked[1].status_code == 401
        too_large = await timed(content=ten_mb, headers=auth)
        assert too_large[1].status_code == 413
        assert too_large[1].json()["error"] == "body_too_large"
        chunked_large = await timed(content=chunks(), headers=auth)
        assert chunked_large[1].status_code == 413
        ok_sized = await timed(json={"paymentIntentId": "pi_1"}, headers=auth)
        assert ok_sized[1].status_code == 503  # authenticated, small: reaches the route (no Stripe key)
        after = _rss_mb(pid)
    print(
        f"\n5 concurrent unauthenticated 10 MB bodies x3: 401 in at most {max(e for e, _ in answers):.3f} s; "
        f"authenticated 10 MB: 413 in {too_large[0]:.3f} s; RSS {before:.0f} -> {after:.0f} MB"
    )
    assert after - before < 30


def test_the_real_service_serves_its_docs_without_a_token(server: tuple[str, int]) -> None:
    import json

    from devtools.export_openapi import DEFAULT_PATH

    base, _pid = server
    assert httpx.get(f"{base}/openapi.json").json() == json.loads(DEFAULT_PATH.read_text())
    assert httpx.get(f"{base}/docs").status_code == 200
    assert httpx.get(f"{base}/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert httpx.get(f"{base}/").json()["docs"] == "/docs"
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}  # unchanged
    assert "billing_stripe_anomalies_total" in httpx.get(f"{base}/metrics").text
    assert httpx.get(f"{base}/wallets/w1").status_code == 401


async def test_a_slowloris_on_a_kept_alive_connection_is_closed_too(server: tuple[str, int]) -> None:
    """uvicorn's keep-alive timer is cancelled by any byte: a second request trickled on a kept-alive
    connection must still meet the head deadline, counted from its first byte."""
    base, _pid = server
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    first = await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), timeout=5)  # the whole response
    assert first.startswith(b"HTTP/1.1 200 ")
    started = time.monotonic()
    said = b""
    for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
        writer.write(bytes([byte]))
        await writer.drain()
        try:
            said = await asyncio.wait_for(reader.read(4096), timeout=0.5)  # within the keep-alive time
        except TimeoutError:
            continue
        break
    elapsed = time.monotonic() - started
    writer.close()
    assert said.startswith(b"HTTP/1.1 408 ")
    assert HEADER_TIMEOUT_S - 0.1 <= elapsed <= HEADER_TIMEOUT_S + SLACK_S
