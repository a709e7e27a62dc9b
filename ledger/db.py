"""Engines and the unit of work.

The service connects with whatever login the URL names and immediately ``SET ROLE`` to the service
role, so even a superuser URL (a developer's local server) runs with the service's privileges:
SELECT and INSERT on the log and the journal, nothing that could rewrite them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, create_engine, event

from ledger.invariants import require

_ROLE_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def make_engine(url: str, *, role: str | None, pool_size: int = 5, **kwargs: Any) -> Engine:
    """An engine whose every connection runs as ``role`` (None or "" keeps the login's own role)."""
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, **kwargs)
    if role:
        require(_ROLE_RE.match(role) is not None, f"bad role name {role!r}")

        @event.listens_for(engine, "connect")
        def _set_role(dbapi_conn: psycopg.Connection[Any], _record: object) -> None:
            # Outside a transaction, so a later ROLLBACK cannot undo it.
            was = dbapi_conn.autocommit
            dbapi_conn.autocommit = True
            try:
                dbapi_conn.execute(f"SET ROLE {role}")  # validated identifier above
            finally:
                dbapi_conn.autocommit = was

    return engine


@dataclass
class UnitOfWork:
    """One database transaction. Nothing is kept unless :meth:`commit` is called."""

    conn: Connection

    @property
    def pg(self) -> psycopg.Connection[Any]:
        """The psycopg connection of this transaction, for the batch paths (COPY, binary arrays)."""
        driver = self.conn.connection.driver_connection
        require(isinstance(driver, psycopg.Connection), "the ledger needs the psycopg driver")
        return driver  # type: ignore[return-value]

    def commit(self) -> None:
        self.conn.commit()


@contextmanager
def unit_of_work(engine: Engine) -> Iterator[UnitOfWork]:
    """Rolls back unless the body calls ``uow.commit()``: an exception or a forgotten commit
    keeps nothing, and the batch that caused it is redelivered."""
    with engine.connect() as conn:
        # Begin explicitly: the batch paths talk to psycopg directly, and SQLAlchemy must know a
        # transaction is open so that commit() and the rollback below reach the driver.
        conn.begin()
        uow = UnitOfWork(conn)
        try:
            yield uow
        finally:
            if conn.in_transaction():
                conn.rollback()
