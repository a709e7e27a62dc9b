"""The batch processor (the intake's unit of work) against the real PostgreSQL, as the service
role: the charging vectors, duplicates, retries of not-started readings, rejections, the outbox."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from consumers.nats.intake import parsed_items, transact
from ledger.db import unit_of_work
from ledger.events import Event, RejectReason, event_to_json
from projections.outbox import MARK_PUBLISHED_SQL
from projections.processor import BatchResult, Disposition, Incoming, process_batch
from projections.wakeups import STOPS_ISSUED_SQL
from projections.wallet_store import BATCH_LOOKUPS_SQL, WalletCache
from tests.factories import T0, adjusted, make_event
from tests.integration.vectors import load_cases, renamed

pytestmark = pytest.mark.integration

NOW = T0 + timedelta(minutes=2)
CASES = load_cases()


def run(
    engine: Engine,
    events: list[Event],
    *,
    now: datetime = NOW,
    batch: int = 1000,
    last_attempt: bool = False,
    cache: WalletCache | None = None,
):
    """The events in batches: through process_batch alone, or with ``cache`` through the intake
    owner's unit of work (consumers.nats.intake.transact: its wallets in memory, written through)."""
    results = []
    for i in range(0, len(events), batch):
        incoming = [Incoming(e, event_to_json(e), last_attempt=last_attempt) for e in events[i : i + batch]]
        if cache is not None:
            outcome = transact(engine, parsed_items(incoming), now, cache=cache)
            results.append(BatchResult([Disposition(o.disposition) for o in outcome.outcomes]))
            continue
        with unit_of_work(engine) as uow:
            res = process_batch(uow.pg, incoming, now=now)
            uow.commit()
        results.append(res)
    return results


def q(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params).all())


def check_case(engine: Engine, case: dict[str, Any], names: dict[str, str]) -> None:
    expect = case["expect"]
    for w, balance in expect.get("wallets", {}).items():
        rows = q(engine, "SELECT balance_micros FROM account_balances WHERE account = :a", a=f"wallet:{names[w]}")
        assert rows == [(balance,)], (case["name"], w)
    for r, want in expect.get("rentals", {}).items():
        rows = q(
            engine, "SELECT billable_seconds, charged_micros, status FROM rentals WHERE resource_id = :r", r=names[r]
        )
        assert rows == [(want["billableSeconds"], want["costMicros"], want["state"])], (case["name"], r)
    wallets = [names[w] for w in names if w.startswith("w")]
    if "settlements" in expect:
        rows = q(
            engine,
            "SELECT payload FROM outbox"
            " WHERE subject LIKE 'billing.out.settlements.%' AND payload->>'walletId' = ANY(:w)",
            w=wallets,
        )
        got = [{k: p[k] for k in ("resourceId", "billableSeconds", "costMicros", "reason")} for (p,) in rows]
        want = [{**s, "resourceId": names[s["resourceId"]]} for s in expect["settlements"]]
        assert got == want, case["name"]
    for product, amount in expect.get("revenue", {}).items():
        rows = q(
            engine,
            "SELECT coalesce(sum(e.amount_micros), 0) FROM journal_entries e"
            " JOIN journal_transactions t USING (event_position, txn_no)"
            " WHERE e.account = :a AND t.wallet_id = ANY(:w)",
            a=f"revenue:{product}",
            w=wallets,
        )
        assert rows == [(amount,)], (case["name"], product)
    if "rejected" in expect:
        rows = q(engine, "SELECT count(*) FROM rejected_inputs WHERE wallet_id = ANY(:w)", w=wallets)
        assert rows == [(expect["rejected"],)], case["name"]
    # Whatever the case: the journal of these wallets balances, and each balance is its entries' sum.
    for w in wallets:
        rows = q(
            engine,
            "SELECT (SELECT coalesce(sum(amount_micros), 0) FROM journal_entries WHERE account = :a),"
            "       (SELECT coalesce(max(balance_micros), 0) FROM account_balances WHERE account = :a)",
            a=f"wallet:{w}",
        )
        assert rows[0][0] == rows[0][1]


@pytest.mark.parametrize("case", CASES, ids=[c["name"][:60] for c in CASES])
@pytest.mark.parametrize("batch", [1, 7, 1000])
@pytest.mark.parametrize("cached", [False, True], ids=["stateless", "cached"])
def test_charging_vectors_through_the_batch_processor(
    app_engine: Engine, case: dict[str, Any], batch: int, cached: bool
) -> None:
    events, names, _ = renamed(case)
    cache = WalletCache(5000) if cached else None
    run(app_engine, events, batch=batch, cache=cache)
    check_case(app_engine, case, names)
    # Delivered again, whole: nothing changes. (A refused event is not in the log: it is refused
    # again, and recorded once.)
    again = run(app_engine, events, batch=batch, cache=cache)
    assert all(d in (Disposition.duplicate, Disposition.rejected) for r in again for d in r.dispositions)
    check_case(app_engine, case, names)


