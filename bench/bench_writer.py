"""The intake's writer alone, without NATS: ``prepare_deliveries`` (parse, subject check) and
``transact`` (one transaction per batch with the owner's wallet cache), over a workload of
``bench/e2e_workload.py``, on a fresh database.

    python bench/bench_writer.py [--shape rentals|mix] [--batch 4000] [--events 100000] [--runs 3] [--small 1000]

Prints events/s and splits the wall time into the writer thread's own CPU (Python: parsing, the
rules, psycopg's encoding; ``time.thread_time``) and the rest (waiting for PostgreSQL). It is the
quick loop for the writer's CPU per event, and, after the drain, the latency of small batches (5
serverless jobs each, the paced probe's case): what ``bench_e2e.py`` measures end to end, less the NATS
side. The workload's objects are frozen out of the garbage collector's sight (``gc.freeze``), as the
service freezes its own start-up objects (``consumers.runtime.gc_tuning``): without it the 700k
objects of a 100k-event workload make every collection of the writer walk them (measured: parsing
alone 43 us an event instead of 10)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import e2e_workload as workload
from bench.common import fresh_database, pg_server
from consumers.nats.intake import prepare_deliveries, transact
from consumers.nats.names import NatsNames
from consumers.runtime.gc_tuning import tune_gc
from ledger.db import make_engine
from projections.wallet_store import WalletCache

Delivery = tuple[str, bytes, int, int, None]
SMALL_BATCH: Final = 5


def run_once(url: str, deliveries: list[Delivery], batch: int, small: list[Delivery]) -> dict[str, float]:
    engine = make_engine(url, role=None)
    cache = WalletCache(50_000)
    names = NatsNames("")
    parse_s = 0.0
    t0, c0 = time.perf_counter(), time.thread_time()
    for i in range(0, len(deliveries), batch):
        p0 = time.perf_counter()
        items = prepare_deliveries(deliveries[i : i + batch], now=datetime.now(UTC), names=names, max_deliver=20)
        parse_s += time.perf_counter() - p0
        transact(engine, items, datetime.now(UTC), cache=cache)
    wall_s, cpu_s = time.perf_counter() - t0, time.thread_time() - c0
    # After the drain, the paced probe's case: small batches (serverless jobs of live wallets) on
    # the same connection pool and cache, each timed (prepare + transaction + commit).
    small_ms = []
    for i in range(0, len(small), SMALL_BATCH):
        s0 = time.perf_counter()
        items = prepare_deliveries(small[i : i + SMALL_BATCH], now=datetime.now(UTC), names=names, max_deliver=20)
        transact(engine, items, datetime.now(UTC), cache=cache)
        small_ms.append((time.perf_counter() - s0) * 1000)
    engine.dispose()
    n = len(deliveries)
    small_ms.sort()
    return {
        "small_p50_ms": small_ms[len(small_ms) // 2] if small_ms else 0.0,
        "small_p99_ms": small_ms[int(len(small_ms) * 0.99)] if small_ms else 0.0,
        "events_per_s": n / wall_s,
        "cpu_us": cpu_s / n * 1e6,
        "parse_us": parse_s / n * 1e6,
        "wait_us": (wall_s - cpu_s) / n * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=("rentals", "mix"), default="rentals")
    ap.add_argument("--batch", type=int, default=4000)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small", type=int, default=1000, help="events of the small batches after the drain")
    args = ap.parse_args()
    now = datetime.now(UTC)
    if args.shape == "rentals":
        wl = workload.build_rentals(workload.rentals_wallets(args.events), dry=20, now=now)
    else:
        wl = workload.build(10_000, args.events, now=now)
    names = NatsNames("")
    deliveries = [(names.in_subject(m.wallet_id), m.data, 1, k + 1, None) for k, m in enumerate(wl.messages)]
    paced = workload.paced_messages(wl.live, args.small, now, "writer")
    small = [(names.in_subject(m.wallet_id), m.data, 1, 10**9 + k, None) for k, m in enumerate(paced)]
    del wl, paced
    tune_gc()
    runs = []
    with pg_server() as server:
        for run in range(args.runs):
            with fresh_database(server, "writer") as url:
                r = run_once(url, deliveries, args.batch, small)
            runs.append(r)
            print(
                f"{args.shape} run {run + 1}: {len(deliveries):,} messages, {r['events_per_s']:,.0f}/s; per event:"
                f" writer CPU {r['cpu_us']:.0f} us (parse {r['parse_us']:.0f}), waiting {r['wait_us']:.0f} us; then"
                f" batches of {SMALL_BATCH}: p50 {r['small_p50_ms']:.1f} ms, p99 {r['small_p99_ms']:.1f} ms",
                flush=True,
            )
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(
        f"{args.shape}, median of {len(runs)}: {med['events_per_s']:,.0f} events/s; writer CPU {med['cpu_us']:.0f}"
        f" us/event (parse {med['parse_us']:.0f}), waiting {med['wait_us']:.0f} us/event; batches of {SMALL_BATCH}"
        f" after the drain: p50 {med['small_p50_ms']:.1f} ms, p99 {med['small_p99_ms']:.1f} ms"
    )


if __name__ == "__main__":
    main()
