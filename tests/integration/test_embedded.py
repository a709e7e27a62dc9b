"""The embedded servers are real and keep their data across a stop/start on the same data dir."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import psutil
import pytest
import sqlalchemy as sa
from nats.js.api import StorageType, StreamConfig

from consumers.runtime.embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedServerError, nats_server_binary

pytestmark = pytest.mark.integration


@pytest.fixture
def embedded_pg(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(tmp_path / "pg")
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture
def embedded_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    """Running and not a zombie (the embedded postmaster is reparented to PID 1, which may reap late)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def test_postgres_row_survives_restart(embedded_pg: EmbeddedPostgres) -> None:
    url = embedded_pg.start()
    assert url.startswith("postgresql+psycopg://postgres@/postgres?host=/")
    assert embedded_pg.start() == url  # idempotent
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (id int PRIMARY KEY, note text NOT NULL)"))
            conn.execute(sa.text("INSERT INTO t VALUES (1, 'kept')"))
    finally:
        engine.dispose()
    pid = embedded_pg.pid
    assert pid is not None
    assert _alive(pid)

    embedded_pg.stop()
    embedded_pg.stop()  # idempotent
    assert not _alive(pid)
    assert not embedded_pg.is_running

    url2 = embedded_pg.start()
    engine = sa.create_engine(url2)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT id, note FROM t")).all() == [(1, "kept")]
    finally:
        engine.dispose()


def test_postgres_long_data_dir_uses_short_socket_dir(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with EmbeddedPostgres(deep) as pg:
        socket_dir = pg.url.split("host=", 1)[1]
        assert len(socket_dir + "/.s.PGSQL.5432") < 100
        engine = sa.create_engine(pg.url)
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
        finally:
            engine.dispose()


def test_nats_server_binary_exists() -> None:
    assert os.access(nats_server_binary(), os.X_OK)


async def test_nats_jetstream_message_survives_restart(embedded_nats: EmbeddedNats) -> None:
    url = embedded_nats.start()
    assert url.startswith("nats://127.0.0.1:")
    assert embedded_nats.port not in (4222,)
    assert embedded_nats.start() == url  # idempotent

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="EMB", subjects=["emb.>"], storage=StorageType.FILE))
        ack = await js.publish("emb.one", b"hello", headers={"Nats-Msg-Id": "m-1"})
        assert ack.seq == 1
    finally:
        await nc.close()
    pid = embedded_nats.pid
    assert pid is not None

    embedded_nats.stop()
    embedded_nats.stop()  # idempotent
    assert not _alive(pid)

    url2 = embedded_nats.start()
    assert url2 == url  # the port chosen on the first start is reused when free
    nc = await nats.connect(url2)
    try:
        js = nc.jetstream()
        info = await js.stream_info("EMB")
        assert info.state.messages == 1
        msg = await js.get_msg("EMB", 1)
        assert msg.data == b"hello"
        assert msg.subject == "emb.one"
    finally:
        await nc.close()
    assert (embedded_nats.data_dir / "nats.log").read_text().count("--- embedded start") == 2


def test_nats_port_taken_fails_fast_with_log_tail(tmp_path: Path) -> None:
    # Another listener holds the port: our server must exit and say why, not adopt the other one.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        server = EmbeddedNats(tmp_path / "nats", port=other.getsockname()[1])
        try:
            with pytest.raises(EmbeddedServerError, match="exited with code") as excinfo:
                server.start()
            assert "address already in use" in str(excinfo.value)
            assert not server.is_running
        finally:
            server.stop()


_START_AND_CRASH = """
import os, sys
from pathlib import Path
from consumers.runtime.embedded import EmbeddedNats
server = EmbeddedNats(Path(sys.argv[1]))
server.start()
print(server.pid, flush=True)
os.kill(os.getpid(), 9)  # no atexit: the nats-server child is left running
"""


def test_nats_leftover_from_crashed_run_is_replaced(tmp_path: Path) -> None:
    data_dir = tmp_path / "nats"
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    crashed = subprocess.run(
        [sys.executable, "-c", _START_AND_CRASH, str(data_dir)],
        capture_output=True, text=True, env=env, timeout=30, check=False,
    )  # fmt: skip
    leftover = int(crashed.stdout.strip())
    server = EmbeddedNats(data_dir)
    try:
        assert _alive(leftover)
        server.start()
        assert server.pid != leftover
        assert not _alive(leftover)
        assert "stopping leftover nats-server" in (data_dir / "nats.log").read_text()
    finally:
        server.stop()
        if _alive(leftover):
            os.kill(leftover, signal.SIGKILL)
