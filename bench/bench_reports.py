"""Finance reports over a generated ledger of 1M journal entries (issue 6: each under a second).

    python bench/bench_reports.py [--entries 1000000] [--wallets 2000] [--runs 3]

Generates a realistic month (top-ups through Stripe, per-second charges across products and GPU
types, refunds, adjustments, a few wallets in debt) with a binary COPY into a fresh database, then
times each report through the same functions the HTTP API and the CLI call.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Connection, Table, create_engine, pool

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fresh_database, pg_server, plain
from ledger import schema
from projections import reports

T0 = datetime(2026, 10, 1, tzinfo=UTC)
DAYS = 30
PRODUCTS = [
    ("pod_on_demand", ["RTX 4090", "A100", "H100"]),
    ("pod_spot", ["RTX 4090", "A100"]),
    ("marketplace", ["A6000", "RTX 3090"]),
    ("cluster", ["H100"]),
    ("serverless", ["AMPERE_24", "ADA_48"]),
]


def generate(url: str, entries: int, wallets: int, seed: int = 11) -> dict[str, int]:
    rnd = random.Random(seed)
    txns = entries // 2
    span_s = DAYS * 86400
    balances = [0] * wallets
    kinds = {"topup": 0, "charge": 0, "refund": 0, "adjustment": 0}
    with psycopg.connect(plain(url)) as conn, conn.cursor() as cur:
        rows_ev, rows_tx, rows_en = [], [], []
        for i in range(txns):
            pos = i + 1
            w = rnd.randrange(wallets)
            wid = f"w{w:05d}"
            at = T0 + timedelta(seconds=span_s * i // txns)
            r = rnd.random()
            if r < 0.05 or (balances[w] < 1_000_000 and r < 0.5):
                amount = rnd.choice([5, 10, 25, 50, 100]) * 1_000_000
                kind, debit, credit, product, gpu, res = "topup", "stripe:clearing", f"wallet:{wid}", None, None, None
                etype, src, eid = "stripe.payment.succeeded", "stripe", f"pi_{pos}"
            elif r < 0.06:
                amount = rnd.randrange(1_000_000, 5_000_000)
                kind, debit, credit, product, gpu, res = "refund", f"wallet:{wid}", "refunds", None, None, None
                etype, src, eid = "stripe.refund.succeeded", "stripe", f"re_{pos}"
            elif r < 0.07:
                amount = rnd.randrange(100_000, 2_000_000)
                kind, debit, credit, product, gpu, res = "adjustment", "adjustments", f"wallet:{wid}", None, None, None
                etype, src, eid = "wallet.adjusted", "finance/ops", f"adj-{pos}"
            else:
                product, gpus = rnd.choice(PRODUCTS)
                gpu = rnd.choice(gpus)
                amount = rnd.randrange(100, 100_000)
                res = f"{product[:3]}{w}-{rnd.randrange(5)}"
                kind, debit, credit = "charge", f"wallet:{wid}", f"revenue:{product}"
                etype = "serverless.job.completed" if product == "serverless" else "gpu.rental.metered"
                src, eid = f"compute/host{w % 50}", f"ev-{pos}"
            kinds[kind] += 1
            balances[w] += amount if credit == f"wallet:{wid}" else -amount if debit == f"wallet:{wid}" else 0
            payload = json.dumps({"data": {"walletId": wid, "amountMicros": amount}})
            rows_ev.append((pos, src, eid, etype, wid, res, at, at, payload))
            rows_tx.append((pos, 0, kind, wid, res, product, gpu, "", at))
            rows_en.append((pos, 0, 0, debit, -amount, at, kind, wid, res, product, gpu))
            rows_en.append((pos, 0, 1, credit, amount, at, kind, wid, res, product, gpu))
        _load(cur, rows_ev, rows_tx, rows_en)
        cur.execute("SELECT setval('events_position_seq', %s)", (txns,))
        conn.commit()
        cur.execute("SELECT coalesce(sum(amount_micros), 0), count(*) FROM journal_entries")
        total, n = cur.fetchone()  # type: ignore[misc]
        assert total == 0, total
        conn.commit()
        conn.autocommit = True
        cur.execute("VACUUM ANALYZE")
    return {"entries": n, **kinds, "debts": sum(1 for b in balances if b < 0)}


def _columns(table: Table) -> str:
    return ", ".join(c.name for c in table.columns)


def _load(cur: psycopg.Cursor[Any], *rows: list[tuple[Any, ...]]) -> None:
    """The rows (in each table's column order, ledger.schema's) by COPY, then the wallet balances."""
    tables = (schema.events, schema.journal_transactions, schema.journal_entries)
    cur.execute("SET session_replication_role = replica")  # bulk load: skip the check triggers, not the data
    for table, table_rows in zip(tables, rows, strict=True):
        with cur.copy(f"COPY {table.name} ({_columns(table)}) FROM STDIN") as cp:
            for row in table_rows:
                cp.write_row(row)
    cur.execute("SET session_replication_role = origin")
    # Wallet accounts only: the shared accounts' balances are derived on read (migration 0007).
    cur.execute(
        "INSERT INTO account_balances (account, balance_micros, last_position)"
        " SELECT account, sum(amount_micros), max(event_position) FROM journal_entries"
        " WHERE account LIKE 'wallet:%' GROUP BY account"
    )


def reconcile_against_copy(conn: Connection, start: datetime, end: datetime) -> reports.Report:
    """The ledger side read once; Stripe's side stands in as a copy (its list APIs are not timed)."""
    mine = reports.ledger_stripe_records(conn, start, end)
    return reports.reconcile(mine, list(mine), start, end)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--wallets", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with pg_server() as server, fresh_database(server, "reports") as url:
        t = time.perf_counter()
        stats = generate(url, args.entries, args.wallets)
        print(f"generated {stats} in {time.perf_counter() - t:.0f} s")
        engine = create_engine(url, poolclass=pool.NullPool)
        end = T0 + timedelta(days=DAYS)
        mid = T0 + timedelta(days=DAYS // 2)
        cases = [
            ("trial balance at end of month", lambda c: reports.trial_balance(c, end)),
            ("trial balance mid-month", lambda c: reports.trial_balance(c, mid)),
            ("statement of one wallet, month", lambda c: reports.statement(c, "w00042", T0, end)),
            ("statement lines (dated) of one wallet, month", lambda c: reports.statement_lines(c, "w00042", T0, end)),
            ("revenue by day, product, gpuType", lambda c: reports.revenue(c, T0, end)),
            ("revenue by product, one week", lambda c: reports.revenue(c, mid, mid + timedelta(days=7), ["product"])),
            ("debts", lambda c: reports.debts(c)),
            ("rejected inputs by reason", lambda c: reports.rejected_inputs(c, T0, end)),
            ("stripe reconciliation (ledger side + match)", lambda c: reconcile_against_copy(c, T0, end)),
        ]
        title = f"report over {stats['entries']:,} entries"
        print(f"\n{title:<48} {'median s':>9} {'max s':>7} {'rows':>6}  < 1 s")
        for name, fn in cases:
            times, rows = [], 0
            for _ in range(args.runs):
                with engine.connect() as conn:
                    t = time.perf_counter()
                    rep = fn(conn)
                    times.append(time.perf_counter() - t)
                    rows = len(rep.rows)
            ok = "yes" if max(times) < 1 else "NO"
            print(f"{name:<48} {statistics.median(times):>9.3f} {max(times):>7.3f} {rows:>6}  {ok}")
        engine.dispose()


if __name__ == "__main__":
    main()
