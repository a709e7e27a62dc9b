"""`billing verify` against the real PostgreSQL: after the charging vectors and mixed traffic
through the real units of work, the log rebuilds the journal and every projection exactly; each kind
of tampering is reported as exactly that difference, with a non-zero result.

The module runs in a database of its own: the run's shared database also holds events that
test_ledger_store appends with hand-made journals (no rules behind them), which a full rebuild
rightly reports as differences.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, pool, text
from sqlalchemy.engine import make_url

from ledger.db import make_engine, unit_of_work
from ledger.events import (
    STRIPE_SOURCE,
    Event,
    LogEvent,
    StripeDisputeClosed,
    StripeDisputeClosedEvent,
    StripeDisputeOpened,
    StripeDisputeOpenedEvent,
    StripePaymentSucceeded,
    StripePaymentSucceededEvent,
    StripeRefundSucceeded,
    StripeRefundSucceededEvent,
    event_to_json,
)
from ledger.schema import APP_ROLE
from projections.processor import (
    Disposition,
    Incoming,
    admit_rental_request,
    admit_serverless_request,
    process_batch,
    tick_wallets,
)
from projections.verify import COMPARED, VerifyError, VerifyResult, verify, verify_command
from tests.conftest import migrated_database
from tests.factories import T0, make_event
from tests.integration.vectors import load_cases, renamed

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------------ own database


def _plain(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def vdb(pg_server: tuple[str, str]) -> Iterator[str]:
    """Owner's URL of a fresh, migrated database for this module."""
    with migrated_database(pg_server[0], "verify") as url:
        yield url


