"""Read-only loads of the wallet and rental aggregates, for the HTTP reads.

Readers never take a lock: no ``lock_wallets`` (which inserts and ``SELECT ... FOR UPDATE``s),
no write of any kind. Instead each read runs in a ``REPEATABLE READ, READ ONLY`` transaction
(:func:`read_snapshot`), so the several statements of one load (balance, holds, rentals) see one
consistent snapshot: a batch committed halfway through a load cannot pair a new balance with an
old rental reading. Readers and writers never block each other.

The figures a reader shows (available, burn, projected zero) are computed by the caller at the
instant of the request with the rules' query functions, from the :class:`WalletState` loaded here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine

from ledger.invariants import fail
from projections.rules import RentalState, WalletState
from projections.wallet_store import load_wallets


@contextmanager
def read_snapshot(engine: Engine) -> Iterator[psycopg.Connection[Any]]:
    """A read-only, repeatable-read transaction; rolled back at the end (it wrote nothing)."""
    conn: Connection
    options = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
    with engine.connect().execution_options(**options) as conn, conn.begin() as txn:
        driver = conn.connection.driver_connection
        if not isinstance(driver, psycopg.Connection):
            fail("the read models need the psycopg driver")
        yield driver
        txn.rollback()


def wallet_exists(conn: psycopg.Connection[Any], wallet_id: str) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM wallets WHERE wallet_id = %s", (wallet_id,))
        return cur.fetchone() is not None


def read_wallet(conn: psycopg.Connection[Any], wallet_id: str) -> WalletState | None:
    """The wallet's aggregate (balance, holds, every open rental), or None for a wallet never seen.

    ``load_wallets`` only reads; it is ``lock_wallets`` that locks, and it is not called here.
    """
    if not wallet_exists(conn, wallet_id):
        return None
    states, _ = load_wallets(conn, [wallet_id])
    return states[wallet_id]


def read_rental(conn: psycopg.Connection[Any], resource_id: str) -> RentalState | None:
    """One rental in any status (ended included), or None if no rental has this resource id."""
    # With no wallet named, load_wallets returns the named rental among the "foreign" ones.
    _, rentals = load_wallets(conn, [], resource_ids=[resource_id])
    return rentals.get(resource_id)
