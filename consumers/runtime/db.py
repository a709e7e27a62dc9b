"""A database connection for one-shot commands (`billing report`, `billing dlq list|show`): found
like `billing verify` finds it (`consumers.runtime.instance.client_services`): the configured URL, else the
running `billing up` of the data dir, else the data dir's embedded server (started for the command).
A data dir without a database is one line, not an initialised PostgreSQL without tables."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import Connection, text

from consumers.runtime.settings import Settings
from ledger.db import make_engine


def _settings(settings: Settings | None) -> Settings:
    from consumers.runtime.preflight import load_settings

    return settings or load_settings()  # a bad environment value as one line naming the variable


@contextlib.contextmanager
def database_url(settings: Settings | None = None) -> Iterator[str]:
    from consumers.runtime.instance import client_services

    with client_services(_settings(settings), need_nats=False) as urls:
        yield urls.database_url


@contextlib.contextmanager
def report_connection(settings: Settings | None = None) -> Iterator[Connection]:
    """A read connection as the service role (reports never write)."""
    settings = _settings(settings)
    with database_url(settings) as url:
        engine = make_engine(url, role=settings.database_role or None, pool_size=1)
        try:
            with engine.connect() as conn:
                conn.execute(text("SET TRANSACTION READ ONLY"))
                yield conn
        finally:
            engine.dispose()