@pytest.fixture(scope="module")
def vowner(vdb: str) -> Iterator[Engine]:
    engine = create_engine(vdb, poolclass=pool.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def vapp(vdb: str) -> Iterator[Engine]:
    engine = make_engine(vdb, role=APP_ROLE)
    yield engine
    engine.dispose()


# --------------------------------------------------------------------------------------- traffic


def batch(engine: Engine, events: list[LogEvent], now: datetime, **kw: Any) -> list[Disposition]:
    with unit_of_work(engine) as uow:
        result = process_batch(uow.pg, [Incoming(e, event_to_json(e), **kw) for e in events], now=now)
        uow.commit()
    return result.dispositions


def start(w: str, r: str, at: datetime, *, price: int, kind: str = "pod", tier: str = "on_demand", **extra: Any):
    data = {
        "walletId": w,
        "resourceId": r,
        "resourceKind": kind,
        "gpuType": "H100 SXM",
        "gpuCount": 8 if kind == "cluster" else 1,
        "tier": tier,
        "pricePerHourMicros": price,
        **extra,
    }
    return make_event("gpu.rental.started", data, time=at)


def reading(kind: str, w: str, r: str, seconds: int, at: datetime, **extra: Any) -> Event:
    return make_event(kind, {"walletId": w, "resourceId": r, "uptimeSecondsTotal": seconds, **extra}, time=at)


def credit(w: str, amount: int, at: datetime) -> Event:
    data = {"walletId": w, "amountMicros": amount, "reason": "top-up", "operator": "ops"}
    return make_event("wallet.adjusted", data, time=at)


def job(w: str, e: str, j: str, ms: int, price: int, at: datetime, status: str = "completed") -> Event:
    data = {
        "walletId": w,
        "endpointId": e,
        "jobId": j,
        "gpuType": "L4",
        "computeMs": ms,
        "pricePerSecondMicros": price,
        "status": status,
    }
    return make_event("serverless.job.completed", data, time=at)


def stripe_payment(w: str, pi: str, amount: int, at: datetime) -> LogEvent:
    data = StripePaymentSucceeded(wallet_id=w, payment_intent_id=pi, amount_micros=amount, via="webhook")
    return StripePaymentSucceededEvent(specversion="1.0", id=pi, source=STRIPE_SOURCE, time=at, data=data)


def stripe_refund(w: str, pi: str, refund_id: str, amount: int, at: datetime) -> LogEvent:
    data = StripeRefundSucceeded(wallet_id=w, payment_intent_id=pi, refund_id=refund_id, amount_micros=amount)
    return StripeRefundSucceededEvent(specversion="1.0", id=refund_id, source=STRIPE_SOURCE, time=at, data=data)


def stripe_dispute(w: str, pi: str, dispute_id: str, amount: int, at: datetime, won: bool | None = None) -> LogEvent:
    if won is None:
        opened = StripeDisputeOpened(wallet_id=w, payment_intent_id=pi, dispute_id=dispute_id, amount_micros=amount)
        return StripeDisputeOpenedEvent(
            specversion="1.0", id=f"{dispute_id}.opened", source=STRIPE_SOURCE, time=at, data=opened
        )
    closed = StripeDisputeClosed(
        wallet_id=w, payment_intent_id=pi, dispute_id=dispute_id, amount_micros=amount, won=won
    )
    return StripeDisputeClosedEvent(
        specversion="1.0", id=f"{dispute_id}.closed", source=STRIPE_SOURCE, time=at, data=closed
    )


def traffic(app: Engine, prefix: str) -> dict[str, str]:
    """Mixed traffic through every unit of work: top-ups, an admission and its start, spot and
    marketplace and cluster rentals, readings late, early, older and after the settlement, pause,
    resume, end, preemption, serverless jobs (one twice under a new event id), a wallet running dry
    (stop commands), scheduler ticks, refusals, Stripe payments, refunds and disputes in and out of
    order. Returns the names it used."""

    def s(n: int) -> datetime:
        return T0 + timedelta(seconds=n)

    a, b, c = f"{prefix}-wa", f"{prefix}-wb", f"{prefix}-wc"
    pod, spot, mkt, clu = f"{prefix}-pod", f"{prefix}-spot", f"{prefix}-mkt", f"{prefix}-clu"
    ep = f"{prefix}-ep"
    early = reading("gpu.rental.metered", a, pod, 60, s(62))
    assert batch(app, [credit(a, 20_000_000, s(0)), early], s(1)) == [Disposition.accepted, Disposition.retry]
    with unit_of_work(app) as uow:
        answer, _ = admit_rental_request(
            uow.pg,
            wallet_id=a,
            resource_id=pod,
            price_per_hour_micros=3_600_000,
            admission_id=f"{prefix}-adm",
            now=s(1),
        )
        uow.commit()
    assert answer.admitted
    first = [
        start(a, pod, s(2), price=3_600_000, admissionId=f"{prefix}-adm"),
        start(a, spot, s(2), price=1_800_000, tier="spot"),
        start(b, mkt, s(3), price=999_999, kind="marketplace", tier="spot"),
        credit(b, 1_000_000, s(3)),
        start(b, pod, s(4), price=1),  # another wallet's resource: wallet_mismatch
        reading("gpu.rental.metered", a, pod, 30, s(32)),
        reading("gpu.rental.paused", a, spot, 100, s(102)),
        job(c, ep, "j1", 1500, 333, s(5)),
        job(c, ep, "j2", 1500, 333, s(6), status="failed"),
        credit(c, 5_000_000, s(6)),
    ]
    dispositions = batch(app, first, s(120))
    assert dispositions[4] == Disposition.rejected
    assert dispositions.count(Disposition.accepted) == len(first) - 1
    # The early reading is redelivered, now that its rental has started; the start twice is one event.
    assert batch(app, [early, first[0]], s(121)) == [Disposition.accepted, Disposition.duplicate]
    with unit_of_work(app) as uow:
        tick_wallets(uow.pg, [a, b, c], now=s(130))
        for _ in range(3):
            admit_serverless_request(uow.pg, wallet_id=c, endpoint_id=ep, now=s(131))
        uow.commit()
    second = [
        make_event("gpu.rental.resumed", {"walletId": a, "resourceId": spot}, time=s(200)),
        reading(
            "gpu.spot.preempted", a, spot, 400, s(500), noticedAt=s(200).isoformat(), terminatedAt=s(500).isoformat()
        ),
        reading("gpu.rental.metered", a, spot, 300, s(501)),  # below the settlement: a no-op
        reading("gpu.rental.metered", b, mkt, 3600, s(3603)),  # b runs dry: a stop command
        start(b, clu, s(3603), price=7_200_000, kind="cluster"),
        job(c, ep, "j1", 1500, 333, s(3604)),  # the same job under a new event id: charged once
        *(job(c, ep, f"k{i}", 1500 + i, 333, s(3605)) for i in range(8)),
        reading("gpu.rental.ended", a, pod, 3500, s(3600), reason="stopped"),
        reading("gpu.rental.metered", a, pod, 3700, s(3700)),  # above the settlement: rejected
        credit(b, -1, s(3700)),
    ]
    assert batch(app, second, s(3700)).count(Disposition.rejected) == 1
    with unit_of_work(app) as uow:
        tick_wallets(uow.pg, [b], now=s(3800))
        uow.commit()
    third = [
        credit(b, 50_000_000, s(3900)),
        reading("gpu.rental.paused", b, mkt, 3700, s(3900)),
        make_event("gpu.rental.resumed", {"walletId": b, "resourceId": mkt}, time=s(4000)),
        reading("gpu.rental.ended", b, mkt, 4000, s(4300), reason="destroyed"),
        reading("gpu.rental.ended", b, clu, 600, s(4300), reason="auto_stopped"),
    ]
    assert batch(app, third, s(4300)) == [Disposition.accepted] * len(third)
    # Stripe facts (the HTTP intake's path into the same log): a refund and a dispute that arrive
    # before their payment wait for it; a dispute lost, one won; a payment below $5 still credits.
    pi1, pi2 = f"pi_{prefix}_1".replace("-", "_"), f"pi_{prefix}_2".replace("-", "_")
    stripe = [
        stripe_refund(c, pi2, f"re_{pi2}", 1_000_000, s(4400)),
        stripe_dispute(c, pi2, f"dp_{pi2}", 2_000_000, s(4401)),
        stripe_payment(c, pi1, 4_000_000, s(4402)),
        stripe_payment(c, pi2, 10_000_000, s(4403)),
        stripe_dispute(c, pi2, f"dp_{pi2}", 2_000_000, s(4404), won=False),
        stripe_dispute(c, pi1, f"dp_{pi1}", 500_000, s(4405)),
        stripe_dispute(c, pi1, f"dp_{pi1}", 500_000, s(4406), won=True),
    ]
    assert batch(app, stripe[:3], s(4402)) == [Disposition.accepted] * 3
    assert batch(app, [*stripe[3:], stripe[2]], s(4406)) == [Disposition.accepted] * 4 + [Disposition.duplicate]
    return {"a": a, "b": b, "c": c, "pod": pod, "spot": spot, "mkt": mkt, "clu": clu, "ep": ep}


@pytest.fixture(scope="module")
def loaded(vapp: Engine) -> dict[str, str]:
    """The charging vectors (in batches of 1, 7 and 1000) and the mixed traffic, twice each."""
    for size in (1, 7, 1000):
        for case in load_cases():
            events, _, _ = renamed(case)
            for i in range(0, len(events), size):
                batch(vapp, events[i : i + size], T0 + timedelta(minutes=2))
    traffic(vapp, f"x{secrets.token_hex(3)}")
    return traffic(vapp, f"y{secrets.token_hex(3)}")


# ------------------------------------------------------------------------------------------ helpers


def q(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params).all())


