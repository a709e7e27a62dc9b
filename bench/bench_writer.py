"""The intake's writer alone, no NATS: prepare (parse) + transact (one transaction per batch, the
owner's wallet cache) over a workload of bench/e2e_workload.py, on a fresh database.
Prints events/s, and the split of the wall time: the writer thread's own CPU (Python, psycopg's
encoding) vs waiting (PostgreSQL)."""
from __future__ import annotations
import argparse, os, sys, time, cProfile, pstats
from datetime import UTC, datetime
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import e2e_workload as workload
from common import fresh_database, pg_server
from consumers.nats.intake import prepare_deliveries, transact
from consumers.nats.names import NatsNames
from ledger.db import make_engine
from projections.wallet_store import WalletCache

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=("mix", "rentals"), default="rentals")
    ap.add_argument("--batch", type=int, default=4000)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--profile", type=Path)
    ap.add_argument("--gc", choices=("default", "freeze", "tuned"), default="freeze")
    args = ap.parse_args()
    now = datetime.now(UTC)
    if args.shape == "rentals":
        wl = workload.build_rentals(workload.rentals_wallets(args.events), dry=20, now=now)
    else:
        wl = workload.build(10_000, args.events, now=now)
    names = NatsNames("")
    msgs = [(names.in_subject(m.wallet_id) if hasattr(names, "in_subject") else "billing.in." + m.wallet_id, m.data) for m in wl.messages]
    import gc
    if args.gc != "default":
        gc.collect(); gc.freeze()
    if args.gc == "tuned":
        gc.set_threshold(50_000, 20, 100)
    with pg_server() as server, fresh_database(server, "writer") as url:
        engine = make_engine(url, role=None)
        cache = WalletCache(50_000)
        t0 = time.perf_counter(); c0 = time.thread_time(); parse_s = 0.0; n = 0
        prof = cProfile.Profile() if args.profile else None
        if prof: prof.enable()
        for i in range(0, len(msgs), args.batch):
            chunk = msgs[i : i + args.batch]
            p0 = time.perf_counter()
            items = prepare_deliveries([(s, d, 1, i + k + 1, None) for k, (s, d) in enumerate(chunk)],
                                       now=datetime.now(UTC), names=names, max_deliver=20)
            parse_s += time.perf_counter() - p0
            transact(engine, items, datetime.now(UTC), cache=cache)
            n += len(chunk)
        if prof:
            prof.disable(); prof.dump_stats(args.profile)
        wall = time.perf_counter() - t0; cpu = time.thread_time() - c0
        print(f"{args.shape}: {n:,} messages in {wall:.2f} s: {n / wall:,.0f}/s; writer CPU {cpu:.2f} s ({cpu / wall:.0%} of wall; "
              f"{cpu / n * 1e6:.0f} us/event), parse {parse_s:.2f} s ({parse_s / n * 1e6:.0f} us/event), waiting {wall - cpu:.2f} s ({(wall - cpu) / n * 1e6:.0f} us/event)")
        engine.dispose()

if __name__ == "__main__":
    main()
