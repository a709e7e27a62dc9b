"""Store throughput: events with their journal through the store's batch path, beside a raw
binary COPY of the same rows into the same tables, measured in the same run on the same server.

    python bench/bench_store.py [--events 200000] [--batch 1000] [--runs 3]

Each event is a per-second usage reading with one two-leg charge (1 event row, 1 transaction row,
2 entry rows). Two paths: the store by COPY (``append_new`` + ``apply_balances``, what the intake's
processor uses: balances kept, no conflict check since the processor has ruled duplicates out under
its wallet locks); and the raw COPY baseline (no balances): the floor of what PostgreSQL can take
from Python here.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fresh_database, pg_server, plain, summary
from ledger.db import make_engine, unit_of_work
from ledger.events import EVENT_ADAPTER
from ledger.journal import revenue_account, transfer, wallet_account
from ledger.money import rental_cost_micros
from ledger.schema import APP_ROLE
from ledger.store import AppendItem, EventRecord, append_new, apply_balances, as_jsonb

T0 = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


def make_items(n: int, wallets: int = 1000, seed: int = 7) -> list[AppendItem]:
    """n metered readings over `wallets` wallets, one pod each, 60 s apart, each with its charge."""
    rnd = random.Random(seed)
    prices = [rnd.choice([250_000, 510_000, 1_990_000, 4_490_000]) for _ in range(wallets)]
    seconds = [0] * wallets
    items = []
    for i in range(n):
        w = i % wallets
        prev = seconds[w]
        seconds[w] = prev + 60
        wid = f"w{w:05d}"
        ev = EVENT_ADAPTER.validate_python(
            {
                "specversion": "1.0",
                "id": f"host{w % 97}-pod{w}-{i:09d}",
                "source": f"compute/host{w % 97}",
                "type": "gpu.rental.metered",
                "time": T0 + timedelta(seconds=seconds[w]),
                "data": {"walletId": wid, "resourceId": f"pod{w}", "uptimeSecondsTotal": seconds[w]},
            }
        )
        cost = rental_cost_micros(seconds[w], prices[w]) - rental_cost_micros(prev, prices[w])
        items.append(
            AppendItem(
                EventRecord.from_event(ev),
                (
                    transfer(
                        "charge",
                        wallet_id=wid,
                        debit=wallet_account(wid),
                        credit=revenue_account("pod_on_demand"),
                        amount_micros=cost,
                        resource_id=f"pod{w}",
                        product="pod_on_demand",
                        gpu_type="RTX 4090",
                    ),
                ),
            )
        )
    return items


def run_store_new(url: str, items: list[AppendItem], batch: int) -> float:
    """The intake's path since the COPY change: append_new (binary COPY, no conflict check) and the
    balances last, a transaction per batch."""
    engine = make_engine(url, role=APP_ROLE)
    received_at = datetime.now(UTC)
    t = time.perf_counter()
    for i in range(0, len(items), batch):
        with unit_of_work(engine) as uow:
            res = append_new(uow.pg, items[i : i + batch], received_at=received_at)
            apply_balances(uow.pg, res.balance_deltas)
            uow.commit()
        assert len(res.positions) == len(items[i : i + batch])
    dt = time.perf_counter() - t
    engine.dispose()
    return len(items) / dt


def run_copy(url: str, items: list[AppendItem], batch: int) -> float:
    """Binary COPY of the same rows, a transaction per batch, positions reserved with nextval()."""
    received_at = datetime.now(UTC)
    with psycopg.connect(plain(url)) as conn:
        conn.execute(f"SET ROLE {APP_ROLE}")
        conn.commit()
        t = time.perf_counter()
        for i in range(0, len(items), batch):
            chunk = items[i : i + batch]
            with conn.cursor() as cur:
                cur.execute("SELECT nextval('events_position_seq') FROM generate_series(1, %s)", (len(chunk),))
                positions = [r[0] for r in cur.fetchall()]
                with cur.copy(
                    "COPY events (position, source, event_id, type, wallet_id, resource_id, event_time,"
                    " received_at, payload) FROM STDIN (FORMAT BINARY)"
                ) as cp:
                    cp.set_types(
                        [
                            "int8",
                            "text",
                            "text",
                            "text",
                            "text",
                            "text",
                            "timestamptz",
                            "timestamptz",
                            "jsonb",
                        ]
                    )
                    for pos, it in zip(positions, chunk, strict=True):
                        r = it.record
                        cp.write_row(
                            (
                                pos,
                                r.source,
                                r.event_id,
                                r.type,
                                r.wallet_id,
                                r.resource_id,
                                r.event_time,
                                received_at,
                                as_jsonb(r.payload_json),
                            )
                        )
                with cur.copy(
                    "COPY journal_transactions (event_position, txn_no, kind, wallet_id, resource_id,"
                    " product, gpu_type, memo, booked_at) FROM STDIN (FORMAT BINARY)"
                ) as cp:
                    cp.set_types(["int8", "int2", "text", "text", "text", "text", "text", "text", "timestamptz"])
                    for pos, it in zip(positions, chunk, strict=True):
                        for n, tx in enumerate(it.txns):
                            cp.write_row(
                                (
                                    pos,
                                    n,
                                    tx.kind,
                                    tx.wallet_id,
                                    tx.resource_id,
                                    tx.product,
                                    tx.gpu_type,
                                    tx.memo,
                                    it.record.event_time,
                                )
                            )
                with cur.copy(
                    "COPY journal_entries (event_position, txn_no, entry_no, account, amount_micros, booked_at, kind,"
                    " wallet_id, resource_id, product, gpu_type) FROM STDIN (FORMAT BINARY)"
                ) as cp:
                    cp.set_types(
                        ["int8", "int2", "int2", "text", "int8", "timestamptz", "text", "text", "text", "text", "text"]
                    )
                    for pos, it in zip(positions, chunk, strict=True):
                        for n, tx in enumerate(it.txns):
                            for en, p in enumerate(tx.postings):
                                cp.write_row(
                                    (
                                        pos,
                                        n,
                                        en,
                                        p.account,
                                        p.amount_micros,
                                        it.record.event_time,
                                        tx.kind,
                                        tx.wallet_id,
                                        tx.resource_id,
                                        tx.product,
                                        tx.gpu_type,
                                    )
                                )
            conn.commit()
        dt = time.perf_counter() - t
    return len(items) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    t = time.perf_counter()
    items = make_items(args.events)
    prep_s = time.perf_counter() - t
    print(
        f"{args.events:,} events (1 event + 1 transaction + 2 entries each), batches of {args.batch}; "
        f"built in {prep_s:.1f} s (not timed)"
    )
    runs: dict[str, list[float]] = {"new": [], "copy": []}
    paths = {"new": run_store_new, "copy": run_copy}
    with pg_server() as server:
        for run in range(args.runs):
            # Rotate the order so no path always gets the warmer cache.
            order = list(paths)[run % 2 :] + list(paths)[: run % 2]
            for what in order:
                with fresh_database(server, what) as url:
                    runs[what].append(paths[what](url, items, args.batch))
            print(
                f"  run {run + 1}: store by COPY {runs['new'][-1]:,.0f} ev/s, raw COPY {runs['copy'][-1]:,.0f} ev/s",
                flush=True,
            )
    print()
    print(f"{'path':<60} {'events/s median (min-max)':>30}")
    print(f"{'raw binary COPY of the same rows (baseline)':<60} {summary(runs['copy']):>30}")
    print(f"{'store by COPY (append_new + apply_balances + commit)':<60} {summary(runs['new']):>30}")
    ratios = [s / c for s, c in zip(runs["new"], runs["copy"], strict=True)]
    print(
        f"store by COPY / raw COPY: median {sorted(ratios)[len(ratios) // 2]:.2f} (per run: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + ")"
    )


if __name__ == "__main__":
    main()