def tamper(engine: Engine, *statements: tuple[str, dict[str, Any]]) -> None:
    """As the owner, with the append-only triggers bypassed for this transaction only."""
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        for sql, params in statements:
            assert conn.execute(text(sql), params).rowcount == 1, sql


def differing(result: VerifyResult) -> dict[str, int]:
    return {t.table: t.differing for t in result.tables if t.differing}


def broken(result: VerifyResult) -> list[tuple[str, str, int]]:
    return [(i.side, i.name.split(" (")[0], i.violations) for i in result.invariants if not i.ok]


# -------------------------------------------------------------------------------------------- tests


def test_rebuild_from_the_log_equals_the_projections(vdb: str, vowner: Engine, loaded: dict[str, str], capsys) -> None:
    result = verify(vdb)
    print(result.report())
    assert result.ok, result.report()
    assert result.differences == 0
    assert result.replayed == result.events > 200
    assert result.replay_problems == ()
    assert {t.table for t in result.tables} == {t.name for t in COMPARED}
    assert result.unknown_tables == ()
    for t in result.tables:
        assert t.live_rows == t.rebuilt_rows > 0, t
    # The scratch schema is gone.
    gone = q(vowner, "SELECT count(*) FROM pg_namespace WHERE nspname = :s", s=result.schema)
    assert gone == [(0,)]
    assert "OK: the log rebuilds" in capsys.readouterr().out


