"""Finance reports over ledgers built through the real batch processor (issue 6)."""

from __future__ import annotations

import itertools
import json
import secrets
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from ledger.db import unit_of_work
from ledger.events import LOG_EVENT_ADAPTER, event_to_json
from ledger.money import rental_cost_micros
from projections import reports
from projections.processor import Incoming, process_batch
from projections.reports import StripeRecord
from tests.factories import make_event

pytestmark = pytest.mark.integration

# Each example books in its own day of 1990, so reports over its window see only its own rows.
_day = itertools.count(1)


def stripe_fact(type_: str, id_: str, at: datetime, data: dict[str, object]):
    return LOG_EVENT_ADAPTER.validate_json(
        json.dumps(
            {"specversion": "1.0", "id": id_, "source": "stripe", "type": type_, "time": at.isoformat(), "data": data}
        )
    )


def process(engine: Engine, events: list, now: datetime) -> None:
    with unit_of_work(engine) as uow:
        process_batch(uow.pg, [Incoming(e, event_to_json(e)) for e in events], now=now)
        uow.commit()


@st.composite
def ledgers(draw):
    n_wallets = draw(st.integers(1, 3))
    plan = []
    for _w in range(n_wallets):
        topups = draw(st.lists(st.integers(5, 200), min_size=1, max_size=3))
        refunds = draw(st.lists(st.integers(1, 4), max_size=2))
        pods = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(
                        [("pod", "on_demand"), ("pod", "spot"), ("marketplace", "on_demand"), ("cluster", "on_demand")]
                    ),
                    st.integers(1, 5_000_000),
                    st.lists(st.integers(0, 20_000), min_size=1, max_size=4),
                ),
                max_size=3,
            )
        )
        jobs = draw(st.lists(st.tuples(st.integers(0, 90_000), st.integers(0, 5_000)), max_size=4))
        plan.append((topups, refunds, pods, jobs))
    return plan


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(plan=ledgers())
def test_statement_identities_and_revenue_equals_charges(app_engine: Engine, plan) -> None:
    base = datetime(1990, 1, 1, tzinfo=UTC) + timedelta(days=next(_day))
    end = base + timedelta(hours=12)
    prefix = secrets.token_hex(4)
    expected_balance: dict[str, int] = {}
    expected_revenue: dict[str, int] = defaultdict(int)
    events = []
    t = base
    for w, (topups, refunds, pods, jobs) in enumerate(plan):
        wid = f"{prefix}-w{w}"
        bal = 0
        for i, usd in enumerate(topups):
            t += timedelta(seconds=1)
            events.append(
                stripe_fact(
                    "stripe.payment.succeeded",
                    f"pi_{prefix}_{w}_{i}",
                    t,
                    {
                        "walletId": wid,
                        "paymentIntentId": f"pi_{prefix}_{w}_{i}",
                        "amountMicros": usd * 1_000_000,
                        "via": "webhook",
                    },
                )
            )
            bal += usd * 1_000_000
        for i, usd in enumerate(refunds):
            t += timedelta(seconds=1)
            events.append(
                stripe_fact(
                    "stripe.refund.succeeded",
                    f"re_{prefix}_{w}_{i}",
                    t,
                    {
                        "walletId": wid,
                        "paymentIntentId": f"pi_{prefix}_{w}_0",
                        "refundId": f"re_{prefix}_{w}_{i}",
                        "amountMicros": usd * 1_000_000,
                    },
                )
            )
            bal -= usd * 1_000_000
        for p, ((kind, tier), price, readings) in enumerate(pods):
            rid = f"{prefix}-w{w}-p{p}"
            t += timedelta(seconds=1)
            events.append(
                make_event(
                    "gpu.rental.started",
                    {
                        "walletId": wid,
                        "resourceId": rid,
                        "resourceKind": kind,
                        "gpuType": "A100",
                        "gpuCount": 1,
                        "tier": tier,
                        "pricePerHourMicros": price,
                    },
                    time=t,
                )
            )
            for r in readings:
                t += timedelta(seconds=1)
                events.append(
                    make_event(
                        "gpu.rental.metered", {"walletId": wid, "resourceId": rid, "uptimeSecondsTotal": r}, time=t
                    )
                )
            cost = rental_cost_micros(max(readings), price)
            product = "pod_spot" if (kind, tier) == ("pod", "spot") else ("pod_on_demand" if kind == "pod" else kind)
            expected_revenue[product] += cost
            bal -= cost
        exact = 0
        for j, (ms, pps) in enumerate(jobs):
            t += timedelta(seconds=1)
            events.append(
                make_event(
                    "serverless.job.completed",
                    {
                        "walletId": wid,
                        "endpointId": f"{prefix}e",
                        "jobId": f"j{j}",
                        "gpuType": "ADA_48",
                        "computeMs": ms,
                        "pricePerSecondMicros": pps,
                        "status": "completed",
                    },
                    time=t,
                )
            )
            exact += ms * pps
        expected_revenue["serverless"] += exact // 1000
        bal -= exact // 1000
        expected_balance[wid] = bal
    process(app_engine, events, now=end)

    with app_engine.connect() as conn:
        for wid, bal in expected_balance.items():
            st_rep = reports.statement(conn, wid, base, end)  # checks opening + movements == closing
            s = st_rep.summary
            assert s["openingBalanceMicros"] == 0
            assert s["closingBalanceMicros"] == bal
            assert (
                s["topupsMicros"]
                + s["chargesMicros"]
                + s["refundsMicros"]
                + s["disputesMicros"]
                + s["adjustmentsMicros"]
            ) == bal
        rev = reports.revenue(conn, base, end, ["product"])
        got = {r[0]: r[1] for r in rev.rows}
        assert got == {k: v for k, v in expected_revenue.items() if v}
        assert rev.summary["totalMicros"] == sum(expected_revenue.values())
        tb = reports.trial_balance(conn, end)
        assert tb.summary["totalMicros"] == 0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 12),
    drop=st.sets(st.integers(0, 11), max_size=4),
    change=st.sets(st.integers(0, 11), max_size=4),
    extra=st.integers(0, 3),
)
def test_reconciliation_finds_every_planted_discrepancy_and_nothing_else(
    app_engine: Engine, n, drop, change, extra
) -> None:
    base = datetime(1990, 1, 1, tzinfo=UTC) + timedelta(days=next(_day))
    end = base + timedelta(hours=1)
    prefix = secrets.token_hex(4)
    events = [
        stripe_fact(
            "stripe.payment.succeeded",
            f"pi_{prefix}_{i}",
            base + timedelta(seconds=i),
            {
                "walletId": f"{prefix}-w",
                "paymentIntentId": f"pi_{prefix}_{i}",
                "amountMicros": (i + 5) * 1_000_000,
                "via": "confirm",
            },
        )
        for i in range(n)
    ]
    process(app_engine, events, now=end)
    with app_engine.connect() as conn:
        ledger_side = reports.ledger_stripe_records(conn, base, end)
    assert len(ledger_side) == n
    stripe_side = []
    for i, rec in enumerate(ledger_side):
        if i in drop:
            continue
        amount = rec.amount_micros + 10_000 if i in change else rec.amount_micros
        stripe_side.append(StripeRecord(rec.kind, rec.stripe_id, amount, rec.wallet_id, rec.created))
    for k in range(extra):
        stripe_side.append(StripeRecord("payment", f"pi_{prefix}_x{k}", 7_000_000, None, base))
    rep = reports.reconcile(ledger_side, stripe_side, base, end)
    dropped = {i for i in drop if i < n}
    changed = {i for i in change if i < n} - dropped
    assert rep.summary["missing_in_stripe"] == len(dropped)
    assert rep.summary["amount_mismatch"] == len(changed)
    assert rep.summary["missing_in_ledger"] == extra
    assert rep.summary["matched"] == n - len(dropped) - len(changed)
    flagged = {(r[0], r[2]) for r in rep.rows if r[0] != "matched"}
    assert flagged == (
        {("missing_in_stripe", f"pi_{prefix}_{i}") for i in dropped}
        | {("amount_mismatch", f"pi_{prefix}_{i}") for i in changed}
        | {("missing_in_ledger", f"pi_{prefix}_x{k}") for k in range(extra)}
    )


