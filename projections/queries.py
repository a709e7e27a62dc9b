"""Read queries for the adapters (the HTTP finance routes) and the demo, so that no adapter holds
SQL: a read-only snapshot for the reports, the reads that end in a domain error (never an HTTP one;
``consumers.http.errors`` maps them), and the counts of a group of wallets (ids with one prefix)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, text

from projections import reports
from projections.reports import Report


class UnknownWallet(LookupError):
    """Neither the ledger nor the wallet projection has heard of this wallet."""

    def __init__(self, wallet_id: str) -> None:
        super().__init__(f"no wallet {wallet_id} is known")
        self.wallet_id = wallet_id


@contextmanager
def report_snapshot(engine: Engine) -> Iterator[Connection]:
    """A ``REPEATABLE READ, READ ONLY`` transaction: every statement of one report sees one
    snapshot, and takes no lock a writer waits for. Rolled back at the end (it wrote nothing)."""
    with engine.connect() as conn:
        conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        yield conn


def read_report(engine: Engine, report: Callable[..., Report], *args: Any) -> Report:
    """``report(conn, *args)`` in its own :func:`report_snapshot`."""
    with report_snapshot(engine) as conn:
        return report(conn, *args)


def known_wallet_statement(conn: Connection, wallet_id: str, start: datetime, end: datetime) -> Report:
    """The statement of a wallet the ledger knows; :class:`UnknownWallet` for one it does not (an
    all-zero statement would look like a wallet with no money)."""
    if not reports.wallet_known(conn, wallet_id):
        raise UnknownWallet(wallet_id)
    return reports.statement(conn, wallet_id, start, end)


def like_prefix(prefix: str) -> str:
    """A ``LIKE`` pattern for the strings that start with ``prefix`` (its ``%``, ``_`` and ``\\``
    taken literally)."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def events_of_wallets(conn: Connection, wallet_prefix: str) -> int:
    """Events in the log of the wallets whose id starts with ``wallet_prefix``."""
    return int(
        conn.execute(
            text("SELECT count(*) FROM events WHERE wallet_id LIKE :p"), {"p": like_prefix(wallet_prefix)}
        ).scalar_one()
    )


def charged_to_wallets_micros(conn: Connection, wallet_prefix: str) -> int:
    """What the journal charged (kind ``charge``, the wallet's own account debited) to the wallets
    whose id starts with ``wallet_prefix``, in micro-USD."""
    return int(
        conn.execute(
            text(
                "SELECT coalesce(-sum(amount_micros), 0) FROM journal_entries"
                " WHERE kind = 'charge' AND wallet_id LIKE :p AND account = 'wallet:' || wallet_id"
            ),
            {"p": like_prefix(wallet_prefix)},
        ).scalar_one()
    )


def ping(engine: Engine) -> None:
    """The database answers a statement (readiness); raises what the driver raises when not."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