def test_verify_limited_to_some_wallets(vdb: str, loaded: dict[str, str]) -> None:
    result = verify(vdb, wallet_ids=[loaded["a"], loaded["b"]])
    assert result.ok, result.report()
    assert result.table("account_balances").live_rows == 2  # the two wallet accounts only
    assert 0 < result.events < verify(vdb).events


def test_keep_leaves_the_scratch_schema_for_a_person(vdb: str, vowner: Engine, loaded: dict[str, str]) -> None:
    schema = f"verify_test_{secrets.token_hex(4)}"
    result = verify(vdb, keep=True, schema=schema, wallet_ids=[loaded["c"]])
    try:
        assert result.ok
        assert result.kept
        assert result.schema == schema
        rows = q(vowner, f"SELECT count(*) FROM {schema}.serverless_jobs")
        assert rows == [(10,)]
        assert q(vowner, "SELECT count(*) FROM public.serverless_jobs WHERE wallet_id = :w", w=loaded["c"]) == [(10,)]
    finally:
        with vowner.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))


def test_a_wrong_balance_is_reported_as_exactly_that(vdb: str, vowner: Engine, loaded: dict[str, str]) -> None:
    account = f"wallet:{loaded['a']}"
    (before,) = q(vowner, "SELECT balance_micros FROM account_balances WHERE account = :a", a=account)[0]
    stmt = "UPDATE account_balances SET balance_micros = balance_micros + :d WHERE account = :a"
    tamper(vowner, (stmt, {"d": 1, "a": account}))
    try:
        result = verify(vdb)
        assert not result.ok
        assert differing(result) == {"account_balances": 1}
        (diff,) = result.table("account_balances").samples
        assert diff.key == {"account": account}
        assert diff.changed_columns == ("balance_micros",)
        assert (diff.live or {})["balance_micros"] == before + 1
        assert (diff.rebuilt or {})["balance_micros"] == before
        assert broken(result) == [("live", "each wallet balance equals the sum of its entries", 1)]
        assert result.replay_problems == ()
        report = result.report()
        assert f"balance_micros: live {before + 1}  rebuilt {before}" in report
        assert report.rstrip().endswith("DIFFERENCES: 2 (see above)")
    finally:
        tamper(vowner, (stmt, {"d": -1, "a": account}))
    assert verify(vdb).ok


def test_a_wrong_rental_is_reported_but_stop_bookkeeping_is_not_compared(
    vdb: str, vowner: Engine, loaded: dict[str, str]
) -> None:
    pod = loaded["pod"]
    ((seconds, charged, seq),) = q(
        vowner, "SELECT billable_seconds, charged_micros, stop_seq FROM rentals WHERE resource_id = :r", r=pod
    )
    stmt = "UPDATE rentals SET stop_seq = :q, stop_attempts = 0, stop_issued_at = NULL WHERE resource_id = :r"
    tamper(vowner, (stmt, {"q": seq + 7, "r": pod}))
    try:
        assert verify(vdb).ok  # the scheduler's bookkeeping is not a fact of the log
        money = "UPDATE rentals SET billable_seconds = :s, charged_micros = :c WHERE resource_id = :r"
        tamper(vowner, (money, {"s": seconds + 1, "c": charged + 1000, "r": pod}))
        try:
            result = verify(vdb)
            assert differing(result) == {"rentals": 1}
            (diff,) = result.table("rentals").samples
            assert diff.key == {"resource_id": pod}
            assert diff.changed_columns == ("billable_seconds", "charged_micros")
            assert (diff.rebuilt or {})["billable_seconds"] == seconds
            assert broken(result) == []
            assert not result.ok
        finally:
            tamper(vowner, (money, {"s": seconds, "c": charged, "r": pod}))
    finally:
        tamper(vowner, (stmt, {"q": seq, "r": pod}))
    assert verify(vdb).ok


