"""Store throughput, and what each object of the schema costs the write path, in one run on one
server: the store's path, the same schema with objects removed in turn, and a bare COPY.

    python bench/bench_store.py [--events 200000] [--batch 1000] [--runs 3] [--only-store]

Each event is a per-second usage reading with one two-leg charge (1 event row, 1 transaction row,
2 entry rows). Paths, each on a fresh migrated database:

* the store (``append_new`` + ``apply_balances`` + commit, what the intake's processor uses);
* the store's COPYs without ``apply_balances`` (``run_copy``, bench_e2e's B);
* the store on a schema without some objects (foreign keys, check triggers, indexes, primary keys;
  dropped as the owner before the run, ``IF EXISTS`` so the list also runs on a schema that no
  longer has them): the difference to the store is what they cost, printed in us an event;
* a bare binary COPY of three plain rows an event into a table without any index (the issue's
  ceiling: what PostgreSQL takes from Python here when the schema costs nothing).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import psycopg
from alembic import command
from sqlalchemy import create_engine, pool

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fresh_database, pg_server, plain, summary
from ledger.db import make_engine, unit_of_work
from ledger.events import EVENT_ADAPTER
from ledger.journal import revenue_account, transfer, wallet_account
from ledger.migrate import alembic_config
from ledger.money import rental_cost_micros
from ledger.schema import APP_ROLE
from ledger.store import AppendItem, EventRecord, append_new, apply_balances

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


def run_store_new(url: str, items: list[AppendItem], batch: int, *, balances: bool = True) -> float:
    """The intake's path since the COPY change: append_new (binary COPY, no conflict check) and the
    balances last, a transaction per batch."""
    engine = make_engine(url, role=APP_ROLE)
    received_at = datetime.now(UTC)
    t = time.perf_counter()
    for i in range(0, len(items), batch):
        with unit_of_work(engine) as uow:
            res = append_new(uow.pg, items[i : i + batch], received_at=received_at)
            if balances:
                apply_balances(uow.pg, res.balance_deltas)
            uow.commit()
        assert len(res.positions) == len(items[i : i + batch])
    dt = time.perf_counter() - t
    engine.dispose()
    return len(items) / dt


def run_copy(url: str, items: list[AppendItem], batch: int) -> float:
    """The rows the store writes for these events, by its binary COPYs into our tables (positions
    reserved with nextval()), a transaction per batch, no balances: what the schema costs without
    the rest of the write path (bench_e2e's B uses it too)."""
    return run_store_new(url, items, batch, balances=False)


BARE_ROWS_PER_EVENT: Final = 3
"""The issue's ceiling: a bare binary COPY of three plain rows an event into a table without
indexes, constraints or triggers (bench_e2e's held-out check used the same shape)."""


def run_bare(url: str, items: list[AppendItem], batch: int) -> float:
    """Three plain rows an event (int8, text, int8) into an index-less table: what PostgreSQL takes
    from Python here when the schema costs nothing."""
    with psycopg.connect(plain(url)) as conn:
        conn.execute("CREATE TABLE bare_rows (n int8 NOT NULL, k text NOT NULL, amount int8 NOT NULL)")
        conn.execute(f"GRANT INSERT ON bare_rows TO {APP_ROLE}")
        conn.execute(f"SET ROLE {APP_ROLE}")
        conn.commit()
        t = time.perf_counter()
        for i in range(0, len(items), batch):
            with conn.cursor() as cur, cur.copy("COPY bare_rows (n, k, amount) FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(("int8", "text", "int8"))
                for j, it in enumerate(items[i : i + batch], start=i):
                    amount = it.txns[0].postings[1].amount_micros
                    for r in range(BARE_ROWS_PER_EVENT):
                        cp.write_row((j * BARE_ROWS_PER_EVENT + r, it.record.event_id, amount))
            conn.commit()
        dt = time.perf_counter() - t
    return len(items) / dt


@dataclass(frozen=True, slots=True)
class Variant:
    """The store's write path on a schema with some objects removed (as the owner, before the run):
    the difference to the full path is what those objects cost."""

    label: str
    ddl: tuple[str, ...]
    balances: bool = True
    downgrade_to: str | None = None
    """Run on the schema of this revision (alembic downgrade first): the schema before a change."""


def _drop_index(name: str) -> str:
    return f"DROP INDEX IF EXISTS {name}"


def _drop_constraint(table: str, name: str) -> str:
    return f"ALTER TABLE IF EXISTS {table} DROP CONSTRAINT IF EXISTS {name}"


def _drop_trigger(table: str, name: str) -> str:
    return f"DROP TRIGGER IF EXISTS {name} ON {table}"


_FKS: Final = (
    _drop_constraint("journal_entries", "fk_journal_entries_event_position_journal_transactions"),
    _drop_constraint("journal_transactions", "fk_journal_transactions_event_position_events"),
)
_CHECK_TRIGGERS: Final = (
    _drop_trigger("journal_entries", "journal_entries_balanced"),
    _drop_trigger("journal_entries", "journal_entries_checked"),
    _drop_trigger("journal_transactions", "journal_transactions_checked"),
)
_EVENT_INDEXES: Final = (_drop_index("ix_events_wallet_id_position"), _drop_index("ix_events_stripe_event_time"))
_TXN_INDEXES: Final = (
    _drop_index("ix_journal_transactions_wallet_id_booked_at"),
    _drop_index("ix_journal_transactions_booked_at"),
)
_ENTRY_INDEXES: Final = (_drop_index("ix_journal_entries_account_event_position"),)
_JOURNAL_PKS: Final = (
    _drop_constraint("journal_entries", "pk_journal_entries"),
    _drop_constraint("journal_transactions", "pk_journal_transactions"),
)

VARIANTS: Final = (
    Variant("store: append_new + apply_balances (the intake's path)", ()),
    Variant("  on the schema before 0007 (alembic downgrade 0006)", (), downgrade_to="0006"),
    Variant("  without the foreign keys", _FKS),
    Variant("  without the zero-sum / reference check triggers", _CHECK_TRIGGERS),
    Variant("  without events' secondary indexes (wallet, stripe time)", _EVENT_INDEXES),
    Variant("  without journal_transactions' two indexes", _TXN_INDEXES),
    Variant("  without journal_entries' account index", _ENTRY_INDEXES),
    Variant("  without the journal's primary keys (and so the FKs)", (*_FKS, *_JOURNAL_PKS)),
    Variant(
        "  without all of the above (uq on events kept)",
        (*_FKS, *_CHECK_TRIGGERS, *_EVENT_INDEXES, *_TXN_INDEXES, *_ENTRY_INDEXES, *_JOURNAL_PKS),
        balances=False,
    ),
)


def _downgrade(url: str, revision: str) -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
    engine.dispose()


def run_variant(url: str, items: list[AppendItem], batch: int, variant: Variant) -> float:
    if variant.downgrade_to is not None:
        _downgrade(url, variant.downgrade_to)
    with psycopg.connect(plain(url), autocommit=True) as conn:
        for statement in variant.ddl:
            conn.execute(statement)
    return run_store_new(url, items, batch, balances=variant.balances)


def _print_table(runs: dict[str, list[float]], events: int) -> None:
    bare = statistics.median(runs["bare"])
    store = statistics.median(runs[VARIANTS[0].label])
    print()
    print(f"{'path':<64} {'events/s median (min-max)':>28} {'/ store':>8} {'/ bare':>7}")
    rows = [
        ("bare", f"bare binary COPY, {BARE_ROWS_PER_EVENT} plain rows an event, no index"),
        ("copy", "  without apply_balances (raw COPY of the store's rows, bench_e2e's B)"),
    ]
    for key, label in [*rows, *((v.label, v.label) for v in VARIANTS if v.label in runs)]:
        med = statistics.median(runs[key])
        print(f"{label:<64} {summary(runs[key]):>28} {med / store:>8.2f} {med / bare:>7.2f}")
    print()
    print("cost of an object = 1/(its variant's events/s) - 1/(store's), in microseconds an event:")
    for key, label in [(rows[1][0], rows[1][1]), *((v.label, v.label) for v in VARIANTS[1:] if v.label in runs)]:
        med = statistics.median(runs[key])
        print(f"  {label.strip():<62} {1e6 / store - 1e6 / med:>7.1f} us/event")
    print(f"  {'the whole store path beside the bare COPY':<62} {1e6 / store - 1e6 / bare:>7.1f} us/event")
    print(f"({events:,} events; store {1e6 / store:.1f} us/event, bare {1e6 / bare:.1f} us/event)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--only-store", action="store_true", help="the store (on this schema and on 0006's), raw COPY and bare COPY"
    )
    args = ap.parse_args()

    t = time.perf_counter()
    items = make_items(args.events)
    prep_s = time.perf_counter() - t
    print(
        f"{args.events:,} events (1 event + 1 transaction + 2 entries each), batches of {args.batch}; "
        f"built in {prep_s:.1f} s (not timed)"
    )
    variants = VARIANTS[:2] if args.only_store else VARIANTS
    paths: dict[str, Callable[[str], float]] = {
        "bare": lambda url: run_bare(url, items, args.batch),
        "copy": lambda url: run_copy(url, items, args.batch),
    }
    for v in variants:
        paths[v.label] = lambda url, v=v: run_variant(url, items, args.batch, v)  # type: ignore[misc]
    runs: dict[str, list[float]] = {k: [] for k in paths}
    with pg_server() as server:
        for run in range(args.runs):
            # Rotate the order so no path always gets the warmer cache.
            keys = list(paths)
            order = keys[run % len(keys) :] + keys[: run % len(keys)]
            for key in order:
                with fresh_database(server, f"s{len(runs[key])}") as url:
                    runs[key].append(paths[key](url))
                print(f"  run {run + 1}: {key.strip()}: {runs[key][-1]:,.0f} ev/s", flush=True)
    _print_table(runs, args.events)


if __name__ == "__main__":
    main()
