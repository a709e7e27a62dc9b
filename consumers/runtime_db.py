"""A database connection for one-shot commands (`billing report`, `billing verify`): the configured
URL, or the embedded server in the data dir (started if `billing up` is not running)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import Connection, text

from consumers.settings import Settings
from ledger.db import make_engine


@contextlib.contextmanager
def database_url(settings: Settings | None = None) -> Iterator[str]:
    settings = settings or Settings()
    if settings.database_url:
        yield settings.database_url
        return
    from consumers.embedded import EmbeddedPostgres
    from consumers.runtime import EMBEDDED_DB_NAME, _ensure_database

    with EmbeddedPostgres(settings.data_dir / "postgres") as pg:
        yield _ensure_database(pg.url, EMBEDDED_DB_NAME)


@contextlib.contextmanager
def report_connection(settings: Settings | None = None) -> Iterator[Connection]:
    """A read connection as the service role (reports never write)."""
    settings = settings or Settings()
    with database_url(settings) as url:
        engine = make_engine(url, role=settings.database_role or None, pool_size=1)
        try:
            with engine.connect() as conn:
                conn.execute(text("SET TRANSACTION READ ONLY"))
                yield conn
        finally:
            engine.dispose()