def test_reading_before_start_is_retried_then_charged(app_engine: Engine, unique: str) -> None:
    w, p = f"w{unique[-39:]}", f"p{unique[-39:]}"
    credit = make_event("wallet.adjusted", {"walletId": w, "amountMicros": 10_000_000, "reason": "c", "operator": "o"})
    reading = make_event("gpu.rental.metered", {"walletId": w, "resourceId": p, "uptimeSecondsTotal": 3600})
    start = make_event(
        "gpu.rental.started",
        {
            "walletId": w,
            "resourceId": p,
            "resourceKind": "pod",
            "gpuType": "A100",
            "gpuCount": 1,
            "tier": "on_demand",
            "pricePerHourMicros": 1_000_000,
        },
    )
    (r1,) = run(app_engine, [credit, reading])
    assert r1.dispositions == [Disposition.accepted, Disposition.retry]
    assert q(app_engine, "SELECT count(*) FROM events WHERE wallet_id = :w", w=w) == [(1,)]
    (r2,) = run(app_engine, [start, reading])
    assert r2.dispositions == [Disposition.accepted, Disposition.accepted]
    assert q(app_engine, "SELECT balance_micros FROM account_balances WHERE account = :a", a=f"wallet:{w}") == [
        (9_000_000,)
    ]


def test_reading_of_unknown_resource_on_last_attempt_is_rejected_and_kept(app_engine: Engine, unique: str) -> None:
    w, p = f"w{unique[-39:]}", f"p{unique[-39:]}"
    reading = make_event("gpu.rental.metered", {"walletId": w, "resourceId": p, "uptimeSecondsTotal": 60})
    (r,) = run(app_engine, [reading], last_attempt=True)
    assert r.dispositions == [Disposition.rejected]
    assert r.rejections[0].reason == RejectReason.not_started
    rows = q(app_engine, "SELECT reason, source, event_id, raw FROM rejected_inputs WHERE wallet_id = :w", w=w)
    assert [(x[0], x[1], x[2]) for x in rows] == [("not_started", reading.source, reading.id)]
    assert bytes(rows[0][3]) == event_to_json(reading)
    # Redelivered: recorded once.
    run(app_engine, [reading], last_attempt=True)
    assert q(app_engine, "SELECT count(*) FROM rejected_inputs WHERE wallet_id = :w", w=w) == [(1,)]


def test_resource_of_another_wallet_is_refused(app_engine: Engine, unique: str) -> None:
    a, b, p = f"a{unique[-39:]}", f"b{unique[-39:]}", f"p{unique[-39:]}"
    start = {
        "resourceId": p,
        "resourceKind": "pod",
        "gpuType": "A100",
        "gpuCount": 1,
        "tier": "on_demand",
        "pricePerHourMicros": 1_000_000,
    }
    (r,) = run(
        app_engine,
        [
            make_event("gpu.rental.started", {"walletId": a, **start}),
            make_event("gpu.rental.started", {"walletId": b, **start}),
            make_event("gpu.rental.metered", {"walletId": b, "resourceId": p, "uptimeSecondsTotal": 60}),
        ],
    )
    assert r.dispositions == [Disposition.accepted, Disposition.rejected, Disposition.rejected]
    assert {x.reason for x in r.rejections.values()} == {RejectReason.wallet_mismatch}
    assert q(app_engine, "SELECT wallet_id FROM rentals WHERE resource_id = :p", p=p) == [(a,)]


def test_positions_follow_batch_order(app_engine: Engine, unique: str) -> None:
    w = f"w{unique[-39:]}"
    # ids chosen so that key order is the reverse of batch order
    events = [
        make_event(
            "wallet.adjusted",
            {"walletId": w, "amountMicros": 1_000_000 + i, "reason": "c", "operator": "o"},
            id_=f"z{9 - i}-{unique}"[:200],
        )
        for i in range(10)
    ]
    (r,) = run(app_engine, events)
    positions = [r.positions[e.key] for e in events]
    assert positions == sorted(positions)