def test_debts_lists_wallets_below_zero(app_engine: Engine, unique: str) -> None:
    w, p = f"d{unique[-39:]}", f"p{unique[-39:]}"
    t = datetime(1991, 6, 1, tzinfo=UTC)
    process(
        app_engine,
        [
            make_event(
                "wallet.adjusted",
                {"walletId": w, "amountMicros": 5_000_000, "reason": "credit", "operator": "ops"},
                time=t,
            ),
            make_event(
                "gpu.rental.started",
                {
                    "walletId": w,
                    "resourceId": p,
                    "resourceKind": "pod",
                    "gpuType": "H100",
                    "gpuCount": 1,
                    "tier": "on_demand",
                    "pricePerHourMicros": 5_000_000,
                },
                time=t,
            ),
            make_event(
                "gpu.rental.ended",
                {"walletId": w, "resourceId": p, "uptimeSecondsTotal": 3603, "reason": "auto_stopped"},
                time=t,
            ),
        ],
        now=t + timedelta(hours=1),
    )
    with app_engine.connect() as conn:
        rep = reports.debts(conn)
    assert (w, -4166) in rep.rows


def test_views_are_readable_by_the_read_only_role_and_nothing_more(owner_engine: Engine) -> None:
    with owner_engine.connect() as conn:
        conn.execute(text("SET ROLE billing_readonly"))
        for view in ("ledger_entries", "ledger_account_balances", "ledger_debts", "ledger_revenue_daily"):
            conn.execute(text(f"SELECT * FROM {view} LIMIT 1")).all()
        with pytest.raises(Exception, match="permission denied"):
            conn.execute(
                text("INSERT INTO rejected_inputs (received_at, reason, detail, raw) VALUES (now(), 'x', 'x', '')")
            )


@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_report_cli_prints_the_trial_balance(database, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from consumers.cli import app

    monkeypatch.setenv("BILLING_DATABASE_URL", database.url)
    result = CliRunner().invoke(app, ["report", "trial-balance", "--format", fmt])
    assert result.exit_code == 0, result.output
    if fmt == "json":
        body = json.loads(result.output)
        assert body["totalMicros"] == 0
        assert isinstance(body["rows"], list)
    elif fmt == "csv":
        assert result.output.splitlines()[0] == "account,balanceMicros"
    else:
        assert "trial-balance" in result.output
        assert "totalMicros" in result.output
