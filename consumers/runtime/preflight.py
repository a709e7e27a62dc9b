"""The checks before anything starts, and the data dir's lock: one line naming the setting to fix.

Used by `billing up` (consumers/service/up.py) and by the one-shot commands (report, dlq, verify, status) that
find or start the servers of a data dir (consumers/runtime/instance.py, consumers/runtime/db.py). Each mistake
is a :class:`~consumers.runtime.user_errors.UserError`: one line, exit 2.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final

import psycopg
from pydantic import ValidationError
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from consumers.runtime.settings import Settings, nats_servers
from consumers.runtime.user_errors import UserError

LOCK_FILE: Final = "billing.lock"
# Where a running `billing up` says it is (consumers/runtime/instance.py writes it).
RUNTIME_FILE: Final = "runtime.json"


def load_settings(**overrides: Any) -> Settings:
    """``Settings()``, with a bad environment value as one line naming the variable."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "BILLING_" + "_".join(str(p) for p in first["loc"]).upper()
        raise UserError(f"{name}: {first['msg']} (got {str(first.get('input'))[:80]!r})") from None
    if settings.database_url:
        settings = settings.model_copy(update={"database_url": check_database_url(settings.database_url)})
    return settings


def check_database_url(url: str, setting: str = "BILLING_DATABASE_URL") -> str:
    """The URL as the service uses it: ``postgres://`` and ``postgresql://`` are rewritten to
    ``postgresql+psycopg://`` (the same server, the driver the service has); anything else is refused."""
    hint = "use postgresql+psycopg://user:password@host:5432/database"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"{setting}: not a database URL; {hint}") from None
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername != "postgresql+psycopg":
        raise UserError(f"{setting}: unsupported scheme {parsed.drivername}://; {hint}")
    return parsed.render_as_string(hide_password=False)


def redacted_database_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def redacted_nats_url(url: str) -> str:
    """The servers of a NATS URL with their passwords (or tokens) replaced."""
    from urllib.parse import urlsplit, urlunsplit

    out = []
    for server in nats_servers(url):
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        if parts.username is None and parts.password is None:
            out.append(server)
            continue
        host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        user = f"{parts.username}:***" if parts.password is not None else "***"
        out.append(urlunsplit(parts._replace(netloc=f"{user}@{host}")))
    return ",".join(out)


def check_http_port(settings: Settings) -> None:
    """The HTTP port can be bound now (uvicorn would otherwise fail after everything else started)."""
    if settings.http_port == 0:
        return
    family = socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((settings.http_host, settings.http_port))
        except OSError as exc:
            raise UserError(
                f"BILLING_HTTP_PORT: cannot listen on {settings.http_host}:{settings.http_port} "
                f"({exc.strerror or exc}); choose another port or stop what uses it"
            ) from None


def check_data_dir(data_dir: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"BILLING_DATA_DIR: {data_dir} is a file, not a directory")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"BILLING_DATA_DIR: cannot create {data_dir} ({exc.strerror or exc})") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise UserError(f"BILLING_DATA_DIR: {data_dir} is not writable")


def lock_holder(data_dir: Path) -> int | None:
    """The pid of the process holding ``<data_dir>/billing.lock``, None when nobody holds it."""
    path = data_dir / LOCK_FILE
    try:
        with path.open("r") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = path.read_text().strip()
                return int(text) if text.isdigit() else -1
            return None
    except FileNotFoundError:
        return None


def _running_http_url(data_dir: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        url = json.loads((data_dir / RUNTIME_FILE).read_text()).get("httpUrl")
        return str(url) if url else None
    return None


@contextlib.contextmanager
def data_dir_lock(data_dir: Path, what: str = "billing up") -> Iterator[None]:
    """Hold ``<data_dir>/billing.lock`` (exclusive, for the ``with`` block); UserError if another
    process holds it. The file keeps the holder's pid; the lock itself dies with the process (a
    ``kill -9`` leaves no stale lock, only the pid text, which the next holder overwrites)."""
    check_data_dir(data_dir)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    f: IO[str] = os.fdopen(fd, "r+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = path.read_text().strip()
            pid = text if text.isdigit() else "unknown"
            http = _running_http_url(data_dir)
            where = f", {http}" if http else ", still starting or a one-shot command"
            raise UserError(
                f"billing is already running on data dir {data_dir} (pid {pid}{where}); "
                f"stop it first, or set another BILLING_DATA_DIR for {what}"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def database_failure(url: URL, exc: Exception) -> str | None:
    """A one-line reason when retrying cannot help (wrong password, no such database), else None."""
    text = " ".join(str(exc).split())
    lowered = text.lower()
    where = f"{url.host or 'unix socket'}" + (f":{url.port}" if url.port else "")
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return f"password authentication failed for user {url.username!r} on {where}"
    if "does not exist" in lowered and ("database" in lowered or "role" in lowered):
        return text[text.lower().find("fatal:") :].removeprefix("FATAL:").strip() if "fatal:" in lowered else text
    if "could not translate host name" in lowered:
        return f"unknown host {url.host!r}"
    return None


def probe_database(url: str, setting: str = "BILLING_DATABASE_URL", timeout_s: int = 5) -> None:
    """One connect (a one-shot command: no retries); a failure as one line naming the setting."""
    parsed = make_url(url)
    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(conninfo, connect_timeout=timeout_s) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        reason = database_failure(parsed, exc) or " ".join(str(exc).split())[:200]
        raise UserError(f"{setting}: cannot connect: {reason} ({redacted_database_url(url)})") from None