def test_auto_stop_when_the_balance_runs_out_writes_a_stop_command(app_engine: Engine, unique: str) -> None:
    w, p = f"w{unique[-39:]}", f"p{unique[-39:]}"
    events = [
        make_event("wallet.adjusted", {"walletId": w, "amountMicros": 1_000_000, "reason": "c", "operator": "o"}),
        make_event(
            "gpu.rental.started",
            {
                "walletId": w,
                "resourceId": p,
                "resourceKind": "pod",
                "gpuType": "A100",
                "gpuCount": 1,
                "tier": "on_demand",
                "pricePerHourMicros": 3_600_000,
            },
            time=T0,
        ),
        # 1000 s at $3.60/h = $1.00: the wallet is at zero.
        make_event(
            "gpu.rental.metered",
            {"walletId": w, "resourceId": p, "uptimeSecondsTotal": 1000},
            time=T0 + timedelta(seconds=1000),
        ),
    ]
    run(app_engine, events, now=T0 + timedelta(seconds=1000))
    rows = q(
        app_engine,
        "SELECT msg_id, payload FROM outbox WHERE subject = 'compute.commands.stop' AND payload->>'walletId' = :w",
        w=w,
    )
    assert len(rows) == 1
    msg_id, payload = rows[0]
    assert payload["resourceId"] == p
    assert payload["action"] == "pause"
    assert payload["reason"] == "balance_exhausted"
    assert payload["commandId"] == msg_id
    notices = q(app_engine, "SELECT payload->>'kind' FROM outbox WHERE subject = :s", s=f"billing.out.notices.{w}")
    assert ("exhausted",) in notices


def test_rental_of_another_wallet_is_refused_even_with_its_owner_in_the_batch(app_engine: Engine, unique: str) -> None:
    # Found by the stateful test: the owner's rentals were loaded into its own state, not into the
    # map of owners, so B's start was applied to B and the save failed (a poison batch).
    a, b, p = f"a{unique[-39:]}", f"b{unique[-39:]}", f"p{unique[-39:]}"
    start = {
        "resourceId": p,
        "resourceKind": "pod",
        "gpuType": "A100",
        "gpuCount": 1,
        "tier": "on_demand",
        "pricePerHourMicros": 1_000_000,
    }
    run(app_engine, [make_event("gpu.rental.started", {"walletId": a, **start})])
    (r,) = run(
        app_engine,
        [
            make_event("gpu.rental.metered", {"walletId": a, "resourceId": p, "uptimeSecondsTotal": 60}),
            make_event("gpu.rental.started", {"walletId": b, **start}),
            make_event("gpu.rental.metered", {"walletId": b, "resourceId": p, "uptimeSecondsTotal": 120}),
        ],
    )
    assert r.dispositions == [Disposition.accepted, Disposition.rejected, Disposition.rejected]
    assert {x.reason for x in r.rejections.values()} == {RejectReason.wallet_mismatch}


def test_batch_lookups_have_no_array_filter_in_their_generic_plans(app_engine: Engine) -> None:
    # psycopg prepares a statement it has run five times and PostgreSQL then settles on a generic
    # plan, where ``col = ANY($1)`` in a scan's filter is searched element by element for every row:
    # the rentals lookup cost 20-40 ms a batch that way at 1,551 rentals (see wallet_store). The
    # generic plan of each lookup of a batch must join its keys instead.
    with app_engine.connect() as conn:
        pg = conn.connection.dbapi_connection
        assert pg is not None
        pg.execute("SET plan_cache_mode = force_generic_plan")
        for n, sql in enumerate((*BATCH_LOOKUPS_SQL, STOPS_ISSUED_SQL, MARK_PUBLISHED_SQL)):
            parts = re.split("%[bs]", sql)
            count = len(parts) - 1
            stmt = "".join(f"{part}${i}" for i, part in enumerate(parts[:-1], start=1)) + parts[-1]
            pg.execute(f"PREPARE lookup_{n} AS {stmt}")
            plan = "\n".join(r[0] for r in pg.execute(f"EXPLAIN EXECUTE lookup_{n}({', '.join(['NULL'] * count)})"))
            assert "ANY" not in plan, f"{sql}\n{plan}"
        pg.rollback()


def test_a_wallet_row_that_would_not_change_is_not_rewritten(app_engine: Engine, unique: str) -> None:
    """Its fields are not rewritten; its version is bumped by the lock of every writer but the
    intake owner (wallet_store.lock_and_read_wallets), so an owner's cached state of it is reloaded."""
    w = f"w{unique[-39:]}"

    def row() -> tuple[Any, ...]:
        (r,) = q(app_engine, "SELECT version, status, updated_at FROM wallets WHERE wallet_id = :w", w=w)
        return tuple(r)

    def balance() -> int:
        (r,) = q(app_engine, "SELECT balance_micros FROM account_balances WHERE account = :a", a=f"wallet:{w}")
        return int(r[0])

    run(app_engine, [adjusted(w, 2_000_000)])
    first = row()
    assert first[1] == "active"
    run(app_engine, [adjusted(w, 3_000_000)], now=NOW + timedelta(seconds=1))
    assert balance() == 5_000_000
    # charged (the balance is account_balances'), the wallet row's fields untouched, its version bumped
    assert row() == (first[0] + 1, *first[1:])
    # A change of the row's own fields is written: the wallet runs dry.
    run(app_engine, [adjusted(w, -5_000_000)], now=NOW + timedelta(seconds=2))
    after = row()
    assert after[0] != first[0]
    assert after[1:] == ("exhausted", NOW + timedelta(seconds=2))