def test_an_edited_journal_entry_is_reported_with_the_invariants_it_breaks(
    vdb: str, vowner: Engine, loaded: dict[str, str]
) -> None:
    ((position, txn_no, entry_no, account, amount),) = q(
        vowner,
        "SELECT e.event_position, e.txn_no, e.entry_no, e.account, e.amount_micros FROM journal_entries e"
        " JOIN journal_transactions t USING (event_position, txn_no)"
        " WHERE t.wallet_id = :w AND t.kind = 'charge' ORDER BY 1 LIMIT 1",
        w=loaded["b"],
    )
    stmt = "UPDATE journal_entries SET amount_micros = :v WHERE event_position = :p AND txn_no = :t AND entry_no = :e"
    key = {"p": position, "t": txn_no, "e": entry_no}
    tamper(vowner, (stmt, {"v": amount - 5, **key}))
    try:
        result = verify(vdb)
        assert differing(result) == {"journal_entries": 1}
        (diff,) = result.table("journal_entries").samples
        assert diff.key == {"event_position": position, "txn_no": txn_no, "entry_no": entry_no}
        assert diff.changed_columns == ("amount_micros",)
        assert ((diff.live or {})["amount_micros"], (diff.rebuilt or {})["amount_micros"]) == (amount - 5, amount)
        assert broken(result) == [
            ("live", "every journal transaction sums to zero", 1),
            ("live", "all entries sum to zero", 1),
            ("live", "each wallet balance equals the sum of its entries", 1),
        ]
        bad = next(i for i in result.invariants if not i.ok and "each wallet" in i.name)
        assert bad.samples[0]["account"] == account
    finally:
        tamper(vowner, (stmt, {"v": amount, **key}))
    assert verify(vdb).ok


def test_an_edited_journal_transaction_is_reported(vdb: str, vowner: Engine, loaded: dict[str, str]) -> None:
    ((position, txn_no, memo),) = q(
        vowner,
        "SELECT event_position, txn_no, memo FROM journal_transactions WHERE wallet_id = :w ORDER BY 1 DESC LIMIT 1",
        w=loaded["c"],
    )
    stmt = "UPDATE journal_transactions SET memo = :m WHERE event_position = :p AND txn_no = :t"
    tamper(vowner, (stmt, {"m": memo + " (edited)", "p": position, "t": txn_no}))
    try:
        result = verify(vdb)
        assert differing(result) == {"journal_transactions": 1}
        (diff,) = result.table("journal_transactions").samples
        assert diff.changed_columns == ("memo",)
        assert (diff.rebuilt or {})["memo"] == memo
        assert broken(result) == []
    finally:
        tamper(vowner, (stmt, {"m": memo, "p": position, "t": txn_no}))


def test_a_lost_serverless_job_is_reported(vdb: str, vowner: Engine, loaded: dict[str, str]) -> None:
    w, ep = loaded["c"], loaded["ep"]
    ((position,),) = q(vowner, "SELECT event_position FROM serverless_jobs WHERE wallet_id = :w AND job_id = 'k3'", w=w)
    tamper(vowner, ("DELETE FROM serverless_jobs WHERE wallet_id = :w AND job_id = 'k3'", {"w": w}))
    try:
        result = verify(vdb)
        assert differing(result) == {"serverless_jobs": 1}
        (diff,) = result.table("serverless_jobs").samples
        assert diff.live is None
        assert diff.rebuilt == {"wallet_id": w, "endpoint_id": ep, "job_id": "k3", "event_position": position}
        assert "only rebuilt" in result.report()
    finally:
        tamper(
            vowner,
            (
                "INSERT INTO serverless_jobs VALUES (:w, :e, 'k3', :p)",
                {"w": w, "e": ep, "p": position},
            ),
        )


