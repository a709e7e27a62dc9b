"""The lifetime of the real `billing up` (a subprocess): one instance per data dir, bounded first
connects, a stop at any moment (startup included) that takes the embedded servers with it, the
embedded mode's non-superuser login and development token, `billing status`, `billing token`,
`billing verify` on the embedded database, and the one-line errors of ordinary mistakes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psutil
import psycopg
import pytest

from tests.integration.jetstream import namespace_of, wait_until
from tests.integration.test_billing_up import BILLING, free_port

if TYPE_CHECKING:
    from tests.conftest import TestDatabase

pytestmark = pytest.mark.integration

READY_WITHIN_S = 40.0
# `billing up` stops within shutdown_timeout_s (10 here) plus the embedded servers' own stop.
STOP_WITHIN_S = 15.0


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        {
            "BILLING_HTTP_HOST": "127.0.0.1",
            "BILLING_HTTP_PORT": str(free_port()),
            "BILLING_EMBEDDED_NATS_PORT": str(free_port()),
            "BILLING_DATA_DIR": str(data_dir),
            "BILLING_SHUTDOWN_TIMEOUT_S": "10",
            "BILLING_INTAKE_MAX_WAIT_S": "0.2",
            **extra,
        }
    )
    return env


class Up:
    """One `billing up`, stdout and stderr in a log file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.http = f"http://127.0.0.1:{env['BILLING_HTTP_PORT']}"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen([BILLING, "up"], env=env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ready(self) -> None:
        async def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"billing up exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                async with httpx.AsyncClient(timeout=1.0) as client:
                    return (await client.get(f"{self.http}/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_until(answers, within=READY_WITHIN_S, what="/readyz 200")
        await wait_until(lambda: "billing ready: " in self.log(), within=5, what="the ready line")

    def signal_and_wait(self, sig: signal.Signals, within: float = STOP_WITHIN_S) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=within)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def running(env: dict[str, str], log_path: Path) -> Iterator[Up]:
    up = Up(env, log_path)
    try:
        yield up
    finally:
        up.kill()
        _kill_leftovers(Path(env["BILLING_DATA_DIR"]))


def _cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BILLING, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _on_data_dir(data_dir: Path) -> list[psutil.Process]:
    """Processes whose command line names the data dir (the embedded postmaster and nats-server)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and any(
                str(data_dir) in a for a in proc.info["cmdline"] or []
            ):
                found.append(proc)
    return found


def _kill_leftovers(data_dir: Path) -> None:
    for proc in _on_data_dir(data_dir):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postgres" / "pgdata" / "postmaster.pid").read_text().splitlines()[0])


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------- one instance per data dir


async def test_second_start_on_a_data_dir_is_refused_and_the_first_stays_ready(
    database: TestDatabase, unique: str, tmp_path: Path
) -> None:
    """Configured database, embedded NATS (the case that lost its nats-server to a second start).
    Its fixed port is taken by another program: the embedded server falls back to a free one."""
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        wanted = taken.getsockname()[1]
        env = _env(
            data_dir,
            BILLING_DATABASE_URL=database.url,
            BILLING_NATS_NAMESPACE=namespace_of(unique),
            BILLING_EMBEDDED_NATS_PORT=str(wanted),
        )
        with running(env, tmp_path / "a.log") as first:
            await first.ready()
            assert f"port {wanted} (BILLING_EMBEDDED_NATS_PORT) is taken; using " in first.log()
            runtime = json.loads((data_dir / "runtime.json").read_text())
            assert runtime["pid"] == first.proc.pid
            assert runtime["httpUrl"] == first.http
            assert runtime["natsUrl"].startswith("nats://127.0.0.1:")
            assert not runtime["natsUrl"].endswith(f":{wanted}")
            nats_pid = int((data_dir / "nats" / "nats.pid").read_text())

            for port in (env["BILLING_HTTP_PORT"], str(free_port())):  # the same port, then another
                started = time.monotonic()
                second = _cli({**env, "BILLING_HTTP_PORT": port}, "up", timeout=30)
                assert second.returncode == 2, second.stderr[-3000:]
                assert time.monotonic() - started < 10
                line = _error_line(second)
                assert "already running" in line, line
                assert f"pid {first.proc.pid}" in line, line
                assert first.http in line, line
                print(f"second start: {line}")  # for the record (-s)

            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.get(f"{first.http}/readyz")
            assert response.status_code == 200, response.text
            assert response.json()["checks"]["nats"] == "ok"
            assert _alive(nats_pid)

            status = _cli(env, "status", "--format", "json")
            assert status.returncode == 0, status.stderr
            body = json.loads(status.stdout)
            assert body["pid"] == first.proc.pid
            assert body["ready"] is True
            assert body["natsUrl"] == runtime["natsUrl"]
            assert body["versions"]["natsServer"][0].isdigit()
            assert body["versions"]["postgresql"][0].isdigit()
            assert body["intakeLag"] == 0

            code, took = first.signal_and_wait(signal.SIGTERM)
            assert code == 0, first.log()[-3000:]
            print(f"SIGTERM: exit {code} in {took:.1f} s")
            assert not _alive(nats_pid)
            assert not (data_dir / "runtime.json").exists()
    not_running = _cli(env, "status")
    assert not_running.returncode == 1
    assert "billing is not running on data dir" in not_running.stderr


# ------------------------------------------------------------- embedded mode, from start to SIGHUP


async def test_embedded_mode_non_superuser_login_dev_token_verify_and_sighup(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = _env(data_dir)
    with running(env, tmp_path / "up.log") as up:
        await up.ready()
        postmaster, nats_pid = _postmaster_pid(data_dir), int((data_dir / "nats" / "nats.pid").read_text())
        children = psutil.Process(up.proc.pid).children(recursive=True)
        assert any(p.pid == nats_pid for p in children)
        runtime_path, token_path = data_dir / "runtime.json", data_dir / "dev-token"
        for path in (runtime_path, token_path, data_dir / "billing.lock"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        runtime = json.loads(runtime_path.read_text())
        assert set(runtime) >= {"pid", "httpUrl", "natsUrl", "databaseUrl", "dataDir", "startedAt", "version"}

        token = _cli(env, "token")
        assert token.returncode == 0, token.stderr
        dev_token = token.stdout.strip()
        assert dev_token == token_path.read_text().strip()
        assert len(dev_token) >= 16
        assert dev_token in up.log()  # printed once at start
        async with httpx.AsyncClient(base_url=up.http, timeout=10) as client:
            assert (await client.get("/finance/trial-balance")).status_code == 401
            authorized = await client.get("/finance/trial-balance", headers={"Authorization": f"Bearer {dev_token}"})
            assert authorized.status_code == 200, authorized.text

        # The service's connections log in as billing_svc, which cannot get a superuser back.
        owner = str(runtime["databaseUrl"]).replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(owner, autocommit=True) as conn:
            logins = conn.execute(
                "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = 'billing' AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend'"
            ).fetchall()
            assert logins == [("billing_svc",)], logins
            supers = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'billing_svc'").fetchall()
            assert supers == [(False,)]
        service = owner.replace("postgresql://postgres@", "postgresql://billing_svc@")
        with psycopg.connect(service, autocommit=True) as conn:
            conn.execute("SET ROLE billing_app")
            conn.execute("RESET ROLE")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SET session_replication_role = replica")
            with pytest.raises(psycopg.Error):  # the append-only trigger, or no DELETE privilege
                conn.execute("DELETE FROM journal_entries")

        verified = _cli(env, "verify")
        assert verified.returncode == 0, verified.stdout[-2000:] + verified.stderr[-2000:]
        assert "OK: the log rebuilds" in verified.stdout

        code, took = up.signal_and_wait(signal.SIGHUP)
        print(f"SIGHUP: exit {code} in {took:.1f} s")
        assert code == 0, up.log()[-3000:]
        assert not _alive(postmaster), "the embedded PostgreSQL outlived billing up"
        assert not _alive(nats_pid), "the embedded nats-server outlived billing up"
        # multiprocessing's resource tracker exits once it reads EOF from the gone parent: a moment.
        await wait_until(lambda: not [p for p in children if _alive(p.pid)], within=5, what="every child process gone")
    log = up.log()
    assert "SIGHUP received: stopping" in log
    assert "previous owner none" not in log
    assert "first owner" in log
    assert "password" not in json.dumps(runtime)


# -------------------------------------------------------------------- bounded start, stop in start


async def test_unreachable_nats_exits_2_within_the_bound_and_leaves_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    closed = free_port()
    env = _env(
        data_dir, BILLING_NATS_URL=f"nats://user:hunter2secret@127.0.0.1:{closed}", BILLING_CONNECT_TIMEOUT_S="3"
    )
    started = time.monotonic()
    result = _cli(env, "up", timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result)
    assert line.startswith("error: BILLING_NATS_URL: cannot connect to NATS at"), line
    assert "within 3 s" in line, line
    assert "hunter2secret" not in result.stderr
    assert result.stderr.count(f"cannot connect to NATS at nats://user:***@127.0.0.1:{closed}") >= 2
    print(f"unreachable NATS: exit 2 after {took:.1f} s: {line}")
    assert not _on_data_dir(data_dir), "the embedded PostgreSQL outlived billing up"


async def test_unreachable_database_exits_2_within_the_bound_and_leaves_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = _env(data_dir, BILLING_DATABASE_URL=f"postgresql://billing@127.0.0.1:{free_port()}/billing")
    env["BILLING_CONNECT_TIMEOUT_S"] = "3"
    started = time.monotonic()
    result = _cli(env, "up", timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result)
    assert line.startswith("error: BILLING_DATABASE_URL: cannot connect to PostgreSQL at"), line
    assert took < 3 + 10, took  # the bound, plus the embedded nats-server's start and stop
    print(f"unreachable database: exit 2 after {took:.1f} s: {line}")
    assert not _on_data_dir(data_dir), "the embedded nats-server outlived billing up"


async def test_sigterm_during_the_nats_connect_retries_is_honoured(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = _env(data_dir, BILLING_NATS_URL=f"nats://127.0.0.1:{free_port()}", BILLING_CONNECT_TIMEOUT_S="300")
    with running(env, tmp_path / "up.log") as up:
        await wait_until(lambda: "cannot connect to NATS at" in up.log(), within=READY_WITHIN_S, what="a retry")
        postmaster = _postmaster_pid(data_dir)
        assert _alive(postmaster)
        code, took = up.signal_and_wait(signal.SIGTERM, within=10)
        print(f"SIGTERM during the NATS connect retries: exit {code} in {took:.1f} s")
        assert code == 0, up.log()[-3000:]
        assert took < 10
        assert not _alive(postmaster), "the embedded PostgreSQL outlived billing up"
        assert not _on_data_dir(data_dir)
    assert "stopped during the start" in up.log()


# ---------------------------------------------------------------------------- ordinary mistakes


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"BILLING_DATABASE_URL": "mysql://billing@127.0.0.1/billing"}, "BILLING_DATABASE_URL: unsupported scheme"),
        ({"BILLING_DATABASE_URL": "not a url"}, "BILLING_DATABASE_URL: not a database URL"),
        ({"BILLING_HTTP_PORT": "eighty"}, "BILLING_HTTP_PORT: Input should be a valid integer"),
        (
            {
                "BILLING_DATABASE_URL": "postgresql://billing@127.0.0.1:1/billing",
                "BILLING_NATS_URL": "nats://127.0.0.1:1",
                "BILLING_API_TOKENS": "short:wallet",
            },
            "BILLING_API_TOKENS entry 1: the token has 5 characters, at least 16",
        ),
        ({"BILLING_API_TOKENS": "tokenwithoutscopes"}, "BILLING_API_TOKENS entry 1: expected token:scope"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(settings: dict[str, str], expected: str, tmp_path: Path) -> None:
    result = _cli(_env(tmp_path / "data", **settings), "up", timeout=60)
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in _error_line(result)
    assert not _on_data_dir(tmp_path / "data")


def test_postgres_scheme_is_accepted_and_a_missing_database_named(database: TestDatabase, tmp_path: Path) -> None:
    """`postgres://` is rewritten to postgresql+psycopg://; the server answers that the database is missing."""
    from sqlalchemy.engine import make_url

    url = make_url(database.url).set(drivername="postgres", database=f"{database.name}_missing")
    env = _env(tmp_path / "data", BILLING_DATABASE_URL=url.render_as_string(hide_password=False))
    result = _cli(env, "up", timeout=60)
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result)
    assert f'BILLING_DATABASE_URL: database "{database.name}_missing" does not exist' in line, line
    assert not _on_data_dir(tmp_path / "data")


def test_migrate_takes_a_postgres_url_and_its_mistakes_are_one_line(pg_server: tuple[str, str], tmp_path: Path) -> None:
    """`billing migrate` reads BILLING_DATABASE_URL as `billing up` does: postgres:// is the same
    server with the service's driver; a wrong scheme, a missing database or no server is one line."""
    import secrets

    from sqlalchemy.engine import make_url

    from ledger.migrate import current

    admin = make_url(pg_server[0])
    name = f"billing_migrate_{secrets.token_hex(4)}"
    plain = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        given = admin.set(drivername="postgres", database=name).render_as_string(hide_password=False)
        done = _cli(_env(tmp_path / "data", BILLING_DATABASE_URL=given), "migrate")
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().splitlines()[-1] == "database schema is at the newest revision"
        assert current(admin.set(database=name).render_as_string(hide_password=False)) is not None
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    for url, expected in [
        (None, "error: BILLING_DATABASE_URL is not set (or pass --database-url)"),
        ("mysql://billing@127.0.0.1/billing", "error: BILLING_DATABASE_URL: unsupported scheme mysql://"),
        (
            admin.set(drivername="postgres", database=f"{name}_missing").render_as_string(hide_password=False),
            f'error: BILLING_DATABASE_URL: cannot connect: database "{name}_missing" does not exist',
        ),
        ("postgres://postgres@127.0.0.1:1/billing", "error: BILLING_DATABASE_URL: cannot connect: connection failed"),
    ]:
        env = _env(tmp_path / "data", **({"BILLING_DATABASE_URL": url} if url else {}))
        result = _cli(env, "migrate")
        assert result.returncode == 2, (url, result.stderr[-3000:])
        assert _error_line(result).startswith(expected), url


def test_http_port_in_use_is_one_line(database: TestDatabase, nats_url: str, tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        env = _env(tmp_path / "data", BILLING_DATABASE_URL=database.url, BILLING_NATS_URL=nats_url)
        result = _cli({**env, "BILLING_HTTP_PORT": str(port)}, "up", timeout=60)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"BILLING_HTTP_PORT: cannot listen on 127.0.0.1:{port}" in _error_line(result)


def test_one_shot_commands_on_a_data_dir_without_a_database(tmp_path: Path) -> None:
    """verify, the reports and the dlq commands find the database the same way: on a data dir where
    `billing up` never ran, the same one line and exit 2, and nothing initialised there."""
    env = _env(tmp_path / "empty")
    expected = (
        f"error: no billing database in {tmp_path / 'empty'} (BILLING_DATA_DIR): start `billing up` once, "
        "or set BILLING_DATABASE_URL"
    )
    for command in (
        ("verify",),
        ("report", "trial-balance"),
        ("report", "statement", "w-1"),
        ("report", "revenue", "--group-by", "month"),
        ("report", "debts"),
        ("report", "rejected"),
        ("report", "anomalies"),
        ("dlq", "list"),
        ("dlq", "show", "1"),
        ("dlq", "replay"),
    ):
        result = _cli(env, *command)
        assert result.returncode == 2, (command, result.stderr[-3000:])
        assert _error_line(result) == expected, command
    token = _cli(env, "token")
    assert token.returncode == 2
    assert "no development token in" in _error_line(token)
    status = _cli(env, "status")
    assert status.returncode == 1
    assert not (tmp_path / "empty" / "postgres").exists()  # nothing was initialised for them


async def test_leftovers_of_a_killed_instance_are_taken_over(tmp_path: Path) -> None:
    """kill -9 leaves the embedded servers running and a runtime.json behind, but not the lock: the
    next start adopts the PostgreSQL, replaces the nats-server and runs."""
    data_dir = tmp_path / "data"
    env = _env(data_dir)
    with running(env, tmp_path / "a.log") as first:
        await first.ready()
        old_nats = int((data_dir / "nats" / "nats.pid").read_text())
        first.kill()
        assert _alive(old_nats)
        assert _cli(env, "status").returncode == 1  # runtime.json is left, its owner is gone
        with running(env, tmp_path / "b.log") as second:
            await second.ready()
            assert not _alive(old_nats)
            runtime = json.loads((data_dir / "runtime.json").read_text())
            assert runtime["pid"] == second.proc.pid
            code, _ = second.signal_and_wait(signal.SIGINT)
            assert code == 0, second.log()[-3000:]
    assert not _on_data_dir(data_dir)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres@127.0.0.1:1/billing", "BILLING_DATABASE_URL: cannot connect: connection failed"),
        ("mysql://billing@127.0.0.1/billing", "BILLING_DATABASE_URL: unsupported scheme mysql://"),
    ],
)
def test_verify_with_a_wrong_database_url_is_one_line(url: str, expected: str, tmp_path: Path) -> None:
    result = _cli(_env(tmp_path / "data"), "verify", "--database-url", url)
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in _error_line(result)


async def test_sigterm_right_after_the_embedded_postgres_started_is_honoured(tmp_path: Path) -> None:
    """The signal lands in the embedded nats-server's start or the migrations: the step in hand is
    finished, then everything started is stopped."""
    data_dir = tmp_path / "data"
    with running(_env(data_dir), tmp_path / "up.log") as up:
        await wait_until(
            lambda: "embedded PostgreSQL running" in up.log(), within=READY_WITHIN_S, what="the embedded PostgreSQL"
        )
        postmaster = _postmaster_pid(data_dir)
        code, took = up.signal_and_wait(signal.SIGTERM, within=STOP_WITHIN_S)
        print(f"SIGTERM during the start: exit {code} in {took:.1f} s")
        assert code == 0, up.log()[-3000:]
        assert not _alive(postmaster)
        assert not _on_data_dir(data_dir)
    assert "SIGTERM received: stopping" in up.log()
    assert "billing ready" not in up.log()
