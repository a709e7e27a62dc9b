"""Baseline B of bench/bench_e2e.py: what PostgreSQL takes from Python here, with no schema of ours.

* :func:`written_rows`: the rows the service wrote, counted per table from the database itself
  (every base table of the ``public`` schema, exact ``count(*)``), so that "rows per event" is what
  the service writes today, not what a comment says (the journal's schema changes under it);
* :func:`bare_copy`: a binary COPY of that many plain rows into a table with no index, no key, no
  trigger and no constraint, a transaction per ``rows_per_txn`` rows (the rows of 1000 events, as the
  service's batches and B-own). The row is five plain columns (int8, text, text, int8, timestamptz:
  ~60 bytes, the size of a journal entry's own columns), the same for every row.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final

import psycopg

from bench.common import fresh_database, plain

PLAIN_TABLE: Final = "bench_plain_rows"
PLAIN_COLUMNS: Final = "n int8, wallet_id text, account text, amount_micros int8, at timestamptz"
PLAIN_TYPES: Final = ["int8", "text", "text", "int8", "timestamptz"]
NOT_WRITTEN: Final = ("alembic_version",)
"""Tables that are the migration's, not the service's."""
MAX_ROWS: Final = 100_000_000
WALLETS: Final = 3125


def written_rows(dsn: str) -> dict[str, int]:
    """Exact rows per base table of ``public`` (the migration's own left out)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = [
            str(r[0])
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name"
            ).fetchall()
            if r[0] not in NOT_WRITTEN
        ]
        out: dict[str, int] = {}
        for t in tables:
            row = conn.execute(f'SELECT count(*) FROM public."{t}"').fetchone()
            out[t] = int(row[0]) if row is not None else 0
        return out


def rows_added(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Rows per table the service added (tables it left alone left out)."""
    return {t: n - before.get(t, 0) for t, n in after.items() if n != before.get(t, 0)}


def bare_copy(server: str, rows: int, rows_per_txn: int) -> float:
    """Rows/s of a binary COPY of ``rows`` plain rows into an unindexed table of a fresh database."""
    if not 0 < rows <= MAX_ROWS or rows_per_txn < 1:
        raise ValueError(f"bare_copy: {rows} rows, {rows_per_txn} a transaction")
    at = datetime.now(UTC)
    wallets = [(f"w{w:05d}", f"wallet:w{w:05d}") for w in range(WALLETS)]  # built before the clock starts
    with fresh_database(server, "e2ebare") as url, psycopg.connect(plain(url)) as conn:
        conn.execute(f"CREATE TABLE {PLAIN_TABLE} ({PLAIN_COLUMNS})")
        conn.commit()
        t = time.perf_counter()
        for first in range(0, rows, rows_per_txn):
            with conn.cursor() as cur, cur.copy(f"COPY {PLAIN_TABLE} FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(PLAIN_TYPES)
                for n in range(first, min(first + rows_per_txn, rows)):
                    w = wallets[n % WALLETS]
                    cp.write_row((n, w[0], w[1], n % 1_000_003, at))
            conn.commit()
        dt = time.perf_counter() - t
        row = conn.execute(f"SELECT count(*) FROM {PLAIN_TABLE}").fetchone()
        if row is None or int(row[0]) != rows:
            raise RuntimeError(f"{PLAIN_TABLE} holds {row} rows, not {rows}")
    return rows / dt