def test_an_event_the_rules_would_refuse_is_a_replay_problem(vdb: str, vowner: Engine, loaded: dict[str, str]) -> None:
    """An event slipped into the log by hand, for a rental that never started: the replay refuses
    it, so the log cannot be what the intake accepted."""
    ghost = reading("gpu.rental.metered", loaded["a"], f"{loaded['pod']}-ghost", 60, T0)
    with vowner.begin() as conn:
        (position,) = conn.execute(
            text(
                "INSERT INTO events (source, event_id, type, wallet_id, resource_id, event_time, received_at, payload)"
                " VALUES (:s, :i, :t, :w, :r, :et, :rc, CAST(:p AS jsonb)) RETURNING position"
            ),
            {
                "s": ghost.source,
                "i": ghost.id,
                "t": ghost.type,
                "w": ghost.wallet_id,
                "r": ghost.resource_id,
                "et": ghost.time,
                "rc": T0,
                "p": event_to_json(ghost).decode(),
            },
        ).one()
    try:
        result = verify(vdb)
        assert differing(result) == {"events": 1}
        (diff,) = result.table("events").samples
        assert diff.key == {"position": position}
        assert diff.rebuilt is None
        (problem,) = result.replay_problems
        assert (problem.position, problem.event_id, problem.outcome) == (position, ghost.id, "rejected")
        assert problem.detail.startswith("not_started")
        assert broken(result) == []
        assert "FAIL [log] every event replays" in result.report()
    finally:
        tamper(vowner, ("DELETE FROM events WHERE position = :p", {"p": position}))
    assert verify(vdb).ok


def test_the_command_prints_the_report_and_exits_non_zero_on_a_difference(
    vdb: str, vowner: Engine, loaded: dict[str, str], capsys
) -> None:
    assert verify_command(vdb) == 0
    assert "OK: the log rebuilds" in capsys.readouterr().out
    pod = loaded["pod"]
    stmt = "UPDATE rentals SET status = :s WHERE resource_id = :r"
    tamper(vowner, (stmt, {"s": "paused", "r": pod}))
    try:
        assert verify_command(vdb, wallets=[loaded["a"]], limit=1) == 1
        out = capsys.readouterr().out
        assert f'key {{"resource_id":"{pod}"}}' in out
        assert 'status: live "paused"  rebuilt "ended"' in out
    finally:
        tamper(vowner, (stmt, {"s": "ended", "r": pod}))
    assert verify_command(None) == 2


def test_a_wrong_stripe_payment_is_reported(vdb: str, vowner: Engine, loaded: dict[str, str]) -> None:
    ((pi, refunded),) = q(
        vowner,
        "SELECT payment_intent_id, refunded_micros FROM stripe_payments WHERE wallet_id = :w AND refunded_micros > 0",
        w=loaded["c"],
    )
    stmt = "UPDATE stripe_payments SET refunded_micros = :r WHERE payment_intent_id = :p"
    tamper(vowner, (stmt, {"r": 0, "p": pi}))
    try:
        result = verify(vdb, wallet_ids=[loaded["c"]])
        assert differing(result) == {"stripe_payments": 1}
        (diff,) = result.table("stripe_payments").samples
        assert diff.key == {"payment_intent_id": pi}
        assert diff.changed_columns == ("refunded_micros",)
        assert (diff.rebuilt or {})["refunded_micros"] == refunded
    finally:
        tamper(vowner, (stmt, {"r": refunded, "p": pi}))


def test_a_schema_at_another_revision_is_refused_not_compared(vdb: str, vowner: Engine, loaded: dict[str, str]) -> None:
    ((revision,),) = q(vowner, "SELECT version_num FROM alembic_version")
    stmt = "UPDATE alembic_version SET version_num = :v"
    tamper(vowner, (stmt, {"v": "0000_old"}))
    try:
        with pytest.raises(VerifyError, match="run `billing migrate`"):
            verify(vdb)
        assert verify_command(vdb) == 2
    finally:
        tamper(vowner, (stmt, {"v": revision}))
